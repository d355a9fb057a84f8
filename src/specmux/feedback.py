"""Counterfactual (full-information) feedback for every drafter, without extra target calls.

After a round, the *verified path* is the accepted tokens plus one (recovered or bonus).
The verification pass already produced the target's distribution ``p_j`` at every position
of it.  Running each drafter ``i`` over the same path gives ``q_ij``; from those:

* ``gamma_ij = sum_x min(p_j(x), q_ij(x))``: the probability that drafter ``i`` would have
  had its token accepted at position ``j`` (greedy: ``1[argmax q_ij == argmax p_j]``);
* ``w_ij = min(1, q_ij(x_j) / p_j(x_j))`` at the realized token ``x_j`` (greedy: the same
  indicator).

The probability that drafter ``i``, drafting from position ``s``, gets at least ``d`` tokens
accepted is estimated without bias by ``prod_{j<d} w_i,s+j * gamma_i,s+d`` (HedgeSpec).  The
naive ``prod_{j<=d} gamma`` is biased: the realized path follows ``p``, not the accepted
distribution ``min(p, q) / (1 - TV)``.  The expected accepted length of arm ``(i, k)`` is
``E[A] = sum_{d=1..k} P(A >= d)``.

**Truncation / delayed feedback.**  A round's path is only as long as the *chosen* drafter's
accepted prefix plus one, so the terms ``d`` beyond it are not known yet.  They become known
as later rounds verify the following positions (positions tile the generated sequence, each
scored once).  :class:`CounterfactualTracker` keeps the pending rounds in a queue and
releases each round's loss vector once ``max_k`` positions past its start are verified (or
no drafter can be accepted any further, or the query ends).  With ``delayed=False`` it
instead scores only the current path, the naive choice that favours drafters that stop early.

Losses, each in [0, 1]:

* ``"length"``: ``1 - (E[A] + 1) / (max_k + 1)``, the expected-acceptance-length loss;
* ``"acceptance"``: ``sum_j (1 - gamma_ij) / (max_k + 1)`` over the round's path, the
  acceptance-probability loss (known at once: no delay).  It sums rather than averages:
  every position belongs to exactly one round, so summed losses add up to the per-token
  rejection probabilities over the whole output, whereas a per-round mean would overweight
  the position where the *played* drafter was rejected (each round's path ends there).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specmux.types import PathDistributions
from specmux.verify import acceptance_probability

LOSSES = ("length", "acceptance")


def position_scores(
    path: torch.Tensor,
    target_probs: torch.Tensor,
    dists: Sequence[PathDistributions],
    greedy: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every drafter along a verified path.

    ``path`` [n] realized tokens; ``target_probs`` [n, V] processed p along it; ``dists`` one
    :class:`PathDistributions` per drafter (each [n] / [n, V]).  Returns ``gamma`` and ``w``,
    both [n, N] float64.
    """
    n = int(path.shape[0])
    gamma = np.zeros((n, len(dists)))
    weight = np.zeros((n, len(dists)))
    if n == 0:
        return gamma, weight
    target_ids = target_probs.argmax(dim=-1)  # [n]
    rows = torch.arange(n)
    for i, dist in enumerate(dists):
        if greedy:
            guess = dist.tokens if dist.probs is None else dist.probs.argmax(dim=-1)  # [n]
            hit = (guess == target_ids).double().numpy()
            gamma[:, i] = hit
            weight[:, i] = hit
        elif dist.probs is None:  # deterministic guess: q = one_hot(guess), or 0 if none
            guess = dist.tokens
            has = guess >= 0
            p_guess = target_probs[rows, guess.clamp_min(0)] * has  # [n]
            gamma[:, i] = p_guess.double().numpy()
            weight[:, i] = (guess == path).double().numpy()
        else:
            q = dist.probs  # [n, V]
            gamma[:, i] = acceptance_probability(target_probs, q).double().numpy()
            p_x = target_probs[rows, path].double()
            q_x = q[rows, path].double()
            weight[:, i] = torch.clamp(q_x / p_x.clamp_min(1e-30), max=1.0).numpy()
    return gamma, weight


