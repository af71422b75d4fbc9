"""vLLM plugin: serve MaTVLM checkpoints (teacher and hybrids) with vLLM.

Registered through the `vllm.general_plugins` entry point (pyproject.toml), so after `pip install matvlm-hf[vllm]`
`vllm.LLM(path)` and vLLM's OpenAI server load a checkpoint whose config.json has model_type "matvlm" with no extra
flag. `register()` runs in every vLLM process; it imports nothing heavy (the model class loads lazily).
"""

from __future__ import annotations

ARCHITECTURE = "MaTVLMForConditionalGeneration"


def _mark_layer_types(model_config) -> None:
    """vLLM treats a model class with Mamba support as hybrid unless `hf_config.layer_types` says every layer is
    attention: copy the text config's layer types (a teacher has no Mamba layer, so it runs as a plain decoder)."""
    text_types = model_config.hf_config.text_config.layer_types
    model_config.hf_config.layer_types = ["mamba" if t == "linear_attention" else "full_attention" for t in text_types]


def register() -> None:
    """Register the MaTVLM config with transformers and the model class with vLLM (idempotent)."""
    import matvlm_hf  # noqa: F401 - registers model_type "matvlm" with transformers' AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "matvlm_hf.integrations.vllm.model:MaTVLMForConditionalGeneration")

    class MaTVLMConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            _mark_layer_types(model_config)

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, MaTVLMConfigHook)
