"""The MaTVLM study on the synthetic visual-QA world, at GPU scale (issue: "proof that it works without real weights").

    python -m matvlm_hf.study all --workdir runs/study --docs docs/study      # teacher + every variant + report
    python -m matvlm_hf.study teacher --workdir runs/study --set teacher_steps=2000
    python -m matvlm_hf.study variant --workdir runs/study --name h25-even --ratio 0.25
    python -m matvlm_hf.study report --workdir runs/study --docs docs/study

1. teacher  a small TinyLLaVA (SigLIP -> mlp2x_gelu -> Phi) trained from scratch on the synthetic world
            (`quickstart.train_teacher`), saved in the published TinyLLaVA layout;
2. variants each converted with the project's converter (`--ratio`, `--placement`, `--init`) and distilled with
            `MaTVLMDistillationTrainer` (`--loss`: which of L_layer / L_prob / L_ce are on); every variant has the
            same distillation budget (`distill_steps`, at most 1/4 of the teacher's steps);
3. report   greedy exact match on the held-out split before and after distillation, a table beside the paper's
            Tables 2-4 orderings, loss-vs-step plots (docs/).

Knobs: `STUDY` below (the quickstart's `KNOBS` with GPU-scale values); `--set key=value` overrides any of them.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path
from typing import Any

from . import quickstart as qs

STUDY: dict[str, Any] = {
    **qs.KNOBS,
    "n_train": 20000,
    "n_test": 1000,
    "teacher_steps": 3000,
    "teacher_batch_size": 128,
    "teacher_lr": 1e-3,
    "teacher_warmup": 200,
    "log_every": 100,
    "eval_every": 250,
    "distill_steps": 600,
    "distill_batch_size": 64,
    "distill_lr": 1e-3,
    "eval_batch_size": 500,
}
LOSSES = {"ce": (0.0, 0.0, 1.0), "layer": (1.0, 0.0, 0.0), "prob": (0.0, 1.0, 0.0), "layer+prob": (1.0, 1.0, 0.0),
          "all": (1.0, 1.0, 1.0)}  # (alpha: L_layer, beta: L_prob, gamma: L_ce)


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> knob overrides (values as Python literals when they parse, else strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in STUDY:
            raise SystemExit(f"error: --set {pair!r}: expected key=value with key one of {', '.join(STUDY)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_knobs(work: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """STUDY <- the teacher's recorded knobs (when trained) <- overrides."""
    knobs = dict(STUDY)
    recorded = work / "teacher.json"
    if recorded.exists():
        knobs.update(json.loads(recorded.read_text())["knobs"])
    knobs.update(overrides)
    return knobs


def train_teacher_stage(work: Path, knobs: dict[str, Any], seed: int) -> dict[str, Any]:
    """Data, teacher from scratch, TinyLLaVA-layout save, greedy held-out accuracy -> work/teacher.json."""
    from .data import LLaVADataset
    from .fabricate import save_tinyllava_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = qs.make_data(work / "data", knobs, knobs["image_size"], seed)
    model, tokenizer, processor = qs.build_teacher(knobs, knobs["image_size"], seed)
    image_dir = data["paths"]["images"]
    items = qs.materialize(LLaVADataset(data["train"], image_dir, processor))
    test_items = qs.materialize(LLaVADataset(data["test"], image_dir, processor), data["test"])
    qs._say(f"data: {len(items)} training conversations, {len(test_items)} test questions "
            f"({qs._fmt_time(time.perf_counter() - t0)}); teacher {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, {model.config.num_image_tokens} image tokens")
    t1 = time.perf_counter()
    log = qs.train_teacher(model, items, tokenizer.pad_token_id, knobs, seed, eval_items=test_items)
    train_s = time.perf_counter() - t1
    _, accuracy = qs.evaluate(model, processor, data["test"], image_dir, batch_size=knobs["eval_batch_size"],
                              max_new_tokens=knobs["max_new_tokens"])
    save_tinyllava_checkpoint(model.cpu(), tokenizer, work / "teacher-tinyllava")
    result = {"knobs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()}, "seed": seed,
              "train_seconds": round(train_s, 1), "accuracy": accuracy,
              "blind_baseline": qs.blind_baseline(data["train_questions"], data["test"]), "log": log}
    (work / "teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    qs._say(f"teacher: greedy held-out accuracy {accuracy['accuracy']:.3f} "
            f"({ {t: round(v['accuracy'], 3) for t, v in accuracy['per_type'].items()} }) after "
            f"{qs._fmt_time(train_s)} of training")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m matvlm_hf.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("stage", choices=("teacher",))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="knob overrides (see STUDY)")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    knobs = {**STUDY, **parse_sets(args.set)}
    if args.stage == "teacher":
        train_teacher_stage(work, knobs, args.seed)


if __name__ == "__main__":
    main()
