"""The package's top-level API: the README's names import from `matvlm_hf`, they are the library's own objects, and
`import matvlm_hf` stays light (the model core only: no library module, no plotting)."""

import importlib
import subprocess
import sys

import pytest

import matvlm_hf


@pytest.mark.parametrize("name", sorted(matvlm_hf._LAZY))
def test_each_public_name_is_the_defining_module_s_object(name):
    module = importlib.import_module(f"matvlm_hf.{matvlm_hf._LAZY[name]}")
    assert getattr(matvlm_hf, name) is getattr(module, name)
    assert name in dir(matvlm_hf) and name in matvlm_hf.__all__


def test_readme_imports_and_unknown_names():
    from matvlm_hf import (
        DistillationArguments,
        DistillationRecipe,
        LLaVACollator,
        LLaVADataset,
        MaTVLMDistillationTrainer,
        convert_tinyllava_to_matvlm,
    )

    names = (
        DistillationArguments,
        DistillationRecipe,
        LLaVACollator,
        LLaVADataset,
        MaTVLMDistillationTrainer,
        convert_tinyllava_to_matvlm,
    )
    assert [obj.__name__ for obj in names] == [
        "DistillationArguments",
        "DistillationRecipe",
        "LLaVACollator",
        "LLaVADataset",
        "MaTVLMDistillationTrainer",
        "convert_tinyllava_to_matvlm",
    ]
    from matvlm_hf import fabricate  # a submodule (old flat path) still imports through the lazy __getattr__

    assert fabricate.__name__ == "matvlm_hf.convert.fabricate"
    with pytest.raises(AttributeError, match="no_such_name"):
        matvlm_hf.no_such_name  # noqa: B018


def test_import_matvlm_hf_loads_only_the_model_core():
    code = (
        "import sys, matvlm_hf; heavy = ('matvlm_hf.training', 'matvlm_hf.convert', 'matvlm_hf.synthetic', "
        "'matvlm_hf.commands', 'matplotlib'); print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
