"""Triton kernels of the fused decode step (fused_decode_step.py) for its attention layers: one kernel where
transformers' modules launch many. Each has a PyTorch reference (transformers' code), used on the CPU, under autograd
(the kernels are forward-only: never used in training) and when Triton is missing; the tests run each kernel against
it (Triton's interpreter on the CPU, compiled on the GPU). The Mamba layers' kernels live in mamba2_ops.py.

- `rotary_and_cache`: rotary embedding of q and k (partial rotary, transformers' `apply_rotary_pos_emb`) and the
  write of k and v into the static cache at its fill pointer: 1 kernel instead of 14.

Measured and dropped: a split-KV ("flash-decoding") attention kernel of our own was slower than cuDNN's SDPA at every
point (H200, bf16, head dim 80: batch 1 / 1K context 17.0 vs 11.3 us, batch 16 / 8K 1080 vs 334 us, batch 1 / 16K
226 vs 48 us; examples/decode_shapes.py): attention stays torch's SDPA.
"""

from __future__ import annotations

import torch

try:  # optional, detected, never required (it ships with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _rotary_cache_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        q_out_ptr,
        k_ptr,
        v_ptr,
        slot_ptr,
        heads,
        kv_heads,
        stride_qkv,
        stride_cos,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        D: tl.constexpr,
        ROT: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (b, h): rotary embedding on the first ROT channels of q[b, h] (and of k[b, h] and the copy of
        v[b, h] into the cache at the fill pointer, for h < kv_heads), rounded as transformers' bf16 ops round:
        (x cos) and (rotate_half(x) sin) each to the input dtype, then their sum."""
        b, h = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        inside = offs < D
        rotated = offs < ROT
        half = ROT // 2
        partner = tl.where(offs < half, offs + half, offs - half)
        sign = tl.where(offs < half, -1.0, 1.0)
        dtype = q_out_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + b * stride_cos + offs, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_cos + offs, mask=rotated, other=0.0).to(tl.float32)
        row = qkv_ptr + b * stride_qkv
        q = _rotate(row + h * D, offs, partner, sign, cos, sin, inside, rotated, dtype)
        tl.store(q_out_ptr + (b * heads + h) * D + offs, q, mask=inside)
        if h < kv_heads:
            slot = tl.load(slot_ptr)
            k = _rotate(row + (heads + h) * D, offs, partner, sign, cos, sin, inside, rotated, dtype)
            tl.store(k_ptr + b * stride_kb + h * stride_kh + slot * stride_kl + offs, k, mask=inside)
            v = tl.load(row + (heads + kv_heads + h) * D + offs, mask=inside, other=0.0)
            tl.store(v_ptr + b * stride_vb + h * stride_vh + slot * stride_vl + offs, v, mask=inside)

    @triton.jit
    def _rotate(ptr, offs, partner, sign, cos, sin, inside, rotated, dtype: tl.constexpr):
        """x cos + rotate_half(x) sin on the rotated channels (each product rounded to dtype first), x elsewhere."""
        x = tl.load(ptr + offs, mask=inside, other=0.0)
        swapped = tl.load(ptr + partner, mask=rotated, other=0.0).to(tl.float32) * sign
        turned = (x.to(tl.float32) * cos).to(dtype).to(tl.float32) + (swapped * sin).to(dtype).to(tl.float32)
        return tl.where(rotated, turned.to(dtype), x)


def rotary_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    heads: int,
    rotary_dims: int,
    interpret: bool = False,
) -> torch.Tensor:
    """One token's q|k|v projection (b, 1, (heads + 2 kv_heads) D) -> q (b, heads, 1, D) with the rotary embedding
    on its first `rotary_dims` channels (partial rotary, transformers' `apply_rotary_pos_emb`, rotate_half
    convention); k, rotated alike, and v are written into the static cache `keys` / `values` (b, kv_heads,
    capacity, D) at position `slot` ((1,) int64 device tensor). cos, sin (b, 1, rotary_dims), the rotary module's
    output. One Triton kernel on CUDA (or in the interpreter, `interpret`) when no gradient is needed; else
    transformers' `apply_rotary_pos_emb` and `index_copy_`, the reference."""
    b = qkv.shape[0]
    d = keys.shape[-1]
    kv_heads = keys.shape[1]
    use_kernel = triton is not None and (qkv.is_cuda or interpret) and not torch.is_grad_enabled()
    layout = qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()  # rows may be strided
    if not (use_kernel and layout and qkv.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

        q, k, v = (
            t.view(b, 1, -1, d).transpose(1, 2) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        )
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary_dims], k[..., :rotary_dims], cos, sin)
        q = torch.cat((q_rot, q[..., rotary_dims:]), dim=-1)
        keys.index_copy_(2, slot, torch.cat((k_rot, k[..., rotary_dims:]), dim=-1))
        values.index_copy_(2, slot, v)
        return q
    q = torch.empty(b, heads, 1, d, dtype=qkv.dtype, device=qkv.device)
    _rotary_cache_kernel[(b, heads)](
        qkv,
        cos,
        sin,
        q,
        keys,
        values,
        slot,
        heads,
        kv_heads,
        qkv.stride(0),
        cos.stride(0),
        *keys.stride()[:3],
        *values.stride()[:3],
        D=d,
        ROT=rotary_dims,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return q
