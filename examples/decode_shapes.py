"""The decode step's matrix multiplications and attention measured alone, on the GPU (issue 17's "measure shapes
alone first"): which fusions and kernels can bring a TinyLLaVA-3.1B decode step near the bandwidth roofline.

    python examples/decode_shapes.py --out DIR        # CUDA only; writes DIR/decode_shapes.json (DIR new or empty)
    python examples/decode_shapes.py --parts chain --out DIR   # 32 layers' GEMMs in a row: dependent launch, tiles
    python examples/decode_shapes.py --parts mamba --out DIR   # a Mamba layer's step: unfused vs one kernel

Each operation is captured 50 times in one CUDA graph and replayed (so launch overhead is the graph's, as in the
decode step); the time per operation and its achieved bandwidth (bytes of weights / KV read over time) are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch import nn

from matvlm_hf.decode_kernels import attention_counters, attention_step
from matvlm_hf.decode_matmul import BLOCK_END_TILES, LINEAR_TILES, block_end, decode_linear
from matvlm_hf.safe_output import staged_output
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


# the tile grid swept for decode_matmul's kernels: (block_n, block_k, num_warps, num_stages)
TILES = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for w, st in ((4, 3), (4, 4), (4, 5), (8, 4))]


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    """Copies of an (n, k) bf16 weight totalling >= 256 MB, so that a graph cycling through them reads none from L2."""
    return [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(-(-(256 << 20) // (n * k * 2)))
    ]


def gemm_rows(bandwidth: float) -> list[dict]:
    """The decode step's weight reads at batch M = 1 and 16: y = x W^T + b for the fused projections and the LM head,
    cuBLAS (F.linear, without the GELU) against decode_matmul.decode_linear (with GELU on fc1's columns) over TILES;
    and a block's end (out-projection + fc2 + residual adds + LayerNorm), the modules (cuBLAS) against
    decode_matmul.block_end over TILES. Each graph cycles
    through weight copies totalling >= 256 MB, so no weight is read from L2 (50 MB)."""
    shapes = {
        "q|k|v|fc1": (3 * HIDDEN + FFN, HIDDEN),
        "in_proj|fc1": (MIXER_IN + FFN, HIDDEN),
        "lm_head": (51200, HIDDEN),
    }
    rows = []

    def record(m, op, kind, n, k, us, tiles=None):
        rows.append({"op": op, "kernel": kind, "m": m, "n": n, "k": k, "us": us, "tb_s": n * k * 2 / us / 1e6})
        if tiles is not None:
            rows[-1]["tiles"] = dict(zip(TILE_KEYS, tiles))
        print(f"M={m:2d} {op:12s} {kind:24s} N={n:6d} K={k:6d} {us:7.2f} us {rows[-1]['tb_s']:.2f} TB/s {tiles or ''}")

    for m in (1, 16):
        for name, (n, k) in shapes.items():
            ws = weight_copies(n, k)
            b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16)
            us = graph_us(lambda: [F.linear(x, w, b) for w in ws], calls=len(ws))
            record(m, name, "cublas", n, k, us)
            gelu_from = n - FFN if name != "lm_head" else None  # the fused projections: GELU on fc1's columns
            timed = sweep(
                lambda t: graph_us(lambda: [decode_linear(x, w, b, gelu_from, **tile_kwargs(t)) for w in ws], len(ws))
            )
            default = tuple(LINEAR_TILES[key] for key in TILE_KEYS)
            record(m, name, "decode_linear default", n, k, timed[default], default)
            best = min(timed, key=timed.get)
            record(m, name, "decode_linear best", n, k, timed[best], best)
        # the block's end: out-projection (2560 x 2560) + fc2 (2560 x 10240) read as one split-K GEMM
        n, k1, k2 = HIDDEN, HIDDEN, FFN
        pairs = list(zip(weight_copies(n, k1), weight_copies(n, k2)))
        mods = []
        for w1, w2 in pairs:
            out_proj, fc2 = (
                nn.Linear(k1, n, device="cuda", dtype=torch.bfloat16),
                nn.Linear(k2, n, device="cuda", dtype=torch.bfloat16),
            )
            out_proj.weight.data, fc2.weight.data = w1, w2
            mods.append((out_proj, fc2))
        norm = nn.LayerNorm(n, device="cuda", dtype=torch.bfloat16)
        mixed, activated, res = (torch.randn(m, 1, d, device="cuda", dtype=torch.bfloat16) for d in (k1, k2, n))

        def modules():
            for out_proj, fc2 in mods:
                hidden = out_proj(mixed) + fc2(activated) + res
                norm(hidden)

        def kernels(t):
            for out_proj, fc2 in mods:
                block_end(mixed, activated, res, out_proj, fc2, norm, **tile_kwargs(t))

        record(m, "block end", "modules (cublas)", n, k1 + k2, graph_us(modules, len(mods)))
        timed = sweep(lambda t: graph_us(lambda: kernels(t), len(mods)))
        default = tuple(BLOCK_END_TILES[key] for key in TILE_KEYS)
        record(m, "block end", "block_end default", n, k1 + k2, timed[default], default)
        best = min(timed, key=timed.get)
        record(m, "block end", "block_end best", n, k1 + k2, timed[best], best)
    print(f"(peak {bandwidth / 1e12:.2f} TB/s)")
    return rows


TILE_KEYS = ("block_n", "block_k", "num_warps", "num_stages")


def sweep(time_tiles) -> dict:
    """us per call of `time_tiles(tiles)` for each of TILES that fits the GPU (a tile that needs more shared memory
    than the GPU has is left out)."""
    timed = {}
    for tiles in TILES:
        try:
            timed[tiles] = time_tiles(tiles)
        except triton.runtime.errors.OutOfResources:
            torch.cuda.synchronize()
    return timed


def tile_kwargs(tiles: tuple[int, int, int, int]) -> dict:
    return {"tiles": dict(zip(TILE_KEYS, tiles))}


def attention_rows(with_flex: bool) -> list[dict]:
    """One query per sequence against a static cache: SDPA (its default backend, an additive mask) vs FlexAttention
    (torch.compile'd, decoding kernel) with the mask as a score_mod and with a block mask covering the filled part.
    And the whole attention step from the q|k|v projection on (rotary, cache write, attention): this project's
    one-kernel split-KV step (decode_kernels.attention_step) over a grid of tile sizes / program counts, against its
    reference (rotary_and_cache + SDPA), to choose its defaults and where it replaces SDPA."""
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
        qkv = torch.randn(batch, 1, 3 * HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        angles = torch.randn(batch, 1, 16, device="cuda")
        cos, sin = (f(torch.cat([angles, angles], -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        counters = attention_counters("cuda", batch * HEADS)

        def step(**kernel):
            out = attention_step(qkv, cos, sin, k, v, mask, slot, HEADS, 32, HEAD_DIM**-0.5, counters, **kernel)
            return out.view(batch, 1, HEADS, HEAD_DIM).transpose(1, 2)  # as SDPA's output

        ours = [
            (f"step n{n} p{p} w{w}", lambda n=n, p=p, w=w: step(block_n=n, programs=p, num_warps=w, split_kv=True))
            for n in (32, 64)
            for p in (512, 1024)
            for w in (2, 4)
        ]
        flexes = (("flex score_mod", flex_mod), ("flex block_mask", flex_block)) if with_flex else ()
        named = (("sdpa", sdpa), *flexes, ("rotary + sdpa", lambda: step(split_kv=False)), *ours)
        for name, fn in named:
            # the step's own reference for the step's kernels (it attends with a rotated q), SDPA's for the rest
            reference = (step(split_kv=False) if name.startswith("step") else sdpa()).float()
            reference = reference.transpose(1, 2).reshape(batch, 1, -1)
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


# the variants of the chain part: (dependent launch, decode_linear's tiles, block_end's tiles), tiles as
# (block_n, block_k, num_warps, num_stages)
CHAIN_VARIANTS = [
    (False, (32, 64, 4, 4), (32, 128, 4, 4)),
    (False, (32, 64, 4, 4), (64, 64, 4, 5)),
    (True, (32, 64, 4, 4), (64, 64, 4, 5)),
]


def chain_rows(bandwidth: float, layers: int = 32) -> list[dict]:
    """`layers` attention-free parallel blocks in a row, as the decode step runs them: the fused projection
    [q | k | v | fc1] (decode_linear, GELU on fc1's columns) then block_end (out-projection + fc2 + residual +
    LayerNorm) with the projection's q columns as the mixer output; each layer its own weights (157 MB; 5 GB in all,
    so none is read from L2). Timed per chain over CHAIN_VARIANTS: with and without programmatic dependent launch
    (decode_kernels.DEPENDENT_LAUNCH) and the kernels' tiles."""
    from matvlm_hf import decode_kernels

    def linear(n, k):
        layer = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        layer.weight.data.normal_(0, k**-0.5)
        return layer

    blocks = [
        (linear(3 * HIDDEN + FFN, HIDDEN), linear(HIDDEN, HIDDEN), linear(HIDDEN, FFN), nn.LayerNorm(HIDDEN))
        for _ in range(layers)
    ]
    blocks = [(f, o, m, norm.to("cuda", torch.bfloat16)) for f, o, m, norm in blocks]
    saved = decode_kernels.DEPENDENT_LAUNCH
    weight_bytes = sum(p.numel() * 2 for f, o, m, _ in blocks for p in (f.weight, o.weight, m.weight))
    rows = []
    for m in (1, 16):
        hidden = torch.randn(m, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def chain(variant):
            pdl, front_tiles, end_tiles = variant
            decode_kernels.DEPENDENT_LAUNCH = pdl
            front_tiles, end_tiles = dict(zip(TILE_KEYS, front_tiles)), dict(zip(TILE_KEYS, end_tiles))
            h, normed = hidden, hidden
            for front, out_proj, fc2, norm in blocks:
                projected = decode_linear(normed, front.weight, front.bias, 3 * HIDDEN, tiles=front_tiles)
                h, normed = block_end(
                    projected[..., :HIDDEN], projected[..., 3 * HIDDEN :], h, out_proj, fc2, norm, tiles=end_tiles
                )

        for variant in CHAIN_VARIANTS:
            pdl, front_tiles, end_tiles = variant
            try:
                us = graph_us(lambda: chain(variant))
            except Exception as e:  # a tile the GPU or this Triton cannot take: say so, go on
                print(f"M={m:2d} {variant}: {type(e).__name__}: {str(e)[:200]}")
                torch.cuda.synchronize()
                continue
            rows.append(
                {"m": m, "pdl": pdl, "linear_tiles": front_tiles, "block_end_tiles": end_tiles, "us": us,
                 "tb_s": weight_bytes / us / 1e6}
            )  # fmt: skip
            print(f"M={m:2d} chain of {layers}: pdl={pdl!s:5} linear {front_tiles} block_end {end_tiles}: "
                  f"{us:8.1f} us {rows[-1]['tb_s']:.2f} TB/s")  # fmt: skip
    decode_kernels.DEPENDENT_LAUNCH = saved
    print(f"(peak {bandwidth / 1e12:.2f} TB/s)")
    return rows


def mamba_rows(bandwidth: float) -> list[dict]:
    """A Mamba layer's decode step between its projections at TinyLLaVA-3.1B's mixer sizes (32 heads of 80, state
    80, x / B / C 2560 channels each, conv width 4): the unfused step (the conv-step kernel, A = -exp(A_log) in torch,
    mamba_ssm's selective_state_update and gated RMSNorm where installed, else the references) against
    mamba2_ops.mamba_decode_step over MAMBA_WARPS. Each graph cycles through state copies totalling >= 256 MB (in
    the decode step, a layer's states come from HBM). Bandwidth counts the float32 SSM state read and written."""
    from types import SimpleNamespace

    from matvlm_hf import mamba2_mixer, mamba2_ops

    sizes = {"mamba_nheads": HEADS, "mamba_headdim": HEAD_DIM, "mamba_ngroups": HEADS, "mamba_d_state": HEAD_DIM}
    config = SimpleNamespace(
        text_config=SimpleNamespace(hidden_size=HIDDEN), mamba_d_inner=HIDDEN, mamba_d_xb=HIDDEN, mamba_d_conv=4,
        mamba_chunk_size=256, mamba_norm_eps=1e-5, use_mamba_kernels=True, mamba_proj_bias=True,
        mamba_out_proj_bias=True, mamba_conv_bias=True, mamba_dt_min=1e-3, mamba_dt_max=0.1,
        mamba_dt_init_floor=1e-4, mamba_A_init_range=(1, 16), **sizes,
    )  # fmt: skip
    mixer = mamba2_mixer.MaTVLMMamba2Mixer(config, 0).to("cuda", torch.bfloat16)
    mixer.init_ssm_parameters()
    fused_step, default_warps = mamba2_mixer.mamba_decode_step, mamba2_ops.MAMBA_DECODE_WARPS
    rows = []
    for m in (1, 16):
        state_bytes = m * HEADS * HEAD_DIM * HEAD_DIM * 4
        caches = [
            SimpleNamespace(
                conv_states=[torch.randn(m, 3 * HIDDEN, 4, device="cuda", dtype=torch.bfloat16)],
                recurrent_states=[torch.randn(m, HEADS, HEAD_DIM, HEAD_DIM, device="cuda")],
            )
            for _ in range(-(-(256 << 20) // state_bytes))
        ]
        projected = torch.randn(m, 1, HIDDEN + 3 * HIDDEN + HEADS, device="cuda", dtype=torch.bfloat16)

        def run_all():
            for cache in caches:
                mixer.decode_mix(projected, cache)

        variants = [("unfused", None)] + [("fused", w) for w in MAMBA_WARPS]
        for kind, warps in variants:
            mamba2_mixer.mamba_decode_step = (lambda *a, **k: None) if warps is None else fused_step
            mamba2_ops.MAMBA_DECODE_WARPS = warps or default_warps
            us = graph_us(run_all, calls=len(caches))
            rows.append({"m": m, "kernel": kind, "num_warps": warps, "us": us, "tb_s": 2 * state_bytes / us / 1e6})
            print(f"M={m:2d} Mamba step {kind:>7} warps={warps}: {us:7.2f} us {rows[-1]['tb_s']:.2f} TB/s (state r+w)")
    mamba2_mixer.mamba_decode_step, mamba2_ops.MAMBA_DECODE_WARPS = fused_step, default_warps
    print(f"(peak {bandwidth / 1e12:.2f} TB/s)")
    return rows


# num_warps swept for the fused Mamba step's kernel
MAMBA_WARPS = (4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for decode_shapes.json")
    parser.add_argument(
        "--parts", default="gemm,attention", help="gemm, attention, chain, mamba (default: gemm,attention)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (kept until the new one is complete)"
    )
    parser.add_argument("--flex", action="store_true", help="also FlexAttention (compiles, ~1 min)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    parts = args.parts.split(",")
    # refused before measuring: an existing non-empty folder, the working directory or a folder holding it; the
    # result is built beside and moved into place whole
    with staged_output(args.out, overwrite=args.overwrite, option="--out") as staging:
        bandwidth = hbm_bytes_per_s("cuda") or 4.8e12
        result = {
            "gpu": torch.cuda.get_device_name(),
            "gemm": gemm_rows(bandwidth) if "gemm" in parts else [],
            "attention": attention_rows(args.flex) if "attention" in parts else [],
            "chain": chain_rows(bandwidth) if "chain" in parts else [],
            "mamba": mamba_rows(bandwidth) if "mamba" in parts else [],
        }
        (staging / "decode_shapes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
