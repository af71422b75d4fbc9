"""`matvlm eval`: a MaTVLM checkpoint (and optionally its teacher) on the paper's benchmarks through lmms-eval.

    matvlm eval --model HYBRID [--teacher TEACHER] [--tasks pope,mme,...] [--limit N] [--batch-size 8] [--fast-decode]
                [--data pope=DIR --data mme=DIR ...] [--out matvlm-eval] [--overwrite]

Defaults: the paper's nine benchmarks (`PAPER_TASKS`) with lmms-eval's prompts and scorers, greedy decoding, batch 1.
`--data TASK=DIR` points a task at a local copy in its published Hugging Face layout (otherwise lmms-eval loads the
task's Hub id, from the HF cache when offline). The task `matvlm_synthetic` is the synthetic world: `--data
matvlm_synthetic=DIR` takes a `matvlm data` (or quickstart `data/`) folder; without it a 400-question test split is
generated. Writes `results.json` (lmms-eval's results per model, timing) and `results.md` (one row per task; with
--teacher, teacher vs hybrid and their difference) into --out, which is built beside and moved into place at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL = (
    'lmms-eval is not installed: pip install "matvlm-hf[eval]" && pip install --no-deps "lmms-eval==0.7.3" '
    "(--no-deps keeps your torch: lmms-eval's full dependency list pulls torchvision and a CUDA torch)"
)
SYNTHETIC_QUESTION_TYPES = ("color", "shape", "size", "count", "position")


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse (SystemExit naming the path) an output that is the working directory or holds it, is, holds or lies
    inside an input, or exists non-empty without --overwrite."""
    out, cwd = out.resolve(), Path.cwd().resolve()
    if _within(cwd, out):
        raise SystemExit(f"--out {out} is or holds the working directory: choose a new folder")
    for path in inputs:
        path = path.resolve()
        if _within(out, path) or _within(path, out):
            raise SystemExit(f"--out {out} is, holds or lies inside the input {path}: choose another folder")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _parse_data(items: list[str]) -> dict[str, Path]:
    data = {}
    for item in items:
        task, sep, folder = item.partition("=")
        if not sep or not task or not folder:
            raise SystemExit(f"--data {item!r}: expected TASK=FOLDER, e.g. --data pope=./POPE")
        data[task] = Path(folder).expanduser()
    return data


def _synthetic_data(model_path: str, staging: Path, source: Path | None, n_test: int) -> Path:
    """Parquet folder of the synthetic test split: from `source` (a `matvlm data` folder), else freshly generated
    at the model's image size."""
    from transformers import AutoConfig

    from ..integrations.lmms_eval.tasks import synthetic_to_parquet
    from ..synthetic.synthetic_vqa import make_dataset

    if source is None:
        size = AutoConfig.from_pretrained(model_path, trust_remote_code=True).vision_config.image_size
        source = staging / "synthetic-data"
        make_dataset(
            source,
            n_train=0,
            n_test=n_test,
            image_size=size,
            question_types=list(SYNTHETIC_QUESTION_TYPES),
            progress=False,
        )
    return synthetic_to_parquet(source, staging / "synthetic-parquet")


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, float | None]:
    """(metric name, value) shown for a task: `HEADLINE`'s metric, else the first numeric one."""
    from ..integrations.lmms_eval.tasks import HEADLINE

    numeric = {
        k.split(",")[0]: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"
    }
    name = HEADLINE.get(task)
    if name in numeric:
        return name, float(numeric[name])
    return next(((k, float(v)) for k, v in numeric.items()), ("-", None))


