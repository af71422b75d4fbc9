"""Checks of a command's inputs before any work starts: paths, checkpoint kinds, student/teacher pairs, resume files.

Local path or Hub id? A value names a Hub repo only when it has the form `owner/name` (one `/`, letters, digits,
`-`, `_`, `.`; not starting with `.`, `/` or `~`), nothing exists at that path, and no local folder is named like its
`owner` part. Anything else is a local path and must exist: a mistyped local folder is reported as missing, never
looked up on the Hub.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from .errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PAIR_TEXT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_PAIR_VISION_FIELDS = ("model_type", "hidden_size", "image_size", "patch_size", "num_hidden_layers")


def is_hub_id(value: str | os.PathLike) -> bool:
    """True when `value` is to be fetched from the Hub rather than read from disk (rule in the module docstring)."""
    text = os.fspath(value)
    if not _HUB_ID.match(text) or Path(text).exists():
        return False
    return not Path(text.split("/", 1)[0]).exists()


def local_or_hub(value: str | os.PathLike, option: str) -> Path | str:
    """An existing local path (Path) or a Hub id (str); `UserError` for a local path that does not exist."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if is_hub_id(value):
        return os.fspath(value)
    parent = path.parent
    hint = (
        f"{parent} exists but holds no {path.name!r}; check the spelling"
        if parent.is_dir() and str(parent) != "."
        else "check the path"
    )
    raise UserError(f"{option} {value}: no such file or folder ({hint}). A Hub repo id has the form owner/name.")


def read_config(folder: Path, option: str) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict; `UserError` naming the file when missing or not JSON."""
    if not folder.is_dir():
        raise UserError(f"{option} {folder} is a file; expected a checkpoint folder.")
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{option} {folder} has no config.json: not a model checkpoint folder.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}); restore it from the original checkpoint.") from err
    if not isinstance(config, dict):
        raise UserError(f"{file} holds a JSON {type(config).__name__}, not an object; restore it.")
    return config


def check_matvlm_checkpoint(value: str | os.PathLike, option: str, role: str) -> dict[str, Any] | None:
    """The config dict of the MaTVLM checkpoint `value` (None for a Hub id: checked when it is loaded).

    role: "student" or "teacher" (for the advice). `UserError` for a TinyLLaVA folder (with the convert command that
    makes it a MaTVLM checkpoint), another model type, or a folder without safetensors weights.
    """
    where = local_or_hub(value, option)
    if isinstance(where, str):
        return None
    config = read_config(where, option)
    kind = config.get("model_type")
    if kind == "tinyllava" or any("TinyLlava" in a for a in config.get("architectures") or []):
        ratio = "0" if role == "teacher" else "0.25"
        raise UserError(
            f"{option} {value} is a TinyLLaVA checkpoint, not a MaTVLM one (its vision tower and connector would load "
            f"randomly initialised). Convert it first: matvlm convert --input {value} --output OUT/{role} "
            f"--mamba-ratio {ratio}, then pass {option} OUT/{role}."
        )
    if kind != "matvlm":
        raise UserError(
            f"{option} {value}: config.json has model_type {kind!r}, expected 'matvlm' (a checkpoint "
            "written by `matvlm convert` or `matvlm distill`)."
        )
    if not ((where / "model.safetensors").is_file() or (where / "model.safetensors.index.json").is_file()):
        raise UserError(f"{option} {value} has no model.safetensors or model.safetensors.index.json.")
    return config


def check_student_teacher(
    student: dict[str, Any] | None, teacher: dict[str, Any] | None, student_name: str, teacher_name: str
) -> list[str]:
    """`UserError` when the two MaTVLM configs cannot be distilled one from the other; returns notes to print.

    Compared: language model type and sizes, vision tower sizes, image token id. The student must have Mamba layers;
    a teacher with Mamba layers (progressive distillation) must have them at layers the student also replaces.
    """
    if student is None or teacher is None:
        return []
    problems = []
    for part, fields in (("text_config", _PAIR_TEXT_FIELDS), ("vision_config", _PAIR_VISION_FIELDS)):
        s, t = student.get(part) or {}, teacher.get(part) or {}
        problems += [f"{part}.{f}: student {s.get(f)!r}, teacher {t.get(f)!r}" for f in fields if s.get(f) != t.get(f)]
    if student.get("image_token_id") != teacher.get("image_token_id"):
        problems.append(
            f"image_token_id: student {student.get('image_token_id')}, teacher {teacher.get('image_token_id')}"
        )
    if problems:
        raise UserError(
            f"--student {student_name} and --teacher {teacher_name} are not the same model: "
            + "; ".join(problems)
            + ". Convert both from the same TinyLLaVA checkpoint."
        )
    s_layers, t_layers = set(student.get("mamba_layers") or []), set(teacher.get("mamba_layers") or [])
    if not s_layers:
        raise UserError(
            f"--student {student_name} has no Mamba layers: there is nothing to distil. Convert it with "
            "--mamba-ratio > 0 (e.g. 0.25) or --mamba-layers."
        )
    if t_layers - s_layers:
        raise UserError(
            f"--teacher {teacher_name} has Mamba layers {sorted(t_layers - s_layers)} that the student "
            "keeps as attention; use the attention teacher (convert with --mamba-ratio 0)."
        )
    if t_layers:
        return [f"note: the teacher has Mamba layers {sorted(t_layers)} (progressive distillation)"]
    return []


def check_resume_checkpoint(folder: Path) -> None:
    """`UserError` naming the file when a Trainer checkpoint folder is incomplete or damaged.

    Checked: trainer_state.json parses; the model's safetensors open; optimizer/scheduler/RNG states are complete
    torch archives (zip files whose directory reads).
    """
    from safetensors import SafetensorError, safe_open

    advice = f"delete {folder} to resume from the checkpoint before it, or run without --resume to start afresh"
    state = folder / "trainer_state.json"
    if not state.is_file():
        raise UserError(f"--resume: {folder} has no trainer_state.json; it is not a complete checkpoint ({advice}).")
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--resume: {state} is damaged ({err}); {advice}.") from err
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise UserError(f"--resume: {folder} holds no .safetensors weights; {advice}.")
    for file in weights:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise UserError(f"--resume: {file} is damaged or truncated ({err}); {advice}.") from err
    for file in [*folder.glob("*.pt"), *folder.glob("*.pth")]:
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"--resume: {file} is damaged or truncated ({err}); {advice}.") from err
        if bad is not None:
            raise UserError(f"--resume: {file} is damaged (member {bad} fails its checksum); {advice}.")


__all__ = [
    "check_matvlm_checkpoint",
    "check_resume_checkpoint",
    "check_student_teacher",
    "is_hub_id",
    "local_or_hub",
    "read_config",
]
