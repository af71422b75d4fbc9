"""train_cli end to end on CPU: a 2-process DDP run (torchrun, gloo) and a 2-process FSDP2 run (accelerate launch
with examples/configs/fsdp2.yaml) against a 1-process run with the same effective batch, checkpoints, resume, and the
saved student loading with AutoModelForImageTextToText.

Tiny fabricated TinyLLaVA -> teacher (0 % Mamba) and student (layers 0 and 2) via the conversion module; a tiny
LLaVA JSON with generated images and text-only samples (so DDP must cope with batches that leave the connector out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TORCHRUN_2

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_distill.py"
FSDP_CONFIG = ROOT / "examples" / "configs" / "fsdp2.yaml"
FSDP_CPU_SCRIPT = ROOT / "tests" / "fsdp_cpu_train.py"  # train_distill with accelerate's FSDP allowed on a CPU


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from matvlm_hf.conversion import convert_tinyllava_to_matvlm
    from matvlm_hf.fabricate import write_tinyllava_checkpoint

    d = tmp_path_factory.mktemp("mp")
    src = write_tinyllava_checkpoint(d / "tinyllava", lm_type="phi", size="tiny", image_aspect_ratio="pad")
    teacher = convert_tinyllava_to_matvlm(src, d / "teacher", mamba_ratio=0.0, progress=False)
    student = convert_tinyllava_to_matvlm(src, d / "student", mamba_layers=[0, 2], progress=False)
    (d / "img").mkdir()
    samples = []
    colors = {"red": (220, 20, 30), "blue": (20, 40, 220), "green": (30, 200, 40)}
    for i in range(12):
        name = list(colors)[i % 3]
        if i % 4 == 3:  # text-only
            samples.append(
                {
                    "id": f"text-{i}",
                    "conversations": [
                        {"from": "human", "value": "What time of day is it?"},
                        {"from": "gpt", "value": "It is evening."},
                    ],
                }
            )
            continue
        Image.new("RGB", (40 + i, 28), colors[name]).save(d / "img" / f"{i}.png")
        samples.append(
            {
                "id": f"img-{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the car?"},
                    {"from": "gpt", "value": f"The car is {name}."},
                ],
            }
        )
    (d / "data.json").write_text(json.dumps(samples))
    return d, teacher, student


def run(cmd, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def cli_args(d, teacher, student, out, steps=3):
    return [
        "--student",
        student,
        "--teacher",
        teacher,
        "--data",
        d / "data.json",
        "--images",
        d / "img",
        "--output",
        out,
        "--global-batch-size",
        "4",
        "--per-device-batch-size",
        "1",
        "--max-steps",
        str(steps),
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--num-workers",
        "0",
        "--seed",
        "0",
    ]


def logged_losses(out_dir):
    state = json.loads((out_dir / "checkpoint-3" / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


def test_two_process_ddp_run_matches_one_process_and_saves(setup, tmp_path):
    d, teacher, student = setup
    # 1 process x 4 accumulation  vs  2 processes x 2 accumulation: same samples per optimizer step
    single = tmp_path / "single"
    log1 = run([sys.executable, SCRIPT, *cli_args(d, teacher, student, single)], cwd=ROOT)
    assert "1 x 4 accumulation x 1 process(es)" in log1
    ddp = tmp_path / "ddp"
    log2 = run(
        [*TORCHRUN_2, SCRIPT, *cli_args(d, teacher, student, ddp)],
        cwd=ROOT,
    )
    assert "1 x 2 accumulation x 2 process(es)" in log2

    # checkpoints with optimizer/scheduler state, and the final student
    for out in (single, ddp):
        assert {"checkpoint-2", "checkpoint-3"} <= {p.name for p in out.iterdir()}
        assert (out / "checkpoint-2" / "optimizer.pt").is_file() and (out / "checkpoint-2" / "scheduler.pt").is_file()
        assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert len(list(ddp.glob("checkpoint-2/rng_state_*.pth"))) == 2  # one per process

    assert_same_optimisation(single, ddp, student)
    assert_loads_and_generates(ddp, d)


def assert_same_optimisation(single, other, student):
    """The same optimisation: logged losses (and grad norms) per step and final weights agree; only the trainable
    tensors (connector, Mamba mixers of layers 0 and 2) changed."""
    l1, l2 = logged_losses(single), logged_losses(other)
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        for key in ("loss", "l_layer", "l_prob", "l_ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a, b)
    w1, w2 = load_file(single / "model.safetensors"), load_file(other / "model.safetensors")
    w0 = load_file(Path(student) / "model.safetensors")
    assert w1.keys() == w2.keys() == w0.keys()
    changed = 0
    for key in w0:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-6)
        is_trainable = key.startswith("connector.") or ".layers.0.self_attn." in key or ".layers.2.self_attn." in key
        if is_trainable:
            changed += not torch.equal(w2[key], w0[key])
        else:
            assert torch.equal(w2[key], w0[key]), f"frozen {key} changed"
    assert changed > 0


def assert_loads_and_generates(out_dir, d):
    """The saved student loads with AutoModelForImageTextToText and generates."""
    import matvlm_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out_dir).eval()
    assert type(model).__name__ == "MaTVLMForConditionalGeneration" and model.config.mamba_layers == [0, 2]
    processor = AutoProcessor.from_pretrained(out_dir)
    inputs = processor(
        images=[Image.open(d / "img" / "0.png")],
        text=processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the car?"}]}],
            add_generation_prompt=True,
        ),
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_resume_continues_from_the_last_checkpoint(setup, tmp_path):
    d, teacher, student = setup
    out = tmp_path / "resume"
    run([sys.executable, SCRIPT, *cli_args(d, teacher, student, out, steps=4), "--save-steps", "2"], cwd=ROOT)
    full = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    # drop the last checkpoint and the final model, resume from checkpoint-2
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    log = run(
        [sys.executable, SCRIPT, *cli_args(d, teacher, student, out, steps=4), "--save-steps", "2", "--resume"],
        cwd=ROOT,
    )
    assert (out / "model.safetensors").is_file()
    resumed = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    a = [e for e in full if "loss" in e and e["step"] > 2]
    b = [e for e in resumed if "loss" in e and e["step"] > 2]
    assert [e["step"] for e in b] == [3, 4], log[-2000:]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_accelerate_launch_runs_the_same_two_process_training(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine: 2 gloo processes, the same losses as one
    process with the same effective batch (what the README and the issue ask of a multi-process launch)."""
    d, teacher, student = setup
    single, acc = tmp_path / "single", tmp_path / "accelerate"
    run([sys.executable, SCRIPT, *cli_args(d, teacher, student, single)], cwd=ROOT)
    log = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29517",
            SCRIPT,
            *cli_args(d, teacher, student, acc),
        ],
        cwd=ROOT,
    )
    assert "1 x 2 accumulation x 2 process(es)" in log
    assert len(list(acc.glob("checkpoint-2/rng_state_*.pth"))) == 2
    for a, b in zip(logged_losses(single), logged_losses(acc)):
        for key in ("loss", "l_layer", "l_prob", "l_ce"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a, b)
    assert (acc / "model.safetensors").is_file()


