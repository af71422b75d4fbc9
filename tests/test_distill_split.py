"""The distillation objective does not depend on how the global batch is split: one plain-SGD step over the same 4
samples with per-device batch 4 x accumulation 1, 2 x 2, 1 x 4 and 2 processes x 1 x 2 (gloo) moves the parameters
the same way, for every loss term and the full recipe, with gradient checkpointing off, on and reentrant; and at
per-device batch 1 the update is the authors' recipe computed by hand (per-sample Frobenius norm + batchmean KL,
averaged over the accumulated samples)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from matvlm_hf.distillation import trainable_parameter_names

from conftest import TORCHRUN_2
from distill_split import CASES, MAMBA_LAYERS, TERMS, make_models, make_samples, sgd_step

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def reference(term: str) -> dict[str, torch.Tensor]:
    """Per-device batch 4, no accumulation, no checkpointing: the whole global batch in one micro-batch."""
    return sgd_step(term, "off", 4, 1, "/tmp/matvlm-split-ref")


def initial_parameters() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in make_models()[1].named_parameters()}


def assert_same_step(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor within 1e-5 relative (norm-wise), and the whole update within 1e-4 of its own size (a stricter
    look: the update is small next to the parameters)."""
    init = initial_parameters()
    assert set(got) == set(want)
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err <= 1e-5, f"{what}: {name} differs by {err:.2e} (relative)"
    d_got = torch.cat([(got[n] - init[n]).flatten() for n in want])
    d_want = torch.cat([(want[n] - init[n]).flatten() for n in want])
    assert d_want.norm() > 0
    err = (d_got - d_want).norm() / d_want.norm()
    assert err <= 1e-4, f"{what}: the update differs by {err:.2e} (relative)"


@pytest.mark.parametrize("term", list(TERMS))
def test_accumulation_split_gives_the_same_step(term, tmp_path):
    want = reference(term)
    for per_device, accumulation in ((2, 2), (1, 4)):
        got = sgd_step(term, "off", per_device, accumulation, tmp_path)
        assert_same_step(got, want, f"{term} at {per_device} x {accumulation}")


@pytest.mark.parametrize("checkpointing", ["on", "reentrant"])
@pytest.mark.parametrize("term", list(TERMS))
def test_gradient_checkpointing_gives_the_same_step(term, checkpointing, tmp_path):
    assert_same_step(
        sgd_step(term, checkpointing, 2, 2, tmp_path),
        reference(term),
        f"{term}, checkpointing {checkpointing}, at 2 x 2",
    )


def test_per_device_batch_1_is_the_authors_recipe(tmp_path):
    """The authors' loss at their micro-batch of 1: sum over Mamba layers of torch.norm(student layer i on the
    teacher's input - teacher's output) + F.kl_div(..., reduction="batchmean"), one sample at a time, averaged over
    the accumulated samples; computed here without the package's loss functions."""
    teacher, student = make_models()
    names = {f"model.language_model.layers.{i}.self_attn." for i in MAMBA_LAYERS} | {"model.connector."}
    trainable = {n: p for n, p in student.named_parameters() if n.startswith(tuple(names))}
    assert set(trainable) == set(trainable_parameter_names(student, "mamba+connector"))
    samples = make_samples(student.config)
    grads = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for sample in samples:
        inputs = {"input_ids": sample["input_ids"][None]}
        if "pixel_values" in sample:
            inputs["pixel_values"] = sample["pixel_values"]
        with torch.no_grad():
            t = teacher(**inputs, use_cache=False, output_hidden_states=True)
        s_logits = student(**inputs, use_cache=False).logits
        loss = F.kl_div(F.log_softmax(s_logits, -1), F.softmax(t.logits, -1), reduction="batchmean")
        for i in MAMBA_LAYERS:  # hidden_states[i] enters layer i, [i + 1] leaves it (i + 1 < last: not normed)
            loss = loss + torch.norm(student.decoder_layers[i](t.hidden_states[i]) - t.hidden_states[i + 1], p=2)
        for name, g in zip(
            trainable, torch.autograd.grad(loss / len(samples), list(trainable.values()), allow_unused=True)
        ):
            if g is not None:
                grads[name] += g
    want = {n: p.detach() - 1.0 * grads[n] for n, p in trainable.items()}  # SGD, lr 1
    assert_same_step(sgd_step("recipe", "off", 1, 4, tmp_path), want, "1 x 4 vs the authors' recipe")


@pytest.mark.slow
def test_two_processes_give_the_same_step(tmp_path):
    """torchrun, 2 gloo processes x per-device batch 1 x accumulation 2, every case of distill_split.CASES."""
    from safetensors.torch import load_file

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [*TORCHRUN_2, str(ROOT / "tests" / "distill_split.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    for term, checkpointing in CASES:
        got = load_file(str(tmp_path / f"{term}-{checkpointing}.safetensors"))
        assert_same_step(got, reference(term), f"{term}, checkpointing {checkpointing}, 2 processes x 1 x 2")
