"""FSDP2 for distillation: the frozen teacher sharded like the student, and what FSDP needs of the student.

Under `accelerate launch --config_file examples/configs/fsdp2.yaml` (distributed_type FSDP, fsdp_version 2),
transformers' Trainer has accelerate shard the model it prepares, the student: `fully_shard` on each decoder layer
(the config's `fsdp_transformer_layer_cls_to_wrap`), on the input embedding, on the final norm + LM head, then on the
whole model (the root unit: vision tower, connector and whatever is left). The teacher is held by
`MaTVLMDistillationTrainer` outside the prepared model, so accelerate never sees it; `shard_teacher` applies the
same FSDP2 `fully_shard` to it. Each process then keeps 1/N of every unit's weights; a unit's forward all-gathers
its weights, runs, and frees them again (`reshard_after_forward=True` for every teacher unit, the root included:
the teacher never runs backward, so nothing is gained by keeping any of its units gathered).

Why the rest of the trainer works unchanged on sharded modules:
- L_layer's forward hooks on the teacher's decoder layers see activations, not weights; calling the student's
  decoder layer i a second time on the teacher's hidden state (`apply_decoder_layer`) is a call of an FSDP2 unit,
  which all-gathers on its own; the gradients of both uses are reduce-scattered in the backward (FSDP2 supports a
  unit used several times per backward).
- FSDP2 keeps `requires_grad` per parameter (DTensor shards), so frozen and trainable parameters mix in one unit;
  only parameters with a gradient are reduce-scattered, and the optimizer holds the trainable shards.

What FSDP needs that DDP does not: every process must run the same units in the same order (each unit's all-gather
is a collective). A text-only micro-batch skips the vision tower and connector on one process and not on another,
so those must stay in the root unit (all-gathered at every forward): `check_student_units` refuses FSDP units inside
them (e.g. SiglipEncoderLayer in the wrap list, which MaTVLM's `_no_split_modules` names for tensor-parallel
loading). The same holds for the order of the reduce-scatters in backward: FSDP2 reduce-scatters a unit's gradients
when the gradient of the unit's input is computed, or, for an input that does not require grad, at the end of the
backward. An image batch's embeddings require grad (the trainable connector's output is merged in) and a text-only
batch's do not, so decoder layer 0 would reduce-scatter at different points on two processes (a collective
mismatch): `prepare_student` makes the embeddings' output always require grad (no change to any gradient), and makes
the language model's decoder layer class the wrap class when the config names none (accelerate's default,
`_no_split_modules`, would name the vision layers and other models' layer classes).

FSDP1 (`fsdp_version: 1`, deprecated by transformers) is refused: its wrapped modules change the parameter names
and module tree that the trainer's L_layer and gradient check rely on.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

SKIPPED_BY_TEXT_ONLY_BATCHES = ("model.vision_tower", "model.connector")


def fsdp2_plugin(accelerator: Any) -> Any | None:
    """accelerate's `FullyShardedDataParallelPlugin` of this run when FSDP is on, else None. ValueError for FSDP1;
    a warning when FSDP was asked for (ACCELERATE_USE_FSDP) but accelerate did not turn it on: accelerate 1.x turns
    FSDP on only for GPU-like devices, so on a CPU the run trains with DDP instead."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            warnings.warn(
                f"FSDP was asked for, but accelerate runs {accelerator.distributed_type} (it enables FSDP only on "
                "GPU-like devices): every process holds the whole student and teacher",
                stacklevel=2,
            )
        return None
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "MaTVLMDistillationTrainer supports FSDP2 only: set fsdp_version: 2 in the accelerate config "
            "(examples/configs/fsdp2.yaml) or fsdp_config={'version': 2}"
        )
    return plugin


def prepare_student(plugin: Any, student: nn.Module) -> None:
    """Before accelerate shards the student: with the transformer-based wrap policy and no class named, wrap the
    language model's decoder layers (the class of `student.decoder_layers[0]`, e.g. PhiDecoderLayer: sets
    `plugin.transformer_cls_names_to_wrap`); and make the input embeddings' output require grad
    (`enable_input_require_grads`), so that the decoder layers' inputs require grad on every process."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = [type(student.decoder_layers[0]).__name__]
    student.enable_input_require_grads()


def fsdp_mesh(accelerator: Any) -> Any | None:
    """The device mesh accelerate shards the student over (None: FSDP2's default, all processes)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is None:
        return None
    return mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]


def shard_teacher(teacher: nn.Module, plugin: Any, mesh: Any | None = None) -> nn.Module:
    """Shard the frozen teacher in place with FSDP2 `fully_shard` (and return it): one unit per decoder layer, one
    for the input embedding and one for the LM head (when not tied to it), the root for the rest; every unit
    reshards after its forward. The plugin's mixed-precision and CPU-offload policies apply as for the student.
    Set the teacher's dtype first (the shards keep the dtype they are made in); `fully_shard` moves each unit to the
    mesh's device as it shards it (or keeps the shards on the CPU under the offload policy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=True,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        offload_policy=plugin.cpu_offload,
    )
    for layer in teacher.decoder_layers:
        fully_shard(layer, **kwargs)
    embed, head = teacher.get_input_embeddings(), teacher.get_output_embeddings()
    if embed.weight is not head.weight:  # tied weights stay in the root unit (one parameter, one unit)
        fully_shard(embed, **kwargs)
        fully_shard(head, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher


def describe_sharding(teacher: nn.Module, plugin: Any) -> str:
    """One line for the run's start: the teacher's FSDP2 units and the share of its weights this process holds, and
    what accelerate will wrap in the student."""
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) for m in teacher.modules())
    params = list(teacher.parameters())
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    wrap = ", ".join(plugin.transformer_cls_names_to_wrap or []) or "none named"
    return (
        f"FSDP2: teacher sharded into {units} units ({100 * held / total:.1f} % of its weights on this process); "
        f"the student is sharded when training starts (decoder layer units: {wrap})"
    )


def check_student_units(student: nn.Module) -> None:
    """ValueError when the student has FSDP units inside the vision tower or connector (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule

    inside = [
        name
        for name, module in student.named_modules()
        if isinstance(module, FSDPModule) and name.startswith(SKIPPED_BY_TEXT_ONLY_BATCHES)
    ]
    if inside:
        raise ValueError(
            f"FSDP wrapped {len(inside)} module(s) of the vision tower or connector separately (e.g. {inside[0]}): "
            "a text-only batch skips them on one process and not on another, and FSDP needs the same all-gathers "
            "on every process. Wrap only the language model's decoder layers (fsdp_transformer_layer_cls_to_wrap: "
            f"{type(student.decoder_layers[0]).__name__})."
        )


@contextlib.contextmanager
def own_class(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, an FSDP2-sharded `model` has its own class again (e.g. MaTVLMForConditionalGeneration)
    instead of the `FSDP<name>` class that `fully_shard` gives it, which is defined in torch: `save_pretrained`
    would record that class in config.json's auto_map and copy torch's FSDP files as the checkpoint's remote code.
    A model that is not sharded is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded_class


__all__ = [
    "check_student_units",
    "describe_sharding",
    "fsdp2_plugin",
    "fsdp_mesh",
    "own_class",
    "prepare_student",
    "shard_teacher",
]
