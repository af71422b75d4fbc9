"""Safe outputs: nothing that is not the tool's is lost, and an interrupted overwrite always leaves one whole model.

The interrupt tests run `matvlm convert --overwrite` in a subprocess that pauses at a chosen stage (a wrapper around
one internal function writes a flag file and sleeps there), kill it there with SIGINT, SIGTERM or SIGKILL, and check
that a complete model (the old or the new, every tensor readable, config matching it) is under the output's name,
before and after the next run's recovery, and that no partial folder survives the recovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from matvlm_hf import safe_output
from matvlm_hf.conversion import convert_tinyllava_to_matvlm, main as convert_main
from matvlm_hf.errors import UserError
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.safe_output import UnsafeOutputError, check_output, claim_workdir, recover, staged_output

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tinyllava_checkpoint(tmp_path_factory.mktemp("src") / "tinyllava", seed=0)


def model_is_whole(folder: Path) -> list[int]:
    """The Mamba layers of the complete model in `folder` (AssertionError when anything is missing or damaged)."""
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer_config.json").is_file() and (folder / "README.md").is_file()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            f.get_tensor(key)
    for layer in config["mamba_layers"]:
        assert f"language_model.model.layers.{layer}.self_attn.A_log" in keys
    assert not (folder / safe_output.PARTIAL_MARKER).exists()
    return config["mamba_layers"]


# --- refusals: input, working directory and old output intact ------------------------------------------------------


@pytest.mark.parametrize("where", ["cwd", "same", "parent_of_input", "inside_input", "cwd_parent"])
def test_convert_refuses_outputs_over_inputs_and_cwd(where, source, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "ckpts" / "tinyllava"
    src.parent.mkdir()
    import shutil

    shutil.copytree(source, src)
    (work / "notes.txt").write_text("the user's")
    monkeypatch.chdir(work)
    output = {
        "cwd": ".",
        "same": "ckpts/tinyllava",
        "parent_of_input": "ckpts",
        "inside_input": "ckpts/tinyllava/out",
        "cwd_parent": "..",
    }[where]
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--input", "ckpts/tinyllava", "--output", output, "--mamba-ratio", "0.5", "--overwrite"])
    assert exit_info.value.code == 2
    assert tree_digest(tmp_path) == before


def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(source, tmp_path):
    out = tmp_path / "out"
    convert_tinyllava_to_matvlm(source, out, mamba_ratio=0.0, progress=False)
    before = tree_digest(out)
    with pytest.raises(UserError, match="Choose a new folder, or pass --overwrite"):
        convert_tinyllava_to_matvlm(source, out, mamba_ratio=0.5, progress=False)
    assert tree_digest(out) == before
    convert_tinyllava_to_matvlm(source, out, mamba_ratio=0.5, overwrite=True, progress=False)
    assert model_is_whole(out) == [0, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup, journal or partial left
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_build_keeps_old_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True) as staging:
            (staging / "model.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "model.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_removes_only_marked_partials_of_dead_processes(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stamp = {"tool": safe_output.TOOL, "host": os.uname().nodename}
    ours_dead = tmp_path / ".out.partial-1"
    ours_alive = tmp_path / ".out.partial-2"
    users = tmp_path / ".out.partial-3"
    for folder, pid in ((ours_dead, dead_pid), (ours_alive, os.getppid()), (users, None)):
        folder.mkdir()
        (folder / "weights").write_text("x")
        if pid is not None:
            (folder / safe_output.PARTIAL_MARKER).write_text(json.dumps({**stamp, "pid": pid}))
    assert recover(out) == [ours_dead]
    assert not ours_dead.exists() and ours_alive.exists() and users.exists()


def test_check_output_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "file").write_text("x")
    assert check_output("new/out", [("--input", "in")]) == tmp_path / "new" / "out"
    assert check_output("out", [("--input", "someone/model")]) == tmp_path / "out"  # a Hub id is not local
    for bad, msg in (
        (".", "is the working directory"),
        ("..", "contains the working directory"),
        ("in", "is the same folder as the input --input"),
        ("in/x", "lies inside the input"),
        ("file", "is an existing file"),
    ):
        with pytest.raises(UnsafeOutputError, match=msg):
            check_output(bad, [("--input", "in")])


def test_claim_workdir_refuses_a_users_folder_and_reuses_its_own(tmp_path):
    users = tmp_path / "photos"
    users.mkdir()
    (users / "a.jpg").write_text("x")
    with pytest.raises(UnsafeOutputError, match="was not created by matvlm-hf"):
        claim_workdir(users)
    work = claim_workdir(tmp_path / "work")
    (work / "summary.json").write_text("{}")
    assert claim_workdir(work) == work and (work / "summary.json").exists()


# --- distill: the run folder, the student and the teacher are never clobbered ---------------------------------------


@pytest.fixture(scope="module")
def pair(source, tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    teacher = convert_tinyllava_to_matvlm(source, d / "teacher", mamba_ratio=0.0, progress=False)
    student = convert_tinyllava_to_matvlm(source, d / "student", mamba_ratio=0.5, progress=False)
    data = d / "data.json"
    data.write_text(
        json.dumps(
            [{"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
        )
    )
    return d, teacher, student, data


def distill(*args) -> tuple[int, str]:
    from matvlm_hf.train_cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as err:
        return err.code, ""
    return 0, ""


@pytest.mark.parametrize("which", ["teacher", "student", "earlier_run"])
def test_distill_refuses_to_clobber(which, pair, tmp_path, capsys):
    d, teacher, student, data = pair
    earlier = tmp_path / "run"
    (earlier / "checkpoint-5").mkdir(parents=True)
    (earlier / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (earlier / "model.safetensors").write_text("the final model of an earlier run")
    output = {"teacher": teacher, "student": student, "earlier_run": earlier}[which]
    before = {p: tree_digest(p) for p in (teacher, student, earlier)}
    code, _ = distill(
        "--student",
        student,
        "--teacher",
        teacher,
        "--data",
        data,
        "--output",
        output,
        "--max-steps",
        "1",
        "--num-workers",
        "0",
    )
    err = capsys.readouterr().err
    assert code == 2 and ("same folder as the input" in err or "pass --resume to continue" in err), err
    assert {p: tree_digest(p) for p in before} == before


# --- interrupts during an overwrite ---------------------------------------------------------------------------------

PAUSER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import matvlm_hf.conversion as conversion, matvlm_hf.safe_output as safe_output
    stage, flag = sys.argv[1], Path(sys.argv[2])

    def pausing(module, name):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            flag.write_text(stage)
            time.sleep(2 if stage == "swap" else 60)  # in the swap, SIGINT/SIGTERM are held until it is done
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    target = {"weights": (conversion, "_write_metadata"), "metadata": (conversion, "model_card"),
              "swap": (safe_output, "_exchange"), "swap_done": (safe_output, "_settle_swap")}[stage]
    pausing(*target)
    conversion.main(sys.argv[3:])
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,sig",
    [
        ("weights", signal.SIGINT),
        ("weights", signal.SIGTERM),
        ("weights", signal.SIGKILL),
        ("metadata", signal.SIGINT),
        ("metadata", signal.SIGTERM),
        ("metadata", signal.SIGKILL),
        ("swap", signal.SIGINT),
        ("swap", signal.SIGTERM),
        ("swap", signal.SIGKILL),
        ("swap_done", signal.SIGKILL),
    ],
)
def test_interrupted_overwrite_leaves_one_whole_model(stage, sig, source, tmp_path):
    out = tmp_path / "out"
    convert_tinyllava_to_matvlm(source, out, mamba_ratio=0.0, progress=False)  # the old model: no Mamba layer
    old = tree_digest(out)
    flag = tmp_path / "flag"
    script = tmp_path / "pauser.py"
    script.write_text(PAUSER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            stage,
            str(flag),
            "--input",
            str(source),
            "--output",
            str(out),
            "--mamba-ratio",
            "0.5",
            "--overwrite",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while not flag.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the subprocess never reached the stage"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    proc.stdout.close()
    layers = model_is_whole(out)  # before any recovery: one whole model under the output's name
    assert layers in ([], [0, 2])
    if layers == []:
        assert tree_digest(out) == old
    if sig != signal.SIGKILL:  # a catchable signal cleans up on the way out
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert leftovers == [], leftovers
    recover(out)
    assert model_is_whole(out) == layers
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []
    convert_tinyllava_to_matvlm(source, out, mamba_ratio=0.5, overwrite=True, progress=False)  # the next run works
    assert model_is_whole(out) == [0, 2]
