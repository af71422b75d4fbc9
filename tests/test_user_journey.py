"""A user's own TinyLLaVA checkpoint (published layout, remote code included) through convert, distill and generate
with default options: no remote code runs, no question is asked, the recipe fits a CPU, no warning is printed."""

import json
import os
import pty
import runpy
import select
import subprocess
import sys
from pathlib import Path

import pytest

from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.recipe import PRESETS, DistillationRecipe, activation_bytes_per_sample

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
}
WARNING_MARKS = ("warn", "deprecat", "[transformers]", "you are using", "differ from", "custom code", "[y/n]")


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('imported')\n"


def matvlm(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "matvlm_hf.cli", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=kwargs.get("cwd", ROOT),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"matvlm {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def warning_lines(stderr: str) -> list[str]:
    """Lines of stderr that warn or ask (progress bars left out)."""
    lines = [ln for chunk in stderr.splitlines() for ln in chunk.split("\r")]
    return [ln for ln in lines if any(m in ln.lower() for m in WARNING_MARKS)]


def run_in_pty(cmd: list[str], timeout: float = 300) -> str:
    """Runs cmd with a terminal as stdin/stdout/stderr (as a user's shell); returns everything it printed. A
    question on the terminal would get no answer and stop the run at the timeout."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=terminal, stdout=terminal, stderr=terminal, env=ENV, cwd=ROOT, close_fds=True)
    os.close(terminal)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {timeout} s (waiting for an answer?):\n{out.decode()[-3000:]}")
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        proc.wait(timeout=60)
        os.close(controller)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode(errors="replace")


def test_convert_in_a_terminal_asks_nothing_and_runs_no_code_of_the_source(tmp_path):
    marker = tmp_path / "remote_code_was_imported"
    src = write_tinyllava_checkpoint(tmp_path / "tinyllava", remote_code=marker_code(marker))
    config = json.loads((src / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    for ref in config["auto_map"].values():  # the files auto_map names are there
        assert (src / (ref.split(".")[0] + ".py")).is_file()

    printed = run_in_pty(
        [
            sys.executable,
            "-m",
            "matvlm_hf.cli",
            "convert",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out"),
            "--mamba-ratio",
            "0.5",
        ]
    )
    assert "wrote" in printed
    assert warning_lines(printed) == []
    assert not marker.exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # the sentinel is live: importing the source's code file does write the marker
    runpy.run_path(str(src / "configuration.py"))
    assert marker.exists()


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """convert (teacher and 50 % hybrid) -> distill with only the required options -> generate; each stage's
    stdout and stderr. Data: the synthetic world, 16 conversations."""
    from matvlm_hf.synthetic_vqa import make_dataset

    d = tmp_path_factory.mktemp("journey")
    marker = d / "remote_code_was_imported"
    src = write_tinyllava_checkpoint(d / "tinyllava", remote_code=marker_code(marker))
    make_dataset(d / "data", n_train=16, n_test=2, image_size=32, seed=0)
    logs = {
        "teacher": matvlm("convert", "--input", src, "--output", d / "teacher", "--mamba-ratio", "0"),
        "student": matvlm("convert", "--input", src, "--output", d / "student", "--mamba-ratio", "0.5"),
        "distill": matvlm(
            "distill",
            "--student",
            d / "student",
            "--teacher",
            d / "teacher",
            "--data",
            d / "data" / "train.json",
            "--images",
            d / "data" / "images",
            "--output",
            d / "run",
        ),
    }
    script = f"""
import json, matvlm_hf
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(d / "run")!r}).eval()
processor = AutoProcessor.from_pretrained({str(d / "run")!r})
sample = json.load(open({str(d / "data" / "test.json")!r}))[0]
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.open({str(d / "data" / "images")!r} + "/" + sample["image"])
inputs = processor(images=[image], text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print("generated", out.shape[1] - inputs["input_ids"].shape[1])
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    logs["generate"] = proc
    return d, logs, marker


def test_distill_defaults_fit_a_cpu_and_keep_the_global_batch(journey):
    d, logs, marker = journey
    used = json.loads((d / "run" / "distill_config.json").read_text())
    paper = PRESETS["paper"]
    assert used["preset"] == "auto"
    assert used["per_device_batch_size"] > 1 and used["gradient_checkpointing"] is False
    assert used["global_batch_size"] == paper.global_batch_size == 64
    assert used["num_workers"] == 0
    # the objective is the paper's: every knob that is not a memory knob equals the preset's
    for key, value in vars(paper).items():
        if key not in ("per_device_batch_size", "gradient_checkpointing", "num_workers"):
            assert used[key] == value, key
    out = logs["distill"].stdout
    assert out.count("recipe 'auto' on CPU") == 1  # printed once
    assert f"per-device batch {used['per_device_batch_size']} x " in out and "gradient checkpointing off" in out
    assert (d / "run" / "model.safetensors").is_file()
    state = json.loads((d / "run" / "trainer_state.json").read_text())  # the run's log beside the student
    assert state["global_step"] >= 1 and any("loss" in entry for entry in state["log_history"])
    assert not marker.exists()
    assert "generated" in logs["generate"].stdout


def test_a_normal_run_prints_no_warning(journey):
    _, logs, _ = journey
    found = {stage: warning_lines(proc.stderr) + warning_lines(proc.stdout) for stage, proc in logs.items()}
    assert found == {stage: [] for stage in logs}, json.dumps(found, indent=1)


def test_fit_picks_the_largest_divisor_that_fits(monkeypatch):
    """fit() against the arithmetic done by hand: budget for N samples -> the largest divisor of 64 <= N."""
    from conftest import tiny_model

    import matvlm_hf.recipe as recipe_mod

    student, teacher = tiny_model(), tiny_model(mamba_layers=())
    recipe = DistillationRecipe(max_length=100)
    per_sample = activation_bytes_per_sample(student.config, 100, False)
    resident = recipe_mod._resident_bytes(student, teacher)
    for room, expected in ((1, 1), (5, 4), (31, 16), (1000, 64)):
        monkeypatch.setattr(recipe_mod, "memory_budget_bytes", lambda device, r=room: resident + r * per_sample)
        fitted = recipe.fit(student, teacher, device="cpu")
        assert (fitted.per_device_batch_size, fitted.gradient_checkpointing, fitted.num_workers) == (expected, False, 0)
        assert fitted.gradient_accumulation() * expected == 64
    # 2 processes: divisors of 32
    monkeypatch.setattr(recipe_mod, "memory_budget_bytes", lambda device: resident + 1000 * per_sample)
    assert recipe.fit(student, teacher, world_size=2, device="cpu").per_device_batch_size == 32
    # knobs that are set are kept; the paper preset is fixed
    assert PRESETS["paper"].fit(student, teacher, device="cpu") == PRESETS["paper"]


def test_activation_estimate_against_the_gpu_measurement():
    """docs/benchmarks: TinyLLaVA-3.1B distillation at 1428 tokens with checkpointing grows 2.67 GiB per sample."""
    from transformers import PhiConfig

    from matvlm_hf import MaTVLMConfig

    phi2 = PhiConfig(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32
    )
    config = MaTVLMConfig(text_config=phi2.to_dict(), mamba_layers=list(range(0, 32, 4)))
    estimate = activation_bytes_per_sample(config, 1428, True) / 2**30
    assert 2.67 <= estimate <= 1.25 * 2.67


def test_every_option_of_every_command_says_what_it_is(monkeypatch, capsys):
    """Each subcommand's usage names it; each option has a help text, and one that takes a value says its
    default (or that it is required)."""
    import argparse
    import importlib

    from matvlm_hf.cli import COMMANDS

    class Captured(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    missing = []
    for name, (module, _) in COMMANDS.items():
        with pytest.raises(Captured) as caught:
            importlib.import_module(module).main([])
        parser = caught.value.args[0]
        assert parser.format_usage().startswith(f"usage: matvlm {name} "), parser.format_usage()
        assert "python " not in parser.format_help(), name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if not action.option_strings:  # a positional: its help says what it is
                ok = bool(text)
            elif action.required:
                ok = "required" in text
            else:
                ok = "default" in text
            if not ok:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: {text!r}")
    assert missing == [], "\n".join(missing)
