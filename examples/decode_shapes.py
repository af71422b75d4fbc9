"""The decode step's matrix multiplications and attention measured alone, on the GPU (issue 17's "measure shapes
alone first"): which fusions and kernels can bring a TinyLLaVA-3.1B decode step near the bandwidth roofline.

    python examples/decode_shapes.py --out DIR        # CUDA only; writes DIR/decode_shapes.json

Each operation is captured 50 times in one CUDA graph and replayed (so launch overhead is the graph's, as in the
decode step); the time per operation and its achieved bandwidth (bytes of weights / KV read over time) are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from matvlm_hf.decode_kernels import decode_attention
from matvlm_hf.synthetic.benchmark import hbm_bytes_per_s

REPEAT, REPLAYS = 50, 20
HIDDEN, FFN, HEADS, HEAD_DIM = 2560, 10240, 32, 80
MIXER_IN = 2560 + 3 * 2560 + 32  # z | x B C | dt


def graph_us(fn, calls: int = 1) -> float:
    """Microseconds per operation of `fn` (which runs `calls` operations) replayed in a CUDA graph of REPEAT calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (REPEAT * REPLAYS * calls)


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn in (16, 32, 64)
            for bk in (128, 256, 512)
            for w in (4, 8)
            for st in (3, 5)
            if bn * bk <= 16384
        ],
        key=["M", "N", "K"],
    )
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) W (N, K)^T + b, M <= 16: one program per BLOCK_N rows of W, tl.dot on 16 rows of x."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, 16)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            w = tl.load(
                w_ptr + offs_n[:, None] * K + offs_k[None, :],
                mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                other=0.0,
            )
            x = tl.load(
                x_ptr + offs_m[:, None] * K + offs_k[None, :],
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * N + offs_n[None, :],
            acc.to(tl.bfloat16),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )


def triton_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, w, b, y, m, n, k)
    return y


def gemm_rows(bandwidth: float) -> list[dict]:
    """y = x W^T for the decode step's weight shapes (N, K), at batch M = 1 and 16, cuBLAS (F.linear) and a Triton
    GEMV; each graph cycles through copies of the weights totalling >= 256 MB, so no weight is read from L2 (50 MB).
    Also dense|fc2 fused along K with the weight stored transposed (K, N): the layout whose row blocks are disjoint."""
    shapes = {
        "q|k|v|dense (2560x2560)": (HIDDEN, HIDDEN),
        "qkv fused": (3 * HIDDEN, HIDDEN),
        "fc1": (FFN, HIDDEN),
        "qkv+fc1 fused": (3 * HIDDEN + FFN, HIDDEN),
        "mixer in_proj": (MIXER_IN, HIDDEN),
        "in_proj+fc1 fused": (MIXER_IN + FFN, HIDDEN),
        "fc2": (HIDDEN, FFN),
        "dense+fc2 fused (K)": (HIDDEN, HIDDEN + FFN),
        "lm_head": (51200, HIDDEN),
    }
    rows = []
    for m in (1, 16):
        for name, (n, k) in shapes.items():
            copies = max(1, -(-(256 << 20) // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kinds = {"cublas": (lambda w: F.linear(x, w, b), ws)}
            if triton is not None:
                kinds["triton gemv"] = (lambda w: triton_gemv(x, w, b), ws)
            if name.startswith("dense+fc2"):
                kinds["cublas (K,N) layout"] = (lambda t: torch.addmm(b, x, t), [w.t().contiguous() for w in ws])
            for kind, (op, weights) in kinds.items():
                us = graph_us(lambda op=op, weights=weights: [op(w) for w in weights], calls=copies)
                rows.append(
                    {"op": name, "kernel": kind, "m": m, "n": n, "k": k, "us": us, "tb_s": n * k * 2 / us / 1e6}
                )
                print(
                    f"M={m:2d} {name:24s} {kind:20s} N={n:6d} K={k:6d} {us:7.2f} us {rows[-1]['tb_s']:.2f} TB/s",
                    flush=True,
                )
            if "triton gemv" in kinds:
                err = (triton_gemv(x, ws[0], b).float() - F.linear(x, ws[0], b).float()).abs().max().item()
                print(f"   triton gemv max abs diff vs cuBLAS {err:.3g}")
            del ws, kinds
    print(f"(peak {bandwidth / 1e12:.2f} TB/s)")
    return rows


def attention_rows(with_flex: bool) -> list[dict]:
    """One query per sequence against a static cache: SDPA (its default backend, an additive mask) vs FlexAttention
    (torch.compile'd, decoding kernel) with the mask as a score_mod and with a block mask covering the filled part.
    And this project's split-KV kernel (decode_kernels.decode_attention) over a grid of tile sizes / program counts /
    warps, to choose its defaults and where it replaces SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    shapes = ((1, 1024, 1280), (16, 1024, 1280), (1, 8192, 8448), (16, 8192, 8448), (1, 16384, 16640))
    for batch, context, capacity in shapes:
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, HEADS, capacity, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = torch.full((batch, 1, 1, capacity), float("-inf"), device="cuda", dtype=torch.bfloat16)
        mask[..., :context] = 0
        kv_bytes = 2 * batch * HEADS * context * HEAD_DIM * 2

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        flat = mask[:, 0, 0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + flat[b, kv_idx]

        def flex_mod():
            return flex(q, k, v, score_mod=score_mod)

        block = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < context, batch, None, 1, capacity)

        def flex_block():
            return flex(q, k, v, block_mask=block)

        slot = torch.tensor([context - 1], device="cuda")
        ours = [
            (
                f"split n{n} p{p} w{w}",
                lambda n=n, p=p, w=w: decode_attention(
                    q, k, v, mask, slot, HEAD_DIM**-0.5, block_n=n, programs=p, num_warps=w, split_kv=True
                ),
            )
            for n in (32, 64)
            for p in (512, 1024, 2048)
            for w in (4,)
        ]
        reference = sdpa().float().transpose(1, 2).reshape(batch, 1, -1)
        flexes = (("flex score_mod", flex_mod), ("flex block_mask", flex_block)) if with_flex else ()
        named = (("sdpa", sdpa), *flexes, *ours)
        for name, fn in named:
            try:
                err = (fn().float().transpose(1, 2).reshape(batch, 1, -1) - reference).abs().max().item()
                us = graph_us(fn)
            except Exception as e:  # a backend that refuses the shape: say so, go on
                print(f"{name} b={batch} ctx={context}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append({"op": name, "batch": batch, "context": context, "us": us, "tb_s": kv_bytes / us / 1e6})
            print(
                f"attn {name:16s} b={batch:2d} ctx={context:5d} {us:8.2f} us {rows[-1]['tb_s']:.2f} TB/s err {err:.3g}"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="gemm,attention", help="gemm and/or attention (default: both)")
    parser.add_argument("--flex", action="store_true", help="also FlexAttention (compiles, ~1 min)")
    args = parser.parse_args()
    bandwidth = hbm_bytes_per_s("cuda") or 4.8e12
    torch.set_grad_enabled(False)
    parts = args.parts.split(",")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "gemm": gemm_rows(bandwidth) if "gemm" in parts else [],
        "attention": attention_rows(args.flex) if "attention" in parts else [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_shapes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
