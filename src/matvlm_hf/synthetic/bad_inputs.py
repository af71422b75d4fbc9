"""The bad-input matrix: a careless user's mistakes against every entry point, judged and written to a report.

    python -m matvlm_hf.bad_inputs --out docs/bad_inputs          # every case (a few minutes on a CPU)
    python -m matvlm_hf.bad_inputs --fast                          # the cases that train nothing (CI)

Each case builds its own scratch folder (a fabricated tiny TinyLLaVA, its MaTVLM teacher and student, small data),
runs the real entry point in this process (`matvlm CMD ...` through `cli.main`, or the Python API for loading, the
processor and `generate`) from that folder, and is judged:

- lost: a protected file changed (the input checkpoint, the working directory's files, an earlier output);
- clear: the run stopped with exit status 2 (or a `ValueError` from the API) and a message naming what is at fault;
- unclear: it stopped, but with a message that names none of it;
- crash: a traceback (an exception that is not a user error), or a wrong result;
- silent: it went on although it should have refused;
- handled: a case that should work (or be repaired) did.

Cases of owner `model core` are answered by the model core (processor, generate, load-time checks), the others by
the commands; both are reported alike.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


VERDICTS = ("lost", "crash", "unclear", "silent", "clear", "handled")


@dataclass
class World:
    """Shared fixtures (built once, never modified: cases copy what they change)."""

    root: Path
    tinyllava: Path = field(init=False)
    teacher: Path = field(init=False)
    student: Path = field(init=False)

    def build(self) -> World:
        from ..convert.conversion import convert_tinyllava_to_matvlm
        from ..convert.fabricate import write_tinyllava_checkpoint

        self.tinyllava = write_tinyllava_checkpoint(self.root / "tinyllava", seed=0)
        self.teacher = convert_tinyllava_to_matvlm(
            self.tinyllava, self.root / "teacher", mamba_ratio=0.0, progress=False
        )
        self.student = convert_tinyllava_to_matvlm(
            self.tinyllava, self.root / "student", mamba_ratio=0.5, progress=False
        )
        return self


@dataclass
class Case:
    name: str
    command: str  # what the user typed (for the report)
    run: Callable[[Path, World], Any] | _Prepared  # runs in the case folder (the cwd)
    expect: str  # "error": must stop with a message; "ok": must work
    mentions: tuple[str, ...] = ()  # an error is clear when its message holds each of these
    check: Callable[[Path, World], bool] | None = None  # for "ok": the result is right
    protect: tuple[str, ...] = (".",)  # paths (relative to the case folder) that must be unchanged afterwards
    owner: str = "commands"  # the layer answering: the commands, or the model core (loading, processor, generate)
    trains: bool = False


# --- helpers ------------------------------------------------------------------------------------------------------


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cli(*argv: Any) -> Callable[[Path, World], Any]:
    def run(case_dir: Path, world: World) -> Any:
        from ..cli import main

        main([str(a).format(T=world.tinyllava, TEACHER=world.teacher, STUDENT=world.student) for a in argv])
        return 0

    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


@dataclass
class _Prepared:
    """A case's setup (files the mistake needs) and its command; the judge hashes the protected files in between."""

    setup: Callable[[Path, World], Any]
    run: Callable[[Path, World], Any]


def _prepared(setup: Callable[[Path, World], Any], run: Callable[[Path, World], Any]) -> _Prepared:
    return _Prepared(setup, run)


def _tinyllava_copy(case_dir: Path, world: World) -> None:
    _copy(world.tinyllava, case_dir / "ckpts" / "tinyllava")


