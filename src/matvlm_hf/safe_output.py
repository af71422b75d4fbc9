"""Safe output folders: nothing a command did not create is ever deleted or overwritten.

Every `matvlm` command that writes a model or run folder goes through here:

- `check_output` refuses an output that is, contains or lies inside one of the command's inputs, and one that is or
  contains the working directory (`--output .`, `--output ..`).
- `staged_output` builds the new folder beside the old one (`.NAME.partial-PID`, marked as this tool's by a
  `.matvlm-partial` file naming the process) and swaps it into place only once complete: with Linux's atomic
  `renameat2(RENAME_EXCHANGE)` where the file system has it (there is no moment without a whole folder under the
  output's name), else by renaming the old one aside first. A journal file (`.NAME.matvlm-swap`) written before the
  swap lets the next run finish or undo a swap that a SIGKILL interrupted; SIGINT, SIGTERM and SIGHUP remove the
  partial folder on the way out and are held off during the renames.
- `recover` (run by `staged_output` first) removes the partial folders of earlier runs whose process is gone (only
  folders holding this tool's marker) and completes an interrupted swap.
- `claim_workdir` for the commands whose output is a working folder they fill step by step (quickstart, study, demo):
  the folder must be new, empty or one this tool created before (it holds a `.matvlm-workdir` marker).

Folders are created with the user's umask (not 0700 like `tempfile.mkdtemp`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserError

TOOL = "matvlm-hf"
PARTIAL_MARKER = ".matvlm-partial"
WORKDIR_MARKER = ".matvlm-workdir"
_CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class UnsafeOutputError(UserError):
    """The output folder would destroy an input, the working directory or a folder this tool did not create."""


# --- where an output may go ----------------------------------------------------------------------------------------


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    output: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    *,
    option: str = "--output",
    overwrite: bool | None = None,
) -> Path:
    """The resolved output path, or `UnsafeOutputError` when it would clobber something it must not.

    inputs: (option name, path) pairs of what the command reads; None and non-local (Hub id) entries are skipped.
    Refused: output == an input, an input inside the output, the output inside an input; the output being or
    containing the working directory; the output being an existing file; with overwrite=False, an existing non-empty
    folder (None: not checked here).
    """
    out = Path(output).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out):
        what = "is" if out == cwd else "contains"
        raise UnsafeOutputError(
            f"{option} {output} {what} the working directory ({cwd}): replacing it would delete "
            f"what is there. Name a new folder below it instead."
        )
    for name, value in inputs:
        if value is None or not Path(value).expanduser().exists():
            continue
        src = Path(value).expanduser().resolve()
        if out == src:
            problem = "is the same folder as"
        elif _is_within(src, out):
            problem = "contains"
        elif _is_within(out, src):
            problem = "lies inside"
        else:
            continue
        raise UnsafeOutputError(
            f"{option} {output} {problem} the input {name} {value}: writing there would destroy "
            f"the input. Choose an output folder outside {value}."
        )
    if out.exists() and not out.is_dir():
        raise UnsafeOutputError(f"{option} {output} is an existing file, not a folder; choose another path.")
    if overwrite is False and is_nonempty_dir(out):
        raise UnsafeOutputError(
            f"{option} {output} exists and is not empty. Choose a new folder, or pass --overwrite "
            "to replace it (the old folder is kept until the new one is complete)."
        )
    return out


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


# --- markers and journals --------------------------------------------------------------------------------------------


def _stamp(**extra) -> str:
    return json.dumps({"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), **extra})


def _read_stamp(file: Path) -> dict | None:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def _process_gone(stamp: dict) -> bool:
    """True when the process that wrote `stamp` no longer runs (same host only: another host's may still run)."""
    if stamp.get("host") != socket.gethostname():
        return False
    pid = stamp.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _journal(output: Path) -> Path:
    return output.parent / f".{output.name}.matvlm-swap"


def _settle_swap(output: Path, stamp: dict) -> list[Path]:
    """Leave exactly one whole folder under `output` after a swap recorded in `stamp` stopped; remove the rest."""
    staging = output.parent / stamp["staging"]
    backup = output.parent / stamp["backup"]
    if not output.exists():
        if backup.is_dir():
            backup.rename(output)  # the swap stopped between its two renames: the old folder comes back
        elif staging.is_dir():
            staging.rename(output)  # the new folder was complete (the journal is written after it)
    removed = []
    for leftover in (staging, backup):
        if leftover.is_dir():
            shutil.rmtree(leftover)
            removed.append(leftover)
    _journal(output).unlink(missing_ok=True)
    return removed


def recover(output: str | os.PathLike) -> list[Path]:
    """Finish what interrupted runs left beside `output`; returns the folders removed.

    A swap journal whose process is gone: when the output is missing, the old folder (renamed aside) or else the
    complete new one is put back under the output's name; the other copy is removed. Partial folders
    (`.NAME.partial-*`) holding this tool's marker whose process is gone are removed. Nothing without a marker is
    touched.
    """
    output = Path(output).expanduser().resolve()
    parent, removed = output.parent, []
    if not parent.is_dir():
        return removed
    journal = _journal(output)
    stamp = _read_stamp(journal) if journal.exists() else None
    if stamp is not None and _process_gone(stamp):
        removed += _settle_swap(output, stamp)
    for candidate in parent.glob(f".{output.name}.partial-*"):
        marker = _read_stamp(candidate / PARTIAL_MARKER) if candidate.is_dir() else None
        if marker is not None and _process_gone(marker):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


# --- building beside and swapping ----------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP (delivered on exit) so a rename pair is never split by them."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, *_CLEANUP_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap_into_place(staging: Path, output: Path) -> None:
    journal = _journal(output)
    backup = output.parent / f".{output.name}.old-{os.getpid()}"
    with _signals_held():
        journal.write_text(_stamp(staging=staging.name, backup=backup.name))
        (staging / PARTIAL_MARKER).unlink()
        if not output.exists():
            staging.rename(output)
        elif _exchange(staging, output):
            pass  # staging now holds the old folder
        else:
            output.rename(backup)
            staging.rename(output)
    _settle_swap(output, {"staging": staging.name, "backup": backup.name})


@contextlib.contextmanager
def _cleanup_on_termination() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit (so `finally` blocks run) where the default would kill outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for sig in _CLEANUP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, leave)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staged_output(
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    option: str = "--output",
    tag: str | None = None,
) -> Iterator[Path]:
    """Yield a fresh folder beside `output` to build in; on success it replaces `output`, on any error it is removed.

    Raises `UnsafeOutputError` when `check_output` refuses the path, or when `output` exists, is not empty and
    `overwrite` is False. The old output stays untouched until the new one is complete. tag: the suffix of the
    partial folder (default: this process id; processes of one distributed run pass a shared one).
    """
    check_output(output, inputs, option=option)
    out = Path(output).expanduser().resolve()
    recover(out)
    check_output(output, inputs, option=option, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{tag or os.getpid()}"
    if staging.exists():
        marker = _read_stamp(staging / PARTIAL_MARKER)
        if marker is None:
            raise UnsafeOutputError(f"{staging} exists and was not made by {TOOL}; move it away and run again.")
        shutil.rmtree(staging)
    staging.mkdir()
    (staging / PARTIAL_MARKER).write_text(_stamp(output=out.name))
    try:
        with _cleanup_on_termination():
            yield staging
            _swap_into_place(staging, out)
    except BaseException:
        journal = _read_stamp(_journal(out)) if _journal(out).exists() else None
        if journal is not None and journal.get("pid") == os.getpid():
            _settle_swap(out, journal)  # stopped during the swap: keep the whole one
        elif (staging / PARTIAL_MARKER).exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def claim_workdir(
    workdir: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    *,
    option: str = "--workdir",
) -> Path:
    """Create (or reuse) a working folder this tool fills step by step; returns its path.

    Accepted: a new or empty folder (marked as this tool's), or one marked by an earlier run. A non-empty folder
    without the marker raises `UnsafeOutputError` (its files are not ours to replace), as do the `check_output` cases.
    """
    work = check_output(workdir, inputs, option=option)
    marker = work / WORKDIR_MARKER
    if is_nonempty_dir(work) and _read_stamp(marker) is None:
        raise UnsafeOutputError(
            f"{option} {workdir} is not empty and was not created by {TOOL}: its files could be "
            f"replaced. Name a new folder (or an earlier {option} of this command)."
        )
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(_stamp())
    return work


__all__ = ["UnsafeOutputError", "check_output", "claim_workdir", "is_nonempty_dir", "recover", "staged_output"]
