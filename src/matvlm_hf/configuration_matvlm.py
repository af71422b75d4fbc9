"""MaTVLM configuration: a TinyLLaVA-style VLM whose chosen decoder layers use a Mamba-2 mixer instead of attention.

Self-contained (transformers imports only) so it can be saved beside the weights as remote code.
"""

from __future__ import annotations

import copy
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

#: the layer type the cache uses for a Mamba layer (transformers' name for recurrent layers)
MAMBA_LAYER_TYPE = "linear_attention"
SUPPORTED_TEXT_MODEL_TYPES = ("phi", "llama", "qwen2")


class MaTVLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`MaTVLMForConditionalGeneration`].

    Args:
        vision_config (`dict` or `PreTrainedConfig`): the vision tower's config (SigLIP).
        text_config (`dict` or `PreTrainedConfig`): the teacher language model's own config (Phi, Llama or Qwen2).
            Its `layer_types` is rewritten from `mamba_layers` (`"linear_attention"` marks a Mamba layer) so that
            transformers' caches hold conv/SSM states there and key/values elsewhere.
        connector_type (`str`): TinyLLaVA connector; only `"mlp2x_gelu"` (Linear, GELU, Linear).
        vision_feature_layer (`int`): hidden state of the vision tower fed to the connector (TinyLLaVA: -2).
        vision_feature_select_strategy (`str`): `"patch"` drops the first token (TinyLLaVA does this even for SigLIP,
            which has no CLS token), `"cls_patch"` keeps all.
        image_token_id (`int`): id standing for one image feature in `input_ids`; an embedding row the tokenizer does
            not use. Defaults to the last embedding row.
        mamba_layers (`list[int]`): decoder layers whose attention is a Mamba-2 mixer. Empty = the teacher.
        mamba_d_state, mamba_nheads, mamba_headdim, mamba_ngroups, mamba_d_xb: mixer sizes; default to the MaTVLM
            mapping from the attention they replace (d_state = headdim = head_dim, nheads = ngroups = attention heads,
            d_xb = key/value heads x head_dim).
        mamba_d_conv (`int`): causal depthwise conv width. mamba_chunk_size (`int`): SSD chunk length.
        mamba_dt_min, mamba_dt_max, mamba_dt_init_floor, mamba_A_init_range: fresh-initialisation ranges.
        mamba_proj_bias, mamba_out_proj_bias (`bool`): biases of in_proj and out_proj; default to whether the teacher's
            q/k/v and output projections have them (Phi-2: both; Qwen2: in only; Llama: `attention_bias`), so the
            teacher's biases carry over to x/B/C and out (the original MambaInLlama mixer has none).
        mamba_conv_bias (`bool`), mamba_norm_eps (`float`): conv bias and gated RMSNorm epsilon.
        use_mamba_kernels (`bool`): use mamba_ssm / causal_conv1d kernels when installed and on CUDA.
    """

    model_type = "matvlm"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["patch", "cls_patch"] = "patch"
    image_token_id: int | None = None
    mamba_layers: list[int] | None = None
    mamba_d_state: int | None = None
    mamba_nheads: int | None = None
    mamba_headdim: int | None = None
    mamba_ngroups: int | None = None
    mamba_d_xb: int | None = None
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_A_init_range: list[float] | tuple[float, float] = (1.0, 16.0)
    mamba_proj_bias: bool | None = None
    mamba_out_proj_bias: bool | None = None
    mamba_conv_bias: bool = True
    mamba_norm_eps: float = 1e-5
    use_mamba_kernels: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            self.vision_config = CONFIG_MAPPING[self.vision_config.get("model_type", "siglip_vision_model")](
                **{k: v for k, v in self.vision_config.items() if k != "model_type"}
            )
        elif self.vision_config is None:
            self.vision_config = CONFIG_MAPPING["siglip_vision_model"]()
        if isinstance(self.text_config, dict):
            self.text_config = CONFIG_MAPPING[self.text_config.get("model_type", "phi")](
                **{k: v for k, v in self.text_config.items() if k != "model_type"}
            )
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["phi"]()
        if self.text_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"Unsupported language model type {self.text_config.model_type!r}: MaTVLM supports "
                f"{', '.join(SUPPORTED_TEXT_MODEL_TYPES)}."
            )
        if self.connector_type != "mlp2x_gelu":
            raise ValueError(f"Unsupported connector_type {self.connector_type!r}: only 'mlp2x_gelu' is implemented.")
        if self.vision_feature_select_strategy not in ("patch", "cls_patch"):
            raise ValueError(
                "vision_feature_select_strategy must be 'patch' or 'cls_patch', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        tc = self.text_config
        if self.image_token_id is None:
            self.image_token_id = tc.vocab_size - 1
        if not 0 <= self.image_token_id < tc.vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the embedding (vocab_size {tc.vocab_size})."
            )

        n_layers = tc.num_hidden_layers
        layers = sorted({int(i) for i in (self.mamba_layers or [])})
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(
                f"mamba_layers {bad} out of range: the language model has {n_layers} decoder layers "
                f"(0..{n_layers - 1})."
            )
        if len(layers) == n_layers:
            raise ValueError("All decoder layers are Mamba layers: MaTVLM needs at least one attention layer.")
        self.mamba_layers = layers

        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        self.mamba_headdim = self.mamba_headdim or head_dim
        self.mamba_d_state = self.mamba_d_state or head_dim
        self.mamba_nheads = self.mamba_nheads or tc.num_attention_heads
        self.mamba_ngroups = self.mamba_ngroups or tc.num_attention_heads
        self.mamba_d_xb = self.mamba_d_xb or kv_heads * head_dim
        self.mamba_A_init_range = list(self.mamba_A_init_range)
        qkv_bias, o_bias = {"phi": (True, True), "qwen2": (True, False)}.get(
            tc.model_type, (getattr(tc, "attention_bias", False),) * 2
        )
        self.mamba_proj_bias = qkv_bias if self.mamba_proj_bias is None else self.mamba_proj_bias
        self.mamba_out_proj_bias = o_bias if self.mamba_out_proj_bias is None else self.mamba_out_proj_bias
        d_inner = self.mamba_d_inner
        if d_inner != self.mamba_ngroups * self.mamba_d_state:
            raise ValueError(
                f"C has d_inner = nheads x headdim = {d_inner} outputs, which must equal ngroups x d_state "
                f"({self.mamba_ngroups} x {self.mamba_d_state})."
            )
        if self.mamba_d_xb % self.mamba_headdim or self.mamba_d_xb % self.mamba_d_state or d_inner % self.mamba_d_xb:
            raise ValueError(
                f"mamba_d_xb ({self.mamba_d_xb}) must be a multiple of headdim and d_state and divide d_inner "
                f"({d_inner})."
            )

        # transformers' caches read the layer structure from the text config
        tc.layer_types = [MAMBA_LAYER_TYPE if i in layers else self.attention_layer_type(i) for i in range(n_layers)]
        if not self.tie_word_embeddings and tc.tie_word_embeddings:
            self.tie_word_embeddings = tc.tie_word_embeddings
        super().__post_init__(**kwargs)

    def attention_layer_type(self, index: int) -> str:
        """The layer type layer `index` has in the teacher (its attention kind, never the Mamba type)."""
        layer_type = (getattr(self.text_config, "layer_types", None) or ["full_attention"] * (index + 1))[index]
        return "full_attention" if layer_type == MAMBA_LAYER_TYPE else layer_type

    def attention_text_config(self) -> PreTrainedConfig:
        """A copy of the text config with every layer an attention layer: the teacher's language model (for tools
        that build or write the teacher's layers, e.g. the fabricator and the random-layer ablation)."""
        config = copy.deepcopy(self.text_config)
        config.layer_types = [self.attention_layer_type(i) for i in range(config.num_hidden_layers)]
        return config

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_nheads * self.mamba_headdim

    @property
    def num_image_tokens(self) -> int:
        """Image features per image reaching the LM (TinyLLaVA 'patch': every patch but the first)."""
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return patches - 1 if self.vision_feature_select_strategy == "patch" else patches


def mamba_layer_indices(num_layers: int, ratio: float, placement: str = "even") -> list[int]:
    """Which decoder layers become Mamba layers for a given ratio (the MaTVLM / MambaInLlama choice).

    `even` spaces them from layer 0 (25 % of 32 -> [0, 4, ..., 28]); `start`, `middle` and `end` put them in one
    contiguous block (the paper's placement ablation).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mamba ratio must be in [0, 1), got {ratio}.")
    count = round(num_layers * ratio)
    if count == 0:
        return []
    if placement == "even":
        step = num_layers / count
        return sorted({int(i * step) for i in range(count)})
    if placement == "start":
        return list(range(count))
    if placement == "end":
        return list(range(num_layers - count, num_layers))
    if placement == "middle":
        first = (num_layers - count) // 2
        return list(range(first, first + count))
    raise ValueError(f"placement must be one of even, start, middle, end; got {placement!r}.")


__all__ = ["MaTVLMConfig", "mamba_layer_indices"]