def _reshaped(key: str, shape_change: Callable[[tuple], tuple]) -> Callable[[Path, World], None]:
    def setup(case_dir: Path, world: World) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        folder = _copy(world.tinyllava, case_dir / "broken")
        file = next(f for f in folder.glob("*.safetensors") if key in load_file(str(f)))
        tensors = load_file(str(file))
        tensors[key] = torch.zeros(shape_change(tuple(tensors[key].shape)))
        save_file(tensors, str(file), metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.exists():
            _edit_json(index, lambda d: None)

    return setup


def _data(records: Any, name: str = "data.json", raw: str | None = None) -> Callable[[Path, World], None]:
    def setup(case_dir: Path, world: World) -> None:
        (case_dir / name).write_text(raw if raw is not None else json.dumps(records))

    return setup


QA = [
    {
        "id": "a",
        "conversations": [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}],
    }
]
DISTILL = (
    "distill",
    "--student",
    "{STUDENT}",
    "--teacher",
    "{TEACHER}",
    "--max-steps",
    "1",
    "--num-workers",
    "0",
    "--save-steps",
    "0",
    "--global-batch-size",
    "1",
)


def _distill(*extra: Any) -> Callable[[Path, World], Any]:
    return _cli(*DISTILL, *extra)


def _earlier_run(case_dir: Path, world: World) -> None:
    _data(QA)(case_dir, world)
    run = case_dir / "runs" / "m25"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (run / "model.safetensors").write_text("the final model of an earlier run")


