"""Prompt-lookup n-gram drafter (model-free, deterministic).

It finds the most recent earlier occurrence of the context's last ``n`` tokens, for ``n``
from ``prompt_lookup_max`` down to ``prompt_lookup_min`` (vLLM's option names), and proposes
the tokens that followed it.  Strong on code edits, summaries and anything that repeats
the prompt; useless on free text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from specmux.drafters.base import Drafter
from specmux.errors import ConfigError
from specmux.types import Draft, PathDistributions, SamplingParams

STRONG_MATCH = 3  # a matched n-gram this long is a strong signal (:meth:`NgramDrafter.signal`)


def lookup(tokens: np.ndarray, end: int, max_n: int, min_n: int, k: int) -> np.ndarray:
    """Continuation (up to ``k`` tokens) of the latest earlier match of ``tokens[end-n:end]``.

    Only ``tokens[:end]`` is searched.  Returns an empty array when nothing matches.
    """
    return match(tokens, end, max_n, min_n, k)[0]


def match(tokens: np.ndarray, end: int, max_n: int, min_n: int,
          k: int) -> tuple[np.ndarray, int]:
    """:func:`lookup`'s continuation and the length ``n`` of the matched suffix (0: none)."""
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        pattern = tokens[end - n : end]
        # Windows starting at 0..end-n-1 (the pattern's own position end-n is excluded).
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: end - 1], n)  # [end-n, n]
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : min(start + k, end)], n
    return tokens[:0], 0


class NgramDrafter(Drafter):
    """Prompt lookup decoding.

    >>> d = NgramDrafter(prompt_lookup_max=3, prompt_lookup_min=1)
    >>> d.propose([5, 6, 7, 8, 5, 6], k=2, sampling=SamplingParams()).tokens.tolist()
    [7, 8]
    """

    def __init__(
        self, prompt_lookup_max: int = 4, prompt_lookup_min: int = 1, name: str = "ngram"
    ) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ConfigError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{prompt_lookup_min} and {prompt_lookup_max}"
            )
        self.max_n = prompt_lookup_max
        self.min_n = prompt_lookup_min
        self.name = name

    def propose(
        self,
        context: Sequence[int],
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        tokens = np.asarray(context, dtype=np.int64)
        guess = lookup(tokens, len(tokens), self.max_n, self.min_n, k)
        return Draft(tokens=torch.from_numpy(guess.copy()))

    def signal(self, context: Sequence[int], k: int) -> int:
        """``2`` when the context's last ``STRONG_MATCH`` tokens (or ``prompt_lookup_max``,
        if smaller) occurred before, ``1`` for a shorter match, ``0`` for none.

        >>> NgramDrafter().signal([5, 6, 7, 8, 5, 6, 7], k=4), NgramDrafter().signal([1, 2], 4)
        (2, 0)
        """
        return self.offer(context, k)[0]

    def offer(self, context: Sequence[int], k: int) -> tuple[int, int]:
        """``(signal, length of the proposal)`` from one lookup.

        >>> NgramDrafter().offer([5, 6, 7, 8, 5, 6, 7], k=4)
        (2, 1)
        """
        tokens = np.asarray(context, dtype=np.int64)
        guess, n = match(tokens, len(tokens), self.max_n, self.min_n, k)
        if not guess.size:
            return 0, 0
        return (2 if n >= min(STRONG_MATCH, self.max_n) else 1), int(guess.size)

    def distributions(
        self, context: Sequence[int], path: Sequence[int], sampling: SamplingParams
    ) -> PathDistributions:
        tokens = np.asarray([*context, *path], dtype=np.int64)
        guesses = []
        for j in range(len(path)):
            hit = lookup(tokens, len(context) + j, self.max_n, self.min_n, 1)
            guesses.append(int(hit[0]) if hit.size else -1)
        return PathDistributions(tokens=torch.tensor(guesses, dtype=torch.long))