def require_deepspeed() -> None:
    """Skip without deepspeed (the `deepspeed` extra); with MATVLM_REQUIRE_DEEPSPEED=1 (set by .ci/run) fail."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("MATVLM_REQUIRE_DEEPSPEED") == "1":
            pytest.fail(
                "MATVLM_REQUIRE_DEEPSPEED=1 but deepspeed is not installed (pip install --no-build-isolation "
                '-e ".[deepspeed]")',
                pytrace=False,
            )
        pytest.skip("deepspeed is not installed (the `deepspeed` extra)")


def test_deepspeed_zero2_two_processes_match_one_process(setup, tmp_path):
    """`matvlm distill --deepspeed examples/configs/ds_zero2.json` on 2 CPU processes (torchrun, DeepSpeed's CPU
    accelerator, gloo): ZeRO-2 partitions the optimizer states and reduces the gradients in buckets, and gives the
    losses, gradient norms and weights of one plain process with the same global batch. The data mixes image and
    text-only samples, so the two processes' micro-batches differ in kind: before `vision_path_in_graph`, the
    connector's gradients became ready at another point of a text-only backward and ZeRO-2 reduced mismatched
    buckets (gloo: "Received data size doesn't match expected size" at step 2)."""
    require_deepspeed()
    d, teacher, student = setup
    single, zero2 = tmp_path / "single", tmp_path / "zero2"
    run([sys.executable, SCRIPT, *cli_args(d, teacher, student, single)], cwd=ROOT)
    config = ROOT / "examples" / "configs" / "ds_zero2.json"
    log = run(
        [*TORCHRUN_2, SCRIPT, *cli_args(d, teacher, student, zero2), "--deepspeed", config],
        cwd=ROOT,
        timeout=420,
    )
    assert "1 x 2 accumulation x 2 process(es)" in log
    assert list(zero2.glob("checkpoint-2/global_step2/*optim_states.pt"))  # DeepSpeed's own checkpoint: it ran
    assert_same_optimisation(single, zero2, student)
    assert_loads_and_generates(zero2, d)


def test_fsdp2_run_shards_student_and_teacher_and_matches_one_process(setup, tmp_path):
    """`accelerate launch --config_file examples/configs/fsdp2.yaml --num_processes 2` with gloo on the CPU: the
    student sharded by accelerate, the frozen teacher by the trainer (FSDP2 `fully_shard`), L_layer running the
    student's sharded decoder layers on the teacher's hidden states; the same losses and weights as one process
    with the same effective batch, a normal MaTVLM checkpoint saved, and --resume from an FSDP checkpoint.

    accelerate 1.15 turns FSDP on only for GPU-like devices (on a CPU it silently trains with DDP), so the run goes
    through tests/fsdp_cpu_train.py, which lifts exactly that check (see its docstring)."""
    d, teacher, student = setup
    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    run([sys.executable, SCRIPT, *cli_args(d, teacher, student, single)], cwd=ROOT)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        FSDP_CONFIG,
        "--num_processes",
        "2",
        "--main_process_port",
        "29519",
        FSDP_CPU_SCRIPT,
    ]
    log = run([*launch, *cli_args(d, teacher, student, sharded)], cwd=ROOT)
    assert "1 x 2 accumulation x 2 process(es)" in log
    # 4 decoder layers + embedding + head + root; each process holds half of the teacher's weights
    assert "FSDP2: teacher sharded into 7 units (50.0 % of its weights on this process)" in log
    assert "decoder layer units: PhiDecoderLayer" in log
    assert (sharded / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # the student was sharded: FSDP's files
    assert len(list(sharded.glob("checkpoint-2/rng_state_*.pth"))) == 2

    assert_same_optimisation(single, sharded, student)
    # a normal MaTVLM checkpoint: MaTVLM's auto_map and remote code, not FSDP2's `FSDP<class>` and torch's files
    config = json.loads((sharded / "config.json").read_text())
    assert config["auto_map"] == json.loads((Path(student) / "config.json").read_text())["auto_map"]
    assert (sharded / "modeling_matvlm.py").is_file() and not list(sharded.glob("_fsdp*.py"))
    assert_loads_and_generates(sharded, d)

    # --resume from the FSDP checkpoint-2 gives the same step 3
    import shutil

    uninterrupted = logged_losses(sharded)
    shutil.rmtree(sharded / "checkpoint-3")
    (sharded / "model.safetensors").unlink()
    run([*launch, *cli_args(d, teacher, student, sharded), "--resume"], cwd=ROOT)
    resumed = logged_losses(sharded)
    assert [e["step"] for e in resumed] == [1, 2, 3]
    for key in ("loss", "l_layer", "l_prob", "grad_norm"):
        assert resumed[2][key] == pytest.approx(uninterrupted[2][key], rel=1e-4), key
    assert (sharded / "model.safetensors").is_file()


FSDP_UNITS_SCRIPT = """
import copy, os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from matvlm_hf.modeling_matvlm import MaTVLMForConditionalGeneration
from matvlm_hf.training import fsdp

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29563", rank=0, world_size=1)

