"""2-GPU DDP check of `matvlm distill` at TinyLLaVA-3.1B sizes: the same global batch on 1 GPU (accumulation) and
on 2 GPUs (DDP, find_unused_parameters=False) must give the same loss curve.

    python examples/distill_ddp_check.py prepare --workdir runs/ddp        # checkpoints + data (3.1B, random weights)
    python examples/distill_ddp_check.py args --workdir runs/ddp --output runs/ddp/one   # prints `matvlm distill` flags
    # 1 GPU: per-device batch 4 x accumulation 2;  2 GPUs: per-device batch 4 x 2 processes (global batch 8 both)
    matvlm distill $(python examples/distill_ddp_check.py args --workdir runs/ddp --output runs/ddp/one)
    accelerate launch --multi_gpu --num_processes 2 --mixed_precision no -m matvlm_hf.train_cli \\
        $(python examples/distill_ddp_check.py args --workdir runs/ddp --output runs/ddp/two)
    python examples/distill_ddp_check.py compare runs/ddp/one runs/ddp/two   # exit 1 when the curves differ
    python examples/distill_ddp_check.py summary runs/ddp/one runs/ddp/two   # step time, tokens/s, peak memory (JSON)

examples/multi_gpu_check.sh runs all of it (and ZeRO-2 on 2 GPUs) in one call; examples/deepspeed_check.sh is the
1-GPU DeepSpeed check.

Each step is 8 samples x 1428 tokens (every sample is cut to exactly that length), 20 steps, bf16, gradient
checkpointing, the paper's losses and trainable set. accelerate gives each process a shard of the same batches as
the 1-GPU run, so every step sees the same samples. The last step writes checkpoint-20 (its trainer_state.json holds
the curve). bf16 autocast and a different summation order make the curves
equal to within bf16 noise, not bit for bit: `compare` allows --rtol (default 2e-2) per logged value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STEPS, GLOBAL_BATCH, PER_DEVICE, MAX_LENGTH = 20, 8, 4, 1428


def prepare(workdir: Path, size: str = "full") -> dict[str, Path]:
    from matvlm_hf.distill_benchmark import prepare as prepare_bench

    return prepare_bench(workdir, size, 0.25, MAX_LENGTH, n_samples=GLOBAL_BATCH * STEPS)


def distill_args(workdir: Path, output: Path) -> list[str]:
    paths = {
        "teacher": workdir / "teacher",
        "student": workdir / "student-0.25",
        "data": workdir / f"data-{MAX_LENGTH}.json",
        "images": workdir / "images",
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"error: run `prepare --workdir {workdir}` first (missing: {', '.join(missing)})")
    return [
        "--student",
        str(paths["student"]),
        "--teacher",
        str(paths["teacher"]),
        "--data",
        str(paths["data"]),
        "--images",
        str(paths["images"]),
        "--output",
        str(output),
        "--global-batch-size",
        str(GLOBAL_BATCH),
        "--per-device-batch-size",
        str(PER_DEVICE),
        "--max-length",
        str(MAX_LENGTH),
        "--max-steps",
        str(STEPS),
        "--logging-steps",
        "1",
        "--save-steps",
        str(STEPS),
        "--num-workers",
        "2",
        "--seed",
        "0",
        "--bf16",
        "true",
    ]


def logged(run: Path) -> list[dict]:
    """The per-step log entries of a finished run (trainer_state.json in the run folder or its last checkpoint)."""
    states = sorted(run.glob("**/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        raise SystemExit(f"error: no trainer_state.json under {run}")
    return [e for e in json.loads(states[-1].read_text())["log_history"] if "loss" in e]


def compare(one: Path, two: Path, rtol: float) -> int:
    a, b = logged(one), logged(two)
    keys = ("loss", "l_layer", "l_prob", "grad_norm")
    print(f"{'step':>4} " + " ".join(f"{k + ' 1 GPU':>16} {k + ' 2 GPU':>16}" for k in keys))
    worst = 0.0
    for x, y in zip(a, b):
        print(f"{x['step']:>4} " + " ".join(f"{x[k]:>16.6g} {y[k]:>16.6g}" for k in keys))
        worst = max([worst] + [abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for k in keys])
    same_length = len(a) == len(b) > 0
    print(f"{len(a)} vs {len(b)} logged steps; largest relative difference {worst:.2e} (allowed {rtol:g})")
    return 0 if same_length and worst <= rtol else 1


def summary(runs: list[Path]) -> dict:
    """Per run folder: optimizer steps, seconds per step (median of the logged `step_s` after the first step, which
    compiles and autotunes Triton kernels), tokens/s (global batch x max length of its distill_config.json / that
    time: every sample of this check is cut to exactly max length), peak GPU memory (`peak_gib`) and the losses; a
    string for a run without trainer_state.json (failed or out of memory)."""
    out: dict = {}
    for run in runs:
        states = sorted(run.glob("**/trainer_state.json"), key=lambda p: p.stat().st_mtime)
        if not states:
            out[run.name] = "no trainer_state.json (failed or out of memory: see its log)"
            continue
        state = json.loads(states[-1].read_text())
        logs = state["log_history"]
        later = [e["step_s"] for e in logs if "loss" in e and "step_s" in e][1:]
        step_s = sorted(later)[len(later) // 2] if later else None
        knobs = json.loads((run / "distill_config.json").read_text()) if (run / "distill_config.json").is_file() else {}
        tokens = knobs.get("global_batch_size", 0) * knobs.get("max_length", 0)
        out[run.name] = {
            "steps": state["global_step"],
            "seconds_per_step": round(step_s, 3) if step_s else None,
            "tokens_per_s": round(tokens / step_s) if step_s and tokens else None,
            "peak_gib": max((e["peak_gib"] for e in logs if "peak_gib" in e), default=None),
            "losses": [round(e["loss"], 5) for e in logs if "loss" in e],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fabricate the 3.1B teacher/student and the data set")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a CPU smoke run of the check")
    p = sub.add_parser("args", help="print the `matvlm distill` arguments of the check")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("compare", help="compare two runs' loss curves")
    p.add_argument("one", type=Path)
    p.add_argument("two", type=Path)
    p.add_argument("--rtol", type=float, default=2e-2)
    p = sub.add_parser("summary", help="step time, tokens/s, peak memory and losses of run folders, as JSON")
    p.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(json.dumps({k: str(v) for k, v in prepare(args.workdir, args.size).items()}))
        return 0
    if args.command == "args":
        print(" ".join(distill_args(args.workdir, args.output)))
        return 0
    if args.command == "summary":
        print(json.dumps(summary(args.runs), indent=1))
        return 0
    return compare(args.one, args.two, args.rtol)


if __name__ == "__main__":
    sys.exit(main())
