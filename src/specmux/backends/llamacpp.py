"""The llama.cpp backend: a GGUF model as a ``Target`` (and as an LM drafter's LM).

Through llama-cpp-python, the GGUF runs as it is (no dequantization: a Q4_K_M file runs on
llama.cpp's quantized CPU kernels).  :class:`LlamaCppLM` drives ``llama_decode`` with its own
batch so that, like :class:`specmux.lm.CachedLM`:

* one call evaluates every new token in ONE batch (chunks of ``n_batch`` for a long prompt)
  and asks llama.cpp for logits at the wanted positions only (``batch.logits[i]``): a
  verification pass of ``k + 1`` tokens returns ``[k + 1, V]`` rows, a prefill returns one;
* the KV cache follows the caller's sequence: it is rolled back to the longest common prefix
  (``llama_memory_seq_rm``) and only the tokens after it are fed, so rejected draft tokens
  are dropped without re-encoding the context;
* the logit rows of recent positions are remembered, so a drafter scoring the path it just
  drafted (counterfactual feedback) costs no forward pass.

Logits are float32, as llama.cpp computes them.  A ``(k + 1)``-token batch may round
differently from a one-token step (different matmul kernels), so greedy speculative output
equals target-only greedy output on this backend except at near-ties; the benchmark
diagnoses each mismatch (logit gap in ulp).

Measured (2 threads, Qwen2.5-Coder-1.5B Q4_K_M, a 2-core AMD EPYC): one token ~21 ms;
scoring k tokens in one batch 41 / 58 / 66 / 97 / 115 ms for k = 2 / 3 / 4 / 6 / 8, i.e. a
batch costs nearly linearly more on two cores (see docs/BENCHMARKS.md; on a 2-vCPU AMX
Xeon, ``benchmarks/pass_cost.py``: 90 ms a token, 9 positions 3.2x that).

On a CPU with AMX (Intel Xeon since Sapphire Rapids) a llama.cpp build with its AMX kernels
can segfault in ``ggml_backend_amx_mul_mat`` on every batch of more than one token (a
prompt, a verification pass; llama.cpp issue #20824; it did with llama-cpp-python 0.3.36 on
an AMX Xeon), so :func:`new_llama` loads models there without llama.cpp's extra CPU buffer types
(the AMX and repacked weight layouts): plain quantized kernels, slower per token but sound.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from specmux.drafters.hf import HFDrafter
from specmux.errors import ConfigError, ModelLoadError, PromptError, TokenizerMismatchError
from specmux.target import check_num_last, common_prefix_length, prefix_to_keep

if TYPE_CHECKING:
    from llama_cpp import Llama
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_CONTEXT = 4096
DEFAULT_BATCH = 512


def default_threads() -> int:
    """The CPU cores this process may run on (llama-cpp-python's own default is half)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def llama_cpp_module() -> Any:
    """``import llama_cpp``, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ConfigError(
            "the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python "
            f"(builds from source in 3-5 minutes) [{err}]"
        ) from None
    return llama_cpp


def amx_kernels(lc: Any) -> bool:
    """Whether this llama.cpp build runs its AMX kernels on this CPU (``AMX_INT8 = 1`` in
    ``llama_print_system_info()``)."""
    try:
        info = lc.llama_print_system_info()
    except AttributeError:
        return False
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    return "AMX_INT8 = 1" in text


_PARAMS_LOCK = threading.Lock()  # new_llama swaps a module function while a model loads


@contextmanager
def _model_params(lc: Any, **fields: Any) -> Iterator[None]:
    """Within the block, ``Llama(...)`` loads its model with ``fields`` set in its
    ``llama_model_params``: llama-cpp-python's ``Llama`` fills them from
    ``llama_cpp.llama_cpp.llama_model_default_params()`` and has no argument for these."""
    module = lc.llama_cpp
    default = module.llama_model_default_params

    def params() -> Any:
        out = default()
        for key, value in fields.items():
            setattr(out, key, value)
        return out

    with _PARAMS_LOCK:
        module.llama_model_default_params = params
        try:
            yield
        finally:
            module.llama_model_default_params = default


def new_llama(**kwargs: Any) -> Llama:
    """``llama_cpp.Llama(**kwargs)``, without llama.cpp's extra CPU buffer types where its
    AMX kernels would run (module docstring: they segfault on batches of more than one
    token).  Every ``Llama`` specmux builds comes from here."""
    lc = llama_cpp_module()
    fields = [name for name, _ in getattr(lc.llama_model_params, "_fields_", ())]
    if "use_extra_bufts" not in fields or not amx_kernels(lc):
        return lc.Llama(**kwargs)
    log.info("llama.cpp: AMX CPU, loading without extra buffer types (llama.cpp #20824)")
    with _model_params(lc, use_extra_bufts=False):
        return lc.Llama(**kwargs)


def check_gguf(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it is a readable GGUF file (magic bytes and version); else a one-line
    :class:`ModelLoadError`.  llama.cpp itself rejects a truncated or corrupt body."""
    path = path.expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (no GGUF header)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
    return path


def resolve_gguf(spec: str, *, install: bool = False) -> pathlib.Path:
    """The GGUF file of a model spec: ``embedded:NAME`` (or bare ``NAME``) or a ``.gguf``
    path.  HF directories and hub ids are transformers-only."""
    from specmux.models import EMBEDDED, EMBEDDED_PREFIX, embedded_path

    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX) or spec in EMBEDDED:
        return embedded_path(spec, install=install)
    path = pathlib.Path(spec).expanduser()
    if path.suffix.lower() != ".gguf" and not (path.is_file() and _has_magic(path)):
        raise ConfigError(
            f"the llama.cpp backend loads GGUF files (a .gguf path or embedded:NAME), got "
            f"{spec!r}; use --backend transformers for HF models"
        )
    return check_gguf(path)


