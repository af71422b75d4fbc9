"""Distillation step time, tokens/s, peak memory and the largest micro-batch, through the real training path.

    matvlm bench-distill --workdir runs/distill-bench --out docs/benchmarks/distillation.json
    matvlm bench-distill --size tiny --workdir /tmp/db --out /tmp/db.json   # CPU smoke scale

1. checkpoints  a TinyLLaVA-Phi-2-SigLIP checkpoint of the published sizes with random weights (`fabricate`),
                converted twice (`conversion`): the teacher (no Mamba layer) and the student (`--ratio`);
2. data         LLaVA-format conversations about synthetic images (`synthetic_vqa`) long enough that every sample
                is cut to exactly `--max-length` tokens (image tokens included) by the data set's truncation;
3. runs         `training/trainer_factory.make_trainer` with `matvlm distill`'s default `DistillationRecipe` (bf16
                and gradient checkpointing on CUDA, the paper's losses and trainable set; `training/measure`'s
                `StepTimer`) for `--steps` optimizer steps at micro-batch `--batch-size`, no gradient accumulation,
                timing each step (CUDA-synchronised; the Mamba conv runs its differentiable path while training:
                `conv_training_path` in the results); then, on CUDA, the largest micro-batch that trains without
                running out of memory (`largest_fitting`: doubling, then bisection; a few steps per try).

Models are loaded once and reused by every run. Results go to `--out` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training.measure import StepTimer, largest_fitting
from ..training.recipe import DistillationRecipe


def prepare(work: Path, size: str, ratio: float, max_length: int, n_samples: int, seed: int = 0) -> dict[str, Path]:
    """Fabricated TinyLLaVA -> teacher (ratio 0) and student (`ratio`) MaTVLM checkpoints, and a data set whose
    samples all exceed `max_length` tokens; reuses what is already in `work`."""
    import torch

    from ..convert.conversion import convert_tinyllava_to_matvlm
    from ..convert.fabricate import write_tinyllava_checkpoint
    from .synthetic_vqa import generate_samples

    source, teacher, student = work / "tinyllava", work / "teacher", work / f"student-{ratio:g}"
    dtype = torch.bfloat16 if size == "full" else torch.float32
    if not (source / "config.json").exists():
        write_tinyllava_checkpoint(source, lm_type="phi", size=size, dtype=dtype, seed=seed)
    for folder, r in ((teacher, 0.0), (student, ratio)):
        if not (folder / "config.json").exists():
            convert_tinyllava_to_matvlm(source, folder, mamba_ratio=r, seed=seed, overwrite=True, progress=False)
    data = work / f"data-{max_length}.json"
    images = work / "images"
    if not data.exists():
        from ..configuration_matvlm import MaTVLMConfig
        from ..processing_matvlm import MaTVLMProcessor

        image_size = MaTVLMConfig.from_pretrained(student).vision_config.image_size
        tokenizer = MaTVLMProcessor.from_pretrained(student).tokenizer
        images.mkdir(parents=True, exist_ok=True)
        qa = generate_samples(200, image_size=image_size, seed=seed, split="filler", render=False)
        records = []
        for i, sample in enumerate(generate_samples(n_samples, image_size=image_size, seed=seed, split="bench")):
            sample.image.save(images / f"{sample.image_id}.png")
            turns = [{"from": "human", "value": f"<image>\n{sample.question}"}, {"from": "gpt", "value": sample.answer}]
            # text tokens counted turn by turn (the chat template only adds more), image tokens ignored: an overshoot
            n_tokens, j = 0, i
            while n_tokens < max_length:
                filler = qa[j % len(qa)]
                turns += [{"from": "human", "value": filler.question}, {"from": "gpt", "value": filler.answer}]
                n_tokens += len(tokenizer(f"{filler.question} {filler.answer}")["input_ids"])
                j += 7
            records.append({"id": sample.id, "image": f"{sample.image_id}.png", "conversations": turns})
        data.write_text(json.dumps(records) + "\n")
    return {"teacher": teacher, "student": student, "data": data, "images": images}


@dataclass
class Bench:
    """What every run shares: the recipe (micro-batch and steps are set per run), the loaded models on their
    device, the processor, the data set and the run folder."""

    recipe: DistillationRecipe
    student: Any
    teacher: Any
    processor: Any
    dataset: Any
    output: Path


def load_bench(args: argparse.Namespace, work: Path, paths: dict[str, Path]) -> Bench:
    """`matvlm distill`'s default recipe at `--max-length` and `--train-mode` with 2 loader workers, fitted to this
    machine at micro-batch `--batch-size`; the student (float32) and teacher (bfloat16 with bf16) on the GPU when
    there is one; the benchmark data cut to `--max-length` tokens."""
    import torch

    from .. import MaTVLMForConditionalGeneration
    from ..processing_matvlm import MaTVLMProcessor
    from ..training.data import LLaVADataset

    recipe = DistillationRecipe(max_length=args.max_length, train_mode=args.train_mode, num_workers=2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = MaTVLMForConditionalGeneration.from_pretrained(paths["student"], dtype=torch.float32).to(device)
    teacher_dtype = torch.bfloat16 if recipe.use_bf16() else torch.float32
    teacher = MaTVLMForConditionalGeneration.from_pretrained(paths["teacher"], dtype=teacher_dtype).to(device)
    recipe = dataclasses.replace(recipe, per_device_batch_size=args.batch_size, global_batch_size=args.batch_size)
    recipe = recipe.fit(student, teacher)
    processor = MaTVLMProcessor.from_pretrained(paths["student"])
    dataset = LLaVADataset(paths["data"], paths["images"], processor, max_length=recipe.max_length)
    return Bench(recipe, student, teacher, processor, dataset, work / "run")


def _train(bench: Bench, batch_size: int, steps: int, timer: StepTimer) -> None:
    """`steps` optimizer steps at micro-batch `batch_size` (no accumulation) through the trainer factory, no
    checkpoint written; the student's gradients are dropped afterwards."""
    from ..training.trainer_factory import make_trainer

    recipe = dataclasses.replace(
        bench.recipe, per_device_batch_size=batch_size, global_batch_size=batch_size, max_steps=steps
    )
    trainer = None
    try:
        trainer = make_trainer(
            recipe,
            bench.student,
            bench.teacher,
            bench.dataset,
            bench.processor,
            bench.output,
            callbacks=[timer],
            logging_steps=10,
            logging_first_step=True,
            save_strategy="no",
            report_to="none",
            disable_tqdm=False,
        )
        trainer.train()
    finally:
        del trainer
        for p in bench.student.parameters():
            p.grad = None
        gc.collect()


