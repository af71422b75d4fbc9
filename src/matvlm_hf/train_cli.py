"""Distil a MaTVLM hybrid from its attention teacher on LLaVA-format data (the paper's recipe by default).

    python examples/train_distill.py --student OUT/student --teacher OUT/teacher \\
        --data sharegpt4v_mix665k.json --images playground/data --output runs/matvlm-25

    # knobs from a YAML file (keys = the long option names with "_"), command-line flags override it
    python examples/train_distill.py --config examples/configs/distill_paper.yaml --student ... --output ...

Student and teacher are MaTVLM checkpoints (`conversion.py`: `--mamba-ratio 0.25` for the student, `--mamba-ratio 0`
for the teacher); the processor (tokenizer + image processor) is read from the student folder unless --processor
says otherwise.

Defaults (the authors' released configs): AdamW betas (0.9, 0.95), lr 2e-4, weight decay 0.01 (none on biases,
norms, A_log, dt_bias, D), warmup-stable-decay with 10 % warmup and 10 % (cosine) decay, effective batch 64
(= per-device batch x gradient accumulation x processes: the accumulation is computed), 1 epoch, max length 1428,
max grad norm 0.1, gradient checkpointing, bf16 mixed precision when CUDA has it, loss 1 * L_layer (Frobenius) +
1 * L_prob (KL over all positions, T = 1) + 0 * L_ce, trainable: Mamba mixers + connector.

Several GPUs (one process per GPU; the accumulation shrinks so the effective batch stays --global-batch-size):

    accelerate launch --num_processes 4 examples/train_distill.py --config examples/configs/distill_paper.yaml ...
    torchrun --nproc_per_node 4 examples/train_distill.py --config examples/configs/distill_paper.yaml ...
    # DeepSpeed ZeRO-2 (the authors' setup: pip install deepspeed), optimizer states sharded across GPUs:
    accelerate launch --num_processes 4 examples/train_distill.py --deepspeed examples/configs/ds_zero2.json ...

On a machine without CUDA (tests, smoke runs) the script trains on the CPU and several processes talk over gloo:
`torchrun --standalone --nproc_per_node 2 ...` or `accelerate launch --multi_gpu --num_processes 2 ...` (note:
`accelerate launch --cpu --num_processes 2` starts a single process). Checkpoints (`checkpoint-N`, every --save-steps optimizer steps) hold the student, the optimizer, the
scheduler and RNG states; `--resume` continues from the latest one in --output (or `--resume DIR`). The final
student is written to --output with `save_pretrained` (safetensors, remote code, processor): it loads with
`AutoModelForImageTextToText.from_pretrained(output)` (import matvlm_hf first, or pass trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

# ------------------------------------------------------------------------------------------------------------
# Knobs and their defaults (the paper's recipe). YAML keys and CLI options (--learning-rate) share these names.
DEFAULTS: dict[str, Any] = dict(
    # inputs / outputs
    student=None,  # MaTVLM checkpoint with Mamba layers (required)
    teacher=None,  # MaTVLM checkpoint without Mamba layers (required)
    data=None,  # LLaVA-format JSON (required)
    images=None,  # folder the JSON's image paths are relative to
    output=None,  # run folder: checkpoints and the final student (required)
    processor=None,  # folder with the processor (default: the student's)
    # loss
    alpha=1.0,  # weight of L_layer
    beta=1.0,  # weight of L_prob (KL)
    gamma=0.0,  # weight of L_ce
    temperature=1.0,
    kl_positions="all",  # all | answer
    layer_loss="frobenius",  # frobenius | mse
    train_mode="mamba+connector",  # mamba+connector | mamba | mamba+mlp+connector | all
    teacher_dtype="auto",  # auto | float32 | bfloat16 | float16
    # optimisation
    learning_rate=2e-4,
    weight_decay=0.01,
    adam_beta1=0.9,
    adam_beta2=0.95,
    lr_scheduler="warmup_stable_decay",
    warmup_ratio=0.1,
    decay_ratio=0.1,  # warmup_stable_decay only
    global_batch_size=64,  # per-device batch x gradient accumulation x processes
    per_device_batch_size=1,
    max_length=1428,
    num_epochs=1.0,
    max_steps=-1,  # > 0 overrides num_epochs
    max_grad_norm=0.1,
    bf16="auto",  # auto (= CUDA with bf16) | true | false
    gradient_checkpointing=True,
    seed=42,
    # data loading
    num_workers=2,
    max_samples=None,  # use only the first N samples (smoke runs)
    image_aspect_ratio=None,  # pad | square (default: the processor's)
    # bookkeeping
    logging_steps=10,
    save_steps=1000,  # 0 = no checkpoints (the final student is still saved)
    save_total_limit=2,
    resume=None,  # true = latest checkpoint in output, or a checkpoint folder
    overwrite=False,  # replace a non-empty --output (built beside it, swapped in at the end)
    deepspeed=None,  # DeepSpeed JSON config (e.g. examples/configs/ds_zero2.json)
    report_to="none",  # none | tensorboard | wandb | ...
)
REQUIRED = ("student", "teacher", "data", "output")
BOOL_KEYS = ("gradient_checkpointing", "overwrite")
CHOICES = dict(kl_positions=("all", "answer"), layer_loss=("frobenius", "mse"),
               train_mode=("mamba+connector", "mamba", "mamba+mlp+connector", "all"),
               teacher_dtype=("auto", "float32", "bfloat16", "float16"))


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _opt_int(value: Any) -> int | None:
    return None if value is None or str(value).lower() in ("none", "") else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1], argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file of knobs (keys as below with '_'); flags override it")
    for key, default in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        help_ = f"default: {default}"
        if key == "resume":
            p.add_argument(flag, nargs="?", const=True, help="resume from the latest checkpoint in --output, or DIR")
        elif key in BOOL_KEYS:
            p.add_argument(flag, type=_bool, nargs="?", const=True, help=help_)
        elif key == "bf16":
            p.add_argument(flag, help="auto | true | false (default: auto)")
        elif key in CHOICES:
            p.add_argument(flag, choices=CHOICES[key], help=help_)
        elif key in ("max_samples",):
            p.add_argument(flag, type=_opt_int, help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, type=_bool, help=help_)
        elif isinstance(default, int):
            p.add_argument(flag, type=int, help=help_)
        elif isinstance(default, float):
            p.add_argument(flag, type=float, help=help_)
        else:
            p.add_argument(flag, help=help_)
    return p


def parse_config(argv: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- YAML (--config) <- command-line flags; checks required keys and unknown YAML keys."""
    args = vars(build_parser().parse_args(argv))
    config = dict(DEFAULTS)
    if args.get("config"):
        import yaml

        with open(args["config"], encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"error: unknown key(s) in {args['config']}: {', '.join(unknown)}")
        config.update(loaded)
    config.update({k: v for k, v in args.items() if k != "config"})
    missing = [k for k in REQUIRED if not config.get(k)]
    if missing:
        raise SystemExit("error: missing " + ", ".join("--" + k for k in missing))
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise SystemExit(f"error: {key} must be one of {', '.join(choices)}, got {config[key]!r}")
    config["gradient_checkpointing"] = _bool(config["gradient_checkpointing"])
    for key in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "warmup_ratio", "decay_ratio", "alpha",
                "beta", "gamma", "temperature", "max_grad_norm", "num_epochs"):
        config[key] = float(config[key])
    for key in ("global_batch_size", "per_device_batch_size", "max_length", "max_steps", "seed", "num_workers",
                "logging_steps", "save_steps", "save_total_limit"):
        config[key] = int(config[key])
    config["max_samples"] = _opt_int(config["max_samples"])
    return config


