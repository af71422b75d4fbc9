"""The trainer factory: the one place a `MaTVLMDistillationTrainer` is built, from a `DistillationRecipe`.

`make_trainer` (recipe + loaded models + data -> trainer) is what every driver uses: `matvlm distill` through
`build_trainer` (the command's knobs -> recipe, models, processor and data read from disk, fitted to the machine),
the quickstart and the study (`synthetic/quickstart.distill`) and the distillation benchmark
(`synthetic/distill_benchmark`). `check_supervision` is the data check `build_trainer` prints before training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .recipe import DistillationRecipe, recipe_fields

RECIPE_KEYS = tuple(f.name for f in recipe_fields())
UNSET_MEANS_FITTED = ("per_device_batch_size", "gradient_checkpointing", "num_workers")


def make_trainer(
    recipe: DistillationRecipe,
    student,
    teacher,
    train_dataset,
    processor,
    output_dir: str | Path,
    *,
    world_size: int = 1,
    device: str | None = None,
    callbacks: list | None = None,
    **bookkeeping: Any,
):
    """A `MaTVLMDistillationTrainer` of the (fitted) `recipe`: the student's trainable parameters set to
    `recipe.train_mode`, `recipe.training_arguments(output_dir, world_size, device, **bookkeeping)` and the loss of
    `recipe.distillation_arguments()`, batches padded on the right with the processor's pad token.

    student, teacher: loaded MaTVLM models (any device; the trainer moves them). train_dataset: `LLaVADataset` items
    (a data set or a list). device: "cuda" / "cpu" (default: CUDA when available). callbacks: extra
    `TrainerCallback`s (`measure.PeakMemory` and `measure.StepSeconds` are always there: peak GPU memory and seconds per
    optimizer step in every log entry). ValueError from
    the recipe when a knob `fit` sets is unset or the batch does not divide.

    Training on a CPU sets DS_ACCELERATOR=cpu unless set: DeepSpeed, when installed, is imported by accelerate as
    soon as the Trainer exists and would otherwise warn on every CPU run that it "was unable to detect" a GPU.
    """
    import torch

    from .data import LLaVACollator
    from .distillation import MaTVLMDistillationTrainer, set_trainable
    from .measure import PeakMemory, StepSeconds

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks on a CPU, without its warning
    set_trainable(student, recipe.train_mode)
    return MaTVLMDistillationTrainer(
        model=student,
        teacher_model=teacher,
        distill_args=recipe.distillation_arguments(),
        args=recipe.training_arguments(str(output_dir), world_size, device, **bookkeeping),
        train_dataset=train_dataset,
        data_collator=LLaVACollator(processor.tokenizer.pad_token_id, padding_side="right"),
        processing_class=processor,
        callbacks=[PeakMemory(), StepSeconds(), *(callbacks or [])],
    )


def build_trainer(cfg: dict[str, Any], run_dir: Path | None = None):
    """The `MaTVLMDistillationTrainer` that `matvlm distill` runs for the knobs `cfg` (from `parse_config`).

    The training knobs become one `DistillationRecipe`, fitted to this machine and these models where the preset
    leaves them unset, and printed once (with `distill_config.json` written to the run folder). run_dir: where
    checkpoints go (default: cfg["output"]; `main` passes the folder built beside an output it replaces).
    SystemExit for a global batch that the processes or the per-device batch do not divide, and for a student,
    teacher and processor that disagree on the image tokens.
    """
    from transformers import set_seed

    from .distillation import set_trainable

    set_seed(cfg["seed"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = DistillationRecipe(**{k: cfg[k] for k in RECIPE_KEYS})
    if recipe.global_batch_size % world_size:
        raise SystemExit(
            f"error: --global-batch-size {recipe.global_batch_size} is not a multiple of {world_size} processes"
        )
    output = Path(run_dir or cfg["output"])
    student, teacher = load_student_and_teacher(cfg, recipe.use_bf16())
    processor = load_processor(cfg, student)
    fitted = [k for k in UNSET_MEANS_FITTED if getattr(recipe, k) is None]
    set_trainable(student, recipe.train_mode)  # before fit: it counts the trainable parameters' optimiser states
    recipe = recipe.fit(student, teacher, world_size=world_size)
    try:
        recipe.gradient_accumulation(world_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    dataset = load_dataset(cfg, processor, recipe.max_length)
    trainer = make_trainer(
        recipe, student, teacher, dataset, processor, output, world_size=world_size, **bookkeeping_arguments(cfg)
    )
    if trainer.is_world_process_zero():
        for line in describe_run(cfg, recipe, student, fitted, len(dataset), world_size):
            print(line)
        if trainer.is_fsdp_enabled:
            from .fsdp import describe_sharding

            print(describe_sharding(trainer.teacher, trainer.accelerator.state.fsdp_plugin))
        output.mkdir(parents=True, exist_ok=True)
        record = {**cfg, **dataclasses.asdict(recipe)}
        (output / "distill_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return trainer


def load_student_and_teacher(cfg: dict[str, Any], bf16: bool):
    """(student in float32, teacher in cfg["teacher_dtype"]: "auto" = bfloat16 when `bf16`, else float32), read
    from cfg["student"] / cfg["teacher"]. SystemExit when their image token ids differ; prints a note when the
    teacher has Mamba layers."""
    import torch

    from ..modeling_matvlm import MaTVLMForConditionalGeneration

    student = MaTVLMForConditionalGeneration.from_pretrained(cfg["student"], dtype=torch.float32)
    teacher_dtype = {"auto": torch.bfloat16 if bf16 else torch.float32}.get(cfg["teacher_dtype"]) or getattr(
        torch, cfg["teacher_dtype"]
    )
    teacher = MaTVLMForConditionalGeneration.from_pretrained(cfg["teacher"], dtype=teacher_dtype)
    if student.config.image_token_id != teacher.config.image_token_id:
        raise SystemExit(
            f"error: student and teacher use different image token ids "
            f"({student.config.image_token_id} vs {teacher.config.image_token_id})"
        )
    if teacher.config.mamba_layers:
        print(f"note: the teacher has Mamba layers {teacher.config.mamba_layers} (progressive distillation?)")
    return student, teacher


def load_processor(cfg: dict[str, Any], student):
    """The processor of cfg["processor"] (default: the student's folder); SystemExit when the image tokens it
    writes are not the ones the student expects."""
    from ..processing_matvlm import MaTVLMProcessor

    processor = MaTVLMProcessor.from_pretrained(cfg["processor"] or cfg["student"])
    if (processor.image_token_id, processor.num_image_tokens) != (
        student.config.image_token_id,
        student.config.num_image_tokens,
    ):
        raise SystemExit(
            f"error: the processor writes {processor.num_image_tokens} x id {processor.image_token_id} "
            f"per image, the student expects {student.config.num_image_tokens} x id "
            f"{student.config.image_token_id}"
        )
    return processor


def load_dataset(cfg: dict[str, Any], processor, max_length: int):
    """`LLaVADataset` of cfg["data"] / cfg["images"] cut to `max_length` tokens (the first cfg["max_samples"] when
    set); prints `check_supervision`'s notes (UserError when no sample has an answer token)."""
    import torch

    from .data import LLaVADataset

    dataset = LLaVADataset(
        cfg["data"], cfg["images"], processor, max_length=max_length, image_aspect_ratio=cfg["image_aspect_ratio"]
    )
    if cfg["max_samples"] is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg["max_samples"], len(dataset))))
    for line in check_supervision(dataset, cfg["data"]):
        print(line)
    return dataset


