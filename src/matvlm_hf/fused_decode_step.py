"""One decode step of a Phi-family hybrid with fused projections: the fast decoder's step for TinyLLaVA's Phi LM.

Phi's decoder block is parallel: out = x + mixer(ln(x)) + mlp(ln(x)) (transformers' `PhiDecoderLayer`), so the
projections that read the same normalised input are one GEMM: [q | k | v | fc1] in attention layers, [z | x B C |
dt | fc1] (the mixer's in_proj and fc1) in Mamba layers. At decode batch sizes a GEMM is a read of its weights, and
one larger read runs closer to the bandwidth roofline than several small ones. Measured alone on an H200 (bf16,
batch 1, weights not in L2; `examples/decode_shapes.py`): a 2560x2560 projection 7.1 us (1.9 TB/s), q|k|v as one
12.4 us against 3 x 7.1, q|k|v|fc1 27.2 us against 12.4 + 16.0, in_proj|fc1 29.5 us against 16.5 + 16.0.

No second copy of the weights: `packed_rows` moves the Linear layers' weights into one buffer and points each
Linear's weight and bias at its rows (same Parameter objects, same values; transformers' `save_pretrained` clones such
disjoint views when saving). Everything else is transformers' and the mixer's own code: the rotary module,
the static cache's tensors, the mixer's `decode_mix` (on CUDA one kernel, `mamba2_ops.mamba_decode_step`); on CUDA,
an attention layer's rotary embedding, cache write and split-KV attention are one kernel on small caches
(`decode_kernels.attention_step`; rotary + cache write as one kernel and torch's SDPA on larger ones; transformers'
`apply_rotary_pos_emb` + `index_copy_` and SDPA elsewhere),
the fused projections a Triton GEMV and the block's end (the mixer's out-projection and fc2 as one GEMM along K,
GELU inside the projection before it, the residual adds and the next LayerNorm) two kernels (`decode_matmul.py`;
F.linear and the modules elsewhere), all launched with programmatic dependent launch on sm_90+.

`fused_step_for(model, cache)` is the seam: a `PhiFusedDecodeStep` for a Phi LM whose layers it knows, else None
(the decoder then runs transformers' modules: another model family is an addition here, not a rewrite).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode_kernels import SPLIT_KV_MAX_TOKENS, attention_counters, attention_step
from .decode_matmul import block_end, decode_linear
from .mamba2_mixer import MaTVLMMamba2Mixer


def packed_rows(owner: nn.Module, name: str, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of `linears` (same in_features K) as one (sum of out_features, K) tensor and their biases as one
    (sum of out_features,) tensor (zeros where a Linear has none), without a copy kept: on first use (or when the
    Linear layers' tensors moved since, e.g. `.to()`), the weights are moved into one buffer and each Linear's weight
    and bias point at its rows; the result is remembered on `owner` under `name` (a plain attribute: not in the
    state dict). ValueError when the Linear layers differ in K, dtype or device."""
    packed = getattr(owner, name, None)
    if packed is not None and _still_packed(packed, linears):
        return packed
    first = linears[0].weight
    if any(lin.weight.shape[1] != first.shape[1] or lin.weight.dtype != first.dtype for lin in linears) or any(
        lin.weight.device != first.device for lin in linears
    ):
        raise ValueError(f"{name}: the projections to fuse differ in input size, dtype or device")
    rows = sum(lin.out_features for lin in linears)
    weight = torch.empty(rows, first.shape[1], dtype=first.dtype, device=first.device)
    bias = torch.zeros(rows, dtype=first.dtype, device=first.device)
    start = 0
    with torch.no_grad():
        for lin in linears:
            end = start + lin.out_features
            weight[start:end].copy_(lin.weight)
            lin.weight.data = weight[start:end]  # the old storage is freed here
            if lin.bias is not None:
                bias[start:end].copy_(lin.bias)
                lin.bias.data = bias[start:end]
            start = end
    setattr(owner, name, (weight, bias))
    return weight, bias


def _still_packed(packed: tuple[torch.Tensor, torch.Tensor], linears: list[nn.Linear]) -> bool:
    """Whether every Linear's weight and bias still are the rows of `packed` they were pointed at."""
    weight, bias = packed
    start = 0
    for lin in linears:
        if lin.weight.data_ptr() != weight[start].data_ptr() or lin.weight.shape[0] != lin.out_features:
            return False
        if lin.bias is not None and lin.bias.data_ptr() != bias[start:].data_ptr():
            return False
        start += lin.out_features
    return start == weight.shape[0]


# transformers' tanh-approximation GELU classes (Phi-2's "gelu_new" writes its formula out: 8 kernels per call in
# eager mode); torch's fused kernel computes the same function in fp32 inside one kernel, as torch.compile does
_TANH_GELUS = ("NewGELUActivation", "GELUTanh")


