"""Test-only entry point: `matvlm distill` (train_cli) with accelerate's FSDP allowed on a CPU.

accelerate 1.15 turns FSDP on only for GPU-like process groups: `AcceleratorState.__init__` sets
`distributed_type = FSDP` (and keeps the FSDP plugin) in the branch for MULTI_GPU / MULTI_XPU / MULTI_NPU / ...,
and a CPU run with gloo is MULTI_CPU, which is not in that list. So `accelerate launch --config_file
examples/configs/fsdp2.yaml` on a CPU (and transformers' `TrainingArguments(fsdp=...)` on a CPU) silently trains
with DDP instead. torch's FSDP2 itself runs on a CPU over gloo (all-gather and reduce-scatter of DTensor shards).

This wrapper lifts exactly that check, after `AcceleratorState.__init__`: with an FSDP plugin on a MULTI_CPU run, the
state (and PartialState's shared `distributed_type`, as accelerate sets it) becomes FSDP with that plugin, as it
would be on GPUs. Everything else is the code a GPU run goes through:
accelerate's launcher reading the YAML, its FSDP2 preparation of the student, transformers' FSDP saving, the
trainer's sharded teacher. Used by tests/test_multiprocess_train.py.
"""

from __future__ import annotations

import accelerate.state
from accelerate.utils import DistributedType

from matvlm_hf.train_cli import main

_init = accelerate.state.AcceleratorState.__init__


def _init_allowing_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # as accelerate does at the end of its own __init__ (every later AcceleratorState() copies this back)
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_allowing_fsdp_on_cpu

if __name__ == "__main__":
    main()
