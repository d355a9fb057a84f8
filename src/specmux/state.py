"""Crash-safe JSON state files: atomic writes, and loads that quarantine bad files.

A state file written by :func:`atomic_write_json` is always either the previous complete
version or the new complete version, even if the process is killed (SIGKILL, power loss)
mid-write: the JSON goes to a temporary file in the same directory, which is flushed,
fsync'ed and then atomically renamed over the target with :func:`os.replace`; finally the
directory itself is fsync'ed so that the rename is durable.

:func:`load_json_or_quarantine` reads such a file back.  A file that cannot be parsed is
*never* silently overwritten or deleted: it is logged and renamed aside to
``<name>.corrupt-<UTC timestamp>`` (see :func:`quarantine`), and the caller starts fresh.
Callers that find a file parseable but unusable (e.g. learner state for a different drafter
pool) call :func:`quarantine` themselves.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_json(d / "state.json", {"t": 3})
>>> load_json_or_quarantine(d / "state.json")
{'t': 3}
>>> _ = (d / "state.json").write_text("{truncated")
>>> load_json_or_quarantine(d / "state.json") is None
True
>>> [p.name.split("-")[0] for p in d.iterdir()]
['state.json.corrupt']
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["atomic_write_json", "load_json_or_quarantine", "quarantine"]


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically and durably.

    Temp file in the same directory → write → flush → fsync → :func:`os.replace` → fsync
    the directory.  The parent directory is created if needed.  Raises ``TypeError`` /
    ``ValueError`` (before touching ``path``) if ``obj`` is not JSON-serializable, and
    ``OSError`` if the write fails; in every case ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj, indent=indent, allow_nan=False).encode("utf-8") + b"\n"
    try:  # keep the permissions of the file being replaced (mkstemp makes it 0600)
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def quarantine(path: str | os.PathLike[str], reason: str) -> Path | None:
    """Rename a bad state file aside to ``<name>.corrupt-<UTC timestamp>`` and log why.

    Returns the new path; ``None`` if ``path`` vanished meanwhile or cannot be renamed (that
    is logged as an error; the file is left where it is).  Never overwrites an earlier
    quarantined file: a counter is appended when the timestamp is taken.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("state file %s is unusable (%s) and cannot be moved aside: %s", path,
                  reason, e)
        return None
    _fsync_dir(path.parent)
    log.warning("state file %s is unusable (%s); moved it aside to %s and starting fresh",
                path, reason, target.name)
    return target


def load_json_or_quarantine(path: str | os.PathLike[str]) -> Any | None:
    """The JSON value stored at ``path``; ``None`` if there is no file.

    A file that is unreadable, not UTF-8, not valid JSON or nested too deeply is reported (log
    warning) and renamed aside with :func:`quarantine`, and ``None`` is returned: never fatal.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        if path.is_dir():
            quarantine(path, f"it is a directory: {e}")
            return None
        quarantine(path, f"cannot read it: {e}")
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        quarantine(path, f"not valid JSON: {e}")
        return None
    except RecursionError:
        quarantine(path, "JSON nested too deeply")
        return None
