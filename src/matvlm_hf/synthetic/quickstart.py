"""`matvlm quickstart`: the whole MaTVLM recipe on a CPU, from nothing, in a few minutes.

    matvlm quickstart                        # default run: about 7 minutes on 2 CPU cores
    matvlm quickstart --teacher PATH         # start from your own TinyLLaVA checkpoint (skips step 2)
    matvlm quickstart --fast                 # CI scale (well under a minute); its accuracies mean nothing

1. data     a synthetic visual-QA set (coloured shapes on a 2 x 2 grid; questions about colour, shape, size,
            count and position), written in LLaVA format (`synthetic_vqa.make_dataset`); training records are
            conversations (a caption and five questions per image), test records single questions;
2. teacher  a tiny TinyLLaVA (SigLIP -> mlp2x_gelu -> Phi, 4 layers) trained from scratch the way TinyLLaVA's are
            built, scaled down: the SigLIP first pretrained alone (per-cell object attributes, the stand-in for
            SigLIP's own pretraining), then frozen while connector and LM learn the conversations (cross-entropy on
            the answer tokens only); saved in the *published TinyLLaVA layout* (`fabricate.save_tinyllava_checkpoint`)
            so that the next step is the real conversion path;
3. convert  TinyLLaVA -> MaTVLM twice: ratio 0 (the teacher, repackaged) and ratio 0.25 (the hybrid: Mamba-2 in
            layer 0 of 4, initialised from its attention, paper Eq. 6);
4. distil   `MaTVLMDistillationTrainer` with the paper's losses (L_layer + L_prob, no CE), Mamba mixers + connector
            trainable; a shorter, higher-learning-rate schedule than the paper's, to fit the CPU budget;
5. report   greedy exact-match accuracy (`synthetic_vqa.score`) of the teacher and the hybrid before and after
            distillation, overall and per question type, on the held-out split, beside a blind baseline (the most
            common training answer per question type); decode tokens/s (tiny CPU numbers: not a speed claim);
            one question about one freshly generated image; `summary.png` and `summary.json` in the work dir.

The knobs are the `KNOBS` dict just below (nanoGPT style); `FAST` overrides some of them for `--fast`, and a few have
command-line flags. Everything is seeded (`--seed`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------------------------
# Knobs
KNOBS: dict[str, Any] = dict(
    # data: synthetic_vqa images of `image_size` px (2 x 2 grid of 16 px cells)
    image_size=32,
    question_types=("color", "shape", "size", "count", "position"),
    n_train=6000,  # training images, each one conversation; the teacher and the distillation use the same ones
    n_test=400,  # held-out images, one question each (no scene shared with the training split)
    questions_per_image=5,  # training conversations: this many questions about one image, in a shuffled order
    captions=True,  # plus a "Describe the image." turn (the dense signal that gets the image pathway learning)
    # teacher: fabricate's tiny TinyLLaVA-Phi preset with these dimensions (image size from `image_size`)
    vision_feature_select_strategy="cls_patch",  # keep every patch: 16 px patches = the 4 grid cells = 4 image tokens
    vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, patch_size=16),
    lm=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, vocab_size=1280),
    device="auto",  # auto = CUDA when available
    vision_pretrain_steps=1000,  # stage 0: the vision tower alone learns per-cell attributes (SigLIP comes pretrained)
    vision_pretrain_lr=2e-3,  # cosine-decayed to 0 after `teacher_warmup` steps of warmup
    freeze_vision_tower=True,  # during the teacher's training (TinyLLaVA's recipe freezes its pretrained SigLIP)
    teacher_steps=700,
    teacher_batch_size=32,
    teacher_lr=3e-3,
    teacher_warmup=200,
    teacher_weight_decay=0.01,
    # hybrid: conversion and distillation (loss weights are the paper's: alpha = beta = 1, gamma = 0)
    mamba_ratio=0.25,  # of 4 layers: layer 0
    # SSD chunk of the PyTorch reference scan; exact at any value, smaller = faster on short inputs
    mamba_chunk_size=32,
    mamba_kernels=True,  # mamba_ssm's Triton kernels when installed and on CUDA (else the PyTorch reference scan)
    distill_steps=150,  # 150 / 700 = 0.21 of the teacher's steps, at half its batch
    distill_batch_size=16,
    distill_lr=1e-3,  # the paper: 2e-4 over 665K samples; far fewer steps here
    distill_warmup_ratio=0.1,
    distill_max_grad_norm=1.0,  # the paper: 0.1
    train_mode="mamba+connector",
    # evaluation
    eval_batch_size=200,
    max_new_tokens=12,  # the longest answer ("bottom right") is 8 tokens + <|endoftext|> with the tiny tokenizer
    speed_new_tokens=32,
    log_every=50,  # progress lines (teacher steps)
    eval_every=100,  # teacher-forced held-out accuracy every N teacher steps (0 = never)
)
FAST: dict[str, Any] = dict(
    n_train=128,
    n_test=40,
    vision_pretrain_steps=20,
    teacher_steps=20,
    teacher_warmup=5,
    distill_steps=8,
    distill_batch_size=8,
    eval_batch_size=40,
    speed_new_tokens=8,
    log_every=10,
    eval_every=10,
)

STAGES = 6


def _say(message: str) -> None:
    print(message, flush=True)


def _fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


# ----------------------------------------------------------------------------------------------------------------
# Data


def make_data(out: Path, knobs: dict[str, Any], image_size: int, seed: int) -> dict[str, Any]:
    """LLaVA-format train/test JSON + PNGs under `out`; returns paths and the loaded records.

    Training records are multi-turn (`questions_per_image` questions about one image, after a caption turn when
    `captions`); test records are single questions (no caption), balanced over `question_types`.
    """
    from .synthetic_vqa import as_conversations, make_dataset

    if out.exists():
        shutil.rmtree(out)
    types = list(knobs["question_types"])
    train_types = (["caption"] if knobs["captions"] else []) + types
    k = knobs["questions_per_image"] + bool(knobs["captions"])
    paths = make_dataset(
        out,
        n_train=knobs["n_train"],
        n_test=knobs["n_test"],
        image_size=image_size,
        seed=seed,
        question_types=train_types,
        questions_per_image=k,
        test_question_types=types,
        test_questions_per_image=1,
        progress=False,
    )
    questions = json.loads(paths["train"].read_text(encoding="utf-8"))
    test = json.loads(paths["test"].read_text(encoding="utf-8"))
    return {"paths": paths, "train": as_conversations(questions, seed=seed), "train_questions": questions, "test": test}


def answer_of(record: dict[str, Any]) -> str:
    return next(t["value"] for t in reversed(record["conversations"]) if t["from"] == "gpt")


def blind_baseline(train: list[dict], test: list[dict]) -> dict[str, Any]:
    """Score of answering every test question with the most common training answer of its type (no image)."""
    from .synthetic_vqa import score

    by_type: dict[str, Counter] = {}
    for r in train:
        by_type.setdefault(r["question_type"], Counter())[answer_of(r)] += 1
    predictions = {
        r["id"]: by_type[r["question_type"]].most_common(1)[0][0] for r in test if r["question_type"] in by_type
    }
    return score(predictions, test)


def materialize(dataset, records: list[dict] | None = None) -> list[dict]:
    """Tokenise and preprocess every sample once (the data are tiny; saves the PIL work at every step); items get
    their record's `question_type` when `records` are given."""
    items = [dataset[i] for i in range(len(dataset))]
    for item, record in zip(items, records or []):
        item["question_type"] = record.get("question_type", "unknown")
    return items


