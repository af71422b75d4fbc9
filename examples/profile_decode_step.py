"""Where one `fast_decode` step's time goes: the kernels of a decode step, teacher vs hybrid, eager vs compiled.

    python examples/profile_decode_step.py --out prof/                      # GPU, TinyLLaVA-3.1B sizes, bf16
    python examples/profile_decode_step.py --size tiny --steps 2 --out /tmp/prof   # CPU smoke run

For each model and mode, a `StaticDecoder` is prefilled with `--context` real tokens, then `--steps` decode steps run
outside the CUDA graph under `torch.profiler` (the graph replays these same kernels, so their count and durations are
what a replayed step costs, minus the launch overhead the graph removes). Prints, per model and mode, the kernels
per step, the device time per step, its split into matrix multiplications and the rest, and the top kernels; writes
profile_decode_step.json into --out. This is the measurement behind the next decode-step fusion (issue 17).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from matvlm_hf.fast_generation import SamplingParams, StaticDecoder
from matvlm_hf.safe_output import check_output
from matvlm_hf.synthetic.benchmark import build_model

GEMM_NAMES = (
    "gemm",
    "gemv",
    "matmul",
    "addmm",
    "linear",
    "cutlass",
    "nvjet",
    "sm90_xmma",
)  # CUDA kernels; CPU: aten ops


def profile_steps(model, context: int, steps: int, compile: bool) -> dict:
    """Kernel statistics of `steps` eager (or compiled) decode steps at `context` cached tokens, batch 1."""
    on_gpu = model.device.type == "cuda"
    decoder = StaticDecoder(model, 1, context + steps + 8, SamplingParams(), compile=compile)
    ids = torch.randint(0, 1000, (1, context), device=model.device)
    with torch.no_grad():
        decoder.prefill(ids, torch.ones_like(ids), None)
        for _ in range(3):  # warm-up: compilation, Triton autotuning
            decoder.step()
        activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(steps):
                decoder.step()
            if on_gpu:
                torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        is_kernel = event.device_type == torch.autograd.DeviceType.CUDA if on_gpu else not event.cpu_parent
        if is_kernel:
            us = event.device_time if on_gpu else event.cpu_time
            totals[event.name] += us
            counts[event.name] += 1
    total = sum(totals.values())
    gemm = sum(t for name, t in totals.items() if any(g in name.lower() for g in GEMM_NAMES))
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:15]
    return {
        "kernels_per_step": sum(counts.values()) / steps,
        "us_per_step": total / steps,
        "gemm_us_per_step": gemm / steps,
        "other_us_per_step": (total - gemm) / steps,
        "top": [
            {"name": name[:120], "us_per_step": t / steps, "calls_per_step": counts[name] / steps} for name, t in top
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="model sizes (default: full, GPU)")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens before the steps (default: 1024)")
    parser.add_argument("--steps", type=int, default=10, help="decode steps profiled (default: 10)")
    parser.add_argument("--models", default="teacher,hybrid-50", help="teacher, hybrid-25, hybrid-50 (default: 2)")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled (default: both)")
    parser.add_argument("--out", type=Path, required=True, help="folder for profile_decode_step.json")
    args = parser.parse_args(argv)
    check_output(args.out, option="--out")  # never the working directory, or a folder holding it
    device = "cuda" if args.size == "full" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ratios = {"teacher": 0.0, "hybrid-25": 0.25, "hybrid-50": 0.5}
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "context": args.context}
    for name in args.models.split(","):
        model = build_model(ratios[name], args.size, device, dtype)
        for mode in args.modes.split(","):
            stats = profile_steps(model, args.context, args.steps, compile=mode == "compiled")
            results[f"{name}/{mode}"] = stats
            print(
                f"{name:>10} {mode:>8}: {stats['kernels_per_step']:.0f} kernels/step, "
                f"{stats['us_per_step']:.0f} us/step (matmul {stats['gemm_us_per_step']:.0f}, "
                f"other {stats['other_us_per_step']:.0f})"
            )
            for row in stats["top"][:8]:
                print(f"{'':>21}{row['us_per_step']:9.1f} us  x{row['calls_per_step']:<5.0f} {row['name'][:80]}")
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode_step.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