def results_table(tasks: list[str], runs: dict[str, dict[str, Any]]) -> str:
    """Markdown table: task, metric, one column per model, and hybrid - teacher when both were run."""
    labels = list(runs)
    header = ["task", "metric", *labels] + (["hybrid - teacher"] if labels == ["teacher", "hybrid"] else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        values = []
        for label in labels:
            metric, value = headline(task, runs[label]["results"].get(task, {}))
            values.append(value)
        row = [task, metric] + ["-" if v is None else f"{v:.4g}" for v in values]
        if len(header) > len(labels) + 2:
            row.append("-" if None in values else f"{values[1] - values[0]:+.4g}")
        lines.append("| " + " | ".join(row) + " |")
    timing = ", ".join(f"{label} {run['seconds_per_item']:.3f} s/item" for label, run in runs.items())
    return "\n".join(lines) + f"\n\nwall time per item (model load excluded): {timing}\n"


def lmms_eval_cli_args(output_path: Path) -> argparse.Namespace:
    """lmms-eval's own CLI defaults with `--output_path output_path` (tasks read files' locations from them)."""
    from lmms_eval.__main__ import parse_eval_args

    argv, sys.argv = sys.argv, ["lmms-eval", "--output_path", str(output_path)]
    try:
        return parse_eval_args()[1]
    finally:
        sys.argv = argv


def evaluate_model(
    path: str, tasks: list[str], task_dir: Path, files: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One model on `tasks` (wrapper yamls in `task_dir`) with lmms-eval's `simple_evaluate`; files that tasks write
    (e.g. TextVQA's submission file) go under `files`, not into the working directory."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from ..integrations.lmms_eval.model import MaTVLM

    model = MaTVLM(
        pretrained=path, device=args.device, dtype=args.dtype, batch_size=args.batch_size, fast_decode=args.fast_decode
    )
    manager = TaskManager(verbosity="WARNING", include_path=str(task_dir), include_defaults=False, model_name="matvlm")
    start = time.perf_counter()
    out = simple_evaluate(
        model=model,
        tasks=tasks,
        limit=args.limit,
        task_manager=manager,
        log_samples=True,
        batch_size=args.batch_size,
        verbosity="WARNING",
        cli_args=lmms_eval_cli_args(files),
    )
    seconds = time.perf_counter() - start
    items = sum(int(n.get("effective", 0)) for n in out.get("n-samples", {}).values())
    samples = {
        task: [
            {
                "doc_id": s["doc_id"],
                "target": s.get("target"),
                "response": s.get("filtered_resps"),
                "metrics": {m: s.get(m) for m in s.get("metrics", [])},
            }
            for s in rows
        ]
        for task, rows in out.get("samples", {}).items()
    }
    return {
        "path": path,
        "results": out["results"],
        "n_samples": out.get("n-samples", {}),
        "seconds": seconds,
        "items": items,
        "seconds_per_item": seconds / max(items, 1),
        "samples": samples,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL) from None
    from ..integrations.lmms_eval.tasks import PAPER_TASKS, SYNTHETIC_TASK, write_task_dir

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(PAPER_TASKS.values())
    data = _parse_data(args.data)
    models = {"teacher": args.teacher, "hybrid": args.model} if args.teacher else {"model": args.model}
    out = Path(args.out)
    local_inputs = [Path(p) for p in [*models.values(), *data.values()] if Path(p).exists()]
    check_output(out, local_inputs, args.overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would become the output's mode
    try:
        if SYNTHETIC_TASK in tasks:
            data[SYNTHETIC_TASK] = _synthetic_data(args.model, staging, data.get(SYNTHETIC_TASK), args.synthetic_n)
        try:
            task_dir = write_task_dir(staging / "tasks", tasks, data)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        runs = {
            label: evaluate_model(path, tasks, task_dir, staging / "lmms-eval" / label, args)
            for label, path in models.items()
        }
        report = {
            "tasks": tasks,
            "limit": args.limit,
            "batch_size": args.batch_size,
            "fast_decode": args.fast_decode,
            "data": {k: str(v) for k, v in data.items()},
            "models": runs,
        }
        from lmms_eval.utils import handle_non_serializable

        (staging / "results.json").write_text(
            json.dumps(report, indent=1, default=handle_non_serializable) + "\n", encoding="utf-8"
        )
        table = results_table(tasks, runs)
        (staging / "results.md").write_text(table, encoding="utf-8")
        _swap(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return report


def _swap(staging: Path, out: Path) -> None:
    """Move the finished `staging` folder to `out`; an existing `out` (allowed by --overwrite) goes only after."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    staging.rename(out)
    shutil.rmtree(old)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matvlm eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--model", required=True, help="MaTVLM checkpoint (folder or Hub id) to evaluate, e.g. the hybrid; required"
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="its teacher (a ratio-0 conversion): adds the teacher-vs-hybrid comparison (default: none)",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lmms-eval tasks and/or matvlm_synthetic (default: the paper's nine)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate only the first N documents of each task, e.g. for smoke tests (default: all)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="prompts per generate() call, left-padded (default: 1)"
    )
    parser.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode with generate(fast_decode=True): static cache + CUDA graphs, GPU (default: off)",
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when available) (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="weights dtype: auto (the checkpoint's), float32, bfloat16, float16 (default: auto)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="local copy of a task's data set (published HF layout); repeatable (default: none: the HF cache)",
    )
    parser.add_argument(
        "--synthetic-n",
        type=int,
        default=400,
        help="questions generated for matvlm_synthetic when --data does not give its folder (default: 400)",
    )
    parser.add_argument(
        "--out", default="matvlm-eval", help="output folder: results.json, results.md, tasks/ (default: matvlm-eval)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out, built beside it and swapped in at the end (default: off)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` and evaluate (`run`); returns the report written to results.json."""
    return run(build_parser().parse_args(argv))
