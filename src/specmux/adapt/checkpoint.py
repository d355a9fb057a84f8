"""Atomic saving of adapter state: write a temp file, fsync, ``os.replace``.

A crash mid-write leaves the previous file intact and at most a stray ``.*.tmp`` file next
to it (removed on the error path); readers never see a partial file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> pathlib.Path:
    """``torch.save(obj)`` to ``path`` atomically (same-directory temp file + fsync +
    ``os.replace`` + directory fsync)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # persist the rename (not supported everywhere)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a file written by :func:`atomic_torch_save` (tensors and plain Python only)."""
    return torch.load(pathlib.Path(path), map_location="cpu", weights_only=True)