def run_batch(bench: Bench, batch_size: int, steps: int) -> dict[str, Any]:
    """`steps` optimizer steps at micro-batch `batch_size`; step times, tokens/s, peak memory (or {"oom": True})."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"micro-batch {batch_size}, {steps} steps", flush=True)
    timer = StepTimer(echo=True)
    try:
        _train(bench, batch_size, steps, timer)
        result: dict[str, Any] = {"batch_size": batch_size, "oom": False}
    except torch.OutOfMemoryError:
        result = {"batch_size": batch_size, "oom": True}
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        torch.cuda.empty_cache()
    if not result["oom"]:
        measured = timer.times[1:] or timer.times  # the first step of a shape allocates and autotunes the kernels
        step = statistics.median(measured)
        tokens = batch_size * bench.recipe.max_length
        result.update(
            steps=len(timer.times),
            step_time_s=round(step, 4),
            step_times_s=[round(t, 4) for t in timer.times],
            tokens_per_step=tokens,
            tokens_per_s=round(tokens / step, 1),
            samples_per_s=round(batch_size / step, 2),
        )
    print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}), flush=True)
    return result


def describe_bench(bench: Bench, args: argparse.Namespace, prepare_s: float) -> dict[str, Any]:
    """The results' header: device, versions, model sizes, the recipe's machine choices, the conv path."""
    import torch

    from .. import mamba2_ops

    student, cuda = bench.student, torch.cuda.is_available()
    conv_kernel = mamba2_ops.uses_conv_kernel(student.device, student.config.use_mamba_kernels)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "student_mamba_layers": list(student.config.mamba_layers),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "max_length": args.max_length,
        "bf16": bench.recipe.use_bf16(),
        "gradient_checkpointing": bench.recipe.gradient_checkpointing,
        "train_mode": args.train_mode,
        "prepare_seconds": round(prepare_s, 1),
        # the Mamba conv under autograd (issue 21: the forward-only Triton conv is not used while training)
        "conv_training_path": "causal_conv1d" if conv_kernel else "pytorch",
    }


def search_largest(bench: Bench, args: argparse.Namespace, result: dict[str, Any], out: Path) -> None:
    """The largest micro-batch that trains (`largest_fitting` from the timed run's `--batch-size`, `--search-steps`
    per try) into `result`; every try is appended to result["search"] and written to `out` as it ends."""
    tries: dict[int, dict[str, Any]] = {args.batch_size: result["timed_run"]}

    def fits(n: int) -> bool:
        tries[n] = run_batch(bench, n, args.search_steps)
        result["search"].append(tries[n])
        out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive an interruption
        return not tries[n]["oom"]

    largest, first_oom = largest_fitting(fits, args.batch_size)
    result.update(largest_micro_batch=largest, first_oom_micro_batch=first_oom, largest_micro_batch_run=tries[largest])


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark for the options of `matvlm bench-distill` (`commands/bench_distill.py`): checkpoints and data,
    the timed run, the search on CUDA; results written to args.out after each run, and returned."""

    import torch
    from transformers.utils import logging as hf_logging

    from ..safe_output import claim_workdir

    hf_logging.set_verbosity_error()
    work = claim_workdir(args.workdir)
    t0 = time.perf_counter()
    paths = prepare(work, args.size, args.ratio, args.max_length, n_samples=64)
    prepare_s = time.perf_counter() - t0
    print(f"checkpoints and data ready in {prepare_s:.0f} s: {work}", flush=True)
    bench = load_bench(args, work, paths)
    print(f"models loaded ({time.perf_counter() - t0:.0f} s); {bench.recipe.describe()}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    timed = run_batch(bench, args.batch_size, args.steps)
    result = {**describe_bench(bench, args, prepare_s), "timed_run": timed, "search": []}
    out.write_text(json.dumps(result, indent=1) + "\n")
    if torch.cuda.is_available() and not args.no_search and not timed["oom"]:
        search_largest(bench, args, result, out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s in all)")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`matvlm bench-distill` (`commands/bench_distill.py`, imported when called), kept here for `python -m` and old
    callers."""
    from ..commands.bench_distill import main as command

    return command(argv)


if __name__ == "__main__":
    main()