def _has_magic(path: pathlib.Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class LlamaCppLM:
    """Logits for the last positions of a token sequence from a llama.cpp model, reusing
    its KV cache (the ``Target`` protocol; module docstring).

    Counters ``num_forward_calls`` (``llama_decode`` calls) and ``num_tokens_fed`` make the
    cache's effect testable.  ``llama`` is the underlying ``llama_cpp.Llama``; anything else
    that drives it (its own ``generate``) must be followed by :meth:`reset`.
    """

    max_saved_rows = 64  # logit rows remembered for reuse ([V] float32 each)

    def __init__(self, llama: Llama, name: str = "model") -> None:
        lc = llama_cpp_module()
        self._lc = lc
        self.llama = llama
        self.name = name
        self.path = str(llama.model_path)
        self.vocab_size = int(llama.n_vocab())
        self.n_batch = int(llama.n_batch)
        self.max_context = min(int(llama.n_ctx()), int(llama._model.n_ctx_train()) or 1 << 30)
        self.threads = int(llama.context_params.n_threads)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)  # our own: logits flags per row
        self._vocab = lc.llama_model_get_vocab(llama.model)
        self.num_forward_calls = 0
        self.num_tokens_fed = 0
        self.reset()

    @classmethod
    def load(
        cls,
        spec: str | os.PathLike[str],
        *,
        name: str | None = None,
        context: int = DEFAULT_CONTEXT,
        threads: int | None = None,
        n_batch: int = DEFAULT_BATCH,
        install: bool = False,
    ) -> LlamaCppLM:
        """Load ``embedded:NAME`` or a ``.gguf`` path with ``threads`` CPU threads (default:
        all cores this process may use) and a ``context``-token KV cache."""
        if context < 1 or n_batch < 1 or (threads is not None and threads < 1):
            raise ConfigError("context, n_batch and threads must be >= 1")
        path = resolve_gguf(str(spec), install=install)
        llama_cpp_module()  # a one-line error, before any loading, if it is missing
        threads = threads or default_threads()
        try:
            llama = new_llama(
                model_path=str(path), n_ctx=context, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"llama.cpp cannot load {path}: {first} (a corrupt or truncated GGUF, or an "
                "architecture this llama.cpp does not know)"
            ) from None
        label = name or str(spec).removeprefix("embedded:")
        lm = cls(llama, name=label)
        log.info("llama.cpp loaded %s: %d-token vocab, context %d, %d threads", path,
                 lm.vocab_size, lm.max_context, threads)
        return lm

    def reset(self) -> None:
        """Drop the KV cache."""
        mem = self._lc.llama_get_memory(self.llama.ctx)
        if mem is not None:
            self._lc.llama_memory_clear(mem, True)
        self.llama.n_tokens = 0  # so Llama.generate never reuses a cache it did not fill
        self.cached_ids: list[int] = []
        self.rows: dict[int, torch.Tensor] = {}  # i -> logits [V] after cached_ids[:i]

    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        """Logits [num_last, V] (float32) at the last ``num_last`` positions of ``ids``.

        Row ``j`` is the next-token distribution after ``ids[: len(ids) - num_last + j + 1]``.
        """
        n = len(ids)
        check_num_last(num_last, n)
        if n > self.max_context:
            raise ValueError(f"{n} tokens exceed the context of {self.max_context}")
        common = common_prefix_length(self.cached_ids, ids)
        first = n - num_last + 1  # rows first..n are wanted; row i follows ids[:i]
        start = first
        while start <= n and start <= common and start in self.rows:
            start += 1  # already computed for this very prefix
        if start > n:
            return torch.stack([self.rows[i] for i in range(first, n + 1)])
        keep = prefix_to_keep(self.cached_ids, ids, start)
        fresh = self._decode(ids, keep, start)  # [n - start + 1, V]
        self.cached_ids = list(ids)
        self.rows = {i: r for i, r in self.rows.items() if i <= keep}
        self.rows.update({start + j: fresh[j] for j in range(fresh.shape[0])})
        out = torch.stack([self.rows[i] for i in range(first, n + 1)])  # [num_last, V]
        if len(self.rows) > self.max_saved_rows:  # remember the last rows only
            for i in sorted(self.rows)[: len(self.rows) - self.max_saved_rows]:
                del self.rows[i]
        return out

    def _decode(self, ids: Sequence[int], keep: int, start: int) -> torch.Tensor:
        """Roll the KV cache back to ``keep`` tokens, feed ``ids[keep:]`` in batches of at
        most ``n_batch``, and return the logit rows ``start..len(ids)`` ([rows, V])."""
        lc, batch, ctx = self._lc, self._batch, self.llama.ctx
        bad = [t for t in ids[keep:] if not 0 <= t < self.vocab_size]
        if bad:  # llama_decode would fail on it
            raise PromptError(f"token id {bad[0]} is outside the vocabulary "
                              f"(0..{self.vocab_size - 1})")
        if keep < len(self.cached_ids):
            mem = lc.llama_get_memory(ctx)
            if not lc.llama_memory_seq_rm(mem, 0, keep, -1):  # recurrent models cannot
                lc.llama_memory_clear(mem, True)
                keep = 0
        self.cached_ids = list(ids[:keep])  # what the cache holds if a decode fails below
        out: list[np.ndarray] = []
        n = len(ids)
        for lo in range(keep, n, self.n_batch):
            hi = min(lo + self.n_batch, n)
            batch.n_tokens = hi - lo
            flagged = 0
            for j, pos in enumerate(range(lo, hi)):
                batch.token[j] = ids[pos]
                batch.pos[j] = pos
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                want = pos + 1 >= start  # logits after ids[:pos + 1] = row pos + 1
                batch.logits[j] = want
                flagged += want
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                self.reset()
                raise RuntimeError(f"llama_decode returned {rc} ({hi - lo} tokens at {lo})")
            self.num_forward_calls += 1
            self.num_tokens_fed += hi - lo
            if flagged:
                ptr = lc.llama_get_logits(ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(flagged, self.vocab_size)).copy())
        return torch.from_numpy(np.concatenate(out) if len(out) > 1 else out[0])

    # ------------------------------------------------------------------ vocabulary

    def token_pieces(self) -> list[bytes]:
        """Every token's text as llama.cpp stores it (for tokenizer comparisons)."""
        get = self._lc.llama_vocab_get_text
        return [ctypes.string_at(p) if (p := get(self._vocab, i)) else b""
                for i in range(self.vocab_size)]

    def vocab_fingerprint(self) -> str:
        """sha256 of the token texts: equal iff two GGUFs share one vocabulary."""
        h = hashlib.sha256()
        for piece in self.token_pieces():
            h.update(len(piece).to_bytes(4, "little"))
            h.update(piece)
        return h.hexdigest()

    def eos_token_ids(self) -> list[int]:
        """The GGUF's end-of-sequence (and end-of-turn) tokens, as transformers reads its
        ``eos_token_id`` (the wider end-of-generation set is not used, for parity)."""
        lc = self._lc
        ids = {int(lc.llama_vocab_eos(self._vocab)), int(lc.llama_vocab_eot(self._vocab))}
        return sorted(i for i in ids if 0 <= i < self.vocab_size)

    def close(self) -> None:
        """Free the batch and the model (the object is unusable afterwards)."""
        if getattr(self, "_batch", None) is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self.llama.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_batch", None) is not None:
                self._lc.llama_batch_free(self._batch)
                self._batch = None
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"LlamaCppLM({self.name!r}, vocab={self.vocab_size}, threads={self.threads})"


