"""Plotting and YAML are extras: a command that needs a missing one stops before any work, naming the extra."""

import sys
from pathlib import Path

import pytest

from matvlm_hf.errors import UserError


@pytest.fixture
def without(monkeypatch):
    def hide(module):  # `import module` and importlib.util.find_spec(module) now see it missing
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, module, None)

    return hide


def test_quickstart_without_matplotlib_names_the_plots_extra_before_any_work(without, tmp_path):
    from matvlm_hf.synthetic.quickstart import main

    without("matplotlib")
    with pytest.raises(UserError, match=r"matvlm-hf\[plots\]"):
        main(["--workdir", str(tmp_path / "work"), "--fast"])
    assert not (tmp_path / "work").exists()


def test_study_and_bench_without_matplotlib_name_the_plots_extra(without, tmp_path):
    from matvlm_hf.synthetic import benchmark, study

    without("matplotlib")
    with pytest.raises(UserError, match=r"matvlm-hf\[plots\]"):
        study.main(["all", "--workdir", str(tmp_path / "study")])
    with pytest.raises(UserError, match=r"matvlm-hf\[plots\]"):
        benchmark.main(["--size", "tiny", "--out", str(tmp_path / "bench")])
    assert list(tmp_path.iterdir()) == []


def test_distill_config_without_pyyaml_names_the_yaml_extra(without):
    from matvlm_hf.commands.distill import parse_config

    root = Path(__file__).resolve().parents[1]
    paths = ["--student", "s", "--teacher", "t", "--data", "d.json", "--output", "o"]
    without("yaml")
    with pytest.raises(UserError, match=r"matvlm-hf\[yaml\]"):
        parse_config(["--config", str(root / "examples/configs/distill_paper.yaml"), *paths])
