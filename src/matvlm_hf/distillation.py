"""MaTVLM distillation: a `transformers.Trainer` that trains a hybrid student against its frozen attention teacher.

    loss = alpha * L_layer + beta * L_prob + gamma * L_ce          (paper: alpha = beta = 1, gamma = 0)

- L_layer (layer-wise alignment). For every Mamba layer i, the student's whole decoder layer i (input norm, Mamba-2
  mixer, MLP, residual) is applied to the *teacher's* hidden state entering layer i, and compared with the teacher's
  hidden state leaving layer i. "frobenius" (the authors'): `torch.norm(student_out - teacher_out, p=2)` over the
  whole (batch, length, hidden) tensor, summed over the Mamba layers. "mse": mean squared error per layer, summed.
  Padding positions are left out of both (the authors trained with batch size 1, where there is none).
  The teacher's hidden states are captured with forward hooks on its decoder layers (input and output of each
  Mamba-layer index) rather than taken from `output_hidden_states`: in transformers 5.x the last element of
  `hidden_states` is the *final-normed* output (`capture_outputs(tie_last_hidden_states=True)`), so the output of
  the last decoder layer is not in that tuple. (The authors' hybrid compared final_layernorm(student) with the
  teacher's normed state for the last layer; their layer choice never includes the last layer.)
- L_prob (logit distillation). "all" (the authors'): `F.kl_div(log_softmax(s / T), softmax(t / T),
  reduction="batchmean") * T**2` on (batch, length, vocab) logits. "batchmean" divides the sum over *every* element
  by the first dimension, the batch size: it is the KL summed over all positions (image, prompt and answer tokens)
  of a sequence, averaged over sequences; not a per-token mean. Here padding positions are left out (no difference
  at batch size 1). "answer": only the positions whose logits predict an answer token (shifted labels != -100),
  averaged per token.
- L_ce: the student's next-token cross-entropy on the labels (mean over answer tokens). Logged even at weight 0.

The teacher runs once per step without gradients, on the student's device (and dtype: see `teacher_dtype`); it is
not wrapped by DDP/DeepSpeed (ZeRO-2 is fine: parameters are not partitioned; ZeRO-3 is not supported for it).
`l_layer`, `l_prob`, `l_ce` and `l_total` are logged beside Trainer's `loss` (averaged over the logging window
and over processes).

Trainable parameters (`set_trainable`): "mamba+connector" (paper; the released configs' `tune_mlp: true` means
TinyLLaVA's connector, which TinyLLaVA calls the mlp projector), "mamba" (`tune_mlp: false`),
"mamba+mlp+connector" (also the MLPs of the Mamba layers), "all". The optimizer takes only trainable parameters;
weight decay skips biases, norms, A_log, dt_bias, D and every other 1-D parameter (the authors' rule).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .chat_template import IGNORE_INDEX

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


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
            positions: str = "all", attention_mask: torch.Tensor | None = None,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) on the logits, in float32, times T**2 (see module docstring for the normalisation).

    positions="all": summed over the non-padding positions, divided by the batch size (= the authors' "batchmean"
    when there is no padding). positions="answer": mean over the positions that predict a label != -100.
    """
    t = temperature
    if positions == "answer":
        if labels is None:
            raise ValueError("kl positions 'answer' needs labels")
        select = labels[:, 1:] != IGNORE_INDEX
        s, te = student_logits[:, :-1][select], teacher_logits[:, :-1][select]  # (n, vocab)
        if s.shape[0] == 0:
            return student_logits.sum() * 0.0
        log_s = F.log_softmax(s.float() / t, dim=-1)
        log_t = F.log_softmax(te.float() / t, dim=-1)
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / s.shape[0] * t**2
    if positions != "all":
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (b, l)
    if attention_mask is not None:
        per_token = per_token * attention_mask[:, -per_token.shape[1]:].to(per_token.dtype)
    return per_token.sum() / student_logits.shape[0] * t**2