# ----------------------------------------------------------------------------------------------------------------
# Teacher (trained from scratch, saved as TinyLLaVA)


def build_teacher(knobs: dict[str, Any], image_size: int, seed: int):
    """A fresh attention-only MaTVLM with TinyLLaVA-Phi dimensions, its tokenizer and processor."""
    import torch

    from ..configuration_matvlm import MaTVLMConfig
    from ..convert.fabricate import build_tokenizer, tinyllava_configs
    from ..modeling_matvlm import MaTVLMForConditionalGeneration
    from ..processing_matvlm import MaTVLMProcessor, siglip_image_processor

    tokenizer = build_tokenizer("phi")
    text_config, vision_config = tinyllava_configs(
        tokenizer, "phi", "tiny", lm=knobs["lm"], vision={**knobs["vision"], "image_size": image_size}
    )
    config = MaTVLMConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        mamba_layers=[],
        vision_feature_select_strategy=knobs["vision_feature_select_strategy"],
    )
    torch.manual_seed(seed)
    model = MaTVLMForConditionalGeneration(config)
    processor = MaTVLMProcessor(
        image_processor=siglip_image_processor(image_size),
        tokenizer=tokenizer,
        image_token_id=config.image_token_id,
        num_image_tokens=config.num_image_tokens,
        image_aspect_ratio="square",
    )
    return model, tokenizer, processor


def cell_attribute_labels(records: list[dict], items: list[dict]) -> tuple[list, list, dict[str, tuple[str, ...]]]:
    """What the vision pretraining learns, from the training captions: (pixel_values of each image that has a
    caption turn and pixels, its labels: per grid cell (4, in POSITIONS order) the [shape, colour, size] indices
    into `vocab`, vocab: {"shape", "color", "size"} -> names, "nothing" first for an empty cell).
    ValueError when no record has a caption turn (knob captions=False)."""
    from .synthetic_vqa import COLORS, POSITIONS, SHAPES, SIZES, parse_description

    vocab = {"shape": ("nothing",) + SHAPES, "color": ("nothing",) + tuple(COLORS), "size": ("nothing",) + SIZES}
    pixels, labels = [], []
    for record, item in zip(records, items):
        cells = next(
            (
                c
                for t in record["conversations"]
                if t["from"] == "gpt"
                for c in [parse_description(t["value"])]
                if c is not None
            ),
            None,
        )
        if cells is None or "pixel_values" not in item:
            continue
        row = []
        for name in POSITIONS.values():
            size, color, shape = cells[name] or ("nothing",) * 3
            row.append([vocab["shape"].index(shape), vocab["color"].index(color), vocab["size"].index(size)])
        pixels.append(item["pixel_values"])
        labels.append(row)
    if not labels:
        raise ValueError("vision pretraining needs caption turns in the training records (knob captions=True)")
    return pixels, labels, vocab


