"""The target protocol: what the engine (and an LM drafter) needs from a language model.

A :class:`Target` returns float32 logits for the last positions of a token sequence and
keeps whatever cache it has in step with the caller's sequence: speculative decoding feeds
a model tokens that may later be rejected, so each call syncs the cache to the longest
common prefix of what it holds and what is asked (:func:`prefix_to_keep`), drops the rest
(rolling back rejected draft positions) and feeds only the new tokens.  A long generation
therefore never re-encodes its context.

Implementations: :class:`specmux.lm.CachedLM` (transformers), the adaptive drafter's
:class:`specmux.adapt.drafter.AdaptiveLM`, the replays of :mod:`specmux.adapt.replay`, and
other backends.  This module is the seam: nothing here depends on transformers.

Optional capability (draft heads): ``hidden_states(num_last) -> [num_last, H]``, the
final-layer hidden states of the rows of the most recent ``logits()`` call (no extra
forward).  Backends without it simply lack the method (check with ``hasattr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Target(Protocol):
    """A language model with a prefix-synced cache.

    ``num_forward_calls`` / ``num_tokens_fed`` count model passes and the tokens fed to
    them, which makes cache behaviour testable.
    """

    name: str
    vocab_size: int  # rows of the LM head (V)
    max_context: int  # longest sequence the model accepts
    num_forward_calls: int
    num_tokens_fed: int

    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        """Float32 logits [num_last, V] at the last ``num_last`` positions of ``ids``.

        Row ``j`` is the next-token distribution after ``ids[: len(ids) - num_last + j + 1]``.
        """
        ...

    def reset(self) -> None:
        """Drop the cache."""
        ...


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    >>> common_prefix_length([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_num_last(num_last: int, n: int) -> None:
    """``ValueError`` unless ``1 <= num_last <= n`` (``n = len(ids)``)."""
    if not 1 <= num_last <= n:
        raise ValueError(f"num_last={num_last} must be in [1, len(ids)={n}]")


def prefix_to_keep(cached_ids: Sequence[int], ids: Sequence[int], first_row: int) -> int:
    """How many cached positions a call may keep: the shared prefix-sync rule.

    ``first_row``: the first row to compute, row ``i`` being the distribution after
    ``ids[:i]``; computing it needs position ``i - 1`` fed in this call, so at most
    ``first_row - 1`` cached positions are kept, and never more than the common prefix
    of ``cached_ids`` and ``ids``.

    >>> prefix_to_keep([1, 2, 3, 9], [1, 2, 3, 4, 5], first_row=5)
    3
    >>> prefix_to_keep([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], first_row=4)
    3
    """
    return min(common_prefix_length(cached_ids, ids), first_row - 1)
