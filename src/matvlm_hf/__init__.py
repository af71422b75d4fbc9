"""matvlm-hf: MaTVLM hybrid Mamba-2 / attention vision-language models for Hugging Face Transformers.

Importing the package registers the classes with the Auto classes, and marks them for remote-code saving, so a
saved checkpoint also loads with `trust_remote_code=True` where this package is not installed.
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

__all__ = [
    "MaTVLMConfig", "MaTVLMForConditionalGeneration", "MaTVLMModel", "MaTVLMPreTrainedModel", "MaTVLMProcessor", "mamba_layer_indices",
]
__version__ = "0.1.0"
