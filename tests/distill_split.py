"""One plain-SGD distillation step on a fixed global batch of 4 samples, for any split into per-device batch x
accumulation x processes (used by test_distill_split.py; run under torchrun it is the multi-process side):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distill_split.py OUT_DIR

writes OUT_DIR/<case>.safetensors (the trainable parameters after the step) for every case of CASES, from rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

from conftest import image_prompt, tiny_model  # tests/ is on sys.path: the script's folder, or pytest's

from matvlm_hf.data import LLaVACollator
from matvlm_hf.distillation import MaTVLMDistillationTrainer, set_trainable

MAMBA_LAYERS = (1, 3)
# loss term -> (distillation arguments, train mode). The layer loss alone does not reach the connector, so its
# cases train the mixers only (the first-step gradient check would rightly refuse a connector without gradient).
TERMS = {
    "layer_frobenius": (dict(alpha=1.0, beta=0.0, gamma=0.0), "mamba"),
    "layer_mse": (dict(alpha=1.0, beta=0.0, gamma=0.0, layer_loss="mse"), "mamba"),
    "kl_all": (dict(alpha=0.0, beta=1.0, gamma=0.0), "mamba+connector"),
    "kl_answer": (dict(alpha=0.0, beta=1.0, gamma=0.0, kl_positions="answer"), "mamba+connector"),
    "ce": (dict(alpha=0.0, beta=0.0, gamma=1.0), "mamba+connector"),
    "recipe": (dict(alpha=1.0, beta=1.0, gamma=0.0), "mamba+connector"),  # the paper's
    "all_terms": (dict(alpha=0.7, beta=1.3, gamma=0.5, layer_loss="mse", kl_positions="answer"), "mamba+connector"),
}
CHECKPOINTING = {"off": None, "on": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}
# what the multi-process run computes: every term without checkpointing, and with (non-reentrant) checkpointing
# (reentrant checkpointing is refused with several processes: see MaTVLMDistillationTrainer)
CASES = [(term, gc) for gc in ("off", "on") for term in TERMS]


def make_models(seed: int = 0):
    """Teacher (Phi, 6 layers, no Mamba layer) and a student with its weights and fresh Mamba mixers at 1 and 3."""
    teacher = tiny_model("phi", mamba_layers=(), seed=seed)
    student = tiny_model("phi", mamba_layers=MAMBA_LAYERS, seed=seed + 1)
    student.load_state_dict(teacher.state_dict(), strict=False)
    return teacher, student


def make_samples(config) -> list[dict[str, torch.Tensor]]:
    """Four samples of different lengths and answer lengths; two with an image, two text-only."""
    samples = []
    for j, (text_len, n_answer, image) in enumerate([(14, 5, True), (9, 4, False), (20, 9, True), (5, 1, False)]):
        g = torch.Generator().manual_seed(100 + j)
        ids = (
            image_prompt(config, text_len=text_len, seed=j)[0]
            if image
            else torch.randint(0, config.image_token_id - 1, (text_len,), generator=g)
        )
        labels = torch.full_like(ids, -100)
        labels[-n_answer:] = ids[-n_answer:]
        sample = {"input_ids": ids, "labels": labels}
        if image:
            sample["pixel_values"] = torch.randn(1, 3, 32, 32, generator=g)
        samples.append(sample)
    return samples


def sgd_step(
    term: str, checkpointing: str, per_device: int, accumulation: int, output_dir: str | Path
) -> dict[str, torch.Tensor]:
    """One optimizer step (SGD, lr 1, no momentum, no clipping, no weight decay) over the 4 samples; returns the
    trainable parameters after it (every process holds the same ones)."""
    distill, mode = TERMS[term]
    teacher, student = make_models()
    set_trainable(student, mode)
    student.train()
    gc_kwargs = CHECKPOINTING[checkpointing]
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        gradient_checkpointing=gc_kwargs is not None,
        gradient_checkpointing_kwargs=gc_kwargs,
        use_cpu=True,
        ddp_find_unused_parameters=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = MaTVLMDistillationTrainer(
        model=student,
        teacher_model=teacher,
        distill_args=distill,
        args=args,
        train_dataset=make_samples(student.config),
        data_collator=LLaVACollator(pad_token_id=0),
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}


def main(out_dir: str) -> None:
    import os

    from safetensors.torch import save_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(out_dir)
    for term, checkpointing in CASES:
        params = sgd_step(term, checkpointing, per_device=1, accumulation=4 // world, output_dir=out / "run")
        if int(os.environ.get("RANK", "0")) == 0:
            save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"{term}-{checkpointing}.safetensors"))
    if torch.distributed.is_initialized():  # leave together: gloo's threads must not outlive the group at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
