"""Model loading: HF hub id, local HF directory, ``.gguf`` file, ``embedded:NAME``.

No model hub is reachable here, so nothing in this module ever fetches from the network:
hub ids are only looked up in the local HF cache (``local_files_only=True``).  Embedded
models are located (and installed on request) by :mod:`specmux.embedded`, whose public names
are re-exported here.

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
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from specmux.embedded import (
    EMBEDDED,
    EMBEDDED_PREFIX,
    EmbeddedModel,
    cache_dir,
    embedded_path,
    install_embedded,
    lookup,
    models_dir,
)
from specmux.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
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

_TOKENIZER_STAMP = "specmux-sha256.txt"



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
        model = lookup(spec)
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

    transformers (5.25) logs it for every GGUF asked for in another dtype than float32
    unless it has already decided to dequantize, which it decides only for the
    architectures its packed path handles (``is_gguf_arch_supported``: not ``llama`` or
    ``qwen2``, whose weights the older loader dequantizes to the requested dtype, plain
    ``nn.Linear`` layers).  Where weights do stay packed, :func:`load_model` says so
    itself, once the model is loaded.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Loading a GGUF checkpoint with its weights")


@contextlib.contextmanager
def _quiet_dequantized_gguf() -> Iterator[None]:
    """Silence that warning while loading."""
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
    return models_dir() / f"{model.filename}.tokenizer"


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
    packed = sum(type(m).__name__.startswith("Gguf") for m in model.modules())
    if packed:  # transformers' own hint was dropped while loading (_DropPackedGgufHint)
        log.warning("%s: %d layers keep their GGUF blocks (transformers' packed path: "
                    "float32 compute, casts to and from %s)", src.label, packed,
                    str(model.dtype).removeprefix("torch."))
    log.info(
        "loaded %s (%s, %.0fM params, %s) in %.1fs",
        src.label,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(model.dtype).removeprefix("torch."),
        time.perf_counter() - t0,
    )
    return model, tok
