"""The trainer factory: one `MaTVLMDistillationTrainer` from the knobs of `matvlm distill` (`commands/distill.py`).

`build_trainer` is what `matvlm distill` runs and what the distillation benchmark measures; `check_supervision`
is the data check it prints before training.
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


def build_trainer(cfg: dict[str, Any], models: tuple[Any, Any] | None = None, run_dir: Path | None = None):
    """The `MaTVLMDistillationTrainer` that `main` runs for the knobs `cfg` (from `parse_config`).

    The training knobs become one `DistillationRecipe`, fitted to this machine and these models where the preset
    leaves them unset, and printed once. models: an already loaded (student, teacher) pair to use instead of reading
    cfg["student"] / cfg["teacher"] (benchmarks that try several batch sizes); the student's trainable parameters
    are set here either way. run_dir: where checkpoints go (default: cfg["output"]; `main` passes the folder built
    beside an output it replaces).
    """
    import torch
    from transformers import set_seed

    from ..modeling_matvlm import MaTVLMForConditionalGeneration
    from ..processing_matvlm import MaTVLMProcessor
    from .data import LLaVACollator, LLaVADataset
    from .distillation import DistillationArguments, MaTVLMDistillationTrainer, set_trainable

    set_seed(cfg["seed"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = DistillationRecipe(**{k: cfg[k] for k in RECIPE_KEYS})
    if recipe.global_batch_size % world_size:
        raise SystemExit(
            f"error: --global-batch-size {recipe.global_batch_size} is not a multiple of {world_size} processes"
        )
    bf16 = recipe.use_bf16()
    output = Path(run_dir or cfg["output"])

    # -- models and processor ----------------------------------------------------------------------------------
    if models is None:
        student = MaTVLMForConditionalGeneration.from_pretrained(cfg["student"], dtype=torch.float32)
        teacher_dtype = {"auto": torch.bfloat16 if bf16 else torch.float32}.get(cfg["teacher_dtype"]) or getattr(
            torch, cfg["teacher_dtype"]
        )
        teacher = MaTVLMForConditionalGeneration.from_pretrained(cfg["teacher"], dtype=teacher_dtype)
    else:
        student, teacher = models
    if student.config.image_token_id != teacher.config.image_token_id:
        raise SystemExit(
            f"error: student and teacher use different image token ids "
            f"({student.config.image_token_id} vs {teacher.config.image_token_id})"
        )
    if teacher.config.mamba_layers:
        print(f"note: the teacher has Mamba layers {teacher.config.mamba_layers} (progressive distillation?)")
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
    trainable = set_trainable(student, cfg["train_mode"])
    fitted = [k for k in UNSET_MEANS_FITTED if getattr(recipe, k) is None]
    recipe = recipe.fit(student, teacher, world_size=world_size)
    try:
        recipe.gradient_accumulation(world_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err

    # -- data ----------------------------------------------------------------------------------------------------
    dataset = LLaVADataset(
        cfg["data"],
        cfg["images"],
        processor,
        max_length=recipe.max_length,
        image_aspect_ratio=cfg["image_aspect_ratio"],
    )
    if cfg["max_samples"] is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg["max_samples"], len(dataset))))
    if models is None:
        for line in check_supervision(dataset, cfg["data"]):
            print(line)
    collator = LLaVACollator(processor.tokenizer.pad_token_id, padding_side="right")

    # -- trainer -------------------------------------------------------------------------------------------------
    args = recipe.training_arguments(
        str(output),
        world_size,
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
        save_strategy="steps" if cfg["save_steps"] > 0 else "no",
        save_steps=cfg["save_steps"],
        save_total_limit=cfg["save_total_limit"],
        report_to=cfg["report_to"],
        deepspeed=cfg["deepspeed"],
        disable_tqdm=False,
    )
    distill_args = DistillationArguments(
        alpha=recipe.alpha,
        beta=recipe.beta,
        gamma=recipe.gamma,
        temperature=recipe.temperature,
        kl_positions=recipe.kl_positions,
        layer_loss=recipe.layer_loss,
        teacher_dtype=recipe.teacher_dtype,
        decay_ratio=recipe.decay_ratio,
    )
    trainer = MaTVLMDistillationTrainer(
        model=student,
        teacher_model=teacher,
        distill_args=distill_args,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
    )
    if trainer.is_world_process_zero():
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in student.parameters())
        device = "CUDA" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        print(f"student: {cfg['student']} (Mamba layers {student.config.mamba_layers}); teacher: {cfg['teacher']}")
        print(f"trainable ({recipe.train_mode}): {n_train:,} of {n_all:,} parameters in {len(trainable)} tensors")
        print(
            f"recipe '{cfg['preset']}' on {device}"
            + (f" (fitted: {', '.join(k.replace('_', ' ') for k in fitted)})" if fitted else "")
            + f": {len(dataset)} samples; {recipe.describe(world_size)}"
        )
        output.mkdir(parents=True, exist_ok=True)
        record = {**cfg, **dataclasses.asdict(recipe)}
        (output / "distill_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return trainer


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
