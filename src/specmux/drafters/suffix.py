"""Corpus (domain-expert) n-gram drafter: continuations from a text corpus, learned online.

The SuffixDecoding-style drafter (:mod:`specmux.drafters.suffix_tree`) supersedes it as the
``suffix`` pool member (per-request and global stores, frequency-scored adaptive drafts);
this one stays as a small, table-based baseline and for its RAM-budget knob.

It indexes, for every ``n`` in ``[min_n, max_n]``, which token followed each ``n``-gram of
its corpus, and proposes by repeatedly following the most frequent continuation of the
longest matching suffix of the context.  After every round it also indexes the verified
output (``observe``), so it learns the workload as it serves it.  Memory is bounded by
``max_entries`` n-gram keys: the oldest keys are evicted first.

RAM budget: ``max_memory_mb`` sets ``max_entries = max_memory_mb * 2**20 // BYTES_PER_ENTRY``.
Measured with ``tracemalloc`` (CPython 3.11, Qwen2.5 tokenizer, ``max_n`` 4-6, ShareGPT
and HumanEval corpora of 30k-130k tokens): 340-360 bytes per entry while the table grows,
365-410 once it is full and evicting (the key tuple, its ``{next: count}`` dict, the table's
slot; the hash index grows in powers of two).  ``BYTES_PER_ENTRY = 420`` keeps the budget a
bound with some slack.  The default 2,000,000 entries is thus about 800 MB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from specmux.drafters.base import Drafter
from specmux.errors import ConfigError
from specmux.types import Draft, PathDistributions, SamplingParams

log = logging.getLogger(__name__)


DEFAULT_MAX_ENTRIES = 2_000_000
BYTES_PER_ENTRY = 420  # measured upper range, see the module docstring


def entries_for_memory(max_memory_mb: float) -> int:
    """How many n-gram entries fit in ``max_memory_mb`` MiB (at least 1).

    >>> entries_for_memory(100)
    249660
    """
    return max(1, int(max_memory_mb * 2**20) // BYTES_PER_ENTRY)


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a corpus: a text file (one document), a ``.jsonl`` file (``"text"`` per line)
    or a directory of such files, searched recursively (binary files skipped); ConfigError
    if missing, malformed or empty."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"corpus not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    texts: list[str] = []
    for file in files:
        data = file.read_bytes()
        if path.is_dir() and b"\0" in data[:8192]:  # git's test for a binary file
            continue  # a directory of sources also holds bytecode, images, archives
        # as text mode reads it: universal newlines
        raw = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        if file.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{file}:{n}: expected a JSON object with 'text'") from e
        else:
            texts.append(raw)
    if not any(t.strip() for t in texts):
        raise ConfigError(f"corpus {path} holds no text")
    return texts


class SuffixDrafter(Drafter):
    """N-gram continuation drafter over a corpus plus everything it has verified.

    >>> d = SuffixDrafter([[1, 2, 3, 4, 1, 2, 3, 5]], max_n=2, name="toy")
    >>> d.propose([9, 1, 2], k=3, sampling=SamplingParams()).tokens.tolist()
    [3, 4, 1]
    """

    def __init__(
        self,
        documents: Iterable[Sequence[int]] = (),
        *,
        max_n: int = 6,
        min_n: int = 1,
        max_entries: int | None = None,
        max_memory_mb: float | None = None,
        learn_online: bool = True,
        name: str = "suffix",
    ) -> None:
        if not 1 <= min_n <= max_n:
            raise ConfigError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        if max_memory_mb is not None:
            if not max_memory_mb > 0:
                raise ConfigError(f"max_memory_mb must be > 0, got {max_memory_mb}")
            budget = entries_for_memory(max_memory_mb)
            max_entries = budget if max_entries is None else min(max_entries, budget)
        elif max_entries is None:
            max_entries = DEFAULT_MAX_ENTRIES
        if max_entries < 1:
            raise ConfigError(f"max_entries must be >= 1, got {max_entries}")
        self.max_n, self.min_n = max_n, min_n
        self.max_entries = max_entries
        self.learn_online = learn_online
        self.name = name
        # (n-gram tuple) -> {next token: count}; insertion order = eviction order.
        self.table: dict[tuple[int, ...], dict[int, int]] = {}
        self.num_indexed_tokens = 0
        for doc in documents:
            self.add(doc)

    @classmethod
    def from_path(cls, path: str | Path, tokenizer: Any, **kwargs: Any) -> SuffixDrafter:
        """Build from a text file (one document), a ``.jsonl`` file (``"text"`` per line) or a
        directory of such files."""
        kwargs.setdefault("name", f"suffix:{Path(path).stem}")
        return cls.from_texts(read_corpus(path), tokenizer, **kwargs)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: Any, **kwargs: Any) -> SuffixDrafter:
        """Build from raw texts, tokenized with the target's tokenizer."""
        docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return cls(docs, **kwargs)

    @property
    def approx_memory_bytes(self) -> int:
        """Estimated RAM held by the table (``len(table) * BYTES_PER_ENTRY``)."""
        return len(self.table) * BYTES_PER_ENTRY

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Index the n-grams of ``tokens`` whose continuation sits at position >= ``start``."""
        tokens = list(tokens)
        for pos in range(max(start, 1), len(tokens)):
            nxt = tokens[pos]
            for n in range(self.min_n, min(self.max_n, pos) + 1):
                key = tuple(tokens[pos - n : pos])
                counts = self.table.get(key)
                if counts is None:
                    if len(self.table) >= self.max_entries:
                        del self.table[next(iter(self.table))]
                    counts = self.table[key] = {}
                counts[nxt] = counts.get(nxt, 0) + 1
        self.num_indexed_tokens += max(0, len(tokens) - max(start, 1))

    def _next(self, context: Sequence[int]) -> int:
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            counts = self.table.get(tuple(context[len(context) - n :]))
            if counts:
                return max(counts, key=counts.__getitem__)
        return -1

    def propose(
        self,
        context: Sequence[int],
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        ctx = list(context[-self.max_n :])
        out: list[int] = []
        for _ in range(k):
            nxt = self._next(ctx)
            if nxt < 0:
                break
            out.append(nxt)
            ctx = ctx[1:] + [nxt] if len(ctx) >= self.max_n else ctx + [nxt]
        return Draft(tokens=torch.tensor(out, dtype=torch.long))

    def distributions(
        self, context: Sequence[int], path: Sequence[int], sampling: SamplingParams
    ) -> PathDistributions:
        seq = list(context[-self.max_n :]) + list(path)
        base = len(seq) - len(path)
        guesses = [self._next(seq[: base + j]) for j in range(len(path))]
        return PathDistributions(tokens=torch.tensor(guesses, dtype=torch.long))

    def observe(self, context: Sequence[int], committed: Sequence[int]) -> None:
        if self.learn_online and committed:
            tail = list(context[-self.max_n :])
            self.add(tail + list(committed), start=len(tail))
