"""SuffixDecoding-style drafter: suffix matches over the request and over earlier outputs.

SuffixDecoding (Oliaro et al., 2024) keeps two suffix trees: a *per-request* tree over the
current prompt and output, and a *global* tree over earlier outputs.  To draft, it finds
the longest suffix of the context that occurs in a tree, then walks the continuations of
that match, scoring each token by its frequency-estimated probability
``count(match + path + t) / count(match + path)``; the draft length adapts: at most
``max_spec_factor * match_length`` tokens, and a token whose estimated path probability
falls under ``min_token_prob`` ends the draft.  Drafts therefore have variable length.

Here the "tree" is a position index over token stores (what a suffix tree's node holds is
its set of occurrence positions, and its counts are their number):

* a store is a token buffer of documents separated by ``-1``, plus an index from each
  ``n``-gram (``n`` in ``anchors``, default 1-3) to the buffer positions that follow it
  (at most ``max_positions`` most recent per key, so counts are estimated from recent
  occurrences);
* a lookup takes the positions of the longest anchor that matches the context's end and
  extends the match backwards with numpy (up to ``max_match`` tokens), keeping the positions
  of the longest match: the suffix-tree node of the longest matching suffix;
* the draft follows that node's most frequent child while its estimated path probability
  stays >= ``min_token_prob``.

Three stores are searched: the request (prompt + output so far, rebuilt per query), the
learned global store (earlier outputs; bounded by ``max_tokens`` with ``"fifo"`` or
``"lru"`` eviction of whole outputs, where ``lru`` is the CLOCK approximation: an output
that produced a draft since it was last considered gets a second chance) and an optional
frozen corpus store (shared between forks).  The candidate with the larger expected
number of accepted tokens (the sum of its path probabilities) wins.

With ``index_prompts`` an output enters the global store after its prompt (one document),
so repeated prompts (agentic loops, templated requests) are drafted from too; ``fork()``
gives a drafter with the same settings and shared corpus but its own learned store.

The drafter is deterministic (``Draft.probs is None``): verification keeps the output
exactly the target's whatever it proposes.
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specmux.drafters.base import Drafter
from specmux.drafters.ngram import STRONG_MATCH as NGRAM_STRONG_MATCH
from specmux.errors import ConfigError
from specmux.types import Draft, PathDistributions, SamplingParams

SEP = -1
EVICTIONS = ("fifo", "lru")

STRONG_SCORE = 2.0  # expected accepted tokens of a strong candidate (signal)
# ... and the match it continues must be this long, as prompt lookup's strong n-gram: a
# 2-token match continued by its one occurrence scores 2.0 as well, yet on issue 11's
# stream its first two tokens were both right in 51% of such positions outside chat and
# never in chat, against 79% at 3 tokens and 93% at 8 or more
# (benchmarks/signal_replay.py; docs/BENCHMARKS.md, llama.cpp tenth run).
STRONG_MATCH = NGRAM_STRONG_MATCH


class TokenStore:
    """Documents in one buffer plus an ``n``-gram -> following-positions index.

    Positions are global offsets (they only grow); ``buf[i - start]`` holds offset ``i``.
    Offsets below ``alive`` belong to evicted documents and are skipped on lookup.

    >>> s = TokenStore(anchors=(1, 2))
    >>> s.add([5, 6, 7, 5, 6, 8])
    >>> positions, length = s.match(np.array([9, 5, 6]), max_match=8)
    >>> length, s.buf[positions - s.start].tolist()
    (2, [7, 8])
    """

    def __init__(
        self,
        anchors: Sequence[int] = (1, 2, 3),
        max_tokens: int | None = None,
        max_positions: int = 256,
        eviction: str = "fifo",
    ) -> None:
        if eviction not in EVICTIONS:
            raise ConfigError(f"unknown eviction {eviction!r}; known: {', '.join(EVICTIONS)}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_positions < 1:
            raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
        self.anchors = tuple(sorted(set(anchors), reverse=True))  # longest first
        self.max_tokens, self.max_positions, self.eviction = max_tokens, max_positions, eviction
        self.buf = np.full(1024, SEP, dtype=np.int64)
        self.start = 0  # global offset of buf[0]
        self.end = 1  # global offset after the last written token (buf[0] is a separator)
        self.alive = 1  # first offset of a live document
        self.index: dict[tuple[int, ...], array] = {}
        self.docs: deque[list[int]] = deque()  # [start, end, hit] per live document
        self.num_tokens = 0  # live indexed tokens
        self._since_sweep = 0

    def _write(self, tokens: Sequence[int]) -> int:
        """Append ``tokens`` and a separator to the buffer; return the first offset."""
        need = self.end - self.start + len(tokens) + 1
        if need > len(self.buf):
            dead = self.alive - 1 - self.start  # keep one separator before the first live doc
            if dead > len(self.buf) // 2:  # compact: drop the evicted prefix
                self.buf = self.buf[dead:].copy()
                self.start += dead
                need -= dead
            if need > len(self.buf):
                grown = np.full(max(need, 2 * len(self.buf)), SEP, dtype=np.int64)
                grown[: self.end - self.start] = self.buf[: self.end - self.start]
                self.buf = grown
        first = self.end
        i = first - self.start
        self.buf[i : i + len(tokens)] = tokens
        self.buf[i + len(tokens)] = SEP
        self.end = first + len(tokens) + 1
        return first

    def _index(self, tokens: Sequence[int], first: int, begin: int = 1) -> None:
        """Index continuation positions ``begin..len(tokens)-1`` of a document at ``first``."""
        index, cap, size = self.index, self.max_positions, len(tokens)
        for n in self.anchors:
            lo = max(begin, n)  # continuation positions lo..size-1, each after its n-gram
            if lo >= size:
                continue
            keys = zip(*(tokens[lo - n + i : size - n + i] for i in range(n)), strict=True)
            for p, key in enumerate(keys, first + lo):
                positions = index.get(key)
                if positions is None:
                    positions = index[key] = array("q")
                positions.append(p)
                if len(positions) > 2 * cap:
                    del positions[:-cap]

    def add(self, tokens: Sequence[int]) -> None:
        """Add one document (evicting old ones beyond ``max_tokens``)."""
        tokens = [int(t) for t in tokens]
        if self.max_tokens is not None:
            tokens = tokens[-self.max_tokens :]
            self._evict(self.max_tokens - len(tokens))
        if len(tokens) < 2:
            return
        first = self._write(tokens)
        self.docs.append([first, first + len(tokens), 0])
        self.num_tokens += len(tokens)
        self._index(tokens, first)
        self._since_sweep += len(tokens)
        if self.max_tokens is not None and self._since_sweep > max(self.max_tokens, 4096):
            self._sweep()

    def _evict(self, room: int) -> None:
        """Drop (or, under ``lru``, recycle once) the oldest documents until the live
        tokens are at most ``room``."""
        live = self.num_tokens
        recycled = 0
        while self.docs and live > room:
            start, end, hit = self.docs.popleft()
            live -= end - start
            self.alive = self.docs[0][0] if self.docs else self.end + 1
            if hit and self.eviction == "lru" and recycled < len(self.docs) + 1:
                recycled += 1  # second chance: re-append the used document as the newest
                doc = self.buf[start - self.start : end - self.start].tolist()
                first = self._write(doc)
                self.docs.append([first, first + len(doc), 0])
                self._index(doc, first)
                live += len(doc)
                self.alive = self.docs[0][0]
        if not self.docs:
            self.alive = self.end
        self.num_tokens = live

    def _sweep(self) -> None:
        """Drop dead positions and empty keys from the index (amortized O(1) per token)."""
        alive = self.alive
        for key in list(self.index):
            positions = self.index[key]
            if positions and positions[0] < alive:
                kept = array("q", (p for p in positions if p >= alive))
                if kept:
                    self.index[key] = kept
                else:
                    del self.index[key]
        self._since_sweep = 0

    def mark_hit(self, position: int) -> None:
        """Note that the document holding ``position`` produced a draft (for ``lru``)."""
        if self.eviction != "lru" or not self.docs:
            return
        i = bisect.bisect_right(self.docs, position, key=lambda d: d[0]) - 1
        if i >= 0:
            self.docs[i][2] = 1

    def match(self, tail: np.ndarray, max_match: int) -> tuple[np.ndarray, int]:
        """Offsets following the longest match of the end of ``tail`` (``[m]`` int64), and
        its length; ``(empty, 0)`` when no anchor matches."""
        for n in self.anchors:
            if n > len(tail):
                continue
            positions = self.index.get(tuple(tail[-n:].tolist()))
            if not positions:
                continue
            pos = np.frombuffer(positions, dtype=np.int64)[-self.max_positions :]
            pos = pos[pos >= self.alive]
            if not pos.size:
                continue
            local, length = self._extend(pos - self.start, tail, n, min(max_match, len(tail)))
            return local + self.start, length
        return np.empty(0, dtype=np.int64), 0

    def _extend(self, local: np.ndarray, tail: np.ndarray, n: int,
                longest: int) -> tuple[np.ndarray, int]:
        """Extend a length-``n`` match backwards up to ``longest``: the buffer indices
        ``local`` [P] whose preceding tokens match the most of ``tail``, and that length.

        One token is compared first (most candidates fail there); the survivors are compared
        over the rest of the window at once: [S, m] comparisons and a running product (a
        position's match ends at its first difference), not one pass per token.
        """
        if longest <= n:
            return local, n
        before = local - (n + 1)
        keep = (before >= 0) & (self.buf[np.maximum(before, 0)] == tail[-(n + 1)])
        if not keep.any():
            return local, n
        local = local[keep]
        if longest == n + 1:
            return local, n + 1
        ds = np.arange(n + 2, longest + 1)  # [m] distances still to compare
        before = local[:, None] - ds[None, :]  # [S, m]
        same = (before >= 0) & (self.buf[np.maximum(before, 0)] == tail[-ds][None, :])
        run = np.cumprod(same, axis=1).sum(axis=1)  # [S] tokens matched past n + 1
        best = int(run.max())
        return local[run == best], n + 1 + best

    def follow(
        self, positions: np.ndarray, max_len: int, min_prob: float, limit: int | None = None
    ) -> tuple[list[int], list[float]]:
        """Most frequent continuation of ``positions`` while its estimated path probability
        stays >= ``min_prob``: (tokens, path probabilities).  ``limit``: first offset not
        readable (an open document's end)."""
        tokens: list[int] = []
        probs: list[float] = []
        end = self.end if limit is None else limit
        local = positions - self.start
        p = 1.0
        for j in range(max_len):
            local = local[local + j < end - self.start]
            if local.size <= 1:
                if local.size:  # one occurrence: its run, at the current probability
                    i = int(local[0]) + j
                    run = self.buf[i : min(i + max_len - j, end - self.start)].tolist()
                    run = run[: run.index(SEP)] if SEP in run else run
                    tokens += run
                    probs += [float(p)] * len(run)
                break
            nxt = self.buf[local + j]  # [P] the next token after each occurrence
            counts: dict[int, int] = {}
            for t in nxt.tolist():
                counts[t] = counts.get(t, 0) + 1
            tok = max(counts, key=counts.__getitem__)  # ties: the earliest occurrence
            if tok == SEP:  # the most frequent continuation ends a document
                break
            p *= counts[tok] / nxt.size
            if p < min_prob:
                break
            tokens.append(tok)
            probs.append(float(p))
            local = local[nxt == tok]
        return tokens, probs


@dataclass(frozen=True)
class _Candidate:
    """One store's draft after a context: where its match continues, the match length,
    and the draft's tokens with their estimated path probabilities."""

    store: TokenStore
    positions: np.ndarray  # [P] offsets following the match
    length: int
    tokens: list[int]
    probs: list[float]


class _RequestStore(TokenStore):
    """The per-request store: one open document kept equal to the context (synced lazily)."""

    def __init__(self, anchors: Sequence[int], max_positions: int, version: int = 0) -> None:
        super().__init__(anchors, None, max_positions)
        self.tokens: list[int] = []
        self.version = version  # changes whenever the stored tokens do

    def reset(self, tokens: Sequence[int] = ()) -> None:
        self.__init__(self.anchors, self.max_positions, self.version + 1)  # type: ignore[misc]
        self.sync(tokens)

    def sync(self, context: Sequence[int]) -> None:
        """Make the store hold exactly ``context`` (extend it, or rebuild if it diverged)."""
        n = len(self.tokens)
        if n > len(context) or (n and (context[n - 1] != self.tokens[-1]
                                       or context[0] != self.tokens[0])):
            self.reset()
            n = 0
        if n == len(context):
            return
        new = [int(t) for t in context[n:]]
        self.tokens.extend(new)
        self.version += 1
        need = 1 + len(self.tokens) + 1
        if need > len(self.buf):
            grown = np.full(max(need, 2 * len(self.buf)), SEP, dtype=np.int64)
            grown[: 1 + n] = self.buf[: 1 + n]
            self.buf = grown
        self.buf[1 + n : 1 + len(self.tokens)] = new
        self.end = 1 + len(self.tokens)
        # Index continuation positions n..len-1 (each needs its preceding n-gram).
        self._index(self.tokens, 1, begin=max(n, 1))


class SuffixTreeDrafter(Drafter):
    """SuffixDecoding-style drafter (see the module docstring).

    >>> d = SuffixTreeDrafter(name="toy")
    >>> d.start_query([1, 2, 3, 4, 5, 9, 1, 2, 3])
    >>> d.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], k=4, sampling=SamplingParams()).tokens.tolist()
    [4, 5, 9]
    """

    def __init__(
        self,
        documents: Iterable[Sequence[int]] = (),
        *,
        max_tokens: int = 1_000_000,
        eviction: str = "fifo",
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
        max_match: int = 24,
        anchors: Sequence[int] = (1, 2, 3),
        max_positions: int = 256,
        learn_online: bool = True,
        index_prompts: bool = False,
        name: str = "suffix",
    ) -> None:
        if not max_spec_factor > 0:
            raise ConfigError(f"max_spec_factor must be > 0, got {max_spec_factor}")
        if not 0.0 <= min_token_prob <= 1.0:
            raise ConfigError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        if max_match < 1 or not anchors or min(anchors) < 1:
            raise ConfigError("max_match and every anchor must be >= 1")
        self.name = name
        self.max_spec_factor, self.min_token_prob = max_spec_factor, min_token_prob
        self.max_match = max_match
        self.learn_online, self.index_prompts = learn_online, index_prompts
        self.learned = TokenStore(anchors, max_tokens, max_positions, eviction)
        self.corpus: TokenStore | None = None
        docs = list(documents)
        if docs:
            self.corpus = TokenStore(anchors, None, max_positions)
            for doc in docs:
                self.corpus.add(doc)
        self.request = _RequestStore(anchors, max_positions)
        # The last context lookup: ((request version, learned end, learned alive), k, found).
        self._cached: tuple[tuple[int, int, int], int, list[_Candidate]] | None = None
        self._prompt: list[int] = []
        self._output: list[int] = []

    # ------------------------------------------------------------------ building

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: Any, **kwargs: Any) -> SuffixTreeDrafter:
        """Corpus texts tokenized with the target's tokenizer."""
        docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return cls(docs, **kwargs)

    @classmethod
    def from_path(cls, path: str | Path, tokenizer: Any, **kwargs: Any) -> SuffixTreeDrafter:
        """A text file, ``.jsonl`` file (``"text"`` per line) or directory of them."""
        from specmux.drafters.suffix import read_corpus

        kwargs.setdefault("name", f"suffix:{Path(path).stem}")
        return cls.from_texts(read_corpus(path), tokenizer, **kwargs)

    def fork(self) -> SuffixTreeDrafter:
        """Same settings and the same (shared, frozen) corpus; its own empty learned store."""
        learned = self.learned
        twin = SuffixTreeDrafter(
            max_tokens=learned.max_tokens or 1, eviction=learned.eviction,
            max_spec_factor=self.max_spec_factor, min_token_prob=self.min_token_prob,
            max_match=self.max_match, anchors=learned.anchors,
            max_positions=learned.max_positions, learn_online=self.learn_online,
            index_prompts=self.index_prompts, name=self.name,
        )
        twin.corpus = self.corpus
        return twin

    @property
    def num_indexed_tokens(self) -> int:
        """Tokens in the corpus and learned stores."""
        return (self.corpus.num_tokens if self.corpus else 0) + self.learned.num_tokens

    # ------------------------------------------------------------------ learning

    def start_query(self, prompt: Sequence[int]) -> None:
        self._finish_output()
        self.request.reset(prompt)
        self._prompt = [int(t) for t in prompt] if self.index_prompts else []

    def end_query(self) -> None:
        """Index the current output now (it is also done when the next query starts)."""
        self._finish_output()

    def observe(self, context: Sequence[int], committed: Sequence[int]) -> None:
        if self.learn_online and committed:
            self._output.extend(int(t) for t in committed)

    def _finish_output(self) -> None:
        """Move the last request's output (after its prompt, with ``index_prompts``) into
        the global learned store."""
        if self._output:
            self.learned.add(self._prompt + self._output)
        self._output = []

    # ------------------------------------------------------------------ drafting

    def _candidates(self, seq: np.ndarray, k: int) -> list[_Candidate]:
        """Each store's draft of at most ``k`` tokens after ``seq`` (stores without a match
        left out).  A store's draft for a smaller ``k`` is a prefix of this one: its
        follow walk stops earlier on the same path."""
        tail = seq[-self.max_match :]
        out = []
        for store in (self.request, self.learned, self.corpus):
            if store is None or not store.index:
                continue
            positions, length = store.match(tail, self.max_match)
            if not length:
                continue
            max_len = min(k, max(1, int(self.max_spec_factor * length)))
            limit = store.end if store is not self.request else 1 + len(self.request.tokens)
            tokens, probs = store.follow(positions, max_len, self.min_token_prob, limit)
            out.append(_Candidate(store, positions, length, tokens, probs))
        return out

    def _pick(self, candidates: Sequence[_Candidate], k: int) -> tuple[_Candidate | None, int]:
        """The best of ``candidates`` cut to ``k`` tokens (the highest expected accepted
        length, the first store on ties) and how many of its tokens that keeps."""
        best, best_n, best_score = None, 0, 0.0
        for c in candidates:
            n = min(k, max(1, int(self.max_spec_factor * c.length)))
            score = sum(c.probs[:n])
            if score > best_score:
                best, best_n, best_score = c, n, score
        return best, best_n

    def _best(self, candidates: Sequence[_Candidate], k: int,
              mark: bool = True) -> tuple[list[int], list[float]]:
        """:meth:`_pick`'s draft and its path probabilities (``mark``: count a hit of the
        learned store for its LRU eviction)."""
        c, n = self._pick(candidates, k)
        if c is None:
            return [], []
        if mark and c.store is self.learned and c.positions.size:
            self.learned.mark_hit(int(c.positions[-1]))
        return c.tokens[:n], c.probs[:n]

    def _candidate(self, seq: np.ndarray, k: int,
                   mark: bool = True) -> tuple[list[int], list[float]]:
        """Best draft of at most ``k`` tokens after ``seq`` over all stores."""
        return self._best(self._candidates(seq, k), k, mark)

    def _context_candidates(self, context: Sequence[int], k: int) -> list[_Candidate]:
        """:meth:`_candidates` after ``context``, reusing the last lookup when the context
        and the stores are unchanged and it looked at least ``k`` ahead (the engine asks
        for an :meth:`offer` of ``max_k`` tokens and then proposes ``k <= max_k``)."""
        self.request.sync(context)
        key = (self.request.version, self.learned.end, self.learned.alive)
        if self._cached is not None and self._cached[0] == key and self._cached[1] >= k:
            return self._cached[2]
        found = self._candidates(self.request.buf[1 : 1 + len(self.request.tokens)], k)
        self._cached = (key, k, found)
        return found

    def propose(
        self,
        context: Sequence[int],
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        tokens, _ = self._best(self._context_candidates(context, k), k)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long))

    def signal(self, context: Sequence[int], k: int) -> int:
        """From the best candidate's score (its tokens' frequency-estimated probabilities
        summed, the expected accepted length) and its match: ``2`` at ``>= STRONG_SCORE``
        after a match of at least ``STRONG_MATCH`` tokens, ``1`` below either,
        ``0`` without a candidate.

        >>> d = SuffixTreeDrafter(name="toy")
        >>> d.start_query([1, 2, 3, 4, 5, 9, 1, 2, 3])
        >>> d.signal([1, 2, 3, 4, 5, 9, 1, 2, 3], k=4), d.signal([1, 2, 3, 4, 5, 9, 7], k=4)
        (2, 0)
        >>> d.offer([1, 2, 3, 4, 5, 9, 7, 1, 2], k=4)  # [3, 4] after a 2-token match: weak
        (1, 2)
        """
        return self.offer(context, k)[0]

    def offer(self, context: Sequence[int], k: int) -> tuple[int, int]:
        """``(signal, length of the best candidate)`` from one lookup (which a proposal of
        at most ``k`` tokens after the same context reuses)."""
        c, n = self._pick(self._context_candidates(context, k), k)
        if c is None:
            return 0, 0
        strong = sum(c.probs[:n]) >= STRONG_SCORE and c.length >= STRONG_MATCH
        return (2 if strong else 1), len(c.tokens[:n])

    def distributions(
        self, context: Sequence[int], path: Sequence[int], sampling: SamplingParams
    ) -> PathDistributions:
        if not len(path):
            return PathDistributions(tokens=torch.empty(0, dtype=torch.long))
        first, _ = self._best(self._context_candidates(context, 1), 1)  # the offer's lookup
        guesses = [first[0] if first else -1]
        if len(path) > 1:
            seq = np.concatenate([self.request.buf[1 : 1 + len(self.request.tokens)],
                                  np.asarray(path[:-1], dtype=np.int64)])
            base = len(seq) - len(path) + 1
            for j in range(1, len(path)):
                tokens, _ = self._candidate(seq[: base + j], 1)
                guesses.append(tokens[0] if tokens else -1)
        return PathDistributions(tokens=torch.tensor(guesses, dtype=torch.long))
