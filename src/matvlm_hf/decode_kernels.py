"""Triton kernels of the fused decode step (fused_decode_step.py) for its attention layers: one kernel where
transformers' modules launch many (the step's matrix multiplications: decode_matmul.py). Each has a PyTorch reference
(transformers' code), used on the CPU, under autograd (the kernels are forward-only: never used in training) and when
Triton is missing; the tests run each kernel against it (Triton's interpreter on the CPU, compiled on the GPU). The
Mamba layers' kernels live in mamba2_ops.py (a mixer's whole decode step: `mamba_decode_step`).

- `rotary_and_cache`: rotary embedding of q and k (partial rotary, transformers' `apply_rotary_pos_emb`) and the
  write of k and v into the static cache at its fill pointer: 1 kernel instead of 14 (where SDPA attends).
- `attention_step`: rotary, cache write and the attention of one query per sequence against the static cache in ONE
  kernel, split over the keys ("flash-decoding", Dao et al. 2023), the last program of each head combining the
  splits (an arrival counter). Where the cache is small it beats rotary_and_cache + cuDNN's SDPA (H200, bf16, 32
  heads of 80, `examples/decode_shapes.py --parts attention`, h200/decode_shapes_chain_attention.json: batch 1 / 1K
  context 9.5 vs 13.2 us); on longer caches SDPA streams faster (batch 16 / 1K 73 vs 61 us, batch 1 / 8K 36 vs 32),
  so it runs only where batch x capacity <= SPLIT_KV_MAX_TOKENS.
- `dependent_launch`: the step's Triton kernels start while the one before drains (programmatic dependent launch).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# the largest batch x cache capacity (tokens) where the split-KV kernel is faster than SDPA (measured above)
SPLIT_KV_MAX_TOKENS = 2048
# launch the decode step's Triton kernels with programmatic dependent launch where the GPU has it (see
# `dependent_launch`); MATVLM_DEPENDENT_LAUNCH=0 turns it off (for measuring with and without)
DEPENDENT_LAUNCH = os.environ.get("MATVLM_DEPENDENT_LAUNCH", "1") != "0"

try:  # optional, detected, never required (it ships with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def dependent_launch(t: torch.Tensor) -> bool:
    """Whether the decode step's kernels on `t`'s device launch with programmatic dependent launch (CUDA's PDL,
    sm_90 and later, Triton >= 3.3's `launch_pdl`): a kernel's programs are placed on the GPU while the kernel before
    it drains, and wait (`gdc_wait`) before their first read or write of anything but weights until it has finished
    and its writes are visible; the kernel before lets them launch (`gdc_launch_dependents`) at its start, or, for
    the GEMMs, after their main loop (launched at the start, the waiting programs slowed a chain of 32 layers' GEMMs
    by 5 %). CUDA graphs keep the dependency (stream capture turns it into a programmatic edge); a kernel launched
    after one that is not so launched (a torch op) waits for it as usual. Measured on an H200
    (docs/benchmarks/README.md): the whole step at batch 1 / 1K 6 % faster (2.29 -> 2.16 ms, GEMMs then still
    launching their dependents at the start), the 32 layers' GEMMs alone 4 % (launching them after the loop)."""
    # not while torch.compile traces the step (fast_decode_compile): its Triton-kernel wrapper knows no `launch_pdl`
    compiling = torch.compiler.is_compiling()
    return DEPENDENT_LAUNCH and t.is_cuda and not compiling and _gpu_has_dependent_launch(t.device.index)


@functools.cache
def _gpu_has_dependent_launch(index: int | None) -> bool:
    return (
        triton is not None
        and hasattr(tl.extra.cuda, "gdc_wait")  # Triton >= 3.3
        and torch.cuda.get_device_capability(index)[0] >= 9
    )


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
        PDL: tl.constexpr,
    ):
        """Program (b, h): rotary embedding on the first ROT channels of q[b, h] (and of k[b, h] and the copy of
        v[b, h] into the cache at the fill pointer, for h < kv_heads), rounded as transformers' bf16 ops round:
        (x cos) and (rotate_half(x) sin) each to the input dtype, then their sum."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        b, h = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        inside = offs < D
        rotated, partner, sign, cos, sin = _rotary_tables(cos_ptr + b * stride_cos, sin_ptr + b * stride_cos, offs, ROT)
        dtype = q_out_ptr.dtype.element_ty
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
    def _rotary_tables(cos_row, sin_row, offs, ROT: tl.constexpr):
        """One sequence's rotary tables over channels `offs`: which are rotated (the first ROT), each one's
        rotate_half partner and sign, and cos / sin in float32 (1 / 0 past ROT)."""
        rotated = offs < ROT
        half = ROT // 2
        partner = tl.where(offs < half, offs + half, offs - half)
        sign = tl.where(offs < half, -1.0, 1.0)
        cos = tl.load(cos_row + offs, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_row + offs, mask=rotated, other=0.0).to(tl.float32)
        return rotated, partner, sign, cos, sin

    @triton.jit
    def _rotate(ptr, offs, partner, sign, cos, sin, inside, rotated, dtype: tl.constexpr):
        """x cos + rotate_half(x) sin on the rotated channels (each product rounded to dtype first), x elsewhere."""
        x = tl.load(ptr + offs, mask=inside, other=0.0)
        swapped = tl.load(ptr + partner, mask=rotated, other=0.0).to(tl.float32) * sign
        turned = (x.to(tl.float32) * cos).to(dtype).to(tl.float32) + (swapped * sin).to(dtype).to(tl.float32)
        return tl.where(rotated, turned.to(dtype), x)

    @triton.jit
    def _attention_step_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        slot_ptr,
        part_ptr,
        stats_ptr,
        count_ptr,
        out_ptr,
        heads,
        kv_heads,
        keys_per_split,
        splits,
        capacity,
        scale,
        stride_qkv,
        stride_cos,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_mb,
        D: tl.constexpr,
        ROT: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (b h, split): q[b, h] rotated, then the softmax-weighted sum of values over the cached keys
        [split * keys_per_split, ...) before the fill pointer (of `capacity`), unnormalised, with its running max and
        sum (log2 domain), into part / stats. The split holding the fill pointer also takes this step's key and value
        (rotated k, v from qkv), and writes them into the cache there (one program per key/value head). The last
        program of (b, h) to finish (count: arrivals, reset to 0 after) combines the splits into out (b, 1, h D)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        group = heads // kv_heads
        kv = h // group
        slot = tl.load(slot_ptr)
        offs_d = tl.arange(0, BLOCK_D)
        inside = offs_d < D
        rotated, partner, sign, cos, sin = _rotary_tables(
            cos_ptr + b * stride_cos, sin_ptr + b * stride_cos, offs_d, ROT
        )
        dtype = out_ptr.dtype.element_ty
        row = qkv_ptr + b * stride_qkv
        log2e: tl.constexpr = 1.4426950408889634
        q = _rotate(row + h * D, offs_d, partner, sign, cos, sin, inside, rotated, dtype)
        # cast: torch.compile's Triton wrapper passes a Python float as float64, which would spread through the loop
        q = q.to(tl.float32) * tl.cast(scale * log2e, tl.float32)
        # this step's key and value, rotated (used by the split that holds the fill pointer): loaded with the rest
        k_new = _rotate(row + (heads + kv) * D, offs_d, partner, sign, cos, sin, inside, rotated, dtype)
        v_new = tl.load(row + (heads + kv_heads + kv) * D + offs_d, mask=inside, other=0.0)
        k_base = k_ptr + b * stride_kb + kv * stride_kh
        v_base = v_ptr + b * stride_vb + kv * stride_vh
        mask_row = mask_ptr + b * stride_mb
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, capacity)
        end = tl.minimum(stop, slot)  # the cached keys: this step's is not in the cache yet
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        slot_bias = tl.zeros((), tl.float32)  # the mask at the fill pointer, picked from the tile that holds it
        # the whole split is read, to `stop` (not to the fill pointer: the loads then wait for no other load; the
        # kernel runs on small caches only, where reads are latency-bound), and scores past the pointer dropped
        for n0 in range(start, stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            present = offs_n < stop
            tile = present[:, None] & inside[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=tile, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=tile, other=0.0)
            bias = tl.maximum(tl.load(mask_row + offs_n, mask=present, other=0.0).to(tl.float32) * log2e, -1e30)
            slot_bias += tl.sum(tl.where(offs_n == slot, bias, 0.0), 0)
            # the mask's dtype minimum times log2(e) overflows float32: held at -1e30 (a fully masked tile stays finite)
            score = tl.sum(q[None, :] * k.to(tl.float32), 1) + bias
            score = tl.where(offs_n < end, score, float("-inf"))
            new_top = tl.maximum(top, tl.max(score, 0))
            shift = tl.where(new_top > float("-inf"), new_top, 0.0)  # nothing yet: -inf - -inf would be NaN
            weight = tl.exp2(score - shift)
            rescale = tl.exp2(top - shift)
            total = total * rescale + tl.sum(weight, 0)
            acc = acc * rescale + tl.sum(weight[:, None] * v.to(tl.float32), 0)
            top = new_top
        if (slot >= start) & (slot < stop):  # this step's key and value
            if h % group == 0:
                tl.store(k_base + slot * stride_kl + offs_d, k_new, mask=inside)
                tl.store(v_base + slot * stride_vl + offs_d, v_new, mask=inside)
            score = tl.sum(q * k_new.to(tl.float32), 0) + slot_bias
            new_top = tl.maximum(top, score)
            weight = tl.exp2(score - new_top)
            rescale = tl.exp2(top - new_top)
            total = total * rescale + weight
            acc = acc * rescale + weight * v_new.to(tl.float32)
            top = new_top
        part_row = bh * splits + split
        tl.store(part_ptr + part_row * BLOCK_D + offs_d, acc)
        tl.store(stats_ptr + part_row * 2, top)
        tl.store(stats_ptr + part_row * 2 + 1, total)
        # every thread's stores before the arrival (a release at GPU scope); the last to arrive reads them all
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel") == splits - 1:
            offs_s = tl.arange(0, BLOCK_S)
            used = offs_s < splits
            rows = bh * splits + offs_s
            tops = tl.load(stats_ptr + rows * 2, mask=used, other=float("-inf"), cache_modifier=".cg")
            totals = tl.load(stats_ptr + rows * 2 + 1, mask=used, other=0.0, cache_modifier=".cg")
            parts = tl.load(
                part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :],
                mask=used[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            weights = tl.where(tops > float("-inf"), tl.exp2(tops - tl.max(tops, 0)), 0.0)
            out = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights * totals, 0)
            tl.store(out_ptr + bh * D + offs_d, out.to(dtype), mask=inside)
            tl.store(count_ptr + bh, 0)


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
    pdl = dependent_launch(qkv)
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
        PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )
    return q


def attention_counters(device: torch.device | str, rows: int) -> torch.Tensor:
    """Zeroed arrival counters for `attention_step`'s kernel, one per (sequence, head) `rows`: the kernel leaves them
    at zero, so one buffer serves every layer and step (allocate it outside a CUDA graph capture)."""
    return torch.zeros(rows, dtype=torch.int32, device=device)


def attention_step(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    slot: torch.Tensor,
    heads: int,
    rotary_dims: int,
    scale: float,
    counters: torch.Tensor | None = None,
    interpret: bool = False,
    block_n: int = 32,
    programs: int = 1024,
    num_warps: int = 2,
    split_kv: bool | None = None,
) -> torch.Tensor:
    """An attention layer's decode step between its projections: one token's q|k|v projection (b, 1, (heads + 2
    kv_heads) D) -> attention output (b, 1, heads D), heads side by side as the dense projection reads them. q and k
    get the rotary embedding on their first `rotary_dims` channels (cos, sin (b, 1, rotary_dims): the rotary module's
    output); k and v are written into the static cache `keys` / `values` (b, kv_heads, capacity, D) at position
    `slot` ((1,) int64 device tensor), and q attends to the cache up to it: mask (b, 1, 1, capacity) additive (0 =
    attend, the dtype's minimum = not), as transformers' SDPA attention takes it; `scale` multiplies q.k.

    On CUDA (or in the interpreter, `interpret`) with no gradient needed, where it pays (`split_kv`; None: batch x
    capacity <= SPLIT_KV_MAX_TOKENS): one Triton kernel ("flash-decoding", Dao et al. 2023), the keys split so that
    about `programs` programs run (`block_n` keys per tile), keys past `slot` not read, softmax in float32 (SDPA
    rounds the probabilities to the input dtype before multiplying the values: results differ within that
    rounding); the last program of each head combines the splits, counted in `counters` (from `attention_counters`,
    >= b x heads; None: allocated here). Else `rotary_and_cache` and torch's `scaled_dot_product_attention`, the
    reference."""
    b, d = qkv.shape[0], keys.shape[-1]
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if split_kv is None:
        split_kv = b * capacity <= SPLIT_KV_MAX_TOKENS
    use_kernel = split_kv and triton is not None and (qkv.is_cuda or interpret) and not torch.is_grad_enabled()
    layout = (
        qkv.stride(-1) == 1
        and cos.stride(-1) == 1
        and sin.stride() == cos.stride()
        and keys.stride(-1) == 1
        and values.stride(-1) == 1
        and mask.stride(-1) == 1
    )
    if not (use_kernel and layout and heads % kv_heads == 0 and mask.shape[-2] == 1 and qkv.dtype != torch.float64):
        q = rotary_and_cache(qkv, cos, sin, keys, values, slot, heads, rotary_dims, interpret=interpret)
        gqa = {"enable_gqa": True} if kv_heads != heads else {}  # torch >= 2.5 knows the argument
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, **gqa)
        return out.transpose(1, 2).reshape(b, 1, heads * d)
    block_d = triton.next_power_of_2(d)
    tiles = triton.cdiv(capacity, block_n)
    tiles_per_split = triton.cdiv(tiles, min(tiles, max(1, triton.cdiv(programs, b * heads))))
    keys_per_split = tiles_per_split * block_n
    splits = triton.cdiv(capacity, keys_per_split)
    part = torch.empty(b * heads * splits, block_d, dtype=torch.float32, device=qkv.device)
    stats = torch.empty(b * heads * splits, 2, dtype=torch.float32, device=qkv.device)
    if counters is None or counters.numel() < b * heads:
        counters = attention_counters(qkv.device, b * heads)
    out = torch.empty(b, 1, heads * d, dtype=qkv.dtype, device=qkv.device)
    pdl = dependent_launch(qkv)
    _attention_step_kernel[(b * heads, splits)](
        qkv, cos, sin, keys, values, mask, slot, part, stats, counters, out,
        heads, kv_heads, keys_per_split, splits, capacity, scale, qkv.stride(0), cos.stride(0), *keys.stride()[:3],
        *values.stride()[:3], mask.stride(0),
        D=d, ROT=rotary_dims, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(splits), PDL=pdl,
        num_warps=num_warps, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out