def bookkeeping_arguments(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `TrainingArguments` of `matvlm distill` that are not the recipe: logging, checkpoints, reporting,
    DeepSpeed."""
    return dict(
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
        save_strategy="steps" if cfg["save_steps"] > 0 else "no",
        save_steps=cfg["save_steps"],
        save_total_limit=cfg["save_total_limit"],
        report_to=cfg["report_to"],
        deepspeed=cfg["deepspeed"],
        disable_tqdm=False,
    )


def describe_run(
    cfg: dict[str, Any], recipe: DistillationRecipe, student, fitted: list[str], n_samples: int, world_size: int
) -> list[str]:
    """The lines `matvlm distill` prints before training: the models, the trainable parameters, the recipe (with
    the knobs `fit` chose, `fitted`) and the batch arithmetic."""
    import torch

    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in student.parameters())
    n_tensors = sum(1 for p in student.parameters() if p.requires_grad)
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return [
        f"student: {cfg['student']} (Mamba layers {student.config.mamba_layers}); teacher: {cfg['teacher']}",
        f"trainable ({recipe.train_mode}): {n_train:,} of {n_all:,} parameters in {n_tensors} tensors",
        f"recipe '{cfg['preset']}' on {device}"
        + (f" (fitted: {', '.join(k.replace('_', ' ') for k in fitted)})" if fitted else "")
        + f": {n_samples} samples; {recipe.describe(world_size)}",
    ]


def check_supervision(dataset, data_name: str, scan_limit: int = 20000) -> list[str]:
    """Count the samples without a supervised (answer) token; `UserError` when none has one, else notes to print.

    Tokenises up to `scan_limit` samples (text only: no image is opened). Samples without answer tokens still
    contribute to L_layer and an all-positions L_prob, but not to L_ce or an answer-only L_prob.
    """
    from .data import LLaVADataError

    base = dataset.dataset if hasattr(dataset, "indices") else dataset
    indices = list(dataset.indices) if hasattr(dataset, "indices") else range(len(dataset))
    scanned = list(indices)[:scan_limit]
    empty = []
    for i in scanned:
        try:
            _, labels = base.tokenize(i)
        except LLaVADataError as err:
            raise UserError(str(err)) from err
        if all(label < 0 for label in labels):
            empty.append(base.sample_name(i))
    if empty and len(empty) == len(scanned):
        raise UserError(
            f"--data {data_name}: none of the {len(scanned)} samples scanned has an answer token to "
            f"supervise (e.g. {empty[0]}): each needs a 'gpt' (or 'assistant') turn with a non-empty answer "
            "that --max-length does not cut off."
        )
    if empty:
        return [
            f"warning: {len(empty)} of {len(scanned)} samples scanned have no supervised answer token "
            f"(e.g. {empty[0]}); they train only the layer and all-position KL terms."
        ]
    return []
