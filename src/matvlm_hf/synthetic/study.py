"""The MaTVLM study on the synthetic visual-QA world: hybrids of a teacher trained here, and the paper's ablations.

    matvlm study all --workdir runs/study --docs docs/study --jobs 11  # teacher + every variant + report (GPU)
    matvlm study teacher --workdir runs/study --set teacher_steps=2000
    matvlm study variant --workdir runs/study --name h25 --placement start
    matvlm study variant --workdir runs/study --name h-layer4 --layers 4   # exactly these Mamba layers
    matvlm study variants --workdir runs/study --only h25 h50 --set device=cpu distill_steps=150
    matvlm study report --workdir runs/study --docs docs/study

1. teacher  a small TinyLLaVA (SigLIP -> mlp2x_gelu -> Phi) trained from scratch on the synthetic world
            (`quickstart.train_teacher`), saved in the published TinyLLaVA layout;
2. variants each converted with the project's converter (`--ratio`, `--placement`, `--init`) and distilled with
            `MaTVLMDistillationTrainer` (`--loss`: which of L_layer / L_prob / L_ce are on); every variant has the
            same distillation budget (`distill_steps`, at most 1/4 of the teacher's steps);
3. report   greedy exact match on the held-out split before and after distillation, a table beside the paper's
            Tables 2-4 orderings, loss-vs-step plots (`--docs`: results.md, study.png, study.json).

Knobs: `STUDY` below (the quickstart's `KNOBS` at GPU scale, 8 layers: what docs/study ran); `--set key=value`
overrides any of them (the variants read the teacher's recorded knobs, then their own `--set`).
examples/study_gpu.sh runs all of docs/study: `all` plus the distillation-recipe variants (batch, learning rate).
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Any

from . import quickstart as qs

STUDY: dict[str, Any] = {
    **qs.KNOBS,
    "lm": {**qs.KNOBS["lm"], "num_hidden_layers": 8},  # 12.5 / 25 / 50 % = 1 / 2 / 4 Mamba layers
    "n_train": 20000,
    "n_test": 1000,
    "vision_pretrain_steps": 3000,
    "teacher_steps": 1200,  # about 2 min on an H100: 99.1 % held-out (docs/study)
    "teacher_batch_size": 128,
    "teacher_lr": 2e-3,
    "teacher_warmup": 200,
    "log_every": 250,
    "eval_every": 300,
    # the PyTorch scan: on these tiny models and short inputs mamba_ssm's Triton kernels save little, and each of the
    # parallel variant processes would autotune and compile them anew (minutes)
    "mamba_kernels": False,
    "distill_steps": 300,  # a quarter of the teacher's steps
    "distill_batch_size": 64,
    "distill_lr": 1e-3,
    "eval_batch_size": 500,
}
LOSSES = {
    "ce": (0.0, 0.0, 1.0),
    "layer": (1.0, 0.0, 0.0),
    "prob": (0.0, 1.0, 0.0),
    "layer+prob": (1.0, 1.0, 0.0),
    "all": (1.0, 1.0, 1.0),
}  # (alpha: L_layer, beta: L_prob, gamma: L_ce)


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
    work.mkdir(parents=True, exist_ok=True)
    data = qs.make_data(work / "data", knobs, knobs["image_size"], seed)
    t1 = time.perf_counter()
    model, _, processor, log = qs.train_new_teacher(data, knobs, knobs["image_size"], seed, work / "teacher-tinyllava")
    train_s = time.perf_counter() - t1
    _, accuracy = qs.evaluate(
        model,
        processor,
        data["test"],
        data["paths"]["images"],
        batch_size=knobs["eval_batch_size"],
        max_new_tokens=knobs["max_new_tokens"],
    )
    result = {
        "knobs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()},
        "seed": seed,
        "device": str(qs.resolve_device(knobs["device"])),
        "train_seconds": round(train_s, 1),
        "accuracy": accuracy,
        "blind_baseline": qs.blind_baseline(data["train_questions"], data["test"]),
        "log": log,
    }
    (work / "teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    qs._say(
        f"teacher: greedy held-out accuracy {accuracy['accuracy']:.3f} "
        f"({ {t: round(v['accuracy'], 3) for t, v in accuracy['per_type'].items()} }) after "
        f"{qs._fmt_time(train_s)} of training"
    )
    return result


def teacher_matvlm(work: Path, seed: int) -> Path:
    """The trained teacher converted to MaTVLM (ratio 0), converted once and shared by every variant."""
    from ..convert.conversion import convert_tinyllava_to_matvlm

    source, teacher_dir = work / "teacher-tinyllava", work / "teacher-matvlm"
    if not (source / "config.json").exists():
        raise SystemExit(f"error: no trained teacher in {work} (run the `teacher` stage first)")
    if not (teacher_dir / "config.json").exists():
        convert_tinyllava_to_matvlm(source, teacher_dir, mamba_ratio=0.0, seed=seed, overwrite=True, progress=False)
    return teacher_dir


def variant_stage(
    work: Path,
    knobs: dict[str, Any],
    name: str,
    ratio: float,
    placement: str,
    init: str,
    loss: str,
    seed: int,
    layers: list[int] | None = None,
) -> dict[str, Any]:
    """Convert the trained teacher (`ratio`, `placement`, `init`; or exactly `layers`), score it, distil it with the
    `loss` terms on, score it again -> work/variants/NAME.json (accuracies, loss log, timings)."""
    out = work / "variants" / name
    teacher_dir, hybrid_dir = convert_variant(work, out, ratio, placement, init, seed, layers)
    run = distil_and_score(work, knobs, teacher_dir, hybrid_dir, out / "distilled", LOSSES[loss], seed)
    if layers:
        ratio, placement = len(layers) / run["num_layers"], "given"
    result = {
        "name": name,
        "ratio": ratio,
        "placement": placement,
        "init": init,
        "loss": loss,
        "weights": LOSSES[loss],
        "mamba_layers": run["mamba_layers"],
        "train_mode": knobs["train_mode"],
        "undistilled": run["before"],
        "distilled": run["after"],
        "distill_steps": knobs["distill_steps"],
        "distill_batch_size": knobs["distill_batch_size"],
        "distill_lr": knobs["distill_lr"],
        "distill_seconds": round(run["distill_s"], 1),
        "eval_seconds": round(run["eval_s"], 1),
        "log": run["log"],
    }
    (work / "variants" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    qs._say(
        f"{name}: Mamba layers {result['mamba_layers']}, accuracy {run['before']['accuracy']:.3f} -> "
        f"{run['after']['accuracy']:.3f} after {knobs['distill_steps']} steps ({qs._fmt_time(run['distill_s'])})"
    )
    return result


def convert_variant(
    work: Path, out: Path, ratio: float, placement: str, init: str, seed: int, layers: list[int] | None = None
) -> tuple[Path, Path]:
    """(the shared MaTVLM teacher, the hybrid converted from the trained teacher into out/undistilled with the
    project's converter: `ratio`, `placement`, `init`, or exactly the Mamba `layers`)."""
    from ..convert.conversion import convert_tinyllava_to_matvlm

    source, teacher_dir = work / "teacher-tinyllava", teacher_matvlm(work, seed)
    hybrid_dir = convert_tinyllava_to_matvlm(
        source,
        out / "undistilled",
        mamba_ratio=ratio,
        mamba_layers=layers,
        placement=placement,
        init=init,
        seed=seed,
        overwrite=True,
        progress=False,
    )
    return teacher_dir, hybrid_dir


def distil_and_score(
    work: Path,
    knobs: dict[str, Any],
    teacher_dir: Path,
    hybrid_dir: Path,
    out: Path,
    weights: tuple[float, float, float],
    seed: int,
) -> dict[str, Any]:
    """Greedy held-out accuracy of the hybrid, its distillation from the teacher (`quickstart.distill` with the loss
    `weights`, the student saved to `out`) on the study's training conversations, the distilled hybrid's accuracy:
    {"before", "after", "log", "mamba_layers", "num_layers", "distill_s", "eval_s" (seconds of both scorings)}."""
    import torch

    from ..processing_matvlm import MaTVLMProcessor
    from ..training.data import LLaVADataset
    from .synthetic_vqa import as_conversations

    teacher, hybrid = qs.load_matvlm(teacher_dir, knobs), qs.load_matvlm(hybrid_dir, knobs)
    processor = MaTVLMProcessor.from_pretrained(hybrid_dir)
    data = json.loads((work / "data" / "train.json").read_text())
    test = json.loads((work / "data" / "test.json").read_text())
    image_dir = work / "data" / "images"
    ev = dict(batch_size=knobs["eval_batch_size"], max_new_tokens=knobs["max_new_tokens"])
    t0 = time.perf_counter()
    _, before = qs.evaluate(hybrid, processor, test, image_dir, **ev)
    items = qs.materialize(LLaVADataset(as_conversations(data, seed=seed), image_dir, processor))
    t1 = time.perf_counter()
    log = qs.distill(hybrid, teacher, processor, items, out, knobs, seed, weights=weights)
    distill_s = time.perf_counter() - t1
    _, after = qs.evaluate(qs.load_matvlm(out, knobs), processor, test, image_dir, **ev)
    run = {
        "before": before,
        "after": after,
        "log": log,
        "mamba_layers": list(hybrid.config.mamba_layers),
        "num_layers": hybrid.config.text_config.num_hidden_layers,
        "distill_s": distill_s,
        "eval_s": time.perf_counter() - t0 - distill_s,
    }
    del teacher, hybrid
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run


# name -> (ratio, placement, init, loss): the ratios, then one factor at a time around the paper's 25 % recipe
VARIANTS: dict[str, tuple[float, str, str, str]] = {
    "h12.5": (0.125, "even", "attention", "layer+prob"),
    "h25": (0.25, "even", "attention", "layer+prob"),
    "h50": (0.5, "even", "attention", "layer+prob"),
    "h25-loss-ce": (0.25, "even", "attention", "ce"),
    "h25-loss-layer": (0.25, "even", "attention", "layer"),
    "h25-loss-prob": (0.25, "even", "attention", "prob"),
    "h25-loss-all": (0.25, "even", "attention", "all"),
    "h25-start": (0.25, "start", "attention", "layer+prob"),
    "h25-middle": (0.25, "middle", "attention", "layer+prob"),
    "h25-end": (0.25, "end", "attention", "layer+prob"),
    "h25-random-init": (0.25, "even", "random", "layer+prob"),
}


# The paper's ablations (25 % hybrid; average benchmark score, as summarised by a third-party note of the paper; the
# full paper text was not reachable here): loss prob+layer 62.3 > prob 61.4 > all three 61.3 > layer 60.7 > ce 55.6;
# placement even 62.3 > start 60.4 > middle 58.9, end fails to distil; ratio 25 % 62.3 > 12.5 % 61.8 > 50 % 60.1;
# attention initialisation: claimed to speed up convergence (no ablation numbers found).
PAPER = {
    "ratio": ["25 %", "12.5 %", "50 %"],
    "placement": ["even", "start", "middle", "end (fails)"],
    "loss": ["layer+prob", "prob", "all", "layer", "ce"],
    "init": ["attention", "random (claimed: slower convergence; no numbers found)"],
}


def _early_late(log: list[dict]) -> tuple[float, float]:
    """Mean L_prob over the 5 % of steps around 10 % of the run, and over the last 5 % (log must not be empty)."""
    n, w = len(log), max(1, len(log) // 20)
    i = max(w, n // 10)
    early = [e["l_prob"] for e in log[i - w : i + w]]
    late = [e["l_prob"] for e in log[-w:]]
    return sum(early) / len(early), sum(late) / len(late)


def _smooth(values: list[float], k: int) -> list[float]:
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


# ablation -> its label -> the variant that measures it (the 25 % recipe "h25" is everyone's reference)
GROUPS = {
    "ratio": {"12.5 %": "h12.5", "25 %": "h25", "50 %": "h50"},
    "placement": {"even": "h25", "start": "h25-start", "middle": "h25-middle", "end": "h25-end"},
    "loss": {k: ("h25" if k == "layer+prob" else f"h25-loss-{k}") for k in LOSSES},
    "init": {"attention": "h25", "random": "h25-random-init"},
}
TABLE_HEAD = [
    "| variant | Mamba layers | loss | steps x batch, lr | before distillation | after | after / teacher "
    "| L_prob at 10 % / 100 % of the steps |",
    "|---|---|---|---:|---:|---:|---:|---:|",
]


def load_results(work: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """work/teacher.json and every work/variants/*.json: (teacher, name -> variant), VARIANTS first in their order,
    then the others by name."""
    teacher = json.loads((work / "teacher.json").read_text())
    found = {p.stem: json.loads(p.read_text()) for p in (work / "variants").glob("*.json")}
    return teacher, {n: found.pop(n) for n in list(VARIANTS) if n in found} | dict(sorted(found.items()))


def ordering(variants: dict[str, dict], names: dict[str, str]) -> str:
    """The labels of `names` (label -> variant) by accuracy after distillation, best first; "≈" where two neighbours
    differ by less than two standard errors of the difference (binomial, on the test questions)."""
    have = {label: variants[n]["distilled"]["accuracy"] for label, n in names.items() if n in variants}
    ranked = sorted(have, key=lambda label: -have[label])
    out = ranked[:1]
    for prev, cur in zip(ranked, ranked[1:]):
        n = variants[names[cur]]["distilled"]["total"]
        p_mean = (have[prev] + have[cur]) / 2
        se = (2 * p_mean * (1 - p_mean) / max(n, 1)) ** 0.5
        out += [">" if have[prev] - have[cur] > 2 * se else "≈", cur]
    return " ".join(out)


def ordering_by_kl(variants: dict[str, dict], names: dict[str, str]) -> str:
    """The labels of `names` by final L_prob (the KL to the teacher), lowest first, with the values."""
    have = {
        label: _early_late(variants[n]["log"])[1] for label, n in names.items() if n in variants and variants[n]["log"]
    }
    return " > ".join(f"{label} ({have[label]:.2f})" for label in sorted(have, key=have.get))


def _variant_row(name: str, v: dict[str, Any], t_acc: float) -> str:
    """One line of the variants' table; `t_acc`: the teacher's accuracy."""
    mode = v.get("train_mode", "mamba+connector")
    loss = v["loss"] + ("" if mode == "mamba+connector" else f" ({mode} trained)")
    return (
        f"| {name} | {v['mamba_layers']} ({v['placement']}, {v['init']} init) | {loss} | "
        f"{v['distill_steps']} x {v.get('distill_batch_size', '?')}, {v.get('distill_lr', '?')} | "
        f"{100 * v['undistilled']['accuracy']:.1f} % | {100 * v['distilled']['accuracy']:.1f} % | "
        f"{100 * v['distilled']['accuracy'] / max(t_acc, 1e-9):.1f} % | "
        f"{'%.2f / %.2f' % _early_late(v['log']) if v['log'] else '-'} |"
    )


def _teacher_lines(teacher: dict[str, Any], note: str) -> list[str]:
    """The generated page's title, `note`, and the paragraph on the teacher and the protocol."""
    knobs, t_acc = teacher["knobs"], teacher["accuracy"]["accuracy"]
    return [
        "# The MaTVLM study on the synthetic visual-QA world: results",
        "",
        "Written by `matvlm study report` (tables, orderings, study.png, study.json); the reading is in "
        "[README.md](README.md).",
        "",
        *([note, ""] if note else []),
        f"Teacher: TinyLLaVA layout (SigLIP {knobs['vision']['num_hidden_layers']} x {knobs['vision']['hidden_size']}, "
        f"Phi {knobs['lm']['num_hidden_layers']} x {knobs['lm']['hidden_size']}), trained from scratch for "
        f"{knobs['teacher_steps']} steps of {knobs['teacher_batch_size']} conversations in "
        f"{teacher['train_seconds']:.0f} s on `{teacher.get('device', knobs['device'])}`; held-out greedy exact match "
        f"**{100 * t_acc:.1f} %** on {teacher['accuracy']['total']} questions "
        f"(blind baseline {100 * teacher['blind_baseline']['accuracy']:.1f} %).",
        "Every variant: converted from that checkpoint with the project's converter, then distilled (steps, batch "
        f"and lr below; the teacher took {knobs['teacher_steps']} steps), Mamba mixers + connector trainable. "
        "Reproduce: `matvlm study all --workdir W --docs DIR --set KEY=VALUE ...` with the knobs in study.json. "
        "Orderings: `≈` marks neighbours less than two standard errors apart (binomial, on the test questions).",
        "",
    ]


def _orderings_lines(orderings: dict[str, str], kl_orderings: dict[str, str]) -> list[str]:
    """The table of our orderings beside the paper's, and where the paper's come from."""
    return [
        "",
        "## Orderings beside the paper's (best first)",
        "",
        "| ablation | ours: held-out accuracy after distillation | ours: final L_prob (KL to the teacher) "
        "| paper (average benchmark score) |",
        "|---|---|---|---|",
        *(f"| {key} | {orderings[key]} | {kl_orderings[key]} | {' > '.join(PAPER[key])} |" for key in orderings),
        "",
        "Paper column: as summarised by a third-party note of the paper (the full text was not reachable "
        "here): loss prob+layer 62.3, prob 61.4, all 61.3, layer 60.7, ce 55.6; placement even 62.3, start 60.4, "
        "middle 58.9, end fails; ratio 25 % 62.3, 12.5 % 61.8, 50 % 60.1.",
        "",
    ]


def all_orderings(variants: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
    """Per ablation of GROUPS: (its ordering by accuracy after distillation, its ordering by final KL)."""
    return (
        {key: ordering(variants, names) for key, names in GROUPS.items()},
        {key: ordering_by_kl(variants, names) for key, names in GROUPS.items()},
    )


def report_text(teacher: dict[str, Any], variants: dict[str, dict], note: str = "") -> str:
    """The generated results page (markdown): the teacher, one table of VARIANTS and one of the other variants,
    the orderings beside the paper's, the plot (study.png) and its caption."""
    t_acc = teacher["accuracy"]["accuracy"]
    lines = [*_teacher_lines(teacher, note), *TABLE_HEAD]
    lines += [_variant_row(n, variants[n], t_acc) for n in variants if n in VARIANTS]
    extras = [n for n in variants if n not in VARIANTS]
    if extras:
        lines += ["", "### Other distillation recipes (same step budget)", "", *TABLE_HEAD]
        lines += [_variant_row(n, variants[n], t_acc) for n in extras]
    lines += _orderings_lines(*all_orderings(variants))
    return (
        "\n".join(lines)
        + "\n"
        + "\n![loss curves and accuracies](study.png)\n\nCurves: L_prob, the KL divergence to the teacher, logged for "
        "every variant whatever its loss weights (a common yardstick), smoothed; legend: accuracy after.\n"
    )


def plot_study(variants: dict[str, dict], t_acc: float, distill_steps: int, path: Path) -> None:
    """study.png: accuracy before/after per Mamba share beside the teacher's (`t_acc`), then L_prob vs step for
    the loss, placement and initialisation ablations (and the other recipes, when any ran)."""
    import matplotlib.pyplot as plt

    extras = [n for n in variants if n not in VARIANTS]
    fig, axes = plt.subplots(1, 5 if extras else 4, figsize=(27.5 if extras else 22, 4.6))
    ax = axes[0]
    names = [n for n in ("h12.5", "h25", "h50") if n in variants]
    xs = range(len(names))
    before, after = ([100 * variants[n][when]["accuracy"] for n in names] for when in ("undistilled", "distilled"))
    ax.bar([x - 0.2 for x in xs], before, 0.4, label="converted", color="#d62728")
    ax.bar([x + 0.2 for x in xs], after, 0.4, label="distilled", color="#2ca02c")
    ax.axhline(100 * t_acc, color="#1f77b4", ls="--", label="teacher")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Mamba share: accuracy")
    if names:
        ax.legend(fontsize=8)
    groups = [
        ("loss terms (25 %)", ["h25"] + [f"h25-loss-{k}" for k in ("ce", "layer", "prob", "all")]),
        ("placement (25 %)", ["h25", "h25-start", "h25-middle", "h25-end"]),
        ("initialisation (25 %)", ["h25", "h25-random-init"]),
    ]
    if extras:
        groups.append(("other recipes", ["h25", "h50", *extras]))
    for ax, (title, members) in zip(axes[1:], groups):
        _plot_kl_curves(ax, {n: variants[n] for n in members if n in variants and variants[n]["log"]}, distill_steps)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_kl_curves(ax, variants: dict[str, dict], distill_steps: int) -> None:
    """L_prob vs distillation step of each variant (smoothed over ~1/50 of the steps; 50 % hybrids dashed)."""
    k = max(1, distill_steps // 50)
    for name, v in variants.items():
        log = v["log"]
        ax.plot(
            [e["step"] for e in log],
            _smooth([e["l_prob"] for e in log], k),
            ls="--" if name.startswith("h50") else "-",
            label=f"{name} ({100 * v['distilled']['accuracy']:.1f} %)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("L_prob = KL(teacher || student)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def report_stage(work: Path, docs: Path, note: str = "") -> str:
    """The generated part of the report, into `docs`: results.md (tables, orderings vs the paper), study.png (loss
    curves, accuracies), study.json. docs/README.md, the hand-written reading, is never written. Returns the text
    of results.md."""
    from ..extras import require

    require("matplotlib", "matvlm study's report")
    import matplotlib

    matplotlib.use("Agg")
    teacher, variants = load_results(work)
    docs.mkdir(parents=True, exist_ok=True)
    text = report_text(teacher, variants, note)
    plot_study(variants, teacher["accuracy"]["accuracy"], teacher["knobs"]["distill_steps"], docs / "study.png")
    (docs / "results.md").write_text(text)
    by_accuracy, by_kl = all_orderings(variants)
    summary = {
        "teacher": {k: teacher[k] for k in ("accuracy", "blind_baseline", "train_seconds", "knobs")},
        "orderings": by_accuracy,
        "kl_orderings": by_kl,
        "paper_orderings": PAPER,
        "variants": {n: {k: v for k, v in var.items() if k != "log"} for n, var in variants.items()},
    }
    (docs / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    return text


def run_parallel(work: Path, names: list[str], sets: list[str], seed: int, jobs: int) -> None:
    """Each variant in its own `matvlm study variant` process, `jobs` at a time; logs in work/variants."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    (work / "variants").mkdir(parents=True, exist_ok=True)
    teacher_matvlm(work, seed)  # before the processes start: they would all convert it at once

    def one(name: str) -> int:
        cmd = [
            sys.executable,
            "-m",
            "matvlm_hf.commands.study",
            "variant",
            "--workdir",
            str(work),
            "--name",
            name,
            "--seed",
            str(seed),
            "--set",
            *sets,
        ]
        with open(work / "variants" / f"{name}.log", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        qs._say(f"{name}: {'done' if code == 0 else f'FAILED (exit {code}), see its log'}")
        return code

    with ThreadPoolExecutor(jobs) as pool:
        failed = [n for n, code in zip(names, pool.map(one, names)) if code]
    if failed:
        raise SystemExit(f"error: variant(s) failed: {', '.join(failed)} (logs in {work / 'variants'})")


def main(argv: list[str] | None = None) -> str | None:
    """`matvlm study` (`commands/study.py`, imported when called), kept here for `python -m` and old callers."""
    from ..commands.study import main as command

    return command(argv)


if __name__ == "__main__":
    main()
