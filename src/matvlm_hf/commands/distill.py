"""Distil a MaTVLM hybrid from its attention teacher on LLaVA-format data.

    matvlm distill --student out/matvlm-25 --teacher out/teacher --data llava.json --images IMAGES --output runs/m25
    matvlm distill --preset paper ...                       # the authors' recipe exactly (3B models, 24 GB GPUs)
    matvlm distill --config examples/configs/distill_paper.yaml ...   # knobs from YAML; flags override it

Student and teacher are MaTVLM checkpoints (`matvlm convert`: `--mamba-ratio 0.25` for the student,
`--mamba-ratio 0` for the teacher); the processor (tokenizer + image processor) is read from the student folder
unless --processor says otherwise.

The recipe (matvlm_hf/recipe.py) is the paper's objective: AdamW betas (0.9, 0.95), lr 2e-4, weight decay 0.01
(none on biases, norms, A_log, dt_bias, D), warmup-stable-decay with 10 % warmup and 10 % (cosine) decay, global batch
64 samples per optimizer step, 1 epoch, max length 1428, max grad norm 0.1, bf16 where CUDA has it, loss
1 * L_layer (Frobenius) + 1 * L_prob (KL over all positions, T = 1) + 0 * L_ce, trainable: Mamba mixers + connector.
Preset "auto" (the default) fits the per-device batch (the largest that fits), gradient checkpointing (on with CUDA,
off on a CPU) and loader workers to the machine, keeping the global batch; preset "paper" is the authors' setting
(per-device batch 1 x 64 accumulation, gradient checkpointing, 2 workers). The chosen values are printed at the start.

Several GPUs (one process per GPU; the accumulation shrinks so that the global batch stays --global-batch-size):

    accelerate launch --num_processes 4 -m matvlm_hf.cli distill --config examples/configs/distill_paper.yaml ...
    torchrun --nproc_per_node 4 -m matvlm_hf.cli distill --config examples/configs/distill_paper.yaml ...
    # DeepSpeed ZeRO-2 (the authors' setup; pip install --no-build-isolation "matvlm-hf[deepspeed]"), optimizer
    # states sharded across GPUs; ds_zero2_offload.json keeps them on the CPU (torch's AdamW steps there):
    accelerate launch --num_processes 4 -m matvlm_hf.cli distill --deepspeed examples/configs/ds_zero2.json ...
    # FSDP2: the student and the frozen teacher sharded across GPUs (README "FSDP"; training/fsdp.py):
    accelerate launch --config_file examples/configs/fsdp2.yaml --num_processes 4 -m matvlm_hf.cli distill ...

Without CUDA it trains on the CPU, and several processes talk over gloo (`torchrun --standalone --nproc_per_node 2
-m matvlm_hf.cli distill ...`). Checkpoints (`checkpoint-N`, every --save-steps optimizer steps) hold the student,
the optimizer, the scheduler and RNG states; `--resume` continues from the latest one in --output (or `--resume DIR`).
The final student is written to --output with `save_pretrained` (safetensors, remote code, processor): it loads with
`AutoModelForImageTextToText.from_pretrained(output)` (import matvlm_hf first, or pass trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..training.recipe import PRESETS, DistillationRecipe, recipe_fields
from ..training.trainer_factory import build_trainer, check_supervision  # noqa: F401 (train_cli.build_trainer, old path)

# ------------------------------------------------------------------------------------------------------------
# Knobs: YAML keys and CLI options (--learning-rate) share these names. The training knobs are the fields of
# `DistillationRecipe` (recipe.py); the others say where things are and how the run is kept.
# name: (default, help: what it means, its unit)
IO_KNOBS: dict[str, tuple[Any, str]] = dict(
    student=(
        None,
        "MaTVLM checkpoint folder to train (with Mamba layers; `matvlm convert --mamba-ratio 0.25`); required",
    ),
    teacher=(None, "MaTVLM checkpoint folder of the teacher (`matvlm convert --mamba-ratio 0`); required"),
    data=(None, "LLaVA-format JSON file of conversations; required"),
    images=(None, "folder the JSON's image paths are relative to"),
    output=(None, "run folder: checkpoints and the final student; required"),
    processor=(None, "folder with the processor (tokenizer + image processor); unset = the student's"),
    preset=(
        "auto",
        "training recipe: auto (the paper's objective and global batch, memory knobs fitted to this "
        "machine) | paper (the authors' exact recipe: per-device batch 1, gradient checkpointing, 2 workers)",
    ),
)
BOOKKEEPING_KNOBS: dict[str, tuple[Any, str]] = dict(
    max_samples=(None, "use only the first N samples of --data (smoke runs); unset = all"),
    image_aspect_ratio=(None, "pad | square; unset = the processor's (from the TinyLLaVA config)"),
    logging_steps=(10, "log the losses every N optimizer steps"),
    save_steps=(1000, "write a checkpoint every N optimizer steps; 0 = none (the final student is still saved)"),
    save_total_limit=(2, "checkpoints kept in --output (older ones are deleted)"),
    resume=(None, "continue from the latest checkpoint in --output (flag alone) or from DIR"),
    overwrite=(False, "replace a non-empty --output (the new run is built beside it and swapped in at the end)"),
    deepspeed=(None, "DeepSpeed JSON config file (e.g. examples/configs/ds_zero2.json); unset = none"),
    report_to=("none", "where to log: none | tensorboard | wandb | ... (transformers report_to)"),
)
HELP = {
    **{k: h for k, (_, h) in IO_KNOBS.items()},
    **{f.name: f.metadata["help"] for f in recipe_fields()},
    **{k: h for k, (_, h) in BOOKKEEPING_KNOBS.items()},
}
DEFAULTS: dict[str, Any] = {
    **{k: d for k, (d, _) in IO_KNOBS.items()},
    **dataclasses.asdict(DistillationRecipe()),
    **{k: d for k, (d, _) in BOOKKEEPING_KNOBS.items()},
}
REQUIRED = ("student", "teacher", "data", "output")
BOOL_KEYS = ("gradient_checkpointing", "overwrite")
CHOICES = dict(
    kl_positions=("all", "answer"),
    layer_loss=("frobenius", "mse"),
    train_mode=("mamba+connector", "mamba", "mamba+mlp+connector", "all"),
    teacher_dtype=("auto", "float32", "bfloat16", "float16"),
    preset=tuple(PRESETS),
)


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
    p = argparse.ArgumentParser(
        prog="matvlm distill",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file of knobs (keys as below with '_'); flags override it (default: none)",
    )
    for key, default in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        shown = "unset" if default is None else default
        help_ = f"{HELP[key]} (default: {shown})"
        if key == "resume":
            p.add_argument(flag, nargs="?", const=True, metavar="DIR", help=help_)
        elif key in BOOL_KEYS:
            p.add_argument(flag, type=_bool, nargs="?", const=True, metavar="BOOL", help=help_)
        elif key in CHOICES:
            p.add_argument(flag, choices=CHOICES[key], help=help_)
        elif key in ("max_samples", "per_device_batch_size", "num_workers"):
            p.add_argument(flag, type=_opt_int, metavar="N", help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, type=_bool, help=help_)
        elif isinstance(default, int):
            p.add_argument(flag, type=int, metavar="N", help=help_)
        elif isinstance(default, float):
            p.add_argument(flag, type=float, metavar="X", help=help_)
        else:
            p.add_argument(flag, help=help_)
    return p


def parse_config(argv: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- the preset <- YAML (--config) <- command-line flags; checks required keys and unknown YAML keys.
    Knobs left None (per_device_batch_size, gradient_checkpointing, num_workers) are fitted in `build_trainer`."""
    args = vars(build_parser().parse_args(argv))
    loaded: dict[str, Any] = {}
    if args.get("config"):
        from ..extras import require

        require("yaml", "--config (a YAML file)")
        import yaml

        with open(args["config"], encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"error: unknown key(s) in {args['config']}: {', '.join(unknown)}")
    preset = args.get("preset", loaded.get("preset", DEFAULTS["preset"]))
    if preset not in PRESETS:
        raise SystemExit(f"error: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    config = {**DEFAULTS, **dataclasses.asdict(PRESETS[preset]), **loaded}
    config.update({k: v for k, v in args.items() if k != "config"})
    config["preset"] = preset
    missing = [k for k in REQUIRED if not config.get(k)]
    if missing:
        raise SystemExit("error: missing " + ", ".join("--" + k for k in missing))
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise SystemExit(f"error: {key} must be one of {', '.join(choices)}, got {config[key]!r}")
    if config["gradient_checkpointing"] is not None and str(config["gradient_checkpointing"]).lower() != "none":
        config["gradient_checkpointing"] = _bool(config["gradient_checkpointing"])
    else:
        config["gradient_checkpointing"] = None
    for key in (
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "warmup_ratio",
        "decay_ratio",
        "alpha",
        "beta",
        "gamma",
        "temperature",
        "max_grad_norm",
        "num_epochs",
    ):
        config[key] = float(config[key])
    for key in (
        "global_batch_size",
        "max_length",
        "max_steps",
        "seed",
        "logging_steps",
        "save_steps",
        "save_total_limit",
    ):
        config[key] = int(config[key])
    for key in ("max_samples", "per_device_batch_size", "num_workers"):
        config[key] = _opt_int(config[key])
    return config


def prepare_output(cfg: dict[str, Any]) -> tuple[bool, Any]:
    """Validate inputs and --output before anything is loaded; returns (replace, resume).

    replace: the run is built beside --output and swapped in at the end (--overwrite on a non-empty folder);
    resume: None, or the checkpoint folder to resume from (checked for damaged files). `UserError` for: a student or
    teacher that is not a MaTVLM checkpoint (a TinyLLaVA one: with the convert command), a mismatched pair, missing
    data/images/processor paths, an output that is or holds an input or the working directory, a non-empty output
    without --resume or --overwrite, and a damaged resume checkpoint.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from ..input_checks import check_matvlm_checkpoint, check_resume_checkpoint, check_student_teacher, local_or_hub
    from ..safe_output import check_output, is_nonempty_dir, recover

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
        raise UserError(
            f"--output {cfg['output']} is not empty (it holds {held}...): pass --resume to continue that "
            "run, --overwrite to replace it (kept until the new run is complete), or choose a new folder."
        )
    if replace and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--overwrite with several processes cannot swap --output {cfg['output']} safely; move the "
            "old run folder away first, or choose a new --output."
        )
    return replace, resume


def _train_and_save(cfg: dict[str, Any], run_dir: Path, resume: Any) -> None:
    from ..convert.model_card import distilled_card

    trainer = build_trainer(cfg, run_dir=run_dir)
    student = trainer.model
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir))  # save_pretrained (safetensors) + processor, main process only
    trainer.save_state()  # trainer_state.json: the run's log history (losses, peak memory) beside the student
    if trainer.is_world_process_zero():
        if getattr(student, "generation_config", None) is not None:
            student.generation_config.save_pretrained(run_dir)
        (run_dir / "README.md").write_text(
            distilled_card(
                list(student.config.mamba_layers),
                student.config.text_config.num_hidden_layers,
                cfg,
                trainer.state.global_step,
            )
        )


def _leave_process_group() -> None:
    """Wait for every process (rank 0 may still be writing the model card), then tear the process group down.

    A process that exits with the group alive leaves gloo's threads to the interpreter's exit: the CI run on
    transformers 5.17 saw rank 1 abort there ("terminate called without an active exception", SIGABRT) after a
    complete run, which torchrun reports as a failed job (the same abort: pytorch/pytorch#190489).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(argv)
    from ..safe_output import staged_output

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
    _leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved the distilled student to {output}")
    return output


if __name__ == "__main__":
    main()