class Plugin:  # what shard_teacher reads of accelerate's FSDP plugin
    mixed_precision_policy = cpu_offload = transformer_cls_names_to_wrap = None

teacher = MaTVLMForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
teacher.lm_head.weight = teacher.get_input_embeddings().weight  # a tied head stays in the root unit
whole = copy.deepcopy(teacher)
ids = torch.randint(0, 100, (2, 9))
with torch.no_grad():
    expected = whole(input_ids=ids, use_cache=False).logits
    fsdp.shard_teacher(teacher, Plugin())
    got = teacher(input_ids=ids, use_cache=False).logits
torch.testing.assert_close(got, expected, rtol=0, atol=0)
assert sum(isinstance(m, FSDPModule) for m in teacher.modules()) == len(teacher.decoder_layers) + 1

student = MaTVLMForConditionalGeneration.from_pretrained(sys.argv[2])
fully_shard(next(m for m in student.model.vision_tower.modules() if type(m).__name__ == "SiglipEncoderLayer"))
fully_shard(student)
try:
    fsdp.check_student_units(student)
    raise AssertionError("a vision-tower unit was not refused")
except ValueError as err:
    assert "model.vision_tower.encoder.layers.0" in str(err) and "PhiDecoderLayer" in str(err), err
assert type(student).__name__ == "FSDPMaTVLMForConditionalGeneration"
with fsdp.own_class(student):
    assert type(student) is MaTVLMForConditionalGeneration
assert type(student).__name__ == "FSDPMaTVLMForConditionalGeneration"
dist.destroy_process_group()  # before exit: gloo's threads must not outlive the interpreter (pytorch#190489)
print("ok")
"""


def test_fsdp_helpers_on_one_process(setup):
    """training/fsdp.py on a 1-process gloo group (in a subprocess, so the test session keeps no process group): a
    teacher with a tied head, sharded, gives the unsharded logits exactly; a vision-tower FSDP unit in the student is
    refused; `own_class` shows the student's own class inside the block only."""
    _, teacher, student = setup
    assert "ok" in run([sys.executable, "-c", FSDP_UNITS_SCRIPT, teacher, student], cwd=ROOT)
