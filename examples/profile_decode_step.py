"""Where one `fast_decode` step's time goes: the kernels of a decode step, teacher vs hybrid, eager vs compiled.

    python examples/profile_decode_step.py --out prof/                      # GPU, TinyLLaVA-3.1B sizes, bf16
    python examples/profile_decode_step.py --size tiny --steps 2 --out /tmp/prof   # CPU smoke run
    python examples/profile_decode_step.py --plot docs/benchmarks/h200/profile_decode_step.json  # redraw its PNG

For each model and mode, a `StaticDecoder` is prefilled with `--context` real tokens, then `--steps` decode steps run
outside the CUDA graph under `torch.profiler` (the graph replays these same kernels, so their count and durations are
what a replayed step costs, minus the launch overhead the graph removes). Prints, per model and mode, the kernels
per step, the device time per step, its split into matrix multiplications and the rest, and the top kernels; writes
profile_decode_step.json (every kernel) and profile_decode_step.png (time per step split into matrix multiplications,
attention, the Mamba mixer's kernels and the rest, against the bandwidth roofline) into --out. This is the measurement
behind the next decode-step fusion (issue 17).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from matvlm_hf.fast_generation import SamplingParams, StaticDecoder
from matvlm_hf.safe_output import check_output
from matvlm_hf.synthetic.benchmark import build_model, hbm_bytes_per_s, roofline_ms

GEMM_NAMES = (
    "gemm",
    "gemv",
    "matmul",
    "addmm",
    "linear",
    "cutlass",
    "nvjet",
    "sm90_xmma",
    "splitk",
)  # CUDA kernels; CPU: aten ops
# the rest of a step by kernel name (lower case): cuDNN's / torch's SDPA kernels, mamba_ssm's Triton kernels
CATEGORIES = {
    "attention": ("sdpa", "fmha", "flash", "attention", "lean_reduction"),
    "Mamba mixer": ("selective", "ssd", "_chunk_", "conv1d", "_layer_norm_fwd"),
}


def category(kernel: str) -> str:
    """'matmul', 'attention', 'Mamba mixer' or 'other' (norms, rotary, GELU, cache writes, residual adds, ...)."""
    name = kernel.lower()
    if any(g in name for g in GEMM_NAMES):
        return "matmul"
    return next((cat for cat, keys in CATEGORIES.items() if any(k in name for k in keys)), "other")


def profile_steps(model, context: int, steps: int, compile: bool, batch: int = 1) -> dict:
    """Kernel statistics of `steps` eager (or compiled) decode steps at `context` cached tokens and `batch` rows."""
    on_gpu = model.device.type == "cuda"
    decoder = StaticDecoder(model, batch, context + steps + 8, SamplingParams(), compile=compile)
    ids = torch.randint(0, 1000, (batch, context), device=model.device)
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
    top = sorted(totals.items(), key=lambda kv: -kv[1])
    return {
        "kernels_per_step": sum(counts.values()) / steps,
        "us_per_step": total / steps,
        "gemm_us_per_step": gemm / steps,
        "other_us_per_step": (total - gemm) / steps,
        "us_per_step_by_category": {
            cat: sum(t for name, t in totals.items() if category(name) == cat) / steps
            for cat in ("matmul", "attention", "Mamba mixer", "other")
        },
        "kernels": [  # every kernel, the most time first
            {"name": name[:160], "us_per_step": t / steps, "calls_per_step": counts[name] / steps} for name, t in top
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="model sizes (default: full, GPU)")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens before the steps (default: 1024)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    parser.add_argument("--steps", type=int, default=10, help="decode steps profiled (default: 10)")
    parser.add_argument("--models", default="teacher,hybrid-50", help="teacher, hybrid-25, hybrid-50 (default: 2)")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled (default: both)")
    parser.add_argument("--out", type=Path, help="folder for profile_decode_step.json and .png")
    parser.add_argument("--plot", type=Path, help="only redraw the PNG beside this profile_decode_step.json")
    args = parser.parse_args(argv)
    if args.plot:
        results = json.loads(args.plot.read_text())
        print(plot(results, args.plot.with_suffix(".png")))
        return results
    if args.out is None:
        parser.error("--out is required (or --plot JSON)")
    check_output(args.out, option="--out")  # never the working directory, or a folder holding it
    device = "cuda" if args.size == "full" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ratios = {"teacher": 0.0, "hybrid-25": 0.25, "hybrid-50": 0.5}
    results: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "context": args.context,
        "batch": args.batch,
    }
    for name in args.models.split(","):
        model = build_model(ratios[name], args.size, device, dtype)
        hbm = hbm_bytes_per_s(device)
        if hbm:
            results[f"{name}/roofline_us"] = 1e3 * roofline_ms(model, args.batch, args.context, hbm)
        for mode in args.modes.split(","):
            stats = profile_steps(model, args.context, args.steps, compile=mode == "compiled", batch=args.batch)
            results[f"{name}/{mode}"] = stats
            print(
                f"{name:>10} {mode:>8}: {stats['kernels_per_step']:.0f} kernels/step, "
                f"{stats['us_per_step']:.0f} us/step (matmul {stats['gemm_us_per_step']:.0f}, "
                f"other {stats['other_us_per_step']:.0f})"
            )
            for row in stats["kernels"][:12]:
                print(f"{'':>21}{row['us_per_step']:9.1f} us  x{row['calls_per_step']:<5.0f} {row['name'][:80]}")
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode_step.json").write_text(json.dumps(results, indent=1) + "\n")
    if device == "cuda":
        plot(results, args.out / "profile_decode_step.png")
    return results


def by_category(stats: dict) -> dict[str, float]:
    """us per step by `category`, recomputed from the kernel list (JSON written before the categories existed)."""
    totals = {cat: 0.0 for cat in ("matmul", "attention", "Mamba mixer", "other")}
    for row in stats["kernels"]:
        totals[category(row["name"])] += row["us_per_step"]
    return totals


def plot(results: dict, path: Path) -> Path:
    """Stacked bars: device time per decode step by category for every model/mode, the roofline as a tick; written to
    `path` (an older plot there is replaced whole, the new one drawn beside it first)."""
    from matvlm_hf.extras import require

    require("matplotlib", "the decode-step profile's plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [k for k, v in results.items() if isinstance(v, dict) and "kernels" in v]
    colours = {"matmul": "tab:blue", "attention": "tab:orange", "Mamba mixer": "tab:green", "other": "tab:grey"}
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, run in enumerate(runs):
        left = 0.0
        for cat, us in by_category(results[run]).items():
            ax.barh(i, us, left=left, color=colours[cat], label=cat if i == 0 else None)
            left += us
        ax.text(left + 30, i, f"{left:.0f} us, {results[run]['kernels_per_step']:.0f} kernels", va="center", fontsize=8)
        roof = results.get(f"{run.split('/')[0]}/roofline_us")
        if roof:
            ax.plot([roof, roof], [i - 0.4, i + 0.4], color="red", lw=2, label="roofline" if i == 0 else None)
    ax.set_yticks(range(len(runs)), runs)
    ax.invert_yaxis()
    ax.set_xlabel(f"GPU time per decode step (us), batch {results.get('batch', 1)}")
    ax.set_xlim(0, max(sum(by_category(results[r]).values()) for r in runs) * 1.35)
    ax.set_title(f"Where a decode step goes: {results['device']}, {results['context']} cached tokens", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")  # drawn beside, then swapped in: never half a PNG
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)
    return path


if __name__ == "__main__":
    main()