def cell_features(model):
    """A function (b, 3, H, W) pixels -> (b, 4 cells, d): the vision tower's features at the layer the connector
    reads, averaged over each 2 x 2 grid cell's patch tokens."""
    import torch

    vc, tower, device = model.config.vision_config, model.vision_tower, next(model.parameters()).device
    side = vc.image_size // vc.patch_size
    cell_of_token = [(r * 2 // side) * 2 + (c * 2 // side) for r in range(side) for c in range(side)]
    cell_tokens = [torch.tensor([t for t, c in enumerate(cell_of_token) if c == k], device=device) for k in range(4)]

    def per_cell(px: torch.Tensor) -> torch.Tensor:
        feats = tower(pixel_values=px, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        return torch.stack([feats[:, t].mean(1) for t in cell_tokens], 1)

    return per_cell


def pretrain_vision(model, records: list[dict], items: list[dict], knobs: dict[str, Any], seed: int) -> list[dict]:
    """Stage 0, the stand-in for SigLIP's own pretraining: the vision tower alone learns to classify each grid
    cell's object (shape, colour, size, or nothing) from the feature layer the connector reads, with the labels
    parsed from the training captions (`cell_attribute_labels`); the classification heads are dropped afterwards.
    Returns the loss log (its last entry with the heads' per-cell accuracy)."""
    import torch

    pixels, labels, vocab = cell_attribute_labels(records, items)
    device = next(model.parameters()).device
    pixels, labels = torch.cat(pixels).to(device), torch.tensor(labels, device=device)  # (n, 3, H, W), (n, 4, 3)
    per_cell, tower = cell_features(model), model.vision_tower
    hidden = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(v)) for v in vocab.values()).to(device)
    log = _train_cell_heads(tower, heads, per_cell, pixels, labels, knobs, seed)
    tower.eval()
    with torch.no_grad():  # per-cell accuracy of each head on (up to) 1000 training images: how much the tower knows
        pooled = per_cell(pixels[:1000])
        accuracy = {
            name: (head(pooled).argmax(-1) == labels[:1000][..., j]).float().mean().item()
            for j, (name, head) in enumerate(zip(vocab, heads))
        }
    if log:
        _say(
            f"    vision pretraining: {len(log)} steps, per-cell attribute loss {log[0]['loss']:.3f} -> "
            f"{sum(e['loss'] for e in log[-20:]) / len(log[-20:]):.3f}; per-cell accuracy "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in accuracy.items())
        )
        log[-1]["accuracy"] = accuracy
    return log


def _train_cell_heads(tower, heads, per_cell, pixels, labels, knobs: dict[str, Any], seed: int) -> list[dict]:
    """`vision_pretrain_steps` AdamW steps (cosine schedule after `teacher_warmup`) of tower + heads on the summed
    per-cell cross-entropies, random batches of `teacher_batch_size` images; returns [{"step", "loss"}]."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=knobs["vision_pretrain_lr"])
    steps = knobs["vision_pretrain_steps"]
    schedule = get_cosine_schedule_with_warmup(optimizer, min(knobs["teacher_warmup"], steps // 2), steps)
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(labels), (knobs["teacher_batch_size"],), generator=gen).to(labels.device)
        pooled = per_cell(pixels[idx])
        loss = sum(
            torch.nn.functional.cross_entropy(head(pooled).flatten(0, 1), labels[idx][..., j].flatten())
            for j, head in enumerate(heads)
        )
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [{"step": i + 1, "loss": v} for i, v in enumerate(torch.stack(losses).tolist())] if losses else []


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def teacher_forced_accuracy(model, items: list[dict], collate, batch_size: int = 256) -> tuple[float, dict[str, float]]:
    """Share of items whose every answer token (EOS included) is the argmax under teacher forcing, overall and
    per `question_type`; for single-turn items that is exactly greedy decoding's exact match, at one forward pass."""
    import torch

    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    ok: list[bool] = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size]).items()}
            labels = batch.pop("labels")[:, 1:]
            pred = model(**batch, use_cache=False).logits[:, :-1].argmax(-1)
            ok += ((pred == labels) | (labels == -100)).all(1).tolist()
    model.train(was_training)
    per: dict[str, list[bool]] = {}
    for item, o in zip(items, ok):
        per.setdefault(item.get("question_type", "all"), []).append(o)
    return sum(ok) / max(len(ok), 1), {t: sum(v) / len(v) for t, v in sorted(per.items())}


