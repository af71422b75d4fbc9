"""MaTVLM distillation: a `transformers.Trainer` that trains a hybrid student against its frozen attention teacher.

    loss = alpha * L_layer + beta * L_prob + gamma * L_ce          (paper: alpha = beta = 1, gamma = 0)

Every term is a sum over items divided by the number of those items in the GLOBAL batch of the optimizer step
(all micro-batches of the accumulation, all processes), as transformers' `num_items_in_batch` does for the LM loss:
the update for a global batch does not depend on its split into micro-batches, accumulation steps and processes.
At per-device batch 1 the Frobenius and "all"-positions KL terms are exactly the authors' (their micro-batch is one
sample, averaged over the accumulated samples by Trainer and DDP).

- L_layer (layer-wise alignment). For every Mamba layer i, the student's whole decoder layer i (input norm, Mamba-2
  mixer, MLP, residual) is applied to the *teacher's* hidden state entering layer i, and compared with the teacher's
  hidden state leaving layer i. "frobenius" (the authors'): `torch.norm(student_out - teacher_out, p=2)` of each
  sample's (length, hidden) tensor, summed over the Mamba layers; per sample (normalised by the global number of
  samples). "mse": squared error averaged over hidden, per non-padding position (normalised by the global number of
  non-padding positions), summed over the layers. Padding positions are left out of both.
  The teacher's hidden states are captured with forward hooks on its decoder layers (input and output of each
  Mamba-layer index) rather than taken from `output_hidden_states`: in transformers 5.x the last element of
  `hidden_states` is the *final-normed* output (`capture_outputs(tie_last_hidden_states=True)`), so the output of
  the last decoder layer is not in that tuple. (The authors' hybrid compared final_layernorm(student) with the
  teacher's normed state for the last layer; their layer choice never includes the last layer.)
- L_prob (logit distillation). "all" (the authors'): `F.kl_div(log_softmax(s / T), softmax(t / T),
  reduction="batchmean") * T**2` on (1, length, vocab) logits: the KL summed over all non-padding positions (image,
  prompt and answer tokens) of a sample; per sample. "answer": only the positions whose logits predict an answer
  token (shifted labels != -100); per supervised token.
- L_ce: the student's next-token cross-entropy on the labels; per supervised token (transformers' normalisation).
  Logged even at weight 0.

The teacher runs once per step without gradients, on the student's device (and dtype: see `teacher_dtype`); it is
not wrapped by DDP/DeepSpeed (ZeRO-2 is fine: parameters are not partitioned; ZeRO-3 is not supported for it). Under
FSDP2 (accelerate's `fsdp_version: 2`, examples/configs/fsdp2.yaml) the trainer shards it like the student with
torch's `fully_shard` (training/fsdp.py says how, and why L_layer and the frozen parameters work unchanged).
`l_layer`, `l_prob`, `l_ce` and `l_total` are logged beside Trainer's `loss` (averaged over the logging window
and over processes: per optimizer step, the global objective). The first optimizer step checks that every trainable
parameter receives a gradient from every micro-batch and raises `GradientCheckError` naming those that do not (so
DDP keeps find_unused_parameters=False; under FSDP2, which writes the reduced gradient shards outside autograd's
hooks, it checks that every trainable shard holds a gradient after the first optimizer step). Gradient
checkpointing, reentrant or not, gives the same update; reentrant checkpointing is refused with several processes
(see `_refuse_reentrant_checkpointing_under_ddp`).
A text-only micro-batch runs the vision tower and connector on one blank image, added times 0
(`vision_path_in_graph`), so that DDP, DeepSpeed ZeRO-2 and FSDP2 see every trainable gradient, in the same backward
order, on every process whatever the kind of its micro-batch.

Trainable parameters (`set_trainable`): "mamba+connector" (paper; the released configs' `tune_mlp: true` means
TinyLLaVA's connector, which TinyLLaVA calls the mlp projector), "mamba" (`tune_mlp: false`),
"mamba+mlp+connector" (also the MLPs of the Mamba layers), "all". The optimizer takes only trainable parameters;
weight decay skips biases, norms, A_log, dt_bias, D and every other 1-D parameter (the authors' rule).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..chat_template import IGNORE_INDEX
from ..mamba2_mixer import CACHE_ARG
from . import fsdp

TRAIN_MODES = ("mamba+connector", "mamba", "mamba+mlp+connector", "all")
KL_POSITIONS = ("all", "answer")
LAYER_LOSSES = ("frobenius", "mse")
NO_DECAY_NAMES = ("A_log", "dt_bias", "D")


@dataclass
class DistillationArguments:
    """Loss weights and variants (defaults: the paper's recipe)."""

    alpha: float = 1.0  # weight of L_layer
    beta: float = 1.0  # weight of L_prob
    gamma: float = 0.0  # weight of L_ce
    temperature: float = 1.0
    kl_positions: str = "all"  # "all" | "answer"
    layer_loss: str = "frobenius"  # "frobenius" | "mse"
    # dtype of the teacher's weights: "auto" = the student's parameter dtype, or the mixed-precision dtype when
    # training with bf16/fp16 autocast (the teacher's matmuls run in it anyway); or "float32", "bfloat16", "float16"
    teacher_dtype: str = "auto"
    # warmup_stable_decay: decay phase as a fraction of the optimizer steps, used when lr_scheduler_kwargs has no
    # num_decay_steps (the warmup comes from TrainingArguments.warmup_steps, a fraction when < 1)
    decay_ratio: float = 0.1

    def __post_init__(self):
        if self.kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {self.kl_positions!r}")
        if self.layer_loss not in LAYER_LOSSES:
            raise ValueError(f"layer_loss must be one of {LAYER_LOSSES}, got {self.layer_loss!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("loss weights must be non-negative")
        if self.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"teacher_dtype must be auto, float32, bfloat16 or float16, got {self.teacher_dtype!r}")
        if not 0 <= self.decay_ratio <= 1:
            raise ValueError(f"decay_ratio must be in [0, 1], got {self.decay_ratio}")


# ----------------------------------------------------------------------------------------------------------------
# Trainable parameters and weight decay


def _unreachable_vision_parameters(model: nn.Module) -> list[str]:
    """Vision-tower parameters that cannot reach the LM: the pooling head, post_layernorm and the encoder layers
    after `vision_feature_layer` (hidden_states[-2] skips the last one). Training them would give DDP unused
    parameters."""
    config = model.config
    n_layers = config.vision_config.num_hidden_layers
    last_used = config.vision_feature_layer % (n_layers + 1)  # hidden_states has n_layers + 1 entries
    unused = []
    for name, _ in model.vision_tower.named_parameters():
        parts = name.split(".")
        if "head" in parts or "post_layernorm" in parts:
            unused.append("model.vision_tower." + name)
        elif "layers" in parts and int(parts[parts.index("layers") + 1]) >= last_used:
            unused.append("model.vision_tower." + name)
    return unused


def trainable_parameter_names(model: nn.Module, mode: str = "mamba+connector") -> list[str]:
    """Names of the parameters `set_trainable(model, mode)` trains."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}")
    mamba = list(model.config.mamba_layers)
    names = [n for n, _ in model.named_parameters()]
    if mode == "all":
        skip = set(_unreachable_vision_parameters(model))
        return [n for n in names if n not in skip]
    if not mamba:
        raise ValueError(f"train mode {mode!r} needs Mamba layers, but the student has none (config.mamba_layers)")
    prefixes = [f"model.language_model.layers.{i}.self_attn." for i in mamba]
    if mode != "mamba":
        prefixes.append("model.connector.")
    if mode == "mamba+mlp+connector":
        prefixes += [f"model.language_model.layers.{i}.mlp." for i in mamba]
    return [n for n in names if n.startswith(tuple(prefixes))]


def set_trainable(model: nn.Module, mode: str = "mamba+connector") -> list[str]:
    """Freeze everything except the parameters of `mode` (see module docstring); returns the trainable names."""
    keep = set(trainable_parameter_names(model, mode))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sorted(keep)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """The authors' rule: no weight decay on biases and 1-D parameters (norms, A_log, dt_bias, D)."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf == "bias" or leaf in NO_DECAY_NAMES or "norm" in name.lower()


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: [decayed, not decayed]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------------
# Losses (pure functions, used by the trainer and by the tests)


COUNT_KEYS = ("samples", "positions", "supervised")


def item_counts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """What the loss terms are normalised by, for one batch: int64 tensor [samples, positions, supervised] =
    [batch size, non-padding positions, positions whose logits predict a label != -100 (labels[:, 1:])]."""
    positions = attention_mask.sum() if attention_mask is not None else torch.tensor(input_ids.numel())
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else torch.tensor(0)
    return torch.stack([torch.tensor(input_ids.shape[0]), positions.cpu(), supervised.cpu()]).long()


def _normalizer(value: float | torch.Tensor | None, default: torch.Tensor | int) -> torch.Tensor | float:
    """`value`, or the local count `default` (at least 1: a sum over no item is 0, not nan)."""
    if value is not None:
        return value
    return default.clamp(min=1) if torch.is_tensor(default) else max(default, 1)


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    positions: str = "all",
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) on the logits (b, l, vocab), in float32, times T**2.

    positions="all" (the authors'): the KL summed over each sample's non-padding positions, summed over samples,
    divided by `normalizer` (default: the batch size b; = `F.kl_div(..., reduction="batchmean")` when there is no
    padding). positions="answer": summed over the positions that predict a label != -100, divided by `normalizer`
    (default: the number of those positions). The trainer passes the counts of the global batch.
    """
    t = temperature
    if positions == "answer":
        if labels is None:
            raise ValueError("kl positions 'answer' needs labels")
        select = labels[:, 1:] != IGNORE_INDEX
        s, te = student_logits[:, :-1][select], teacher_logits[:, :-1][select]  # (n, vocab)
        log_s = F.log_softmax(s.float() / t, dim=-1)
        log_t = F.log_softmax(te.float() / t, dim=-1)
        total = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
        return total / _normalizer(normalizer, s.shape[0]) * t**2
    if positions != "all":
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (b, l)
    if attention_mask is not None:
        per_token = per_token * attention_mask[:, -per_token.shape[1] :].to(per_token.dtype)
    return per_token.sum() / _normalizer(normalizer, student_logits.shape[0]) * t**2


def layer_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    *,
    kind: str = "frobenius",
    attention_mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between a student layer's output and the teacher's (b, l, hidden), in float32, padding left out.

    "frobenius" (the authors' at batch size 1): each sample's `torch.norm(diff, p=2)` over its (length, hidden)
    tensor, summed over samples, divided by `normalizer` (default: b). "mse": diff**2 summed over the non-padding
    positions and averaged over hidden, divided by `normalizer` (default: the number of non-padding positions).
    """
    diff = student_out.float() - teacher_out.float()
    if attention_mask is not None:
        diff = diff * attention_mask[:, -diff.shape[1] :, None].to(diff.dtype)
    if kind == "frobenius":
        return torch.linalg.vector_norm(diff.flatten(1), dim=1).sum() / _normalizer(normalizer, diff.shape[0])
    if kind == "mse":
        n_valid = diff.shape[0] * diff.shape[1] if attention_mask is None else attention_mask[:, -diff.shape[1] :].sum()
        return diff.pow(2).sum() / (_normalizer(normalizer, n_valid) * diff.shape[-1])
    raise ValueError(f"layer loss must be 'frobenius' or 'mse', got {kind!r}")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy in float32, summed over the supervised tokens and divided by `normalizer`
    (default: their number here, i.e. the mean; 0 when there is none)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    n = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / _normalizer(normalizer, n)


class GradientCheckError(RuntimeError):
    """Raised in the first training step when trainable parameters received no gradient (`.missing`: names)."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        super().__init__(
            f"{len(missing)} trainable parameter(s) received no gradient in the first training step: {shown}. "
            "They would not train (and DDP with find_unused_parameters=False fails in the next step). Causes: a "
            "kernel without a backward on the path, or parameters that do not reach the loss (choose the trainable "
            "set with set_trainable / --train-mode)."
        )


@contextlib.contextmanager
def record_gradients(params: dict[str, torch.Tensor]):
    """Yields a set that collects the names of `params` whose `.grad` is accumulated into during the block (one
    post-accumulate-grad hook per parameter, removed on exit; DDP, DeepSpeed and checkpointing leave these hooks
    firing)."""
    received: set[str] = set()
    handles = [p.register_post_accumulate_grad_hook(lambda _p, n=n: received.add(n)) for n, p in params.items()]
    try:
        yield received
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_layer_io(layers: nn.ModuleList, indices: list[int]):
    """Record the hidden state entering and leaving each decoder layer in `indices` during a forward:
    yields a dict {i: (input, output)} filled by forward hooks (removed on exit)."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i in indices:

        def hook(module, args, kwargs, output, i=i):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured[i] = (hidden_in, hidden_out)

        handles.append(layers[i].register_forward_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def apply_decoder_layer(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
    """Run one (Mamba) decoder layer of the student on `hidden_states`: norm + mixer + MLP + residual. Attention
    masks and position embeddings do not concern a Mamba mixer; the 2-D padding mask goes in as `mamba_mask`.
    Goes through the layer's `__call__`, so gradient checkpointing applies when enabled; the teacher's state then
    enters as a tensor that requires grad, because reentrant checkpointing (`use_reentrant=True`) gives the layer's
    parameters no gradient when no input requires one."""
    dtype = next(layer.parameters()).dtype
    hidden_states = hidden_states.to(dtype)
    if torch.is_grad_enabled() and getattr(layer, "gradient_checkpointing", False) and layer.training:
        hidden_states = hidden_states.detach().requires_grad_()
    out = layer(
        hidden_states,
        attention_mask=None,
        position_ids=None,
        use_cache=False,
        position_embeddings=None,
        mamba_mask=attention_mask,
        **{CACHE_ARG: None},
    )
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------------------------


def _refuse_reentrant_checkpointing_under_ddp(args: Any) -> None:
    """Raise ValueError for reentrant gradient checkpointing in a multi-process run: L_layer runs each Mamba layer a
    second time, so reentrant checkpointing accumulates those parameters' gradients twice in one backward, which DDP
    refuses ("marked ready twice"), and its static_graph way out does not support gradient accumulation."""
    if args is None or args.world_size <= 1 or not args.gradient_checkpointing:
        return
    gc_kwargs = args.gradient_checkpointing_kwargs
    if gc_kwargs is not None and gc_kwargs.get("use_reentrant", True):  # None: transformers' non-reentrant default
        raise ValueError(
            "reentrant gradient checkpointing is not supported with several processes (L_layer uses the "
            "Mamba layers twice per step): set gradient_checkpointing_kwargs={'use_reentrant': False}"
        )


@contextlib.contextmanager
def vision_path_in_graph(student: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While active, the student's token embeddings get 0 x (the projected features of one blank image) added: a
    text-only micro-batch then runs the vision tower and connector at the point of the graph where an image batch
    merges its features, so their trainable parameters receive a (zero) gradient in the same backward order on every
    process. DDP (find_unused_parameters=False) needs every parameter to get a gradient; DeepSpeed ZeRO-2 packs
    gradients into its reduction buckets in the order they become ready, so a rank whose connector gradients came at
    another point (the former `loss + p.sum() * 0`: first in backward instead of last) reduced mismatched buckets:
    a gloo size error on the CPU, silently mixed gradients when the sizes happen to agree. No value or gradient
    changes (the term is an exact 0). The blank image costs one vision-tower forward per text-only micro-batch."""
    if not enabled:
        yield
        return
    vision = student.config.vision_config

    def add_vision_path(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        blank = torch.zeros(1, 3, vision.image_size, vision.image_size, device=output.device)
        features = student.get_image_features(blank).pooler_output
        return output + features.sum().to(output.dtype) * 0.0

    handle = student.get_input_embeddings().register_forward_hook(add_vision_path)
    try:
        yield
    finally:
        handle.remove()


class MaTVLMDistillationTrainer(Trainer):
    """`Trainer` whose loss is MaTVLM's distillation loss (see module docstring).

    Args:
        teacher_model: the frozen teacher: a MaTVLM with the same sizes, normally with no Mamba layers (a hybrid
            teacher, for progressive distillation, works too). It is put in eval mode and frozen here.
        distill_args: `DistillationArguments` (or a dict of its fields).
        *args, **kwargs: as for `Trainer` (model = the student; its trainable parameters must already be chosen,
            e.g. with `set_trainable`).
    """

    def __init__(
        self, *args, teacher_model: nn.Module, distill_args: DistillationArguments | dict | None = None, **kwargs
    ):
        _refuse_reentrant_checkpointing_under_ddp(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        if isinstance(distill_args, dict):
            distill_args = DistillationArguments(**distill_args)
        self.distill_args = distill_args or DistillationArguments()
        student = self.accelerator.unwrap_model(self.model)
        s_tc, t_tc = student.config.text_config, teacher_model.config.text_config
        if (s_tc.num_hidden_layers, s_tc.hidden_size, s_tc.vocab_size) != (
            t_tc.num_hidden_layers,
            t_tc.hidden_size,
            t_tc.vocab_size,
        ):
            raise ValueError("teacher and student language models differ in layers, hidden size or vocabulary")
        if not any(p.requires_grad for p in student.parameters()):
            raise ValueError("the student has no trainable parameter: call set_trainable(student, mode) first")
        self.mamba_layers = list(student.config.mamba_layers)
        self.teacher = teacher_model.eval().requires_grad_(False)
        plugin = fsdp.fsdp2_plugin(self.accelerator)
        if plugin is None:
            self.teacher.to(self.args.device)
        else:  # accelerate shards the student when it prepares it; the teacher is ours to shard. Its dtype is set
            # now; fully_shard moves each unit to the device as it shards it (no whole teacher on one GPU)
            fsdp.prepare_student(plugin, student)
            self.teacher.to(dtype=self._teacher_dtype(student))
            fsdp.shard_teacher(self.teacher, plugin, fsdp.fsdp_mesh(self.accelerator))
        # the loss is ours (not the model's). With this False, Trainer divides each micro-batch's loss by the
        # number of accumulation micro-batches (transformers 5.17 .. 5.24); `compute_loss` multiplies that back.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "eval": {}}
        self._step_counts: list[int] | None = None  # item_counts of the current optimizer step's global batch
        self._in_training_step = False
        self._gradients_checked = False

    # -- optimizer and scheduler ------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if not is_no_decay(n, p)]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if (
            self.lr_scheduler is None
            and str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)) == "warmup_stable_decay"
        ):
            kwargs = dict(self.args.lr_scheduler_kwargs or {})
            if "num_decay_steps" not in kwargs:
                kwargs["num_decay_steps"] = math.ceil(self.distill_args.decay_ratio * num_training_steps)
                self.args.lr_scheduler_kwargs = kwargs
        return super().create_scheduler(num_training_steps, optimizer)

    # -- teacher placement ------------------------------------------------------------------------------------
    def _teacher_dtype(self, student: nn.Module) -> torch.dtype:
        choice = self.distill_args.teacher_dtype
        if choice != "auto":
            return getattr(torch, choice)
        if not self.is_deepspeed_enabled and self.args.bf16:
            return torch.bfloat16
        if not self.is_deepspeed_enabled and self.args.fp16:
            return torch.float16
        return next(student.parameters()).dtype

    def _place_teacher(self, student: nn.Module, device: torch.device) -> None:
        dtype = self._teacher_dtype(student)
        p = next(self.teacher.parameters())
        if p.device != device or p.dtype != dtype:
            self.teacher.to(device=device, dtype=dtype)

    # -- the global batch's counts (the loss normalisation) ----------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Trainer's fetch of one optimizer step's micro-batches, plus their `item_counts` summed over the
        micro-batches and the processes (what every loss term of this step is normalised by)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
        for batch in batch_samples:
            counts += item_counts(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
        counts = counts.to(self.args.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._step_counts = counts.tolist()
        return batch_samples, num_items_in_batch

    def _normalizers(self) -> dict[str, float] | None:
        """Per key of COUNT_KEYS: the global count / (accumulation micro-batches x processes), during a training
        step; None otherwise (each batch is then normalised by its own counts).

        Each micro-batch's loss is (its sum over items) / normalizer. Trainer divides it by the number of
        micro-batches (`model_accepts_loss_kwargs = False`) and DDP/DeepSpeed average the gradients over the
        processes, so the optimizer sees the gradient of (sum over the global batch) / (global count): the same
        objective for every split of the global batch into micro-batches, accumulation steps and processes."""
        if not self._in_training_step or self._step_counts is None:
            return None
        share = self.current_gradient_accumulation_steps * self.accelerator.num_processes
        return {k: max(n, 1) / share for k, n in zip(COUNT_KEYS, self._step_counts)}

    # -- the first step's gradient check ----------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's step with the global normalisation on; during the first optimizer step, also checks that
        every trainable parameter receives a gradient from every micro-batch (`GradientCheckError` otherwise).
        Under FSDP2: that every trainable shard holds a gradient once the step's gradients are reduced, and that the
        student has no FSDP unit a text-only batch would skip (`fsdp.check_student_units`)."""
        self._in_training_step = True
        try:
            if self._gradients_checked:
                return super().training_step(model, inputs, num_items_in_batch)
            student = self.accelerator.unwrap_model(model)
            trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
            if self.is_fsdp_enabled:  # FSDP2 sets the shards' .grad when it reduces (the step's last micro-batch)
                fsdp.check_student_units(student)
                loss = super().training_step(model, inputs, num_items_in_batch)
                sync = self.accelerator.sync_gradients
                received = {n for n, p in student.named_parameters() if p.grad is not None} if sync else set(trainable)
            else:
                with record_gradients(trainable) as received:
                    loss = super().training_step(model, inputs, num_items_in_batch)
            missing = sorted(set(trainable) - received)
            if missing:
                raise GradientCheckError(missing)
            if self.accelerator.sync_gradients:  # the last micro-batch of the first optimizer step
                self._gradients_checked = True
            return loss
        finally:
            self._in_training_step = False

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_distillation_losses(
        self, model: nn.Module, inputs: dict[str, Any], normalizers: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One teacher pass and one student pass on `inputs`: {"loss", "l_layer", "l_prob", "l_ce", "outputs"}
        (loss = alpha * l_layer + beta * l_prob + gamma * l_ce; terms with weight 0 carry no graph).

        normalizers: {"samples", "positions", "supervised"}: what the sums over samples (L_layer Frobenius, L_prob
        "all"), non-padding positions (L_layer MSE) and supervised tokens (L_prob "answer", L_ce) are divided by;
        default: the counts of `inputs` itself (per-sample / per-token means over this batch)."""
        da = self.distill_args
        norm = normalizers or {}
        student = self.accelerator.unwrap_model(model)
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        labels, pixel_values = inputs.get("labels"), inputs.get("pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not self.is_fsdp_enabled:  # a sharded teacher was placed before sharding (its shards may live on the CPU)
            self._place_teacher(student, input_ids.device)
        need_layer = bool(self.mamba_layers)

        def graph_if(weight: float):  # a term with weight 0 is only logged: no graph for it
            return contextlib.nullcontext() if weight > 0 else torch.no_grad()

        with self.accelerator.autocast():
            with (
                torch.no_grad(),
                capture_layer_io(self.teacher.decoder_layers, self.mamba_layers if need_layer else []) as captured,
            ):
                teacher_out = self.teacher(
                    input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=False
                )
            with vision_path_in_graph(student, enabled=pixel_values is None and model.training):
                outputs = model(
                    input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=False
                )
            student_logits = outputs.logits

            with graph_if(da.alpha):
                l_layer = self._layer_alignment_loss(student, captured, attention_mask, norm, student_logits.device)
            with graph_if(da.beta):
                l_prob = kl_loss(
                    student_logits,
                    teacher_out.logits,
                    temperature=da.temperature,
                    positions=da.kl_positions,
                    attention_mask=attention_mask,
                    labels=labels,
                    normalizer=norm.get("samples" if da.kl_positions == "all" else "supervised"),
                )
            with graph_if(da.gamma):  # logged even at weight 0
                l_ce = (
                    ce_loss(student_logits, labels, normalizer=norm.get("supervised"))
                    if labels is not None
                    else torch.zeros_like(l_layer)
                )

        loss = da.alpha * l_layer + da.beta * l_prob + da.gamma * l_ce
        return {"loss": loss, "l_layer": l_layer, "l_prob": l_prob, "l_ce": l_ce, "outputs": outputs}

    def _layer_alignment_loss(
        self, student: nn.Module, captured: dict, attention_mask: torch.Tensor, norm: dict[str, Any], device
    ) -> torch.Tensor:
        """L_layer: for every Mamba layer i, the student's decoder layer i applied to the teacher's input to layer i
        (`captured[i]` = (input, output) of the teacher's layer i), against the teacher's output; summed over the
        layers (a 0-d float32 tensor on `device`; 0 without Mamba layers)."""
        da = self.distill_args
        l_layer = torch.zeros((), device=device)
        for i in self.mamba_layers:
            teacher_in, teacher_out_i = captured[i]
            student_out_i = apply_decoder_layer(student.decoder_layers[i], teacher_in, attention_mask)
            l_layer = l_layer + layer_loss(
                student_out_i,
                teacher_out_i,
                kind=da.layer_loss,
                attention_mask=attention_mask,
                normalizer=norm.get("samples" if da.layer_loss == "frobenius" else "positions"),
            )
        return l_layer

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ):
        terms = self.compute_distillation_losses(model, inputs, normalizers=self._normalizers())
        loss = terms["loss"]
        mode = "train" if model.training else "eval"
        for key in ("l_layer", "l_prob", "l_ce"):
            self._metrics[mode].setdefault(key, []).append(terms[key].detach().float())
        self._metrics[mode].setdefault("l_total", []).append(loss.detach().float())
        return (loss, terms["outputs"]) if return_outputs else loss

    # -- saving -----------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save (`save_pretrained` of the student); under FSDP2 through the student's own class
        (`fsdp.own_class`), so the checkpoint's auto_map and remote code are MaTVLM's."""
        with fsdp.own_class(self.model):
            super()._save(output_dir, state_dict)

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None and self._metrics[mode]:
            keys = sorted(self._metrics[mode])
            means = torch.stack([torch.stack(self._metrics[mode][k]).mean() for k in keys]).to(self.args.device)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: round(float(v), 6) for k, v in zip(keys, means.tolist())})
            self._metrics[mode].clear()
        super().log(logs, start_time)


__all__ = [
    "DistillationArguments",
    "GradientCheckError",
    "MaTVLMDistillationTrainer",
    "TRAIN_MODES",
    "apply_decoder_layer",
    "capture_layer_io",
    "ce_loss",
    "is_no_decay",
    "item_counts",
    "kl_loss",
    "layer_loss",
    "optimizer_param_groups",
    "record_gradients",
    "set_trainable",
    "trainable_parameter_names",
]
