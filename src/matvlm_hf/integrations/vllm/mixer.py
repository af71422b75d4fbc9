"""The MaTVLM Mamba-2 mixer on vLLM's `MambaMixer2` (its conv/SSD kernels, state cache, TP sharding).

vLLM's mixer packs in_proj as [z | x | B | C | dt] with x at d_inner and B, C at ngroups x d_state, and one `use_bias`
for in_proj and out_proj. MaTVLM's (src/matvlm_hf/mamba2_mixer.py) differs in two ways only, handled here:

- GQA teachers: x and B come from W_V and W_K at key/value-head width d_xb (< d_inner) and are repeated per head
  group (like repeat_kv) after the causal conv (depthwise, so repeating after the conv is exact). in_proj and conv1d
  are rebuilt at [d_inner, d_xb, d_xb, d_inner, nheads] / [d_xb, d_xb, d_inner], the conv state is 2 d_xb + d_inner
  channels wide, and the post-conv split repeats x and B to d_inner / ngroups x d_state before the SSD kernels.
- biases: in_proj (x/B/C from the teacher's q/k/v biases) and out_proj have separate flags.
Everything else (gated RMSNorm with group size d_inner / ngroups, norm_before_gate False, softplus(dt + dt_bias),
A = -exp(A_log), D skip) is vLLM's code unchanged.
"""

from __future__ import annotations

import torch
from vllm.config import CacheConfig, ModelConfig
from vllm.distributed import divide, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator
from vllm.model_executor.layers.quantization import QuantizationConfig

from ...configuration_matvlm import MaTVLMConfig


def mamba_state_shape(config: MaTVLMConfig, tp_size: int, num_spec: int = 0) -> tuple[tuple[int, ...], ...]:
    """(conv state, SSM state) shapes of one MaTVLM mixer on one TP rank: the conv state holds 2 d_xb + d_inner
    channels (d_xb = key/value width) x (d_conv - 1) steps, the SSM state (nheads / tp, headdim, d_state)."""
    if config.mamba_d_xb % config.mamba_d_state:
        raise ValueError(f"mamba_d_xb {config.mamba_d_xb} must be a multiple of mamba_d_state {config.mamba_d_state}.")
    return MambaStateShapeCalculator.mamba2_state_shape(
        tp_world_size=tp_size,
        intermediate_size=config.mamba_d_inner,
        n_groups=config.mamba_d_xb // config.mamba_d_state,  # B's width: 2 * groups * d_state = 2 d_xb
        num_heads=config.mamba_nheads,
        head_dim=config.mamba_headdim,
        state_size=config.mamba_d_state,
        conv_kernel=config.mamba_d_conv,
        num_spec=num_spec,
    )


class MaTVLMMambaMixer(MambaMixer2):
    """vLLM Mamba-2 mixer with MaTVLM's layout; called like vLLM's attention modules: `(positions, hidden_states)`."""

    def __init__(
        self,
        config: MaTVLMConfig,
        model_config: ModelConfig | None,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        hidden = config.text_config.hidden_size
        d_inner, d_xb, nheads = config.mamba_d_inner, config.mamba_d_xb, config.mamba_nheads
        super().__init__(
            hidden_size=hidden,
            ssm_state_size=config.mamba_d_state,
            conv_kernel_size=config.mamba_d_conv,
            intermediate_size=d_inner,
            use_conv_bias=config.mamba_conv_bias,
            use_bias=config.mamba_proj_bias,
            n_groups=config.mamba_ngroups,
            num_heads=nheads,
            head_dim=config.mamba_headdim,
            rms_norm_eps=config.mamba_norm_eps,
            activation="silu",
            model_config=model_config,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )
        self.matvlm_config = config
        if config.mamba_out_proj_bias != config.mamba_proj_bias:
            self.out_proj = RowParallelLinear(
                d_inner,
                hidden,
                bias=config.mamba_out_proj_bias,
                input_is_parallel=True,
                quant_config=quant_config,
                prefix=f"{prefix}.out_proj",
            )
        self.d_xb = d_xb
        if d_xb == d_inner:  # no GQA: exactly vLLM's layout
            return
        tp = self.tp_size
        if (d_xb // config.mamba_headdim) % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide the key/value heads of the Mamba layers "
                f"({d_xb // config.mamba_headdim})."
            )
        self.in_proj = MergedColumnParallelLinear(
            hidden,
            [d_inner, d_xb, d_xb, d_inner, nheads],
            bias=config.mamba_proj_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.in_proj",
        )
        self.conv1d = MergedColumnParallelLinear(
            config.mamba_d_conv,
            [d_xb, d_xb, d_inner],
            bias=config.mamba_conv_bias,
            quant_config=None,
            prefix=f"{prefix}.conv1d",
        )
        self.conv1d.weight.data = self.conv1d.weight.data.unsqueeze(1)
        self.register_buffer(
            "conv_weights",
            self.conv1d.weight.view(self.conv1d.weight.size(0), self.conv1d.weight.size(2)),
            persistent=False,
        )
        self.conv_dim = 2 * d_xb + d_inner
        self.tped_conv_size = divide(self.conv_dim, tp)
        repeat = d_inner // d_xb
        sizes = [divide(d_xb, tp), divide(d_xb, tp), divide(d_inner, tp)]

        def split_and_repeat(xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # (tokens, conv channels) -> x (tokens, d_inner/tp), B (tokens, ngroups d_state/tp), C: key/value heads
            # repeated to all heads, as repeat_kv does (head h reads key/value head h // repeat)
            x, B, C = torch.split(xBC, sizes, dim=-1)
            x = x.unflatten(-1, (-1, config.mamba_headdim)).repeat_interleave(repeat, dim=-2).flatten(-2)
            B = B.unflatten(-1, (-1, config.mamba_d_state)).repeat_interleave(repeat, dim=-2).flatten(-2)
            return x, B, C

        self.split_hidden_states_B_C_fn = split_and_repeat

    def forward(
        self, positions: torch.Tensor | None = None, hidden_states: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        return super().forward(hidden_states)

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        if self.use_replayssm:
            raise NotImplementedError("MaTVLM Mamba layers do not support --use-replayssm.")
        return mamba_state_shape(self.matvlm_config, get_tensor_model_parallel_world_size(), self.num_spec)