def train_teacher(
    model, items: list[dict], pad_token_id: int, knobs: dict[str, Any], seed: int, eval_items: list[dict] | None = None
) -> list[dict]:
    """Plain AdamW loop on the answer-token cross-entropy (every parameter trained) on `knobs["device"]` (bf16
    autocast on CUDA); returns the loss log, with the teacher-forced test accuracy every `eval_every` steps."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from ..training.data import LLaVACollator
    from ..training.distillation import optimizer_param_groups

    steps, batch_size = knobs["teacher_steps"], knobs["teacher_batch_size"]
    device = resolve_device(knobs["device"])
    collate = LLaVACollator(pad_token_id)
    model.to(device).train().requires_grad_(True)
    if knobs["freeze_vision_tower"]:  # TinyLLaVA's own recipe keeps its (pretrained) SigLIP frozen
        model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, knobs["teacher_weight_decay"]), lr=knobs["teacher_lr"], betas=(0.9, 0.95)
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, min(knobs["teacher_warmup"], steps // 2), steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    log, window, start = [], [], time.perf_counter()
    eval_every = knobs["eval_every"] if eval_items else 0
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(items), generator=gen).tolist()
        batch = {k: v.to(device, non_blocking=True) for k, v in collate([items[i] for i in order[:batch_size]]).items()}
        del order[:batch_size]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        entry: dict[str, Any] = {"step": step, "loss": None, "time_s": None}
        log.append(entry)
        if step % knobs["log_every"] == 0 or step == steps or (eval_every and step % eval_every == 0):
            losses = torch.stack(window).float().tolist()
            for e, value in zip(log[-len(losses) :], losses):
                e["loss"] = value
            entry["time_s"] = round(time.perf_counter() - start, 2)
            text = f"    teacher step {step:5d}/{steps}  loss {sum(losses) / len(losses):.3f}"
            if eval_every and (step % eval_every == 0 or step == steps):
                entry["tf_accuracy"], entry["tf_accuracy_per_type"] = teacher_forced_accuracy(
                    model, eval_items, collate
                )
                text += f"  held-out {_pct(entry['tf_accuracy']).strip()}"
            elapsed = time.perf_counter() - start
            _say(text + f"  ({_fmt_time(elapsed)}, ~{_fmt_time(elapsed / step * (steps - step))} left)")
            window = []
    model.eval()
    return log


def train_new_teacher(data: dict[str, Any], knobs: dict[str, Any], image_size: int, seed: int, out: Path):
    """A fresh teacher (`build_teacher`), its vision tower pretrained when `vision_pretrain_steps`, trained on
    data["train"] with held-out teacher-forced scores on data["test"], saved in the TinyLLaVA layout at `out`.
    Returns (model on `knobs["device"]`, tokenizer, processor, training log)."""
    from ..training.data import LLaVADataset
    from ..convert.fabricate import save_tinyllava_checkpoint

    model, tokenizer, processor = build_teacher(knobs, image_size, seed)
    image_dir = data["paths"]["images"]
    _say(
        f"    {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters: SigLIP "
        f"{knobs['vision']['num_hidden_layers']} layers x {knobs['vision']['hidden_size']}, Phi "
        f"{knobs['lm']['num_hidden_layers']} layers x {knobs['lm']['hidden_size']}; "
        f"{model.config.num_image_tokens} image tokens per image"
    )
    items = materialize(LLaVADataset(data["train"], image_dir, processor))
    test_items = materialize(LLaVADataset(data["test"], image_dir, processor), data["test"])
    model.to(resolve_device(knobs["device"]))
    if knobs["vision_pretrain_steps"]:
        pretrain_vision(model, data["train"], items, knobs, seed)
    log = train_teacher(model, items, tokenizer.pad_token_id, knobs, seed, eval_items=test_items)
    save_tinyllava_checkpoint(model, tokenizer, out)
    _say(f"    saved in the TinyLLaVA layout: {out}")
    return model, tokenizer, processor, log


def load_matvlm(path: Path, knobs: dict[str, Any]):
    """A MaTVLM checkpoint in float32 on `knobs["device"]`, eval mode, with the knobs' SSD chunk size and kernel
    choice."""
    import torch

    from ..modeling_matvlm import MaTVLMForConditionalGeneration

    return (
        MaTVLMForConditionalGeneration.from_pretrained(
            path,
            dtype=torch.float32,
            mamba_chunk_size=knobs["mamba_chunk_size"],
            use_mamba_kernels=knobs["mamba_kernels"],
        )
        .to(resolve_device(knobs["device"]))
        .eval()
    )


# ----------------------------------------------------------------------------------------------------------------
# Distillation


def distill_recipe(knobs: dict[str, Any], seed: int, weights: tuple[float, float, float] = (1.0, 1.0, 0.0)):
    """The quickstart's `DistillationRecipe`: the loss weights `weights` (alpha: L_layer, beta: L_prob, gamma: L_ce;
    the paper's by default) and the paper's optimiser, on the knobs' shorter schedule (`distill_steps` steps of
    `distill_batch_size` samples, no accumulation, lr `distill_lr`, `distill_warmup_ratio`, grad norm
    `distill_max_grad_norm`); bf16 on CUDA, no checkpointing, no loader workers (the items are in memory), and
    transformers' default AdamW implementation (fused from torch 2.8), which the quickstart has always used."""
    import dataclasses

    from transformers import TrainingArguments

    from ..training.recipe import DistillationRecipe

    alpha, beta, gamma = weights
    batch = knobs["distill_batch_size"]
    return DistillationRecipe(
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        train_mode=knobs["train_mode"],
        learning_rate=knobs["distill_lr"],
        optimizer=next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim"),
        warmup_ratio=knobs["distill_warmup_ratio"],
        global_batch_size=batch,
        per_device_batch_size=batch,
        max_steps=knobs["distill_steps"],
        max_grad_norm=knobs["distill_max_grad_norm"],
        bf16="true" if resolve_device(knobs["device"]).type == "cuda" else "false",
        gradient_checkpointing=False,
        num_workers=0,
        seed=seed,
    )


