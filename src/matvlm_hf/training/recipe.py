"""The distillation recipe: every knob that decides how a student is trained, as one object.

    recipe = PRESETS["paper"]                          # the authors' released recipe, exactly
    recipe = DistillationRecipe().fit(student, teacher)  # the default: fitted to this machine and these models
    args = recipe.training_arguments("runs/m25")       # transformers.TrainingArguments
    loss = recipe.distillation_arguments()             # the loss terms' DistillationArguments

The paper's recipe (hustvl/MaTVLM's released configs) is the preset "paper": per-device batch 1 with 64 accumulation
micro-steps, gradient checkpointing, 2 loader workers; it was made for 3B models on 4 x 24 GB GPUs. The default
recipe keeps everything that defines the objective (losses, optimiser, learning-rate schedule, the global batch of 64
samples) and leaves three knobs unset (None) that only decide how fast one machine gets there; `fit` sets them:

- per_device_batch_size: the largest divisor of the per-process global batch whose estimated activation memory fits
  (`activation_bytes_per_sample`: logits, teacher hidden states, stored student activations, x 1.25 margin) in 90 %
  of the GPU's memory, or half of the free RAM on a CPU, after the models and the optimiser states;
- gradient_checkpointing: on with CUDA (memory is the limit), off on a CPU (compute is, and RAM is plenty);
- num_workers: 0 on a CPU (workers would compete with the training threads for the same cores), else up to 4 per
  GPU process.
The global batch is kept: gradient accumulation = global batch / (per-device batch x processes).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .distillation import DistillationArguments


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DistillationRecipe:
    """Loss, optimiser, batch and memory knobs of `matvlm distill` (help: what each means, its unit, its default)."""

    # loss: L = alpha * L_layer + beta * L_prob + gamma * L_ce
    alpha: float = _knob(1.0, "weight of L_layer (the Mamba layers' outputs against the teacher's)")
    beta: float = _knob(1.0, "weight of L_prob (KL divergence of the student's token distribution from the teacher's)")
    gamma: float = _knob(0.0, "weight of L_ce (the student's cross-entropy on the answer tokens)")
    temperature: float = _knob(1.0, "softmax temperature of L_prob (dimensionless; the KL is scaled by T^2)")
    kl_positions: str = _knob("all", "positions L_prob covers: all (the paper) | answer (answer tokens only)")
    layer_loss: str = _knob("frobenius", "L_layer: frobenius (norm of the difference, the paper) | mse")
    train_mode: str = _knob(
        "mamba+connector", "what trains: mamba+connector (the paper) | mamba | mamba+mlp+connector | all"
    )
    teacher_dtype: str = _knob(
        "auto", "teacher weights: auto (bfloat16 when bf16 is on, else float32) | float32 | bfloat16 | float16"
    )
    # optimisation
    learning_rate: float = _knob(2e-4, "peak learning rate of AdamW (per optimizer step)")
    weight_decay: float = _knob(0.01, "AdamW weight decay (none on biases, norms, A_log, dt_bias, D)")
    adam_beta1: float = _knob(0.9, "AdamW beta1")
    adam_beta2: float = _knob(0.95, "AdamW beta2")
    optimizer: str = _knob(
        "adamw_torch",
        "AdamW implementation (a transformers optim name): adamw_torch | adamw_torch_fused (one fused kernel, "
        "the same update up to rounding)",
    )
    lr_scheduler: str = _knob("warmup_stable_decay", "learning-rate schedule (a transformers scheduler name)")
    warmup_ratio: float = _knob(0.1, "warm-up, as a fraction of all optimizer steps")
    decay_ratio: float = _knob(
        0.1, "final (cosine) decay, as a fraction of all optimizer steps (warmup_stable_decay only)"
    )
    global_batch_size: int = _knob(
        64, "samples per optimizer step, all processes together (= per-device batch x accumulation x processes)"
    )
    per_device_batch_size: int | None = _knob(
        None,
        "samples per forward pass on one device; unset = the largest that "
        "fits this machine and model (paper preset: 1)",
    )
    max_length: int = _knob(1428, "tokens per sample (image tokens included); longer samples are cut")
    num_epochs: float = _knob(1.0, "passes over the data set")
    max_steps: int = _knob(-1, "optimizer steps; > 0 overrides --num-epochs")
    max_grad_norm: float = _knob(0.1, "gradient clipping: largest global L2 norm of the gradient")
    bf16: str = _knob("auto", "bfloat16 mixed precision: auto (on where CUDA supports it) | true | false")
    gradient_checkpointing: bool | None = _knob(
        None,
        "recompute activations in the backward pass (saves memory, "
        "costs ~30 %% time); unset = on with CUDA, off on a CPU (paper: on)",
    )
    num_workers: int | None = _knob(
        None, "data-loader worker processes per training process; unset = 0 on a CPU, up to 4 per GPU (paper preset: 2)"
    )
    seed: int = _knob(42, "random seed (data order, fresh parameters)")

    def fit(self, student, teacher, *, world_size: int = 1, device: str | None = None) -> DistillationRecipe:
        """A copy with per_device_batch_size, gradient_checkpointing and num_workers set where they are None, for
        `device` ("cuda" / "cpu"; default: CUDA when available) and these models (already loaded, any device).
        Set knobs are kept. Raises ValueError when the global batch is not a multiple of the processes."""
        import torch

        if self.global_batch_size % world_size:
            raise ValueError(f"global batch {self.global_batch_size} is not a multiple of {world_size} processes")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = self.gradient_checkpointing if self.gradient_checkpointing is not None else device == "cuda"
        workers = self.num_workers
        if workers is None:
            workers = 0 if device == "cpu" else min(4, max(1, (os.cpu_count() or 1) // max(1, world_size) - 1))
        batch = self.per_device_batch_size
        if batch is None:
            per_process = self.global_batch_size // world_size
            budget = memory_budget_bytes(device) - _resident_bytes(student, teacher)
            per_sample = activation_bytes_per_sample(student.config, self.max_length, ckpt)
            batch = max(
                [d for d in range(1, per_process + 1) if per_process % d == 0 and d * per_sample <= budget], default=1
            )
        return dataclasses.replace(self, per_device_batch_size=batch, gradient_checkpointing=ckpt, num_workers=workers)

    def gradient_accumulation(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step: global batch / (per-device batch x processes). ValueError if it is not
        a whole number."""
        per_step = (self.per_device_batch_size or 1) * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of per-device batch "
                f"{self.per_device_batch_size} x {world_size} process(es) = {per_step}"
            )
        return self.global_batch_size // per_step

    def use_bf16(self, device: str | None = None) -> bool:
        """Whether training runs in bfloat16 mixed precision on `device` ("cuda" / "cpu"; default: CUDA when
        available): bf16 "auto" means where CUDA supports it."""
        import torch

        if str(self.bf16).lower() == "auto":
            on_cuda = device in (None, "cuda") and torch.cuda.is_available()
            return on_cuda and torch.cuda.is_bf16_supported()
        return str(self.bf16).lower() in ("1", "true", "yes", "on")

    def describe(self, world_size: int = 1) -> str:
        """One line: the batch arithmetic and the machine-dependent choices."""
        return (
            f"global batch {self.global_batch_size} = per-device batch {self.per_device_batch_size} x "
            f"{self.gradient_accumulation(world_size)} accumulation x {world_size} process(es); gradient "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}; {self.num_workers} loader "
            f"worker(s); bf16 {'on' if self.use_bf16() else 'off'}"
        )

    def training_arguments(self, output_dir: str, world_size: int = 1, device: str | None = None, **bookkeeping: Any):
        """`transformers.TrainingArguments` of this (fitted) recipe on `device` ("cuda" / "cpu"; default: CUDA when
        available); `bookkeeping` adds logging / saving / reporting arguments (logging_steps, save_steps, report_to,
        deepspeed, ...). ValueError when a knob `fit` sets is still unset. The only place the project builds them."""
        import torch
        from transformers import TrainingArguments

        if self.per_device_batch_size is None or self.gradient_checkpointing is None or self.num_workers is None:
            raise ValueError("call fit() first: per_device_batch_size, gradient_checkpointing or num_workers is unset")
        # transformers >= 5.2x renamed gradient_checkpointing (the old name warns)
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        on_cpu = device == "cpu" if device else not torch.cuda.is_available()
        return TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=self.per_device_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation(world_size),
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            optim=self.optimizer,
            lr_scheduler_type=self.lr_scheduler,
            lr_scheduler_kwargs={"decay_type": "cosine"} if self.lr_scheduler == "warmup_stable_decay" else {},
            warmup_steps=self.warmup_ratio,  # a float < 1 is a fraction of the steps
            max_grad_norm=self.max_grad_norm,
            num_train_epochs=self.num_epochs,
            max_steps=self.max_steps,
            bf16=self.use_bf16(device),
            **{ckpt: self.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}},
            seed=self.seed,
            dataloader_num_workers=self.num_workers,
            remove_unused_columns=False,
            ddp_find_unused_parameters=False,
            use_cpu=on_cpu,  # also what makes a CPU multi-process run (gloo) distributed
            **bookkeeping,
        )

    def distillation_arguments(self) -> DistillationArguments:
        """The loss knobs as the trainer's `DistillationArguments` (ValueError for a weight, position set, layer
        loss, temperature, teacher dtype or decay ratio it does not accept)."""
        from .distillation import DistillationArguments

        return DistillationArguments(
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            temperature=self.temperature,
            kl_positions=self.kl_positions,
            layer_loss=self.layer_loss,
            teacher_dtype=self.teacher_dtype,
            decay_ratio=self.decay_ratio,
        )