def _one_kernel(activation: nn.Module):
    """`activation`, or torch's one-kernel tanh GELU where `activation` is transformers' tanh-approximation GELU."""
    if type(activation).__name__ in _TANH_GELUS:
        return lambda x: F.gelu(x, approximate="tanh")
    return activation


class PhiFusedDecodeStep:
    """Hidden states (b, 1, d) of one new token -> the LM's final hidden states (b, 1, d), through every decoder
    layer with the cache's states updated in place (attention layers: keys / values written at the cache's fill
    pointer, which advances by one; Mamba layers: conv and SSM states). Source: transformers' `PhiDecoderLayer` /
    `PhiAttention` / `PhiMLP` (models/phi/modeling_phi.py) for one token, with the fused projections above."""

    def __init__(self, model, cache) -> None:
        self.lm = model.model.language_model
        self.cache = cache
        activation = self.lm.layers[0].mlp.activation_fn  # stateless, the same in every layer
        self.activation, self.gelu_tanh = _one_kernel(activation), type(activation).__name__ in _TANH_GELUS
        self.fronts, self.fc1_starts, self.backs = [], [], []
        for i, layer in enumerate(self.lm.layers):
            mixer, mlp = layer.self_attn, layer.mlp
            mamba = isinstance(mixer, MaTVLMMamba2Mixer)
            front = [mixer.in_proj] if mamba else [mixer.q_proj, mixer.k_proj, mixer.v_proj]
            self.fronts.append(packed_rows(layer, "_matvlm_fused_front", [*front, mlp.fc1]))
            self.fc1_starts.append(self.fronts[-1][0].shape[0] - mlp.fc1.out_features)  # fc1's first column
            self.backs.append(mixer.out_proj if mamba else mixer.dense)
        # the attention kernel's arrival counters: every batch where it runs (batch x capacity <= SPLIT_KV_MAX_TOKENS)
        heads = self.lm.config.num_attention_heads
        self.counters = attention_counters(next(self.lm.parameters()).device, SPLIT_KV_MAX_TOKENS * heads)

    @staticmethod
    def supports(model) -> bool:
        """Whether this step knows the model's LM: transformers' Phi with its parallel block and no q/k LayerNorm."""
        lm = model.model.language_model
        return lm.config.model_type == "phi" and not getattr(lm.config, "qk_layernorm", False)

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (b, 1, d) embeddings; position_ids (b, 1); mask (b, 1, 1, max_length) additive (0 = attend, the
        dtype's minimum = not) -> final-layernormed hidden states (b, 1, d)."""
        cos, sin = self.lm.rotary_emb(hidden, position_ids)
        # the attention layers' fill pointers (equal; read here: the cache's first prefill replaces the tensors)
        pointers = [layer.cumulative_length for layer in self.cache.layers if hasattr(layer, "cumulative_length")]
        slot = pointers[0].view(1) if pointers else None
        layers = self.lm.layers
        normed = layers[0].input_layernorm(hidden)
        for i, layer in enumerate(layers):
            fc1_start = self.fc1_starts[i]
            # the activation applied in the projection's kernel where it is the tanh GELU
            projected = decode_linear(normed, *self.fronts[i], gelu_from=fc1_start if self.gelu_tanh else None)
            activated = projected[..., fc1_start:]
            if not self.gelu_tanh:
                activated = self.activation(activated)
            if isinstance(layer.self_attn, MaTVLMMamba2Mixer):  # projected: [z | x B C | dt | fc1]
                mixed = layer.self_attn.decode_mix(projected, self.cache.layers[i]).to(hidden.dtype)
            else:  # projected: [q | k | v | fc1]
                qkv = projected[..., :fc1_start]
                mixed = self._attention(layer.self_attn, qkv, self.cache.layers[i], slot, cos, sin, mask)
            # the block's end fused with the next block's LayerNorm (the last block's: the final one)
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.lm.final_layernorm
            hidden, normed = block_end(mixed, activated, hidden, self.backs[i], layer.mlp.fc2, following)
        if pointers:
            torch._foreach_add_(pointers, 1)
        return normed

    def _attention(self, attn, qkv, cache_layer, slot, cos, sin, mask) -> torch.Tensor:
        """qkv (b, 1, 3 d) -> attention output (b, 1, d) before the dense projection; writes k, v at `slot`."""
        heads = attn.config.num_attention_heads
        keys, values = cache_layer.keys, cache_layer.values
        return attention_step(
            qkv, cos, sin, keys, values, mask, slot, heads, attn.rotary_ndims, attn.scaling, self.counters
        )


def fused_step_for(model, cache) -> PhiFusedDecodeStep | None:
    """The fused decode step for `model`'s LM family, or None when there is none (or its weights are not all on one
    device, e.g. offloaded by accelerate's hooks): the decoder then runs transformers' modules."""
    if not PhiFusedDecodeStep.supports(model):
        return None
    devices = {p.device for p in model.model.language_model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return None
    return PhiFusedDecodeStep(model, cache)
