"""Triton kernels of the fused decode step (fused_decode_step.py) for its attention layers: one kernel where
transformers' modules launch many (the step's matrix multiplications: decode_matmul.py). Each has a PyTorch reference
(transformers' code), used on the CPU, under autograd (the kernels are forward-only: never used in training) and when
Triton is missing; the tests run each kernel against it (Triton's interpreter on the CPU, compiled on the GPU). The
Mamba layers' kernels live in mamba2_ops.py.

- `rotary_and_cache`: rotary embedding of q and k (partial rotary, transformers' `apply_rotary_pos_emb`) and the
  write of k and v into the static cache at its fill pointer: 1 kernel instead of 14.
- `decode_attention`: one query per sequence against the static cache, split over the keys ("flash-decoding",
  Dao et al. 2023): partial softmax sums per split, then one combine kernel; keys past the fill pointer are not read.
  It beats cuDNN's SDPA only on small caches (H200, bf16, 32 heads of 80, `examples/decode_shapes.py --parts
  attention`: batch 1 / 1K context 9.4 vs 11.3 us; batch 16 / 1K 110 vs 57; batch 1 / 8K 65 vs 29; batch 16 / 8K
  839 vs 321; batch 1 / 16K 111 vs 48: it reaches 1.1-1.6 TB/s where SDPA streams long caches at 2.9-4.2), so it
  runs only where batch x capacity <= SPLIT_KV_MAX_TOKENS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the largest batch x cache capacity (tokens) where the split-KV kernel is faster than SDPA (measured above)
SPLIT_KV_MAX_TOKENS = 2048

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

    @triton.jit
    def _attention_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        slot_ptr,
        part_ptr,
        stats_ptr,
        heads,
        group,
        keys_per_split,
        splits,
        scale,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_mb,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Program (b h, split): the softmax-weighted sum of values over keys [split * keys_per_split, ...) below the
        fill pointer + 1, unnormalised, with its running max and sum (log2 domain): into part / stats."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        kv = h // group
        limit = tl.load(slot_ptr) + 1
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, limit)
        offs_d = tl.arange(0, BLOCK_D)
        inside = offs_d < D
        log2e: tl.constexpr = 1.4426950408889634
        q = tl.load(q_ptr + bh * D + offs_d, mask=inside, other=0.0).to(tl.float32) * (scale * log2e)
        k_base = k_ptr + b * stride_kb + kv * stride_kh
        v_base = v_ptr + b * stride_vb + kv * stride_vh
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            tile = valid[:, None] & inside[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=tile, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=tile, other=0.0)
            bias = tl.load(mask_ptr + b * stride_mb + offs_n, mask=valid, other=0.0).to(tl.float32)
            # the mask's dtype minimum times log2(e) overflows float32: held at -1e30 (a fully masked tile stays finite)
            score = tl.sum(q[None, :] * k.to(tl.float32), 1) + tl.maximum(bias * log2e, -1e30)
            score = tl.where(valid, score, float("-inf"))
            new_top = tl.maximum(top, tl.max(score, 0))
            weight = tl.exp2(score - new_top)
            rescale = tl.exp2(top - new_top)
            total = total * rescale + tl.sum(weight, 0)
            acc = acc * rescale + tl.sum(weight[:, None] * v.to(tl.float32), 0)
            top = new_top
        row = bh * splits + split
        tl.store(part_ptr + row * BLOCK_D + offs_d, acc)
        tl.store(stats_ptr + row * 2, top)
        tl.store(stats_ptr + row * 2 + 1, total)

    @triton.jit
    def _attention_combine_kernel(
        part_ptr, stats_ptr, out_ptr, splits, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr
    ):
        """Program (b h): the splits' partial sums rescaled to their common max and normalised, into out (b, 1, h D)."""
        bh = tl.program_id(0)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        used = offs_s < splits
        rows = bh * splits + offs_s
        top = tl.load(stats_ptr + rows * 2, mask=used, other=float("-inf"))
        total = tl.load(stats_ptr + rows * 2 + 1, mask=used, other=0.0)
        part = tl.load(part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=used[:, None], other=0.0)
        weight = tl.where(top > float("-inf"), tl.exp2(top - tl.max(top, 0)), 0.0)
        out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight * total, 0)
        tl.store(out_ptr + bh * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


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


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    slot: torch.Tensor,
    scale: float,
    interpret: bool = False,
    block_n: int = 64,
    programs: int = 1024,
    num_warps: int = 4,
    split_kv: bool | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over the static cache -> (b, 1, heads D), heads side by side as the dense
    projection reads them. q (b, heads, 1, D); keys / values (b, kv_heads, capacity, D), filled up to position `slot`
    ((1,) int64 device tensor, the position this step wrote); mask (b, 1, 1, capacity) additive (0 = attend, the
    dtype's minimum = not), as transformers' SDPA attention takes it; `scale` multiplies q.k. On CUDA (or in the
    interpreter, `interpret`) with no gradient needed, where it pays (`split_kv`; None: batch x capacity <=
    SPLIT_KV_MAX_TOKENS): two Triton kernels, the keys split so that about `programs` programs run (`block_n` keys per
    tile), and keys past `slot` not read (the mask excludes them). Else torch's `scaled_dot_product_attention`, the
    reference. Softmax in float32 (SDPA rounds the probabilities to the input
    dtype before multiplying the values: results differ within that rounding)."""
    b, heads, _, d = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if split_kv is None:
        split_kv = b * capacity <= SPLIT_KV_MAX_TOKENS
    use_kernel = split_kv and triton is not None and (q.is_cuda or interpret) and not torch.is_grad_enabled()
    layout = q.is_contiguous() and keys.stride(-1) == 1 and values.stride(-1) == 1 and mask.stride(-1) == 1
    if not (use_kernel and layout and heads % kv_heads == 0 and mask.shape[-2] == 1):
        gqa = {"enable_gqa": True} if kv_heads != heads else {}  # torch >= 2.5 knows the argument
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, **gqa)
        return out.transpose(1, 2).reshape(b, 1, heads * d)
    block_d = triton.next_power_of_2(d)
    tiles = triton.cdiv(capacity, block_n)
    tiles_per_split = triton.cdiv(tiles, min(tiles, max(1, triton.cdiv(programs, b * heads))))
    keys_per_split = tiles_per_split * block_n
    splits = triton.cdiv(capacity, keys_per_split)
    part = torch.empty(b * heads * splits, block_d, dtype=torch.float32, device=q.device)
    stats = torch.empty(b * heads * splits, 2, dtype=torch.float32, device=q.device)
    _attention_split_kernel[(b * heads, splits)](
        q,
        keys,
        values,
        mask,
        slot,
        part,
        stats,
        heads,
        heads // kv_heads,
        keys_per_split,
        splits,
        scale,
        *keys.stride()[:3],
        *values.stride()[:3],
        mask.stride(0),
        D=d,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    out = torch.empty(b, 1, heads * d, dtype=q.dtype, device=q.device)
    _attention_combine_kernel[(b * heads,)](
        part, stats, out, splits, D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits)
    )
    return out