def distill(
    student,
    teacher,
    processor,
    items: list[dict],
    out: Path,
    knobs: dict[str, Any],
    seed: int,
    weights: tuple[float, float, float] = (1.0, 1.0, 0.0),
) -> list[dict]:
    """The trainer factory's `MaTVLMDistillationTrainer` with `distill_recipe(knobs, seed, weights)` on the
    training items, on `knobs["device"]`; saves the student to `out` (the trainer's folder: `out`'s sibling
    distill-run); returns the logged losses (all three terms, every step)."""
    from transformers.trainer_callback import PrinterCallback

    from ..training.trainer_factory import make_trainer

    recipe = distill_recipe(knobs, seed, weights)
    student.train()
    log: list[dict] = []
    trainer = make_trainer(
        recipe,
        student,
        teacher,
        items,
        processor,
        out.parent / "distill-run",
        device=resolve_device(knobs["device"]).type,
        callbacks=[_distill_progress(log, recipe.max_steps)],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer.remove_callback(PrinterCallback)  # the progress callback prints instead
    trainer.train()
    trainer.save_model(str(out))
    student.generation_config.save_pretrained(out)
    student.eval()
    return log


def _distill_progress(log: list[dict], steps: int):
    """A TrainerCallback appending every logged step's losses and learning rate to `log`, and printing a progress
    line (losses, elapsed and estimated remaining time) every ~10 % of the `steps`."""
    from transformers import TrainerCallback

    print_every = max(1, steps // 10)
    start = time.perf_counter()

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "l_total" not in logs:
                return
            entry = {
                "step": state.global_step,
                **{k: logs[k] for k in ("l_total", "l_layer", "l_prob", "l_ce")},
                "lr": logs.get("learning_rate"),
            }
            log.append(entry)
            if state.global_step % print_every == 0 or state.global_step in (1, steps):
                elapsed = time.perf_counter() - start
                left = elapsed / max(state.global_step, 1) * (steps - state.global_step)
                _say(
                    f"    distil step {state.global_step:4d}/{steps}  loss {entry['l_total']:.3f} "
                    f"(L_layer {entry['l_layer']:.3f}, L_prob {entry['l_prob']:.3f}, L_ce {entry['l_ce']:.3f})  "
                    f"({_fmt_time(elapsed)}, ~{_fmt_time(left)} left)"
                )

    return Progress()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    model, processor, records: list[dict], image_dir: Path, *, batch_size: int, max_new_tokens: int
) -> tuple[dict[str, str], dict[str, Any]]:
    """Greedy answers to `records` (batched, left padding) and their `synthetic_vqa.score`."""
    import torch

    from ..chat_template import format_conversation
    from .synthetic_vqa import score

    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    predictions: dict[str, str] = {}
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            prompts = [format_conversation(r["conversations"][:1], add_generation_prompt=True) for r in batch]
            inputs = processor(
                images=[image_dir / r["image"] for r in batch], text=prompts, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            predictions.update({r["id"]: a.strip() for r, a in zip(batch, answers)})
    finally:
        tokenizer.padding_side = side
    return predictions, score(predictions, records)


def answer(model, processor, image, question: str, max_new_tokens: int) -> str:
    import torch

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------------------
# Report


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def summary_table(rows: list[tuple[str, dict, float | None]], types: list[str]) -> str:
    """rows: (name, score dict, decode tokens/s or None)."""
    name_w = max(len(r[0]) for r in rows)
    head = f"{'model':<{name_w}}  {'overall':>7}" + "".join(f"  {t:>8}" for t in types) + "  decode tok/s"
    lines = [head, "-" * len(head)]
    for name, sc, speed in rows:
        cells = "".join(f"  {_pct(sc['per_type'][t]['accuracy']) if t in sc['per_type'] else '-':>8}" for t in types)
        lines.append(
            f"{name:<{name_w}}  {_pct(sc['accuracy']):>7}{cells}  {f'{speed:12.0f}' if speed is not None else '':>12}"
        )
    return "\n".join(lines)


def write_summary_png(path: Path, results: dict[str, Any], example_image) -> Path:
    """Three panels: the example image with its answers, accuracy per type, the training/distillation losses."""
    from ..extras import require

    require("matplotlib", "matvlm quickstart's summary plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 4.8))
    grid = fig.add_gridspec(1, 3, width_ratios=[0.8, 1.6, 1.2])
    _example_panel(fig.add_subplot(grid[0]), results["example"], example_image)
    _accuracy_panel(fig.add_subplot(grid[1]), results["accuracy"], results["question_types"])
    _loss_panel(fig.add_subplot(grid[2]), results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _example_panel(ax, ex: dict[str, Any], image) -> None:
    """The example image, its question as the title and each model's answer below."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(ex["question"], fontsize=9, wrap=True)
    ax.set_xlabel(
        f"true: {ex['answer']}\nteacher: {ex['teacher']}\nhybrid before: {ex['hybrid_undistilled']}\n"
        f"hybrid after: {ex['hybrid_distilled']}",
        fontsize=9,
    )


def _accuracy_panel(ax, acc: dict[str, dict], types: list[str]) -> None:
    """Bars of held-out accuracy, overall and per question type, for the baseline and the three models."""
    models = [
        ("blind baseline", "baseline", "#bbbbbb"),
        ("teacher", "teacher", "#1f77b4"),
        ("hybrid, undistilled", "hybrid_undistilled", "#d62728"),
        ("hybrid, distilled", "hybrid_distilled", "#2ca02c"),
    ]
    labels = ["overall"] + types
    width = 0.8 / len(models)
    for k, (name, key, colour) in enumerate(models):
        sc = acc[key]
        values = [sc["accuracy"]] + [sc["per_type"].get(t, {"accuracy": 0.0})["accuracy"] for t in types]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [100 * v for v in values], width, label=name, color=colour)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"held-out accuracy ({acc['teacher']['total']} questions, greedy)")
    ax.legend(fontsize=8, loc="upper right", ncol=2)


def _loss_panel(ax, results: dict[str, Any]) -> None:
    """The distillation losses per step (log scale), and the teacher's training loss on a second x axis on top."""
    dlog = results["distill_log"]
    if dlog:
        steps = [e["step"] for e in dlog]
        for key, colour in (("l_total", "black"), ("l_layer", "#9467bd"), ("l_prob", "#ff7f0e")):
            ax.plot(steps, [e[key] for e in dlog], label=key, color=colour, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("distillation step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title(f"distillation (Mamba layers {results['mamba_layers']})")
    tlog = results["teacher_log"]
    if tlog:  # the teacher's training loss on a second axis
        twin = ax.twiny()
        k = max(1, len(tlog) // 100)
        smooth = [sum(e["loss"] for e in tlog[i : i + k]) / len(tlog[i : i + k]) for i in range(0, len(tlog), k)]
        twin.plot(
            [tlog[i]["step"] for i in range(0, len(tlog), k)],
            smooth,
            color="#1f77b4",
            lw=0.8,
            alpha=0.6,
            label="teacher CE (top axis)",
        )
        twin.set_xlabel("teacher training step", color="#1f77b4", fontsize=8)
        twin.tick_params(axis="x", colors="#1f77b4", labelsize=7)
        twin.legend(fontsize=8, loc="lower left")


# ----------------------------------------------------------------------------------------------------------------


def run(
    workdir: str | Path = "matvlm-quickstart",
    *,
    teacher: str | Path | None = None,
    seed: int = 0,
    fast: bool = False,
    quiet_transformers: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """The whole quickstart; returns the results (also written to `workdir/summary.json`).

    overrides: any `KNOBS` key (e.g. `teacher_steps=100`), applied after `FAST` when `fast`.
    quiet_transformers: hide transformers' info/warning lines and progress bars while it runs (restored after).
    """
    from transformers.utils import logging as hf_logging

    if not quiet_transformers:
        return _run(workdir, teacher, seed, fast, overrides)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _run(workdir, teacher, seed, fast, overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class _Clock:
    """The stage headers of a run (`[i/6] text  (t = time since the start)`) and the seconds each stage took."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._stage_start = self.start

    def begin(self, i: int, text: str) -> None:
        _say(f"\n[{i}/{STAGES}] {text}  (t = {_fmt_time(time.perf_counter() - self.start)})")
        self._stage_start = time.perf_counter()

    def end(self, name: str) -> None:
        self.timings[name] = time.perf_counter() - self._stage_start


@dataclass
class _Models:
    """A run's converted checkpoints (teacher at ratio 0, undistilled hybrid) and the models loaded from them."""

    teacher_dir: Path
    hybrid_dir: Path
    teacher: Any
    hybrid: Any
    processor: Any


@dataclass
class _Scores:
    """Greedy predictions and scores per model key ("teacher", "hybrid_undistilled", "hybrid_distilled"; the blind
    baseline is accuracy["baseline"]), and one freshly generated example with each model's answer to it."""

    predictions: dict[str, dict[str, str]]
    accuracy: dict[str, dict[str, Any]]
    example: Any
    answers: dict[str, str]


def _knobs(fast: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """KNOBS <- FAST (when `fast`) <- the overrides that are not None; ValueError for a key that is not a knob."""
    knobs = {**KNOBS, **(FAST if fast else {})}
    unknown = sorted(set(overrides) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown quickstart knob(s): {', '.join(unknown)}")
    knobs.update({k: v for k, v in overrides.items() if v is not None})
    return knobs


def _run(workdir, teacher, seed: int, fast: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """The six stages in order (each prints its header and progress); the results, also in summary.json/png."""
    clock = _Clock()
    from transformers import set_seed

    from ..safe_output import claim_workdir

    knobs = _knobs(fast, overrides)
    work = claim_workdir(workdir, [("--teacher", teacher)])
    set_seed(seed)
    data, teacher_src, image_size = _data_stage(clock, work, knobs, teacher, seed)
    teacher_log = _teacher_stage(clock, data, knobs, image_size, seed, teacher_src, given=teacher is not None)
    models = _convert_stage(clock, work, knobs, teacher_src, seed)
    scores = _evaluate_before_stage(clock, models, data, knobs, image_size, seed)
    distilled_dir = work / "hybrid-distilled"
    distill_log = _distill_stage(clock, models, data, knobs, seed, distilled_dir)
    speed = _evaluate_after_stage(clock, work, models, data, knobs, scores, distilled_dir)
    results: dict[str, Any] = {
        "accuracy": scores.accuracy,
        "decode_tokens_per_s": speed,
        "question_types": sorted({r["question_type"] for r in data["test"]}),
        "mamba_layers": list(models.hybrid.config.mamba_layers),
        "example": {
            "question": scores.example.question,
            "answer": scores.example.answer,
            "question_type": scores.example.question_type,
            **scores.answers,
        },
        "teacher_log": teacher_log,
        "distill_log": distill_log,
        "predictions": scores.predictions,
        "paths": {
            "data": str(work / "data"),
            "teacher_tinyllava": str(teacher_src),
            "teacher": str(models.teacher_dir),
            "hybrid_undistilled": str(models.hybrid_dir),
            "hybrid_distilled": str(distilled_dir),
            "example_png": str(work / "example.png"),
            "summary_png": str(work / "summary.png"),
            "summary_json": str(work / "summary.json"),
        },
        "knobs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()},
        "seed": seed,
        "teacher_given": teacher is not None,
    }
    write_summary_png(work / "summary.png", results, scores.example.image)
    clock.timings["total"] = time.perf_counter() - clock.start
    results["timings_s"] = {k: round(v, 2) for k, v in clock.timings.items()}
    (work / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    n_layers = models.hybrid.config.text_config.num_hidden_layers
    _say(summary_text(results, n_layers, work, clock.timings["total"]))
    return results


def _data_stage(clock: _Clock, work: Path, knobs: dict[str, Any], teacher, seed: int) -> tuple[dict, Path, int]:
    """Stage 1: the data set at the teacher's image size (the given teacher's, else knobs["image_size"]), with the
    blind baseline's score in data["baseline"]. Returns (data, the TinyLLaVA teacher's folder, image size)."""
    from ..convert.conversion import read_tinyllava_config, resolve_checkpoint

    if teacher is not None:
        teacher_src = resolve_checkpoint(teacher)
        image_size = int(read_tinyllava_config(teacher_src)["vision_config"]["image_size"])
    else:
        teacher_src, image_size = work / "teacher-tinyllava", knobs["image_size"]
    clock.begin(
        1,
        f"data: {knobs['n_train']} training images ({'a caption + ' if knobs['captions'] else ''}"
        f"{knobs['questions_per_image']} questions each) + {knobs['n_test']} test questions on {image_size}px "
        f"images ({', '.join(knobs['question_types'])})",
    )
    data = make_data(work / "data", knobs, image_size, seed)
    data["baseline"] = blind_baseline(data["train_questions"], data["test"])
    _say(
        f"    {data['paths']['train']} / {data['paths']['test']}; blind baseline (most common answer per type): "
        f"{_pct(data['baseline']['accuracy']).strip()}"
    )
    clock.end("data")
    return data, teacher_src, image_size


def _teacher_stage(
    clock: _Clock, data: dict, knobs: dict[str, Any], image_size: int, seed: int, teacher_src: Path, given: bool
) -> list[dict]:
    """Stage 2: a teacher trained from scratch and saved in the TinyLLaVA layout at `teacher_src`, unless one was
    `given`; returns its training log (empty when given)."""
    if given:
        _say(f"\n[2/{STAGES}] teacher: {teacher_src} (given; not trained here)")
        return []
    clock.begin(
        2,
        f"teacher: training a tiny TinyLLaVA-Phi from scratch ({knobs['teacher_steps']} steps of "
        f"{knobs['teacher_batch_size']})",
    )
    _, _, _, log = train_new_teacher(data, knobs, image_size, seed, teacher_src)
    clock.end("teacher")
    return log


def _convert_stage(clock: _Clock, work: Path, knobs: dict[str, Any], teacher_src: Path, seed: int) -> _Models:
    """Stage 3: the TinyLLaVA teacher converted at ratio 0 (the teacher) and at knobs["mamba_ratio"] (the
    hybrid), both loaded (`load_matvlm`), with the hybrid's processor."""
    from ..convert.conversion import convert_tinyllava_to_matvlm
    from ..processing_matvlm import MaTVLMProcessor

    clock.begin(3, f"convert: TinyLLaVA -> MaTVLM at ratio 0 (teacher) and {knobs['mamba_ratio']:g} (hybrid)")
    teacher_dir = convert_tinyllava_to_matvlm(
        teacher_src, work / "teacher-matvlm", mamba_ratio=0.0, seed=seed, overwrite=True, progress=False
    )
    hybrid_dir = convert_tinyllava_to_matvlm(
        teacher_src,
        work / "hybrid-undistilled",
        mamba_ratio=knobs["mamba_ratio"],
        seed=seed,
        overwrite=True,
        progress=False,
    )
    teacher, hybrid = load_matvlm(teacher_dir, knobs), load_matvlm(hybrid_dir, knobs)
    processor = MaTVLMProcessor.from_pretrained(hybrid_dir)
    _say(
        f"    {teacher_dir}\n    {hybrid_dir}: Mamba layers {list(hybrid.config.mamba_layers)} of "
        f"{hybrid.config.text_config.num_hidden_layers}"
    )
    clock.end("convert")
    return _Models(teacher_dir, hybrid_dir, teacher, hybrid, processor)


def _eval_options(knobs: dict[str, Any]) -> dict[str, int]:
    return dict(batch_size=knobs["eval_batch_size"], max_new_tokens=knobs["max_new_tokens"])


def _evaluate_before_stage(
    clock: _Clock, models: _Models, data: dict, knobs: dict[str, Any], image_size: int, seed: int
) -> _Scores:
    """Stage 4: the teacher and the undistilled hybrid on the held-out questions, and on one generated example."""
    from .synthetic_vqa import generate_samples

    clock.begin(4, f"evaluate the teacher and the undistilled hybrid on {len(data['test'])} held-out questions")
    scores = _Scores({}, {"baseline": data["baseline"]}, None, {})
    for key, model in (("teacher", models.teacher), ("hybrid_undistilled", models.hybrid)):
        scores.predictions[key], scores.accuracy[key] = evaluate(
            model, models.processor, data["test"], data["paths"]["images"], **_eval_options(knobs)
        )
        _say(f"    {key:<20} {_pct(scores.accuracy[key]['accuracy'])}")
    scores.example = generate_samples(
        1, image_size=image_size, seed=seed, split="example", question_types=list(knobs["question_types"])
    )[0]
    for key, model in (("teacher", models.teacher), ("hybrid_undistilled", models.hybrid)):
        scores.answers[key] = answer(
            model, models.processor, scores.example.image, scores.example.question, knobs["max_new_tokens"]
        )
    clock.end("evaluate_before")
    return scores


def _distill_stage(
    clock: _Clock, models: _Models, data: dict, knobs: dict[str, Any], seed: int, out: Path
) -> list[dict]:
    """Stage 5: the hybrid distilled from the teacher on the training conversations (`distill`), saved to `out`;
    returns the loss log."""
    from ..training.data import LLaVADataset

    clock.begin(
        5,
        f"distil the hybrid from the teacher ({knobs['distill_steps']} steps of {knobs['distill_batch_size']}, "
        f"lr {knobs['distill_lr']:g}; L_layer + L_prob; trainable: {knobs['train_mode']})",
    )
    items = materialize(LLaVADataset(data["train"], data["paths"]["images"], models.processor))
    log = distill(models.hybrid, models.teacher, models.processor, items, out, knobs, seed)
    clock.end("distill")
    return log


def _evaluate_after_stage(
    clock: _Clock, work: Path, models: _Models, data: dict, knobs: dict[str, Any], scores: _Scores, distilled: Path
) -> dict[str, float]:
    """Stage 6: the distilled hybrid (loaded from `distilled`) into `scores`; decode tokens/s of the teacher and
    the distilled hybrid on the example (returned); the example's image saved to work/example.png."""
    from .demo import decode_speed

    clock.begin(6, "evaluate the distilled hybrid; decode speed; one question; summary")
    hybrid, processor, example = load_matvlm(distilled, knobs), models.processor, scores.example
    scores.predictions["hybrid_distilled"], scores.accuracy["hybrid_distilled"] = evaluate(
        hybrid, processor, data["test"], data["paths"]["images"], **_eval_options(knobs)
    )
    scores.answers["hybrid_distilled"] = answer(
        hybrid, processor, example.image, example.question, knobs["max_new_tokens"]
    )
    speed = {
        name: decode_speed(model, processor, example.image, example.question, knobs["speed_new_tokens"])[1]
        for name, model in (("teacher", models.teacher), ("hybrid", hybrid))
    }
    example.image.save(work / "example.png")
    clock.end("evaluate_after")
    return speed


def summary_text(results: dict[str, Any], n_layers: int, work: Path, total_s: float) -> str:
    """The closing report: the accuracy table, the distillation's gain, the example's answers, where things are."""
    accuracy, speed, knobs = results["accuracy"], results["decode_tokens_per_s"], results["knobs"]
    mamba_layers, distill_log, ex = results["mamba_layers"], results["distill_log"], results["example"]
    rows = [
        ("blind baseline (no image)", accuracy["baseline"], None),
        (f"teacher ({n_layers} attention layers)", accuracy["teacher"], speed["teacher"]),
        (f"hybrid {knobs['mamba_ratio']:.0%} {mamba_layers}, undistilled", accuracy["hybrid_undistilled"], None),
        (f"hybrid {knobs['mamba_ratio']:.0%} {mamba_layers}, distilled", accuracy["hybrid_distilled"], speed["hybrid"]),
    ]
    gain = accuracy["hybrid_distilled"]["accuracy"] - accuracy["hybrid_undistilled"]["accuracy"]
    first, last = distill_log[0]["l_total"], distill_log[-1]["l_total"]
    return (
        f"\n== summary: greedy exact match on {accuracy['teacher']['total']} held-out questions ==\n"
        + summary_table(rows, results["question_types"])
        + f"\n\ndistillation: +{100 * gain:.1f} points for the hybrid (loss {first:.3f} -> {last:.3f} in "
        f"{len(distill_log)} steps)"
        + "\ndecode tok/s: batch 1, greedy, on this CPU with tiny models: launch overhead, not a speed claim"
        " (see `matvlm bench` on a GPU)"
        + f"\n\none generated image ({work / 'example.png'}):\n  Q: {ex['question']}\n  true answer: {ex['answer']}"
        + f"\n  teacher: {ex['teacher']!r}   hybrid before: {ex['hybrid_undistilled']!r}   "
        f"hybrid after: {ex['hybrid_distilled']!r}"
        + f"\n\nwrote {work / 'summary.png'} and {work / 'summary.json'}; distilled hybrid: "
        f"{results['paths']['hybrid_distilled']}" + f"\ntotal time {_fmt_time(total_s)}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`matvlm quickstart` (`commands/quickstart.py`, imported when called), kept here for `python -m` and old
    callers."""
    from ..commands.quickstart import main as command

    return command(argv)


if __name__ == "__main__":
    main()