def layer_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, *, kind: str = "frobenius",
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between a student layer's output and the teacher's, in float32, padding positions left out.

    "frobenius": torch.norm(diff, p=2) over the whole tensor (the authors'); "mse": mean of diff**2 over the valid
    positions and the hidden dimension.
    """
    diff = student_out.float() - teacher_out.float()
    if attention_mask is not None:
        diff = diff * attention_mask[:, -diff.shape[1]:, None].to(diff.dtype)
    if kind == "frobenius":
        return torch.norm(diff, p=2)
    if kind == "mse":
        n_valid = diff.shape[0] * diff.shape[1] if attention_mask is None else \
            attention_mask[:, -diff.shape[1]:].sum().clamp(min=1)
        return diff.pow(2).sum() / (n_valid * diff.shape[-1])
    raise ValueError(f"layer loss must be 'frobenius' or 'mse', got {kind!r}")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32, mean over the supervised tokens (0 when there is none)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    n = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n.clamp(min=1)


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
    Goes through the layer's `__call__`, so gradient checkpointing applies when enabled."""
    dtype = next(layer.parameters()).dtype
    out = layer(hidden_states.to(dtype), attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, mamba_mask=attention_mask)
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------------------------


class MaTVLMDistillationTrainer(Trainer):
    """`Trainer` whose loss is MaTVLM's distillation loss (see module docstring).

    Args:
        teacher_model: the frozen teacher: a MaTVLM with the same sizes, normally with no Mamba layers (a hybrid
            teacher, for progressive distillation, works too). It is put in eval mode and frozen here.
        distill_args: `DistillationArguments` (or a dict of its fields).
        *args, **kwargs: as for `Trainer` (model = the student; its trainable parameters must already be chosen,
            e.g. with `set_trainable`).
    """

    def __init__(self, *args, teacher_model: nn.Module, distill_args: DistillationArguments | dict | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(distill_args, dict):
            distill_args = DistillationArguments(**distill_args)
        self.distill_args = distill_args or DistillationArguments()
        student = self.accelerator.unwrap_model(self.model)
        s_tc, t_tc = student.config.text_config, teacher_model.config.text_config
        if (s_tc.num_hidden_layers, s_tc.hidden_size, s_tc.vocab_size) != (
                t_tc.num_hidden_layers, t_tc.hidden_size, t_tc.vocab_size):
            raise ValueError("teacher and student language models differ in layers, hidden size or vocabulary")
        if not any(p.requires_grad for p in student.parameters()):
            raise ValueError("the student has no trainable parameter: call set_trainable(student, mode) first")
        self.mamba_layers = list(student.config.mamba_layers)
        self.teacher = teacher_model.eval().requires_grad_(False)
        self.teacher.to(self.args.device)
        # the loss is ours (not the model's): Trainer must average it over gradient-accumulation micro-batches
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "eval": {}}

    # -- optimizer and scheduler ------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if not is_no_decay(n, p)]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and str(getattr(self.args.lr_scheduler_type, "value",
                                                     self.args.lr_scheduler_type)) == "warmup_stable_decay":
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

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_distillation_losses(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """One teacher pass and one student pass on `inputs`: {"loss", "l_layer", "l_prob", "l_ce", "outputs"}
        (loss = alpha * l_layer + beta * l_prob + gamma * l_ce; terms with weight 0 carry no graph)."""
        da = self.distill_args
        student = self.accelerator.unwrap_model(model)
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        labels, pixel_values = inputs.get("labels"), inputs.get("pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._place_teacher(student, input_ids.device)
        need_layer = bool(self.mamba_layers)

        def graph_if(weight: float):  # a term with weight 0 is only logged: no graph for it
            return contextlib.nullcontext() if weight > 0 else torch.no_grad()

        with self.accelerator.autocast():
            with torch.no_grad(), capture_layer_io(self.teacher.decoder_layers,
                                                   self.mamba_layers if need_layer else []) as captured:
                teacher_out = self.teacher(input_ids=input_ids, pixel_values=pixel_values,
                                           attention_mask=attention_mask, use_cache=False)
            outputs = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            use_cache=False)
            student_logits = outputs.logits

            # L_layer: the student's decoder layer i on the teacher's input to layer i, against the teacher's output
            l_layer = torch.zeros((), device=student_logits.device)
            with graph_if(da.alpha):
                for i in self.mamba_layers:
                    teacher_in, teacher_out_i = captured[i]
                    student_out_i = apply_decoder_layer(student.decoder_layers[i], teacher_in, attention_mask)
                    l_layer = l_layer + layer_loss(student_out_i, teacher_out_i, kind=da.layer_loss,
                                                   attention_mask=attention_mask)
            with graph_if(da.beta):
                l_prob = kl_loss(student_logits, teacher_out.logits, temperature=da.temperature,
                                 positions=da.kl_positions, attention_mask=attention_mask, labels=labels)
            with graph_if(da.gamma):  # logged even at weight 0
                l_ce = ce_loss(student_logits, labels) if labels is not None else torch.zeros_like(l_layer)

        loss = da.alpha * l_layer + da.beta * l_prob + da.gamma * l_ce
        return {"loss": loss, "l_layer": l_layer, "l_prob": l_prob, "l_ce": l_ce, "outputs": outputs}

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        terms = self.compute_distillation_losses(model, inputs)
        loss = terms["loss"]
        if inputs.get("pixel_values") is None and model.training:
            # a text-only batch leaves the vision tower and connector out of the graph; give their trainable
            # parameters a zero gradient so that DDP (find_unused_parameters=False) sees every parameter every step
            student = self.accelerator.unwrap_model(model)
            for name, p in student.named_parameters():
                if p.requires_grad and name.startswith(("model.connector.", "model.vision_tower.")):
                    loss = loss + p.sum() * 0.0
        mode = "train" if model.training else "eval"
        for key in ("l_layer", "l_prob", "l_ce"):
            self._metrics[mode].setdefault(key, []).append(terms[key].detach().float())
        self._metrics[mode].setdefault("l_total", []).append(loss.detach().float())
        return (loss, terms["outputs"]) if return_outputs else loss

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

    def distillation_config(self) -> dict[str, Any]:
        return asdict(self.distill_args)


__all__ = [
    "DistillationArguments", "MaTVLMDistillationTrainer", "TRAIN_MODES", "apply_decoder_layer", "capture_layer_io", "ce_loss",
    "is_no_decay", "kl_loss", "layer_loss", "optimizer_param_groups", "set_trainable", "trainable_parameter_names",
]
