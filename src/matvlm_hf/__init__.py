"""matvlm-hf: MaTVLM hybrid Mamba-2 / attention vision-language models for Hugging Face Transformers.

Importing the package registers the classes with the Auto classes, and marks them for remote-code saving, so a
saved checkpoint also loads with `trust_remote_code=True` where this package is not installed.

The model classes are imported here; the conversion and training API (`convert_tinyllava_to_matvlm`,
`MaTVLMDistillationTrainer`, `DistillationArguments`, `DistillationRecipe`, `LLaVADataset`, `LLaVACollator`, ...)
is imported from `matvlm_hf` too, lazily: on first use, so `import matvlm_hf` loads only the model core.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_matvlm import MaTVLMConfig, mamba_layer_indices
from .modeling_matvlm import MaTVLMForConditionalGeneration, MaTVLMModel, MaTVLMPreTrainedModel
from .processing_matvlm import MaTVLMProcessor

AutoConfig.register(MaTVLMConfig.model_type, MaTVLMConfig, exist_ok=True)
AutoModel.register(MaTVLMConfig, MaTVLMModel, exist_ok=True)
AutoModelForImageTextToText.register(MaTVLMConfig, MaTVLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MaTVLMConfig, MaTVLMProcessor, exist_ok=True)
MaTVLMProcessor.register_for_auto_class("AutoProcessor")
MaTVLMConfig.register_for_auto_class()
MaTVLMModel.register_for_auto_class("AutoModel")
MaTVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

# the public API beyond the model core: name -> the module that defines it (imported on first access)
_LAZY = {
    "convert_tinyllava_to_matvlm": "convert.conversion",
    "import_authors_checkpoint": "convert.authors_checkpoint",
    "export_authors_checkpoint": "convert.authors_checkpoint",
    "write_tinyllava_checkpoint": "convert.fabricate",
    "DistillationRecipe": "training.recipe",
    "build_trainer": "training.trainer_factory",
    "DistillationArguments": "training.distillation",
    "MaTVLMDistillationTrainer": "training.distillation",
    "set_trainable": "training.distillation",
    "LLaVADataset": "training.data",
    "LLaVACollator": "training.data",
    "LLaVADataError": "training.data",
    "UserError": "errors",
}


def __getattr__(name: str):
    """The lazily imported part of the public API (`_LAZY`); AttributeError for anything else."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "MaTVLMConfig",
    "MaTVLMForConditionalGeneration",
    "MaTVLMModel",
    "MaTVLMPreTrainedModel",
    "MaTVLMProcessor",
    "mamba_layer_indices",
    *_LAZY,
]
__version__ = "0.1.0"