PRESETS: dict[str, DistillationRecipe] = {
    # the authors' released recipe (hustvl/MaTVLM tinyllava_0.25_mamba2_665k.yaml): 3B models on 4 x 24 GB GPUs
    "paper": DistillationRecipe(per_device_batch_size=1, gradient_checkpointing=True, num_workers=2),
    # the default: the same objective, the memory knobs fitted to the machine (`fit`)
    "auto": DistillationRecipe(),
}


def activation_bytes_per_sample(config, max_length: int, gradient_checkpointing: bool) -> int:
    """Estimated training memory of one sample of `max_length` tokens, bytes (float32 activations, x 1.25 margin):
    5 logit-sized tensors (teacher and student logits, their softmaxes, the gradient), the teacher's hidden states
    (layers + 1), and per student layer its input (checkpointing) or ~8 hidden-sized + 2 MLP-sized tensors.
    Against the GPU measurement (docs/benchmarks: TinyLLaVA-3.1B, 1428 tokens, checkpointing): 2.8 GiB estimated,
    2.67 GiB measured per sample."""
    text = config.text_config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    per_layer = h if gradient_checkpointing else 8 * h + 2 * text.intermediate_size
    return int(1.25 * 4 * max_length * (5 * vocab + (layers + 1) * h + layers * per_layer))


def memory_budget_bytes(device: str) -> int:
    """Memory training may use on `device`: 90 % of the current GPU's, or half of the free RAM (Linux; 8 GiB when it
    cannot be read)."""
    import torch

    if device == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _resident_bytes(student, teacher) -> int:
    """Weights of both models plus the trainable parameters' gradient and two AdamW moments (float32)."""
    weights = sum(p.numel() * p.element_size() for m in (student, teacher) for p in m.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return weights + 3 * 4 * trainable


def recipe_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(DistillationRecipe))
