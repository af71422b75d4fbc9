"""`MaTVLMForConditionalGeneration` for vLLM: SigLIP tower (vLLM's) -> mlp2x_gelu connector
-> hybrid language model (language_model.py), with vLLM's hybrid (Mamba state) and multimodal interfaces.

Weights load from the project's safetensors keys: `vision_tower.*` (a transformers-5 SigLIP state dict),
`connector.{0,2}.*`, `language_model.model.*` / `language_model.lm_head.*`; q/k/v and gate/up are stacked into vLLM's
fused projections, a Mamba layer's `A_log` becomes vLLM's `A` (= -exp(A_log), done by its loader) and `norm_weight` its
gated norm's `norm.weight`. The vision tower is built only up to `vision_feature_layer`, so later layers, SigLIP's
post-LayerNorm and pooling head are not loaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator, MambaStateDtypeCalculator
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import get_layer_index, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...configuration_matvlm import MaTVLMConfig
from .language_model import MaTVLMLanguageModel
from .mixer import mamba_state_shape
from .processing import MaTVLMDummyInputsBuilder, MaTVLMMultiModalProcessor, MaTVLMProcessingInfo

#: checkpoint prefix -> module prefix
_PREFIXES = {
    "vision_tower.": "vision_tower.vision_model.",
    "connector.0.": "connector.linear_1.",
    "connector.2.": "connector.linear_2.",
}
#: (fused parameter, checkpoint name, shard id)
_STACKED = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]
_FEATURE_SELECT = {"patch": "default", "cls_patch": "full"}  # MaTVLM strategy -> vLLM's name (default drops token 0)


class MaTVLMConnector(nn.Module):
    """TinyLLaVA's mlp2x_gelu: Linear(vision -> text), GELU, Linear(text -> text); column- then row-parallel.
    (vLLM's LLaVA projector is the same, but importing llava.py needs torchvision.)"""

    def __init__(self, vision_hidden: int, text_hidden: int, quant_config, prefix: str):
        super().__init__()
        self.linear_1 = ColumnParallelLinear(
            vision_hidden, text_hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.linear_1"
        )
        self.act = get_act_fn("gelu")
        self.linear_2 = RowParallelLinear(
            text_hidden, text_hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.linear_2"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


@MULTIMODAL_REGISTRY.register_processor(
    MaTVLMMultiModalProcessor, info=MaTVLMProcessingInfo, dummy_inputs=MaTVLMDummyInputsBuilder
)
class MaTVLMForConditionalGeneration(nn.Module, SupportsMultiModal, IsHybrid, HasInnerState):
    """A MaTVLM checkpoint (teacher or hybrid) served by vLLM."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"MaTVLM takes images only, not {modality!r}.")

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return mamba_state_shape(
            vllm_config.model_config.hf_config,
            vllm_config.parallel_config.tensor_parallel_size,
            vllm_config.num_speculative_tokens,
        )

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.mamba2_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: MaTVLMConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id])
        vc = config.vision_config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = SiglipVisionModel(
                vc,
                quant_config,
                num_hidden_layers_override=get_layer_index(config.vision_feature_layer, vc.num_hidden_layers),
                require_post_norm=False,
                use_head=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.connector = MaTVLMConnector(
                vc.hidden_size, config.text_config.hidden_size, quant_config, maybe_prefix(prefix, "connector")
            )
        with self._mark_language_model(vllm_config):
            self.language_model = MaTVLMLanguageModel(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model")
            )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """pixel_values (n, 3, H, W) -> n tensors (num_image_tokens, hidden): the tower's hidden state at
        `vision_feature_layer` (TinyLLaVA's first token dropped for "patch"), through the connector."""
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        vc = self.config.vision_config
        expected = (3, vc.image_size, vc.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}."
            )
        strategy = _FEATURE_SELECT[self.config.vision_feature_select_strategy]
        features = self.vision_tower(pixel_values.to(self.vision_tower.dtype), feature_select_strategy=strategy)
        return tuple(self.connector(features))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for key, tensor in weights:
            name = key
            for old, new in _PREFIXES.items():
                if name.startswith(old):
                    name = new + name[len(old) :]
                    break
            if name.endswith(".self_attn.A_log"):
                name = name[: -len("A_log")] + "A"
            elif name.endswith(".self_attn.norm_weight"):
                name = name[: -len("norm_weight")] + "norm.weight"
            for fused, part, shard in _STACKED:
                if part + "." in name and name.replace(part, fused) in params:
                    name = name.replace(part, fused)
                    param = params[name]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    if name.startswith("vision_tower."):  # layers past the feature layer, post-LN, pooling head
                        continue
                    raise ValueError(
                        f"Unexpected tensor {key!r} in the checkpoint: this MaTVLM model has no "
                        f"parameter {name!r}. Is config.json from the same checkpoint?"
                    )
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
