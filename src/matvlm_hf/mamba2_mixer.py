"""The Mamba-2 mixer that takes the place of a decoder layer's attention module (MambaInLlama's Mamba-2 variant).

in_proj -> [z | x | B | C | dt];  causal depthwise conv + SiLU over [x | B | C];  x and B repeated from the key/value
heads to all heads (like repeat_kv);  SSD scan;  gated RMSNorm with z;  out_proj.
Initialised from attention (paper Eq. 6): x <- W_V, B <- W_K, C <- W_Q, out_proj <- W_O.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .mamba2_ops import (
    causal_conv1d_blc,
    causal_conv1d_step,
    mamba_decode_step,
    rmsnorm_gated,
    ssd_scan,
    ssd_step,
)

#: the keyword under which the installed transformers passes the cache to decoder layers and attention modules, and
#: names it in model outputs: `cache` from 5.2x, `past_key_values` before
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MaTVLMMamba2Mixer(nn.Module):
    """Drop-in replacement for a transformers attention module: same call signature, returns (output, None)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        tc = config.text_config
        self.layer_idx = layer_idx
        self.d_model = tc.hidden_size
        self.nheads, self.headdim = config.mamba_nheads, config.mamba_headdim
        self.ngroups, self.d_state = config.mamba_ngroups, config.mamba_d_state
        self.d_inner, self.d_xb = config.mamba_d_inner, config.mamba_d_xb
        self.d_conv, self.chunk_size = config.mamba_d_conv, config.mamba_chunk_size
        self.eps = config.mamba_norm_eps
        self.use_kernels = config.use_mamba_kernels
        self.conv_dim = 2 * self.d_xb + self.d_inner  # x, B, C
        self.in_proj = nn.Linear(self.d_model, self.d_inner + self.conv_dim + self.nheads, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.d_conv,
            groups=self.conv_dim,
            padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=config.mamba_out_proj_bias)
        self._init_ranges = (
            config.mamba_dt_min,
            config.mamba_dt_max,
            config.mamba_dt_init_floor,
            tuple(config.mamba_A_init_range),
        )

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        """Standard Mamba-2 initialisation of dt_bias (log-uniform dt), A_log (uniform A), D = 1 and the norm."""
        dt_min, dt_max, floor, (a_lo, a_hi) = self._init_ranges
        device = self.dt_bias.device
        dt = torch.exp(
            torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        )
        dt = dt.clamp(min=floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.copy_(self.A_log, torch.log(torch.empty(self.nheads, device=device).uniform_(a_lo, a_hi)))
        init.ones_(self.D)
        init.ones_(self.norm_weight)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        mamba_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states (b, l, d_model) -> ((b, l, d_model), None), the attention module's call convention.

        Called by the decoder layer with the attention module's arguments; `attention_mask` and `position_ids` are
        the attention layers' and unused here. The cache arrives as `cache` (transformers >= 5.2x) or
        `past_key_values` (earlier): a transformers Cache whose layer `layer_idx` is a linear-attention layer.
        `mamba_mask` (b, >= l), 1 = real token, is the 2-D padding mask that `MaTVLMModel.forward` hands down through
        the language model's keyword arguments (its last l columns are used; None = nothing padded): pad positions
        leave the conv and SSM states untouched. Raises ValueError when `use_cache` is set but no cache arrived (a
        decode would silently run without its state) or the cache has no linear-attention layer here."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            raise ValueError(
                f"Mamba layer {self.layer_idx} was called with use_cache=True but received no cache (neither `cache` "
                "nor `past_key_values`): decoding would run without its state. This transformers version passes the "
                "cache under a name MaTVLM does not know; please report it with your transformers version."
            )
        b, l, _ = hidden_states.shape
        mask = mamba_mask[:, -l:, None].to(hidden_states.dtype) if mamba_mask is not None else None
        cache_layer = self._cache_layer(cache)
        continuing = cache_layer is not None and cache_layer.has_previous_state[0]  # states hold earlier tokens
        decoding = continuing and l == 1

        projected = self.in_proj(hidden_states)
        if decoding and mask is None:
            return self.out_proj(self.decode_mix(projected, cache_layer).to(hidden_states.dtype)), None
        z, xBC, dt = projected.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        if mask is not None:  # pad positions must leave the conv and SSM states untouched
            xBC = xBC * mask
        if decoding:
            xBC = causal_conv1d_step(
                xBC[:, 0], cache_layer.conv_states[0], self.conv1d.weight[:, 0], self.conv1d.bias, self.use_kernels
            )[:, None]
        else:
            conv_input = xBC
            if continuing:  # a continued prompt (chunked prefill) needs the previous conv inputs as left context
                conv_input = torch.cat([cache_layer.conv_states[0].transpose(1, 2).to(xBC.dtype), xBC], dim=1)
            if cache_layer is not None:  # keep the last d_conv inputs
                cache.update_conv_state(xBC.transpose(1, 2), self.layer_idx, conv_kernel_size=self.d_conv)
            xBC = causal_conv1d_blc(conv_input, self.conv1d.weight[:, 0], self.conv1d.bias, self.use_kernels)[:, -l:]
        if mask is not None:
            xBC = xBC * mask
        x, B, C = self._heads(xBC)
        dt = nn.functional.softplus(dt.float() + self.dt_bias.float())  # (b, l, h)
        if mask is not None:
            dt = dt * mask.float()
        A = -torch.exp(self.A_log.float())

        if decoding:
            y = ssd_step(
                cache_layer.recurrent_states[0], x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, self.use_kernels
            )[:, None]
        else:
            # a fresh prompt starts from None (not a zero tensor: the kernels specialise on it)
            initial = cache_layer.recurrent_states[0] if continuing else None
            y, final_state = ssd_scan(
                x, dt, A, B, C, self.chunk_size, D=self.D, initial_state=initial, use_kernel=self.use_kernels
            )
            if cache_layer is not None:
                cache.update_recurrent_state(final_state, self.layer_idx)
        y = rmsnorm_gated(y.flatten(-2), z, self.norm_weight, self.eps, self.d_inner // self.ngroups, self.use_kernels)
        return self.out_proj(y.to(hidden_states.dtype)), None

    def decode_mix(self, projected: torch.Tensor, cache_layer: LinearAttentionCacheLayerMixin) -> torch.Tensor:
        """One decode step between the projections: `projected` (b, 1, >= d_inner + conv_dim + nheads), the
        in_proj output [z | x B C | dt] (further columns ignored: the fused decode step's MLP part), -> the gated,
        normalised y (b, 1, d_inner) that out_proj takes. Updates the cache layer's conv and SSM states in place;
        no padding mask (a decode step's token is real). Used by `forward` and `fused_decode_step.py`."""
        conv_state, state = cache_layer.conv_states[0], cache_layer.recurrent_states[0]
        if self.use_kernels:
            y = mamba_decode_step(
                projected[:, 0],
                conv_state,
                self.conv1d.weight[:, 0],
                self.conv1d.bias,
                state,
                self.A_log,
                self.dt_bias,
                self.D,
                self.norm_weight,
                self.eps,
                self.d_inner // self.ngroups,
                self.d_xb,
            )
            if y is not None:
                return y[:, None]
        z, xBC, dt = projected[..., : self.d_inner + self.conv_dim + self.nheads].split(
            [self.d_inner, self.conv_dim, self.nheads], dim=-1
        )
        xBC = causal_conv1d_step(xBC[:, 0], conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, self.use_kernels)
        x, B, C = self._heads(xBC[:, None])
        A = -torch.exp(self.A_log.float())
        y = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, self.use_kernels, dt_bias=self.dt_bias)
        return rmsnorm_gated(
            y.flatten(-2)[:, None], z, self.norm_weight, self.eps, self.d_inner // self.ngroups, self.use_kernels
        )

    def _heads(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, l, conv_dim) -> x (b, l, h, p), B (b, l, h or g, n), C (b, l, g, n): key/value heads repeated to all
        heads, as repeat_kv does."""
        x, B, C = xBC.split([self.d_xb, self.d_xb, self.d_inner], dim=-1)
        x = x.unflatten(-1, (-1, self.headdim))
        B = B.unflatten(-1, (-1, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        if self.d_xb < self.d_inner:
            x = x.repeat_interleave(self.d_inner // self.d_xb, dim=-2)
            B = B.repeat_interleave(self.d_inner // self.d_xb, dim=-2)
        return x, B, C

    def _cache_layer(self, cache: Cache | None) -> LinearAttentionCacheLayerMixin | None:
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
        if not isinstance(layer, LinearAttentionCacheLayerMixin):
            raise ValueError(
                f"Layer {self.layer_idx} is a Mamba layer but the cache holds {type(layer).__name__} there: build the "
                "cache from the model's config, e.g. DynamicCache(config=model.config), or let the model create it."
            )
        return layer