def gradient_accumulation(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """global batch = per-device batch x accumulation x processes."""
    per_step = per_device_batch * world_size
    if global_batch % per_step:
        raise SystemExit(f"error: --global-batch-size {global_batch} is not a multiple of per-device batch "
                         f"{per_device_batch} x {world_size} process(es) = {per_step}")
    return global_batch // per_step


def _resolve_bf16(value: Any) -> bool:
    import torch

    if str(value).lower() == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return _bool(value)


def build_trainer(cfg: dict[str, Any], models: tuple[Any, Any] | None = None, run_dir: Path | None = None):
    """The `MaTVLMDistillationTrainer` that `main` runs for the knobs `cfg` (from `parse_config`).

    models: an already loaded (student, teacher) pair to use instead of reading cfg["student"] / cfg["teacher"]
    (benchmarks that try several batch sizes); the student's trainable parameters are set here either way.
    run_dir: where checkpoints go (default: cfg["output"]; `main` passes the folder built beside an output it replaces).
    """
    import torch
    from transformers import TrainingArguments, set_seed

    from . import MaTVLMForConditionalGeneration, MaTVLMProcessor
    from .data import LLaVACollator, LLaVADataset
    from .distillation import DistillationArguments, MaTVLMDistillationTrainer, set_trainable

    set_seed(cfg["seed"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum = gradient_accumulation(cfg["global_batch_size"], cfg["per_device_batch_size"], world_size)
    bf16 = _resolve_bf16(cfg["bf16"])
    output = Path(run_dir or cfg["output"])

    # -- models and processor ----------------------------------------------------------------------------------
    if models is None:
        student = MaTVLMForConditionalGeneration.from_pretrained(cfg["student"], dtype=torch.float32)
        teacher_dtype = {"auto": torch.bfloat16 if bf16 else torch.float32}.get(cfg["teacher_dtype"]) or getattr(
            torch, cfg["teacher_dtype"])
        teacher = MaTVLMForConditionalGeneration.from_pretrained(cfg["teacher"], dtype=teacher_dtype)
    else:
        student, teacher = models
    if student.config.image_token_id != teacher.config.image_token_id:
        raise SystemExit(f"error: student and teacher use different image token ids "
                         f"({student.config.image_token_id} vs {teacher.config.image_token_id})")
    if teacher.config.mamba_layers:
        print(f"note: the teacher has Mamba layers {teacher.config.mamba_layers} (progressive distillation?)")
    processor = MaTVLMProcessor.from_pretrained(cfg["processor"] or cfg["student"])
    if (processor.image_token_id, processor.num_image_tokens) != (student.config.image_token_id,
                                                                  student.config.num_image_tokens):
        raise SystemExit(f"error: the processor writes {processor.num_image_tokens} x id {processor.image_token_id} "
                         f"per image, the student expects {student.config.num_image_tokens} x id "
                         f"{student.config.image_token_id}")
    trainable = set_trainable(student, cfg["train_mode"])

    # -- data ----------------------------------------------------------------------------------------------------
    dataset = LLaVADataset(cfg["data"], cfg["images"], processor, max_length=cfg["max_length"],
                           image_aspect_ratio=cfg["image_aspect_ratio"])
    if cfg["max_samples"] is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg["max_samples"], len(dataset))))
    if models is None:
        for line in check_supervision(dataset, cfg["data"]):
            print(line)
    collator = LLaVACollator(processor.tokenizer.pad_token_id, padding_side="right")

    # -- trainer -------------------------------------------------------------------------------------------------
    lr_scheduler_kwargs = {}
    if cfg["lr_scheduler"] == "warmup_stable_decay":
        lr_scheduler_kwargs = {"decay_type": "cosine"}
    args = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=cfg["per_device_batch_size"],
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"],
        adam_beta1=cfg["adam_beta1"],
        adam_beta2=cfg["adam_beta2"],
        optim="adamw_torch",
        lr_scheduler_type=cfg["lr_scheduler"],
        lr_scheduler_kwargs=lr_scheduler_kwargs,
        warmup_steps=cfg["warmup_ratio"],
        max_grad_norm=cfg["max_grad_norm"],
        num_train_epochs=cfg["num_epochs"],
        max_steps=cfg["max_steps"],
        bf16=bf16,
        gradient_checkpointing=cfg["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
        save_strategy="steps" if cfg["save_steps"] > 0 else "no",
        save_steps=cfg["save_steps"],
        save_total_limit=cfg["save_total_limit"],
        seed=cfg["seed"],
        dataloader_num_workers=cfg["num_workers"],
        remove_unused_columns=False,
        report_to=cfg["report_to"],
        deepspeed=cfg["deepspeed"],
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),  # also what makes a CPU multi-process run (gloo) distributed
        disable_tqdm=False,
    )
    distill_args = DistillationArguments(alpha=cfg["alpha"], beta=cfg["beta"], gamma=cfg["gamma"],
                                         temperature=cfg["temperature"], kl_positions=cfg["kl_positions"],
                                         layer_loss=cfg["layer_loss"], teacher_dtype=cfg["teacher_dtype"],
                                         decay_ratio=cfg["decay_ratio"])
    trainer = MaTVLMDistillationTrainer(model=student, teacher_model=teacher, distill_args=distill_args, args=args,
                                        train_dataset=dataset, data_collator=collator, processing_class=processor)
    if trainer.is_world_process_zero():
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in student.parameters())
        print(f"student: {cfg['student']} (Mamba layers {student.config.mamba_layers}); teacher: {cfg['teacher']}")
        print(f"trainable ({cfg['train_mode']}): {n_train:,} of {n_all:,} parameters in {len(trainable)} tensors")
        print(f"{len(dataset)} samples; effective batch {cfg['global_batch_size']} = {cfg['per_device_batch_size']} "
              f"x {grad_accum} accumulation x {world_size} process(es); bf16={bf16}")
        output.mkdir(parents=True, exist_ok=True)
        (output / "distill_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
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
        raise UserError(f"--data {data_name}: none of the {len(scanned)} samples scanned has an answer token to "
                        f"supervise (e.g. {empty[0]}): each needs a 'gpt' (or 'assistant') turn with a non-empty answer "
                        "that --max-length does not cut off.")
    if empty:
        return [f"warning: {len(empty)} of {len(scanned)} samples scanned have no supervised answer token "
                f"(e.g. {empty[0]}); they train only the layer and all-position KL terms."]
    return []


def prepare_output(cfg: dict[str, Any]) -> tuple[bool, Any]:
    """Validate inputs and --output before anything is loaded; returns (replace, resume).

    replace: the run is built beside --output and swapped in at the end (--overwrite on a non-empty folder);
    resume: None, or the checkpoint folder to resume from (checked for damaged files). `UserError` for: a student or
    teacher that is not a MaTVLM checkpoint (a TinyLLaVA one: with the convert command), a mismatched pair, missing
    data/images/processor paths, an output that is or holds an input or the working directory, a non-empty output
    without --resume or --overwrite, and a damaged resume checkpoint.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from .input_checks import check_matvlm_checkpoint, check_resume_checkpoint, check_student_teacher, local_or_hub
    from .safe_output import check_output, is_nonempty_dir, recover

    student = check_matvlm_checkpoint(cfg["student"], "--student", "student")
    teacher = check_matvlm_checkpoint(cfg["teacher"], "--teacher", "teacher")
    for note in check_student_teacher(student, teacher, cfg["student"], cfg["teacher"]):
        print(note)
    for key in ("data", "images", "deepspeed"):
        if cfg[key] is not None and not Path(cfg[key]).exists():
            raise UserError(f"--{key} {cfg[key]}: no such file or folder.")
    if cfg["processor"] is not None:
        local_or_hub(cfg["processor"], "--processor")
    inputs = [("--" + k, cfg[k]) for k in ("student", "teacher", "processor", "data", "images", "deepspeed")]
    output = check_output(cfg["output"], inputs)
    resume = cfg["resume"]
    resume = None if resume is None or str(resume).lower() in ("false", "no", "0") else resume
    if resume is not None and cfg["overwrite"]:
        raise UserError("--resume continues the run in --output and --overwrite replaces it: pass only one.")
    if resume is True or str(resume).lower() in ("true", "yes", "1", "latest"):
        resume = get_last_checkpoint(str(output)) if output.is_dir() else None
        if resume is None:
            print(f"note: --resume given but no checkpoint in {output}; starting from scratch")
    elif resume is not None and not Path(resume).is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder.")
    if resume is not None:
        check_resume_checkpoint(Path(resume))
    recover(output)
    replace = is_nonempty_dir(output) and resume is None
    if replace and not cfg["overwrite"]:
        held = ", ".join(sorted(p.name for p in output.iterdir())[:4])
        raise UserError(f"--output {cfg['output']} is not empty (it holds {held}...): pass --resume to continue that "
                        "run, --overwrite to replace it (kept until the new run is complete), or choose a new folder.")
    if replace and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--overwrite with several processes cannot swap --output {cfg['output']} safely; move the "
                        "old run folder away first, or choose a new --output.")
    return replace, resume


def _train_and_save(cfg: dict[str, Any], run_dir: Path, resume: Any) -> None:
    from .model_card import distilled_card

    trainer = build_trainer(cfg, run_dir=run_dir)
    student = trainer.model
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir))  # save_pretrained (safetensors) + processor, main process only
    if trainer.is_world_process_zero():
        if getattr(student, "generation_config", None) is not None:
            student.generation_config.save_pretrained(run_dir)
        (run_dir / "README.md").write_text(distilled_card(
            list(student.config.mamba_layers), student.config.text_config.num_hidden_layers, cfg,
            trainer.state.global_step))


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(argv)
    from .safe_output import staged_output

    output = Path(cfg["output"])
    try:
        replace, resume = prepare_output(cfg)
        if replace:
            with staged_output(output, overwrite=True) as run_dir:
                _train_and_save(cfg, run_dir, None)
        else:
            _train_and_save(cfg, output, resume)
    except UserError as err:  # a user's mistake: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved the distilled student to {output}")
    return output


if __name__ == "__main__":
    main()
