"""Triton matrix multiplications of the fused decode step (fused_decode_step.py), where a step is a read of the
weights: a batch of at most MAX_ROWS token rows times a weight matrix, and the block's end fused into one GEMM plus
one reduction kernel. Each has a PyTorch reference (F.linear, transformers' `PhiDecoderLayer` sums), used on the
CPU, under autograd (the kernels are forward-only: never used in training) and when Triton is missing; the tests run
each kernel against it (Triton's interpreter on the CPU, compiled on the GPU).

- `decode_linear`: y = x W^T + b for a few rows of x: one program per BLOCK_N rows of W reading all of K, tensor-core
  dots on 16 rows of x; with `gelu_from`, the tanh GELU on the fc1 columns of a fused projection in its epilogue
  (one kernel less per layer). Measured alone on an H200 (bf16, weights not in L2; `examples/decode_shapes.py
  --parts gemm`, LINEAR_TILES, batch 1): [q | k | v | fc1] (17 920 x 2 560) 25.2 us against cuBLAS's 27.1 (3.64 vs
  3.39 TB/s), [in_proj | fc1] 27.7 against 29.6; batch 16: 25.8 against 27.7.
- `block_end`: a parallel block's end, hidden = out_proj(mixed) + fc2(activated) + residual, and the next block's
  LayerNorm. The two projections read different inputs but write the same rows, so they are one GEMM along K (split
  over K into float32 partial sums), and one kernel sums the partials, both biases and the residual and applies the
  LayerNorm: 2 kernels instead of 5 (two GEMMs, cuBLAS's split-K reduction, the residual adds + LayerNorm).

Both launch with programmatic dependent launch where the GPU has it (decode_kernels.dependent_launch). A chain of 32
layers' [q | k | v | fc1] + block end (`examples/decode_shapes.py --parts chain`, H200, bf16, 5 GB of weights, none
from L2): batch 1 1 446 us = 3.48 TB/s with BLOCK_END_TILES and dependent launch, 1 505 without it, 1 638 with the
previous block-end tile (32 x 128, 4 stages); batch 16 1 489 / 1 551 / 1 680. Tried and dropped there: W prefetched
into L2 before the wait (8 or 32 lines a row: 1-25 % slower), W through TMA descriptors (no faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode_kernels import dependent_launch

# the most token rows (batch x 1) the kernels take: 64 rows of x share each read of the weights; beyond that cuBLAS
MAX_ROWS = 64
# the K range of one split of `block_end`'s GEMM (tokens of K): fc2's 10 240 in 4 splits, a 2 560 out_proj in 1
SPLIT_K_LENGTH = 2560

# Triton launch parameters (rows of W per program, columns per tile, warps, pipeline stages): measured on an H200
# over a grid (`examples/decode_shapes.py --parts gemm`)
LINEAR_TILES = {"block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 4}
BLOCK_END_TILES = {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 5}

try:  # optional, detected, never required (it ships with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _gelu_tanh(x):
        """torch's tanh-approximation GELU (F.gelu(approximate="tanh")) in float32, tanh written with exp."""
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))

    @triton.jit
    def _segment_dot(
        acc,
        x_ptr,
        w_ptr,
        M,
        N,
        K,
        stride_x,
        stride_w,
        split,
        splits,
        offs_m,
        offs_n,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """acc (BLOCK_M, BLOCK_N) + x[offs_m, ks] W[offs_n, ks]^T over split `split` of `splits` equal K ranges (whole
        BLOCK_K tiles). PDL (programmatic dependent launch): wait for the kernel before until reading x, and let the
        next kernel launch once the loop is done (at the start, its waiting programs slowed a chain of these GEMMs by
        5 % on the H200)."""
        per_split = tl.cdiv(tl.cdiv(K, splits), BLOCK_K) * BLOCK_K
        start = split * per_split
        end = tl.minimum(start + per_split, K)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for k in range(start, end, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_w + offs_k[None, :],
                mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        return acc

    @triton.jit
    def _decode_matmul_kernel(
        x1_ptr,
        w1_ptr,
        x2_ptr,
        w2_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K1,
        K2,
        stride_x1,
        stride_w1,
        stride_x2,
        stride_w2,
        stride_out,
        gelu_from,
        SPLITS1: tl.constexpr,
        SPLITS2: tl.constexpr,
        HAS_GELU: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (n block, split, m block). Splits [0, SPLITS1) cover x1 W1^T over K1, splits [SPLITS1, SPLITS1 +
        SPLITS2) x2 W2^T over K2. PARTIAL: each split's float32 sum into out (splits, M, N); else (one split) the sum
        plus the bias, rounded to out's dtype, into out (M, N) with row stride stride_out; with HAS_GELU, columns from
        `gelu_from` on through the tanh GELU (in float32 from the rounded value, rounded again: as torch's modules).
        The GELU sits here, not on the loads of the GEMM that reads its output: transforming a loaded tile before
        tl.dot stalls the loop (measured 3-6x slower on the H200)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if split < SPLITS1:
            acc = _segment_dot(
                acc, x1_ptr, w1_ptr, M, N, K1, stride_x1, stride_w1, split, SPLITS1, offs_m, offs_n, BLOCK_K, PDL,
            )  # fmt: skip
        else:
            acc = _segment_dot(
                acc, x2_ptr, w2_ptr, M, N, K2, stride_x2, stride_w2, split - SPLITS1, SPLITS2, offs_m, offs_n,
                BLOCK_K, PDL,
            )  # fmt: skip
        inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if PARTIAL:
            tl.store(out_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=inside)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            out = acc.to(out_ptr.dtype.element_ty)
            if HAS_GELU:
                act = _gelu_tanh(out.to(tl.float32)).to(out_ptr.dtype.element_ty)
                out = tl.where(offs_n[None, :] >= gelu_from, act, out)
            tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out, mask=inside)

    @triton.jit
    def _partials_layernorm_kernel(
        part_ptr,
        bias1_ptr,
        bias2_ptr,
        res_ptr,
        weight_ptr,
        bias_ptr,
        hidden_ptr,
        normed_ptr,
        M,
        eps,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLITS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (row): branches = sum of the splits' partials (splits, M, D) + bias1 + bias2, rounded to the dtype;
        hidden = branches + residual, rounded; normed = LayerNorm(hidden) in float32, rounded."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < D
        dtype = hidden_ptr.dtype.element_ty
        branches = tl.load(bias1_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        branches += tl.load(bias2_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        for s in tl.static_range(SPLITS):  # unrolled: the loads issued together, not one round trip each
            branches += tl.load(part_ptr + (s * M + row) * D + offs, mask=inside, other=0.0)
        res = tl.load(res_ptr + row * D + offs, mask=inside, other=0.0).to(tl.float32)
        hidden = (branches.to(dtype).to(tl.float32) + res).to(dtype)
        tl.store(hidden_ptr + row * D + offs, hidden, mask=inside)
        x = hidden.to(tl.float32)
        mean = tl.sum(x, 0) / D
        centred = tl.where(inside, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / D + tl.cast(eps, tl.float32))  # (float64 under compile)
        weight = tl.load(weight_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row * D + offs, (centred * rstd * weight + bias).to(dtype), mask=inside)


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t (..., K) as a (rows, K) view with unit stride along K and one row stride (e.g. a column slice of a fused
    projection's output), or None where its rows are not so laid out."""
    k = t.shape[-1]
    row_stride, expected = None, None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        row_stride = stride if row_stride is None else row_stride
        expected = stride * size
    if t.stride(-1) != 1 and k > 1:
        return None
    return t.as_strided((t.numel() // k, k), (row_stride if row_stride is not None else k, 1))


def _kernel_rows(x: torch.Tensor, *weights: torch.Tensor, interpret: bool) -> bool:
    """Whether the kernels take x (..., K) against `weights`: Triton present, CUDA (or the interpreter), no gradient
    needed, at most MAX_ROWS rows, fp16 / bf16 throughout, unit stride along K."""
    rows = x.numel() // x.shape[-1]
    return (
        triton is not None
        and (x.is_cuda or interpret)
        and not torch.is_grad_enabled()
        and 0 < rows <= MAX_ROWS
        and x.dtype in (torch.float16, torch.bfloat16)
        and all(w.dtype == x.dtype and w.stride(-1) == 1 for w in weights)
    )


def _block_m(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))  # tl.dot's smallest M is 16


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu_from: int | None = None,
    interpret: bool = False,
    tiles: dict | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias), with the tanh-approximation GELU (F.gelu(approximate="tanh")) applied to output
    columns from `gelu_from` on when given (the fc1 part of a fused projection): x (..., K) with rows of any stride,
    weight (N, K), bias (N,) or None -> (..., N) in x's dtype, float32 accumulation. One Triton kernel (`tiles`
    overrides LINEAR_TILES: block_n rows of W per program, block_k columns per tile, num_warps, num_stages) on CUDA
    (or in the interpreter, `interpret`) for at most MAX_ROWS rows in fp16 / bf16 with no gradient needed; else
    F.linear (cuBLAS) and F.gelu, the reference."""
    usable = _kernel_rows(x, weight, interpret=interpret) and (bias is None or bias.is_contiguous())
    flat = _as_rows(x) if usable else None
    if flat is None:
        out = F.linear(x, weight, bias)
        if gelu_from is None:
            return out
        return torch.cat([out[..., :gelu_from], F.gelu(out[..., gelu_from:], approximate="tanh")], -1)
    n, k = weight.shape
    rows = flat.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    tiles = {**LINEAR_TILES, **(tiles or {})}
    block_m = _block_m(rows)
    pdl = dependent_launch(x)
    grid = (triton.cdiv(n, tiles["block_n"]), 1, triton.cdiv(rows, block_m))
    _decode_matmul_kernel[grid](
        flat, weight, flat, weight, bias if bias is not None else weight, out,
        rows, n, k, 0, flat.stride(0), weight.stride(0), 0, 0, n, n if gelu_from is None else gelu_from,
        SPLITS1=1, SPLITS2=0, HAS_GELU=gelu_from is not None, HAS_BIAS=bias is not None, PARTIAL=False,
        BLOCK_M=block_m, BLOCK_N=tiles["block_n"], BLOCK_K=tiles["block_k"], PDL=pdl,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out


def block_end(
    mixed: torch.Tensor,
    activated: torch.Tensor,
    residual: torch.Tensor,
    out_proj: nn.Linear,
    fc2: nn.Linear,
    norm: nn.Module,
    interpret: bool = False,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A parallel decoder block's end and the next block's start (transformers' `PhiDecoderLayer`: hidden =
    mixer output + MLP output + residual): hidden = out_proj(mixed) + fc2(activated) + residual and norm(hidden).
    mixed (..., K1) and activated (..., K2, fc1's output after the activation) with rows of any stride, residual
    (..., d). Returns (hidden, normed), (..., d) in residual's dtype. On CUDA (or in the interpreter, `interpret`)
    with no gradient needed, at most MAX_ROWS rows in fp16 / bf16 and an `nn.LayerNorm` with weight and bias: two
    Triton kernels, the GEMM split along K (`SPLIT_K_LENGTH` per split; `tiles` overrides BLOCK_END_TILES) into
    float32 partials and their reduction with both biases, the residual and the LayerNorm (the sum is rounded once
    where torch's modules round each branch: results differ within that rounding). Else the modules (the
    reference)."""
    d = residual.shape[-1]
    x1, x2 = _as_rows(mixed), _as_rows(activated)
    use_kernel = (
        type(norm) is nn.LayerNorm
        and norm.normalized_shape == (d,)
        and all(t is not None and t.is_contiguous() for t in (out_proj.bias, fc2.bias, norm.weight, norm.bias))
        and _kernel_rows(mixed, out_proj.weight, fc2.weight, interpret=interpret)
        and activated.dtype == residual.dtype == norm.weight.dtype == mixed.dtype
        and x1 is not None
        and x2 is not None
        and residual.is_contiguous()
    )
    if not use_kernel:
        hidden = out_proj(mixed) + fc2(activated) + residual
        return hidden, norm(hidden)
    k1, k2 = mixed.shape[-1], activated.shape[-1]
    rows = residual.numel() // d
    splits1, splits2 = (max(1, round(k / SPLIT_K_LENGTH)) for k in (k1, k2))
    partials = torch.empty(splits1 + splits2, rows, d, dtype=torch.float32, device=residual.device)
    tiles = {**BLOCK_END_TILES, **(tiles or {})}
    block_m = _block_m(rows)
    pdl = dependent_launch(residual)
    launch = {"launch_pdl": True} if pdl else {}
    grid = (triton.cdiv(d, tiles["block_n"]), splits1 + splits2, triton.cdiv(rows, block_m))
    _decode_matmul_kernel[grid](
        x1, out_proj.weight, x2, fc2.weight, out_proj.bias, partials,
        rows, d, k1, k2, x1.stride(0), out_proj.weight.stride(0), x2.stride(0), fc2.weight.stride(0), 0, d,
        SPLITS1=splits1, SPLITS2=splits2, HAS_GELU=False, HAS_BIAS=False, PARTIAL=True,
        BLOCK_M=block_m, BLOCK_N=tiles["block_n"], BLOCK_K=tiles["block_k"], PDL=pdl,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], **launch,
    )  # fmt: skip
    hidden, normed = torch.empty_like(residual), torch.empty_like(residual)
    _partials_layernorm_kernel[(rows,)](
        partials, out_proj.bias, fc2.bias, residual, norm.weight, norm.bias, hidden, normed,
        rows, norm.eps, D=d, BLOCK=triton.next_power_of_2(d), SPLITS=splits1 + splits2, PDL=pdl, num_warps=8, **launch,
    )  # fmt: skip
    return hidden, normed
