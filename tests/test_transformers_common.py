"""transformers' own common model tests (ModelTesterMixin, ConfigTester; GenerationTesterMixin where the tree has it)
run against a tiny MaTVLM hybrid (Mamba layers 0 and 2 of 4).

The tests come from the `tests/` folder of the transformers source distribution of the installed release:
`MATVLM_TRANSFORMERS_TESTS=$(bash .ci/transformers_tests.sh)`. Without the variable the module is skipped; with
MATVLM_REQUIRE_TRANSFORMERS_TESTS=1 (CI) that is a failure instead.

The sdist ships `tests/test_modeling_common.py`, `tests/test_configuration_common.py` and
`tests/test_processing_common.py` but not three modules they import: `tests/exporters/test_export.py` (the
`ExportTesterMixin` that `ModelTesterMixin` derives from), `tests/generation/test_utils.py` (`GenerationTesterMixin`)
and `tests/utils/test_configuration_utils.py` (`config_common_kwargs`). Where the tree lacks one, an empty stand-in
takes its place so the others import: the export tests and the generation tests are then NOT run (a git checkout of
transformers has the files, and then they are), and `config_common_kwargs` is never read for a composite config like
MaTVLM's (`ConfigTester.check_config_arguments_init` returns first). Each test MaTVLM cannot pass is skipped below,
one by one, with the reason (Llava's own test file's reason where it applies).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
import unittest
from unittest import mock
from pathlib import Path

import pytest
import torch
from transformers.models.auto import modeling_auto

from matvlm_hf import MaTVLMConfig, MaTVLMForConditionalGeneration, MaTVLMModel

_TREE_VAR = "MATVLM_TRANSFORMERS_TESTS"
_PACKAGE = "_transformers_common_tests"  # the tree's own name `tests` would clash with this repository's tests/


def _missing(reason: str):
    if os.environ.get("MATVLM_REQUIRE_TRANSFORMERS_TESTS") == "1":
        pytest.fail(f"MATVLM_REQUIRE_TRANSFORMERS_TESTS=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _import_tree(tree: Path) -> dict[str, types.ModuleType]:
    """Import the tree's common test modules as the package `_transformers_common_tests` (relative imports resolve
    inside `tree`), with empty stand-ins for the modules the sdist does not ship. Returns the modules by name and
    records which stand-ins were used in `STAND_INS`."""
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(tree)]
    sys.modules[_PACKAGE] = package
    stand_ins = {
        "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        "utils.test_configuration_utils": {"config_common_kwargs": {}},
    }
    for name, attrs in stand_ins.items():
        if (tree / (name.replace(".", "/") + ".py")).is_file():
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            full = ".".join([_PACKAGE, *parts[:depth]])
            if full not in sys.modules:
                module = types.ModuleType(full)
                if depth < len(parts):
                    module.__path__ = []
                sys.modules[full] = module
        vars(sys.modules[f"{_PACKAGE}.{name}"]).update(attrs)
        STAND_INS.append(name)
    return {
        name: importlib.import_module(f"{_PACKAGE}.{name}")
        for name in ("test_modeling_common", "test_configuration_common", "generation.test_utils")
    }


STAND_INS: list[str] = []
_tree = os.environ.get(_TREE_VAR)
if not _tree:
    _missing(
        f"{_TREE_VAR} is not set: point it at the tests/ folder of the installed transformers' source "
        f"distribution, e.g. {_TREE_VAR}=$(bash .ci/transformers_tests.sh)"
    )
if not (Path(_tree) / "test_modeling_common.py").is_file():
    _missing(f"{_TREE_VAR}={_tree} has no test_modeling_common.py (run bash .ci/transformers_tests.sh)")
if not (Path(_tree) / "__init__.py").is_file():  # test_configuration_common.py reads it; the sdist leaves it out
    _missing(f"{_TREE_VAR}={_tree} has no __init__.py (bash .ci/transformers_tests.sh adds the git tree's empty one)")
for _dep in ("parameterized",):
    if importlib.util.find_spec(_dep) is None:
        _missing(f"transformers' common tests need {_dep!r}: pip install -e '.[dev]'")
_modules = _import_tree(Path(_tree))
ModelTesterMixin = _modules["test_modeling_common"].ModelTesterMixin
floats_tensor = _modules["test_modeling_common"].floats_tensor
ids_tensor = _modules["test_modeling_common"].ids_tensor
ConfigTester = _modules["test_configuration_common"].ConfigTester
GenerationTesterMixin = _modules["generation.test_utils"].GenerationTesterMixin
HAS_GENERATION_TESTS = "generation.test_utils" not in STAND_INS
NO_GENERATION_TESTS = "the transformers sdist does not ship tests/generation/test_utils.py (GenerationTesterMixin)"


class MaTVLMModelTester:
    """Tiny MaTVLM hybrid for the mixins: a Phi text model of 2 layers (layer 0 Mamba-2, layer 1 attention) and a
    SigLIP tower of 2 layers on 8x8 images (4 patches of 4x4; 3 image tokens after TinyLLaVA's 'patch' selection).
    The image token is id 3, below the text ids (as Llava's tester puts it at 0), so a shrunk vocabulary keeps it."""

    def __init__(self, parent, batch_size: int = 7, text_len: int = 7):
        # batch 7: the eager-vs-SDPA test pads every input to 7 rows with random ids (which may be the image id)
        self.parent = parent
        self.batch_size = batch_size
        self.text_config = dict(
            model_type="phi",
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=512,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        self.vision_config = dict(
            model_type="siglip_vision_model",
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        )
        self.mamba_layers = [0]
        self.image_token_id = 3
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.pad_token_id = self.text_config["pad_token_id"]
        self.is_training = True
        self.image_size = self.vision_config["image_size"]
        self.num_image_tokens = (self.image_size // self.vision_config["patch_size"]) ** 2 - 1
        self.seq_length = text_len + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> MaTVLMConfig:
        return MaTVLMConfig(
            text_config=dict(self.text_config),
            vision_config=dict(self.vision_config),
            mamba_layers=self.mamba_layers,
            mamba_chunk_size=4,
            image_token_id=self.image_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        # text ids above the bos/pad/eos and image ids; one image block at the start of every row (Llava's tester)
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        attention_mask = torch.ones_like(input_ids)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


STRICT_LOADING = (
    "MaTVLM's from_pretrained refuses a checkpoint whose tensors do not fill the model (ValueError naming "
    "them) where transformers initialises missing ones with a warning: deliberate, a MaTVLM checkpoint "
    "missing tensors is always a mistake (tests/test_bad_inputs.py)"
)


UNUSED_VISION_PARAMETERS = (
    "the test wants a gradient for every parameter, but TinyLLaVA reads the vision tower's hidden_states[-2]: its last "
    "encoder layer, post_layernorm and SigLIP pooling head never reach the output (Llava skips these tests too: 'This "
    "architecture seems to not compute gradients properly when using GC')"
)


def _skip(reason: str):
    return unittest.skip(reason)


class MaTVLMCommonTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (MaTVLMModel, MaTVLMForConditionalGeneration)
    all_generative_model_classes = (MaTVLMForConditionalGeneration,)
    pipeline_model_mapping = {}
    _is_composite = True
    additional_model_inputs = ["pixel_values"]  # the eager-vs-SDPA test passes them with input_ids
    test_torchscript = False
    test_pruning = False
    test_head_masking = False

    def setUp(self):
        # the mixin recognises a headless model by transformers' own AutoModel table, where a plugin registered with
        # AutoModel.register is not: list MaTVLMModel there for the test (it leaves out base models from the training
        # tests and takes them as `base_model_class` for the RoPE tests)
        patcher = mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {MaTVLMConfig.model_type: "MaTVLMModel"})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.model_tester = MaTVLMModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=MaTVLMConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "vision_feature_layer"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skipIf(not HAS_GENERATION_TESTS, NO_GENERATION_TESTS)
    def test_generation_tester_mixin_inheritance(self):
        super().test_generation_tester_mixin_inheritance()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # the mixin adds labels for the classes listed in transformers' own auto mappings (Llava's is, a plugin's is
        # not): next-token labels for the model with the LM head, image positions ignored
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is MaTVLMForConditionalGeneration:
            labels = inputs_dict["input_ids"].clone()
            labels[labels == self.model_tester.image_token_id] = -100
            inputs_dict["labels"] = labels
        return inputs_dict

    def _with_head_only(self, test):
        """Run a mixin test on the model with the LM head only: the mixin leaves out headless models by looking them
        up in transformers' own MODEL_MAPPING, where a plugin's MaTVLMModel is not."""
        self.all_model_classes = (MaTVLMForConditionalGeneration,)
        test()

    @_skip(UNUSED_VISION_PARAMETERS)
    def test_training_gradient_checkpointing(self):
        pass

    @_skip(UNUSED_VISION_PARAMETERS)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @_skip(UNUSED_VISION_PARAMETERS)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    def test_reverse_loading_mapping(self, check_keys_were_modified=True):
        # as Llava's test: the checkpoint layout's renames apply to the model with the head only; MaTVLMModel loads
        # from that checkpoint through base_model_prefix
        if "skip_base_model" in inspect.signature(ModelTesterMixin.test_reverse_loading_mapping).parameters:
            super().test_reverse_loading_mapping(check_keys_were_modified, skip_base_model=True)
        else:
            self._with_head_only(
                lambda: super(MaTVLMCommonTest, self).test_reverse_loading_mapping(check_keys_were_modified)
            )

    @_skip(
        "hybrid: the Mamba-2 layers return no attention weights, so fewer attentions than decoder layers come back "
        "(transformers' Mamba hybrids Bamba/Jamba override this test to count attention layers only)"
    )
    def test_attention_outputs(self):
        pass

    @_skip(STRICT_LOADING)
    def test_correct_missing_keys(self):
        pass

    @_skip(STRICT_LOADING)
    def test_model_weights_reload_no_missing_tied_weights(self):
        pass

    @_skip(STRICT_LOADING)
    def test_base_model_prefix_loads_base_weights(self):
        pass

    def _with_text_ids(self, test_name: str) -> None:
        """Run a mixin test whose random text-only input_ids (drawn over the whole vocabulary, no pixel_values) may
        hold the image token id, which MaTVLM refuses without images (ValueError; Llava ignores it): the same ids
        with the image id replaced by the next one, so the test is not flaky."""
        image_id = self.model_tester.image_token_id

        def text_ids(shape, vocab_size, rng=None, name=None):
            ids = ids_tensor(shape, vocab_size, rng=rng, name=name)
            return ids.masked_fill(ids == image_id, image_id + 1)

        with mock.patch.object(_modules["test_modeling_common"], "ids_tensor", text_ids):
            getattr(ModelTesterMixin, test_name)(self)

    # the RoPE tests feed text-only random ids (partial rotation: transformers >= 5.24; the scaling test's three cases
    # are the names parameterized.expand gives)
    for _name in (
        "test_model_rope_with_partial_rotation",
        *(f"test_model_rope_scaling_from_config_{case}" for case in ("0_linear", "1_dynamic", "2_yarn")),
    ):
        if hasattr(ModelTesterMixin, _name):
            locals()[_name] = lambda self, _name=_name: self._with_text_ids(_name)
    del _name