def check_same_vocab(target: LlamaCppLM, drafter: LlamaCppLM) -> None:
    """Raise :class:`TokenizerMismatchError` unless both GGUFs have the same token texts."""
    if (target.vocab_size != drafter.vocab_size
            or target.vocab_fingerprint() != drafter.vocab_fingerprint()):
        raise TokenizerMismatchError(
            f"drafter {drafter.name!r} has a different vocabulary ({drafter.vocab_size} "
            f"tokens) from the target's ({target.vocab_size} tokens); use a drafter of the "
            "target's model family"
        )


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_text(piece: str) -> str:
    """A token's text with SentencePiece's spellings undone (``▁`` is a space, ``<0x0A>`` a
    byte), so a GGUF's pieces and a transformers tokenizer's vocabulary compare equal."""
    return _BYTE_PIECE.sub(lambda m: chr(int(m.group(1), 16)), piece.replace("\u2581", " "))


def check_tokenizer_vocab(tokenizer: PreTrainedTokenizerBase, lm: LlamaCppLM,
                          name: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless every token of ``tokenizer`` (a
    transformers target's) has the same id and text in the GGUF ``lm`` (a drafter on
    llama.cpp beside a transformers target)."""
    pieces = lm.token_pieces()
    vocab = tokenizer.get_vocab()
    same = all(i < len(pieces) and _piece_text(pieces[i].decode("utf-8", "replace"))
               == _piece_text(token) for token, i in vocab.items())
    if not same:
        raise TokenizerMismatchError(
            f"drafter {name!r} has a different vocabulary ({lm.vocab_size} tokens) from the "
            f"target's tokenizer ({len(vocab)} tokens); use a drafter of the target's model "
            "family"
        )


class LlamaCppDrafter(HFDrafter):
    """The LM drafter (:class:`~specmux.drafters.hf.HFDrafter`'s logic: ``k`` one-token
    steps to propose, one batched pass to score a path) over a :class:`LlamaCppLM`."""

    def __init__(self, lm: LlamaCppLM, name: str | None = None,
                 context_window: int | None = None, confidence_threshold: float = 0.0) -> None:
        super().__init__(lm, name=name or lm.name, context_window=context_window,
                         confidence_threshold=confidence_threshold)
