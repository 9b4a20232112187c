"""Checkpoints of a running :func:`cdfast.compress`: written atomically, resumed identically.

A checkpoint holds everything the rest of the walk depends on: the student's weights,
the finished layers, the channel removals decided so far (in order, so that a resume
replays them on a fresh copy of the teacher before loading the weights), and the
report. It also holds a *fingerprint* of the run — the teacher's structure, the
calibration data and the settings — and a resume with another fingerprint is refused
with a message that says what differs. Files are written to a temporary name in the
same folder, flushed to disk, then renamed over the old one, so a crash at any moment
leaves either the previous checkpoint or the new one, never a torn file; temporaries a
crash left behind are removed on the next run. Files are read with
``torch.load(weights_only=True)``: a checkpoint can never run code.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Any

import torch
import torch.nn as nn

__all__ = ["fingerprint", "save", "load", "check_path", "VERSION"]

VERSION = 2
_KEYS = ("version", "fingerprint", "student", "done", "pruned", "layers", "shrink", "quantized")


def check_path(checkpoint) -> str | None:
    """``checkpoint`` as a path whose folder exists, or None; errors name the argument."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a file path, got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint: {path!r} is a directory; expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint: the folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"checkpoint: the folder {folder!r} is not writable")
    return path


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]


def fingerprint(teacher: nn.Module, batches: list[torch.Tensor], settings: dict[str, Any]) -> dict[str, str]:
    """What a resume must share with the run that wrote the checkpoint: the teacher's
    structure and weights, the calibration data, and each setting (by its ``repr``)."""
    model = _digest([(type(m).__name__, n) for n, m in teacher.named_modules()]
                    + [(n, tuple(t.shape), str(t.dtype)) for n, t in teacher.state_dict().items()]
                    + [t.detach().cpu().contiguous().numpy().tobytes() for t in teacher.state_dict().values()])
    data = _digest([(tuple(b.shape), str(b.dtype)) for b in batches]
                   + [b.detach().cpu().contiguous().numpy().tobytes() for b in batches])
    out = {"model": model, "data": data}
    out.update({f"setting:{k}": repr(v) for k, v in sorted(settings.items())})
    return out


def _temporaries(path: str) -> list[str]:
    return glob.glob(glob.escape(path) + ".tmp-*")


def save(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync folder)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # the rename itself is durable only once the folder is
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass


def load(path: str, expected: dict[str, str]) -> dict | None:
    """The checkpoint at ``path`` if it exists and belongs to this run, else None (no file).

    Removes temporaries a crash left behind. A file that cannot be read, or one written
    for another model, data or settings, is a ``ValueError`` naming the file and what to do.
    """
    for tmp in _temporaries(path):
        try:
            os.remove(tmp)
        except OSError:
            pass
    if not os.path.exists(path):
        return None
    advice = "delete it to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, garbage, or a pickle of other objects
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint: {path!r} is not a readable cdfast checkpoint ({type(exc).__name__}: "
                         f"{reason[:160]}); {advice}") from None
    if not isinstance(state, dict) or any(k not in state for k in _KEYS) or state.get("version") != VERSION:
        raise ValueError(f"checkpoint: {path!r} is not a cdfast compress checkpoint of this version; {advice}")
    theirs = state["fingerprint"]
    differ = sorted(k for k in set(expected) | set(theirs) if expected.get(k) != theirs.get(k))
    if differ:
        what = ", ".join(k.replace("setting:", "") for k in differ)
        detail = "; ".join(f"{k.replace('setting:', '')}: checkpoint {theirs.get(k)} vs now {expected.get(k)}"
                           for k in differ if k.startswith("setting:"))[:400]
        raise ValueError(f"checkpoint: {path!r} was written by a run with another {what}"
                         + (f" ({detail})" if detail else "")
                         + f"; pass the same model, data and settings to resume, or {advice}")
    return state
