"""Tests for the regret simulator (specmux.sim) and the tracker fast path it relies on."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import pytest

from specmux.feedback import CounterfactualTracker, expected_accepted

# --------------------------------------------------------------------------------------
# Tracker fast path: identical results to the original list-based implementation.
# --------------------------------------------------------------------------------------


def _reference_expected_accepted(gamma: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """The original ``expected_accepted`` (commit e91895a), kept as the oracle."""
    m = min(k, gamma.shape[0])
    if m == 0:
        return np.zeros(gamma.shape[1])
    reach = np.cumprod(np.vstack([np.ones((1, gamma.shape[1])), weight[: m - 1]]), axis=0)
    return (reach * gamma[:m]).sum(axis=0)


class _ReferenceTracker:
    """The original list-of-rows CounterfactualTracker (commit cf63d7a), kept as the oracle."""

    def __init__(self, arms: Sequence[tuple[int, int]], loss: str, delayed: bool) -> None:
        self.drafter_of_arm = np.array([d for d, _ in arms], dtype=int)
        self.k_of_arm = np.array([k for _, k in arms], dtype=int)
        self.max_k = int(self.k_of_arm.max())
        self.loss, self.delayed = loss, delayed
        self.reset()

    def reset(self) -> None:
        self._gamma: list[np.ndarray] = []
        self._weight: list[np.ndarray] = []
        self._offset = 0
        self._pending: deque[tuple[int, int]] = deque()

    def add_round_tagged(self, gamma, weight, tag):  # type: ignore[no-untyped-def]
        if self.loss == "acceptance" or not self.delayed:
            return [(tag, self._losses(gamma, weight))] if gamma.shape[0] else []
        start = self._offset + len(self._gamma)
        self._gamma.extend(gamma)
        self._weight.extend(weight)
        self._pending.append((start, tag))
        return self._release(final=False)

    def flush_tagged(self):  # type: ignore[no-untyped-def]
        out = self._release(final=True)
        self.reset()
        return out

    def _release(self, final: bool):  # type: ignore[no-untyped-def]
        out = []
        end = self._offset + len(self._gamma)
        while self._pending:
            lo = self._pending[0][0] - self._offset
            hi = min(lo + self.max_k, len(self._gamma))
            gamma = np.asarray(self._gamma[lo:hi])
            weight = np.asarray(self._weight[lo:hi])
            complete = end - self._pending[0][0] >= self.max_k
            dead = gamma.shape[0] > 0 and not np.any(np.prod(weight, axis=0) > 0)
            if not (complete or dead or final):
                break
            _, tag = self._pending.popleft()
            if gamma.shape[0]:
                out.append((tag, self._losses(gamma, weight)))
        keep_from = self._pending[0][0] if self._pending else end
        drop = keep_from - self._offset
        if drop > 0:
            del self._gamma[:drop], self._weight[:drop]
            self._offset += drop
        return out

    def _losses(self, gamma: np.ndarray, weight: np.ndarray) -> np.ndarray:
        if self.loss == "acceptance":
            return (1.0 - gamma.mean(axis=0))[self.drafter_of_arm]
        losses = np.empty(len(self.k_of_arm))
        for k in np.unique(self.k_of_arm):
            mean_accepted = _reference_expected_accepted(gamma, weight, int(k))
            sel = self.k_of_arm == k
            losses[sel] = 1.0 - (mean_accepted[self.drafter_of_arm[sel]] + 1.0) / (self.max_k + 1)
        return losses


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
@pytest.mark.parametrize("ks", [(4,), (1, 3, 8)])
@pytest.mark.parametrize(("loss", "delayed"), [("length", True), ("length", False),
                                               ("acceptance", True)])
def test_tracker_fast_path_is_bitwise_identical(
    mode: str, ks: tuple[int, ...], loss: str, delayed: bool
) -> None:
    rng = np.random.default_rng(7)
    num = 5
    arms = [(i, k) for i in range(num) for k in ks]
    fast = CounterfactualTracker(arms, loss=loss, delayed=delayed)
    ref = _ReferenceTracker(arms, loss, delayed)
    released = 0
    for _query in range(30):
        for _round in range(int(rng.integers(0, 40))):
            n = int(rng.integers(1, 10))
            p = rng.uniform(0.0, 1.0)  # some rounds have every drafter dead
            weight = (rng.random((n, num)) < p).astype(float)
            if mode == "sampling":
                weight *= rng.random((n, num))
                gamma = rng.random((n, num))
            else:
                gamma = weight
            got = fast.add_round_tagged(gamma, weight, _round)
            want = ref.add_round_tagged(gamma, weight, _round)
            assert [t for t, _ in got] == [t for t, _ in want]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
            assert fast.num_pending == len(ref._pending)
            released += len(got)
        got, want = fast.flush_tagged(), ref.flush_tagged()
        assert [t for t, _ in got] == [t for t, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
        released += len(got)
    assert released > 100


def test_expected_accepted_fast_path_is_bitwise_identical() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        m, num, k = int(rng.integers(0, 12)), int(rng.integers(1, 9)), int(rng.integers(1, 10))
        gamma, weight = rng.random((m, num)), rng.random((m, num))
        assert np.array_equal(expected_accepted(gamma, weight, k),
                              _reference_expected_accepted(gamma, weight, k))