def expected_accepted(gamma: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """Unbiased ``E[min(A, k)] = sum_{d=1..k} prod_{j<d} w_j * gamma_d`` per drafter.

    ``gamma``, ``weight``: [m, N] along the path from a round's start; only the first
    ``min(k, m)`` rows are used (fewer rows = the truncated estimate).  Returns [N].
    """
    m = min(k, gamma.shape[0])
    if m == 0:
        return np.zeros(gamma.shape[1])
    # reach[d] = prod_{j<d} w_j, written in place (same products, same order, as cumprod
    # over [1; w]: 1 * w_0 == w_0 exactly).
    reach = np.empty((m, gamma.shape[1]))
    reach[0] = 1.0
    if m > 1:
        np.cumprod(weight[: m - 1], axis=0, out=reach[1:])
    reach *= gamma[:m]
    return reach.sum(axis=0)  # [N]


@dataclass
class _Pending:
    start: int  # index of the round's first path position in the query's position log
    tag: int  # caller's label for the round (the engine passes the arm it played)


class CounterfactualTracker:
    """Turns per-position drafter scores into per-round loss vectors over arms.

    ``arms``: ``(drafter_index, k)`` per arm.  Call :meth:`add_round` once per round with the
    round's ``gamma``/``weight`` [n, N]; it returns the loss vectors [num_arms] that became
    known.  Call :meth:`flush` at the end of a query.
    """

    def __init__(
        self, arms: Sequence[tuple[int, int]], loss: str = "length", delayed: bool = True
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.drafter_of_arm = np.array([d for d, _ in arms], dtype=int)
        self.k_of_arm = np.array([k for _, k in arms], dtype=int)
        self.max_k = int(self.k_of_arm.max())
        self.loss = loss
        self.delayed = delayed
        # Arms grouped by k once: (k, arm mask, drafter of each selected arm).
        self._groups = [
            (int(k), sel, self.drafter_of_arm[sel])
            for k in np.unique(self.k_of_arm)
            for sel in [self.k_of_arm == k]
        ]
        self.reset()

    def reset(self) -> None:
        """Start a new query (pending rounds of the previous one must be flushed first)."""
        # The position log: rows [0, _len) of two growable [capacity, N] arrays.
        self._gamma: np.ndarray | None = None
        self._weight: np.ndarray | None = None
        self._len = 0
        self._offset = 0  # positions dropped from the front of the log
        self._pending: deque[_Pending] = deque()

    def add_round(self, gamma: np.ndarray, weight: np.ndarray) -> list[np.ndarray]:
        """Record one round's path scores; return the loss vectors that became known."""
        return [losses for _, losses in self.add_round_tagged(gamma, weight, -1)]

    def flush(self) -> list[np.ndarray]:
        """End of query: resolve every pending round with the positions known."""
        return [losses for _, losses in self.flush_tagged()]

    def add_round_tagged(
        self, gamma: np.ndarray, weight: np.ndarray, tag: int
    ) -> list[tuple[int, np.ndarray]]:
        """As :meth:`add_round`, pairing each released loss vector with its round's ``tag``."""
        if self.loss == "acceptance" or not self.delayed:
            return [(tag, self._losses(gamma, weight))] if gamma.shape[0] else []
        n = gamma.shape[0]
        if self._gamma is None or self._len + n > self._gamma.shape[0]:
            self._grow(self._len + n, gamma.shape[1])
        assert self._gamma is not None and self._weight is not None
        self._gamma[self._len : self._len + n] = gamma
        self._weight[self._len : self._len + n] = weight
        start = self._offset + self._len
        self._len += n
        self._pending.append(_Pending(start, tag))
        return self._release(final=False)

    def flush_tagged(self) -> list[tuple[int, np.ndarray]]:
        """As :meth:`flush`, with tags."""
        out = self._release(final=True) if self._gamma is not None else []
        self.reset()
        return out

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def _grow(self, rows: int, num_drafters: int) -> None:
        capacity = max(64, 4 * self.max_k, 2 * rows)
        gamma, weight = np.empty((capacity, num_drafters)), np.empty((capacity, num_drafters))
        if self._gamma is not None and self._weight is not None:
            gamma[: self._len] = self._gamma[: self._len]
            weight[: self._len] = self._weight[: self._len]
        self._gamma, self._weight = gamma, weight

    def _release(self, final: bool) -> list[tuple[int, np.ndarray]]:
        assert self._gamma is not None and self._weight is not None
        out: list[tuple[int, np.ndarray]] = []
        end = self._offset + self._len
        pending = self._pending
        while pending:
            lo = pending[0].start - self._offset
            hi = min(lo + self.max_k, self._len)
            complete = end - pending[0].start >= self.max_k
            if not (complete or final):
                # No drafter can get past the known positions: the rest contributes nothing.
                dead = hi > lo and not np.any(np.prod(self._weight[lo:hi], axis=0) > 0)
                if not dead:
                    break
            tag = pending.popleft().tag
            if hi > lo:
                out.append((tag, self._losses(self._gamma[lo:hi], self._weight[lo:hi])))
        # Drop positions no pending round needs any more.
        keep_from = pending[0].start if pending else end
        drop = keep_from - self._offset
        if drop > 0:
            rest = self._len - drop
            if rest > 0:
                self._gamma[:rest] = self._gamma[drop : self._len]
                self._weight[:rest] = self._weight[drop : self._len]
            self._len = rest
            self._offset += drop
        return out

    def _losses(self, gamma: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Loss vector [num_arms] from the scores along one round's (possibly longer) path."""
        if self.loss == "acceptance":
            per_drafter = (1.0 - gamma).sum(axis=0) / (self.max_k + 1)  # [N]
            return per_drafter[self.drafter_of_arm]
        if len(self._groups) == 1:  # one k for every arm: no scatter needed
            k, _, drafters = self._groups[0]
            mean_accepted = expected_accepted(gamma, weight, k)  # [N]
            return 1.0 - (mean_accepted[drafters] + 1.0) / (self.max_k + 1)
        losses = np.empty(len(self.k_of_arm))
        for k, sel, drafters in self._groups:
            mean_accepted = expected_accepted(gamma, weight, k)  # [N]
            losses[sel] = 1.0 - (mean_accepted[drafters] + 1.0) / (self.max_k + 1)
        return losses