def _checkpoint(damage: str) -> Callable[[Path, World], None]:
    def setup(case_dir: Path, world: World) -> None:
        _data(QA)(case_dir, world)
        ckpt = case_dir / "runs" / "m25" / "checkpoint-1"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{not json" if damage == "state" else "{}")
        weights = (world.student / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2] if damage == "weights" else weights)
        (ckpt / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated" if damage == "optimizer" else b"")
        if damage != "optimizer":
            (ckpt / "optimizer.pt").unlink()

    return setup


def _api_processor_empty(case_dir: Path, world: World) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(world.student, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(world.student, trust_remote_code=True)
    inputs = processor(text="", return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=2)


def _api_long_prompt(case_dir: Path, world: World) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(world.student, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(world.student, trust_remote_code=True)
    limit = model.config.text_config.max_position_embeddings
    inputs = processor(text="hello " * (limit + 50), return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=2)


def _api_edited_mamba_layers(case_dir: Path, world: World) -> Any:
    from transformers import AutoModelForImageTextToText

    folder = _copy(world.student, case_dir / "edited")
    _edit_json(folder / "config.json", lambda d: d.update(mamba_layers=[1, 3]))
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)


def _has(*names: str) -> Callable[[Path, World], bool]:
    return lambda case_dir, world: all((case_dir / n).exists() for n in names)


def _converted(folder: str, layers: list[int]) -> Callable[[Path, World], bool]:
    def check(case_dir: Path, world: World) -> bool:
        config = json.loads((case_dir / folder / "config.json").read_text())
        mode = (case_dir / folder).stat().st_mode & 0o077
        return config["mamba_layers"] == layers and mode != 0 and not list(case_dir.glob(f".{folder}.*"))

    return check


# --- the cases ----------------------------------------------------------------------------------------------------


def cases() -> list[Case]:
    """Every case of the matrix, in the report's order. One long function on purpose: it is a table (one `Case`
    per entry, grouped by command under comments), read and extended as a list, not as logic."""
    conv = ("convert", "--input", "ckpts/tinyllava", "--mamba-ratio", "0.5")
    c = [
        # convert: outputs that would destroy something
        Case(
            "output is the working directory",
            "convert ... --output . --overwrite",
            _prepared(_tinyllava_copy, _cli(*conv, "--output", ".", "--overwrite")),
            "error",
            ("--output", "working"),
        ),
        Case(
            "output is the parent of the working directory",
            "convert ... --output .. --overwrite",
            _prepared(_tinyllava_copy, _cli(*conv, "--output", "..", "--overwrite")),
            "error",
            ("working",),
        ),
        Case(
            "output == input",
            "convert --input ckpts/tinyllava --output ckpts/tinyllava --overwrite",
            _prepared(_tinyllava_copy, _cli(*conv, "--output", "ckpts/tinyllava", "--overwrite")),
            "error",
            ("--input", "ckpts/tinyllava"),
        ),
        Case(
            "output is the input's parent",
            "convert ... --output ckpts --overwrite",
            _prepared(_tinyllava_copy, _cli(*conv, "--output", "ckpts", "--overwrite")),
            "error",
            ("contains",),
        ),
        Case(
            "output inside the input",
            "convert ... --output ckpts/tinyllava/out",
            _prepared(_tinyllava_copy, _cli(*conv, "--output", "ckpts/tinyllava/out")),
            "error",
            ("inside",),
        ),
        Case(
            "output exists, no --overwrite",
            "convert ... --output old",
            _prepared(
                lambda d, w: (_tinyllava_copy(d, w), _copy(w.student, d / "old")), _cli(*conv, "--output", "old")
            ),
            "error",
            ("old", "new folder", "--overwrite"),
        ),
        Case(
            "output is a file",
            "convert ... --output notes.txt",
            _prepared(
                lambda d, w: (_tinyllava_copy(d, w), (d / "notes.txt").write_text("x")),
                _cli(*conv, "--output", "notes.txt"),
            ),
            "error",
            ("notes.txt", "file"),
        ),
        Case(
            "output exists, --overwrite: replaced by a swap",
            "convert ... --output old --overwrite",
            _prepared(
                lambda d, w: (_tinyllava_copy(d, w), _copy(w.teacher, d / "old")),
                _cli(*conv, "--output", "old", "--overwrite"),
            ),
            "ok",
            check=_converted("old", [0, 2]),
            protect=("ckpts",),
        ),
        Case(
            "stale partial folder of a killed run",
            "convert ... --output out (after a SIGKILL)",
            _prepared(
                lambda d, w: (
                    _tinyllava_copy(d, w),
                    (d / ".out.partial-999999").mkdir(),
                    (d / ".out.partial-999999" / ".matvlm-partial").write_text(
                        json.dumps({"tool": "matvlm-hf", "pid": 999999, "host": os.uname().nodename})
                    ),
                ),
                _cli(*conv, "--output", "out"),
            ),
            "ok",
            check=_converted("out", [0, 2]),
            protect=("ckpts",),
        ),
        Case(
            "new output: normal permissions",
            "convert ... --output out",
            _prepared(_tinyllava_copy, _cli(*conv, "--output", "out")),
            "ok",
            check=_converted("out", [0, 2]),
            protect=("ckpts",),
        ),
        # convert: inputs
        Case(
            "missing local --input",
            "convert --input tinylava --output out",
            _cli("convert", "--input", "tinylava", "--output", "out", "--mamba-ratio", "0.5"),
            "error",
            ("--input", "tinylava", "no such"),
        ),
        Case(
            "mistyped local path with one '/'",
            "convert --input ckpts/tinylava --output out",
            _prepared(_tinyllava_copy, _cli("convert", "--input", "ckpts/tinylava", "--output", "out")),
            "error",
            ("ckpts/tinylava", "no such", "spelling"),
        ),
        Case(
            "Hub id without network",
            "convert --input someone/tinyllava --output out",
            _cli("convert", "--input", "someone/tinyllava", "--output", "out"),
            "error",
            ("someone/tinyllava", "local folder"),
        ),
        Case(
            "--input is a file",
            "convert --input notes.txt --output out",
            _prepared(_data(None, "notes.txt", "x"), _cli("convert", "--input", "notes.txt", "--output", "out")),
            "error",
            ("notes.txt", "file"),
        ),
        Case(
            "folder without config.json",
            "convert --input empty --output out",
            _prepared(lambda d, w: (d / "empty").mkdir(), _cli("convert", "--input", "empty", "--output", "out")),
            "error",
            ("empty", "config.json"),
        ),
        Case(
            "config.json is not JSON",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: (_copy(w.tinyllava, d / "broken") / "config.json").write_text("{oops"),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("config.json", "JSON"),
        ),
        Case(
            "not a TinyLLaVA (model_type llava)",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: _edit_json(
                    _copy(w.tinyllava, d / "broken") / "config.json",
                    lambda c: c.update(model_type="llava", architectures=[]),
                ),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("llava", "tinyllava"),
        ),
        Case(
            "unknown vision model_type",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: _edit_json(
                    _copy(w.tinyllava, d / "broken") / "config.json",
                    lambda c: c["vision_config"].update(model_type="dinov2"),
                ),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("vision_config.model_type", "dinov2"),
        ),
        Case(
            "unsupported language model type",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: _edit_json(
                    _copy(w.tinyllava, d / "broken") / "config.json",
                    lambda c: c["text_config"].update(model_type="gpt2"),
                ),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("gpt2",),
        ),
        Case(
            "wrong-shaped MLP tensor",
            "convert --input broken --output out",
            _prepared(
                _reshaped("language_model.model.layers.1.mlp.fc1.weight", lambda s: (s[0] + 1, s[1])),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("language_model.model.layers.1.mlp.fc1.weight", "layer 1"),
        ),
        Case(
            "wrong-shaped embedding",
            "convert --input broken --output out",
            _prepared(
                _reshaped("language_model.model.embed_tokens.weight", lambda s: (s[0] - 3, s[1])),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("embed_tokens",),
        ),
        Case(
            "wrong-shaped patch embedding",
            "convert --input broken --output out",
            _prepared(
                _reshaped(
                    "vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight",
                    lambda s: (s[0], s[1], s[2] + 1, s[3]),
                ),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("patch_embedding",),
        ),
        Case(
            "wrong-shaped q_proj in a layer that becomes Mamba",
            "convert --input broken --output out --mamba-layers 0",
            _prepared(
                _reshaped("language_model.model.layers.0.self_attn.q_proj.weight", lambda s: (s[0] // 2, s[1])),
                _cli("convert", "--input", "broken", "--output", "out", "--mamba-layers", "0"),
            ),
            "error",
            ("layers.0.self_attn.q_proj.weight", "layer 0"),
        ),
        Case(
            "a weight shard missing",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: (
                    _edit_json(_copy(w.tinyllava, d / "broken") / "config.json", lambda c: None)
                    or (d / "broken" / "model.safetensors").unlink()
                ),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("model.safetensors",),
        ),
        Case(
            "a truncated weight file",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: (lambda f: f.write_bytes(f.read_bytes()[:4000]))(
                    _copy(w.tinyllava, d / "broken") / "model.safetensors"
                ),
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("truncated",),
        ),
        Case(
            "missing tokenizer: refused before any weight is written",
            "convert --input broken --output out",
            _prepared(
                lambda d, w: [
                    p.unlink()
                    for p in _copy(w.tinyllava, d / "broken").iterdir()
                    if p.name.startswith(("tokenizer", "vocab", "merges", "special"))
                ],
                _cli("convert", "--input", "broken", "--output", "out"),
            ),
            "error",
            ("tokenizer", "broken"),
            check=lambda d, w: not (d / "out").exists() and not list(d.glob(".out.*")),
        ),
        Case(
            "ratio that rounds to no Mamba layer",
            "convert ... --mamba-ratio 0.05 (4 layers)",
            _prepared(
                _tinyllava_copy,
                _cli("convert", "--input", "ckpts/tinyllava", "--output", "out", "--mamba-ratio", "0.05"),
            ),
            "error",
            ("--mamba-ratio", "no Mamba layer"),
        ),
        Case(
            "empty layer list",
            "convert ... --mamba-layers ,",
            _prepared(
                _tinyllava_copy, _cli("convert", "--input", "ckpts/tinyllava", "--output", "out", "--mamba-layers", ",")
            ),
            "error",
            ("--mamba-layers",),
        ),
        Case(
            "layer out of range",
            "convert ... --mamba-layers 9",
            _prepared(
                _tinyllava_copy, _cli("convert", "--input", "ckpts/tinyllava", "--output", "out", "--mamba-layers", "9")
            ),
            "error",
            ("--mamba-layers", "range"),
        ),
        Case(
            "ratio 1",
            "convert ... --mamba-ratio 1",
            _prepared(
                _tinyllava_copy, _cli("convert", "--input", "ckpts/tinyllava", "--output", "out", "--mamba-ratio", "1")
            ),
            "error",
            ("--mamba-ratio",),
        ),
        # distill
        Case(
            "raw TinyLLaVA as --teacher",
            "distill --teacher TINYLLAVA ...",
            _prepared(
                _data(QA),
                _cli("distill", "--student", "{STUDENT}", "--teacher", "{T}", "--data", "data.json", "--output", "run"),
            ),
            "error",
            ("TinyLLaVA", "matvlm convert", "--mamba-ratio 0"),
        ),
        Case(
            "raw TinyLLaVA as --student",
            "distill --student TINYLLAVA ...",
            _prepared(
                _data(QA),
                _cli("distill", "--student", "{T}", "--teacher", "{TEACHER}", "--data", "data.json", "--output", "run"),
            ),
            "error",
            ("--student", "matvlm convert"),
        ),
        Case(
            "missing local --teacher",
            "distill --teacher teachr ...",
            _prepared(
                _data(QA),
                _cli(
                    "distill", "--student", "{STUDENT}", "--teacher", "teachr", "--data", "data.json", "--output", "run"
                ),
            ),
            "error",
            ("--teacher", "teachr", "no such"),
        ),
        Case(
            "mistyped --teacher with one '/'",
            "distill --teacher out/teachr ...",
            _prepared(
                lambda d, w: (_data(QA)(d, w), (d / "out").mkdir()),
                _cli(
                    "distill",
                    "--student",
                    "{STUDENT}",
                    "--teacher",
                    "out/teachr",
                    "--data",
                    "data.json",
                    "--output",
                    "run",
                ),
            ),
            "error",
            ("out/teachr", "no such"),
        ),
        Case(
            "student and teacher of different models",
            "distill --student A --teacher B ...",
            _prepared(
                lambda d, w: (
                    _data(QA)(d, w),
                    _edit_json(
                        _copy(w.teacher, d / "other") / "config.json", lambda c: c["text_config"].update(hidden_size=96)
                    ),
                ),
                _cli(
                    "distill", "--student", "{STUDENT}", "--teacher", "other", "--data", "data.json", "--output", "run"
                ),
            ),
            "error",
            ("hidden_size", "student", "teacher"),
        ),
        Case(
            "student without Mamba layers",
            "distill --student TEACHER --teacher TEACHER ...",
            _prepared(
                _data(QA),
                _cli(
                    "distill",
                    "--student",
                    "{TEACHER}",
                    "--teacher",
                    "{TEACHER}",
                    "--data",
                    "data.json",
                    "--output",
                    "run",
                ),
            ),
            "error",
            ("no Mamba layers",),
        ),
        Case(
            "--output is the teacher folder",
            "distill ... --output TEACHER",
            _prepared(
                lambda d, w: (_data(QA)(d, w), _copy(w.teacher, d / "teacher")),
                _cli(*DISTILL[:3], "--teacher", "teacher", "--data", "data.json", "--output", "teacher"),
            ),
            "error",
            ("--teacher", "same folder"),
        ),
        Case(
            "--output holds the student",
            "distill --student models/student ... --output models",
            _prepared(
                lambda d, w: (_data(QA)(d, w), _copy(w.student, d / "models" / "student")),
                _cli(
                    "distill",
                    "--student",
                    "models/student",
                    "--teacher",
                    "{TEACHER}",
                    "--data",
                    "data.json",
                    "--output",
                    "models",
                ),
            ),
            "error",
            ("--student", "contains"),
        ),
        Case(
            "--output is the working directory",
            "distill ... --output .",
            _prepared(_data(QA), _distill("--data", "data.json", "--output", ".")),
            "error",
            ("working directory",),
        ),
        Case(
            "earlier run folder without --resume",
            "distill ... --output runs/m25",
            _prepared(_earlier_run, _distill("--data", "data.json", "--output", "runs/m25")),
            "error",
            ("runs/m25", "--resume", "--overwrite"),
        ),
        Case(
            "--resume and --overwrite together",
            "distill ... --resume --overwrite",
            _prepared(_earlier_run, _distill("--data", "data.json", "--output", "runs/m25", "--resume", "--overwrite")),
            "error",
            ("--resume", "--overwrite"),
        ),
        Case(
            "--resume DIR that does not exist",
            "distill ... --resume runs/m25/checkpoint-9",
            _prepared(
                _earlier_run,
                _distill("--data", "data.json", "--output", "runs/m25", "--resume", "runs/m25/checkpoint-9"),
            ),
            "error",
            ("checkpoint-9",),
        ),
        Case(
            "resume checkpoint: damaged trainer_state.json",
            "distill ... --resume",
            _prepared(_checkpoint("state"), _distill("--data", "data.json", "--output", "runs/m25", "--resume")),
            "error",
            ("trainer_state.json", "damaged"),
        ),
        Case(
            "resume checkpoint: truncated model.safetensors",
            "distill ... --resume",
            _prepared(_checkpoint("weights"), _distill("--data", "data.json", "--output", "runs/m25", "--resume")),
            "error",
            ("model.safetensors", "checkpoint-1"),
        ),
        Case(
            "resume checkpoint: truncated optimizer.pt",
            "distill ... --resume",
            _prepared(_checkpoint("optimizer"), _distill("--data", "data.json", "--output", "runs/m25", "--resume")),
            "error",
            ("optimizer.pt",),
        ),
        Case(
            "data file missing",
            "distill ... --data dat.json",
            _distill("--data", "dat.json", "--output", "run"),
            "error",
            ("dat.json",),
        ),
        Case(
            "malformed data JSON",
            "distill ... --data data.json",
            _prepared(_data(None, raw='[{"id": "a",}]'), _distill("--data", "data.json", "--output", "run")),
            "error",
            ("data.json", "JSON", "line 1"),
        ),
        Case(
            "JSON lines instead of a JSON list",
            "distill ... --data data.jsonl",
            _prepared(
                _data(None, "data.jsonl", json.dumps(QA[0]) + "\n" + json.dumps(QA[0])),
                _distill("--data", "data.jsonl", "--output", "run"),
            ),
            "error",
            ("data.jsonl", "JSON"),
        ),
        Case(
            "empty data list",
            "distill ... --data data.json ([])",
            _prepared(_data([]), _distill("--data", "data.json", "--output", "run")),
            "error",
            ("data.json", "empty"),
        ),
        Case(
            "no sample has an answer to supervise",
            "distill ... (questions only)",
            _prepared(
                _data([{"id": "q", "conversations": [{"from": "human", "value": "Why?"}]}]),
                _distill("--data", "data.json", "--output", "run"),
            ),
            "error",
            ("data.json", "answer"),
        ),
        Case(
            "ShareGPT user/assistant roles: accepted",
            "distill ... (roles user/assistant)",
            _prepared(
                _data(
                    [
                        {
                            "id": "s",
                            "conversations": [
                                {"from": "user", "value": "Hi?"},
                                {"from": "assistant", "value": "Hello."},
                            ],
                        }
                    ]
                ),
                _distill("--data", "data.json", "--output", "run"),
            ),
            "ok",
            check=_has("run/model.safetensors", "run/README.md"),
            protect=("data.json",),
            trains=True,
        ),
        Case(
            "earlier run replaced with --overwrite",
            "distill ... --output runs/m25 --overwrite",
            _prepared(_earlier_run, _distill("--data", "data.json", "--output", "runs/m25", "--overwrite")),
            "ok",
            check=lambda d, w: (d / "runs/m25/README.md").exists() and not (d / "runs/m25/checkpoint-5").exists(),
            protect=("data.json",),
            trains=True,
        ),
        # other commands' output folders
        Case(
            "quickstart into a user's non-empty folder",
            "quickstart --workdir photos",
            _prepared(
                lambda d, w: (d / "photos").mkdir() or (d / "photos" / "a.jpg").write_text("x"),
                _cli("quickstart", "--workdir", "photos", "--fast"),
            ),
            "error",
            ("photos", "not created"),
        ),
        Case(
            "quickstart --workdir .",
            "quickstart --workdir .",
            _cli("quickstart", "--workdir", ".", "--fast"),
            "error",
            ("working directory",),
        ),
        Case(
            "study --workdir .",
            "study teacher --workdir .",
            _cli("study", "teacher", "--workdir", "."),
            "error",
            ("working directory",),
        ),
        Case(
            "demo --workdir ..", "demo --workdir ..", _cli("demo", "--workdir", ".."), "error", ("working directory",)
        ),
        Case("data --out . ", "data --out .", _cli("data", "--out", "."), "error", ("working directory",)),
        Case(
            "data into a non-empty folder",
            "data --out photos",
            _prepared(
                lambda d, w: (d / "photos").mkdir() or (d / "photos" / "a.jpg").write_text("x"),
                _cli("data", "--out", "photos", "--n-train", "2", "--n-test", "1"),
            ),
            "error",
            ("photos", "--overwrite"),
        ),
        Case(
            "bench --out .",
            "bench --size tiny --out .",
            _cli("bench", "--size", "tiny", "--out", "."),
            "error",
            ("working directory",),
        ),
        Case(
            "bench-distill --workdir .",
            "bench-distill --workdir . --out r.json",
            _cli("bench-distill", "--workdir", ".", "--out", "r.json", "--size", "tiny"),
            "error",
            ("working directory",),
        ),
        # the model core
        Case(
            "config.json mamba_layers edited by hand",
            "AutoModelForImageTextToText.from_pretrained(edited)",
            _api_edited_mamba_layers,
            "error",
            ("mamba_layers",),
            owner="model core",
        ),
        Case(
            "processor(text='') then generate",
            "processor(text=''); model.generate(**inputs)",
            _api_processor_empty,
            "error",
            ("empty",),
            owner="model core",
        ),
        Case(
            "prompt past the position limit",
            "generate on max_position_embeddings + 50 tokens",
            _api_long_prompt,
            "error",
            ("max_position_embeddings",),
            owner="model core",
        ),
    ]
    return c


# --- running and judging ---------------------------------------------------------------------------------------------

PROTECTED = ("notes.txt", "ckpts", "old", "runs/m25/checkpoint-5", "teacher", "models", "photos", "data.json")


def _relative_digest(folder: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(folder)): v for k, v in _digest(folder).items()}


def judge(case: Case, world: World, scratch: Path, fixtures: dict[Path, dict[str, str]]) -> dict[str, Any]:
    """Run one case in its own folder (its working directory); returns its row for the report."""
    work = scratch / case.name.replace(" ", "_").replace("/", "_").replace("'", "")[:60]
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("the user's own file\n")
    home, err = Path.cwd(), io.StringIO()
    status, message, protected = "ok", "", {}
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            run = case.run
            if isinstance(run, _Prepared):
                run.setup(work, world)
                run = run.run
            protected = {rel: _relative_digest(work / rel) for rel in PROTECTED if (work / rel).exists()}
            if case.expect == "ok":  # a successful command may replace what it was asked to replace
                protected = {rel: d for rel, d in protected.items() if rel in ("notes.txt", "ckpts", "data.json")}
            run(work, world)
    except SystemExit as exc:
        if exc.code not in (0, None):
            status = "exit"
            text = err.getvalue()
            message = text[text.rfind("error:") :] if "error:" in text else text or f"exit status {exc.code}"
    except ValueError as exc:  # the Python API's way to refuse (UserError is one)
        status, message = "exit", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - anything else is a crash
        status, message = "crash", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        os.chdir(home)
    lost = next(
        (
            name
            for name, folder in (
                ("the TinyLLaVA source", world.tinyllava),
                ("the teacher", world.teacher),
                ("the student", world.student),
            )
            if _relative_digest(folder) != fixtures[folder]
        ),
        "",
    )
    lost = lost or next(
        (
            rel
            for rel, digest in protected.items()
            if not (work / rel).exists() or _relative_digest(work / rel) != digest
        ),
        "",
    )
    if lost:
        verdict = "lost"
    elif status == "crash":
        verdict = "crash"
    elif case.expect == "error":
        mentioned = all(m.lower() in message.lower() for m in case.mentions) and "Traceback" not in message
        verdict = "silent" if status == "ok" else ("clear" if mentioned else "unclear")
        if verdict == "clear" and case.check is not None and not case.check(work, world):
            verdict, message = "crash", message + " (but it wrote an output)"
    else:
        verdict = "handled" if status == "ok" and (case.check is None or case.check(work, world)) else "crash"
    return {
        "case": case.name,
        "command": case.command,
        "owner": case.owner,
        "verdict": verdict,
        "lost": lost,
        "message": " ".join(message.replace(str(scratch.parent), "<tmp>").split()).replace("|", "\\|")[:400],
    }


def run_matrix(fast: bool = False) -> list[dict[str, Any]]:
    """Build the world in a temporary folder and run every case (fast: those that train nothing); the rows."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="matvlm-bad-inputs-") as tmp:
        world = World(Path(tmp) / "world").build()
        fixtures = {f: _relative_digest(f) for f in (world.tinyllava, world.teacher, world.student)}
        return [judge(case, world, Path(tmp) / "cases", fixtures) for case in cases() if not (fast and case.trains)]


def report(rows: list[dict[str, Any]], fast: bool) -> str:
    counts = Counter(r["verdict"] for r in rows)
    core = Counter(r["verdict"] for r in rows if r["owner"] == "model core")
    lines = [
        "# Bad inputs: every mistake answered clearly, nothing lost",
        "",
        "Written by `python -m matvlm_hf.bad_inputs --out docs/bad_inputs` (the module docstring says how each case "
        "is judged). " + ("Fast subset (cases that train skipped)." if fast else "Every case."),
        "",
        f"**{len(rows)} cases: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS) + "**",
        "",
        f"Of these, {sum(core.values())} belong to the model core (owner `model core`): "
        + ", ".join(f"{core.get(v, 0)} {v}" for v in VERDICTS if core.get(v))
        + ".",
        "",
        "| # | case | what the user ran | owner | behaviour (the message) | clear? | anything lost? |",
        "|---:|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        clear = {
            "clear": "yes",
            "handled": "works",
            "unclear": "**no**",
            "silent": "**accepted**",
            "crash": "**crash**",
            "lost": "-",
        }[r["verdict"]]
        lines.append(
            f"| {i} | {r['case']} | `{r['command']}` | {r['owner']} | {r['message'] or 'ok'} | {clear} | "
            f"{'**' + r['lost'] + '**' if r['lost'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m matvlm_hf.bad_inputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write README.md and bad_inputs.json here")
    parser.add_argument("--fast", action="store_true", help="skip the cases that train (CI)")
    args = parser.parse_args(argv)
    rows = run_matrix(fast=args.fast)
    text = report(rows, args.fast)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "README.md").write_text(text)
        (out / "bad_inputs.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
