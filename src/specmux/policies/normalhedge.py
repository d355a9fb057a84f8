"""NormalHedge (Chaudhuri, Freund & Hsu 2009): parameter-free Hedge, HedgeSpec's choice.

With regrets ``R_i = sum_t (<p_t, l_t> - l_t,i)`` and ``x_i = [R_i]+^2 / 2``:

    w_i ∝ ([R_i]+ / c) * exp(x_i / c),   c > 0 solving   mean_i exp(x_i / c) = e

and uniform weights while every ``[R_i]+`` is 0.  :func:`solve_scale` finds ``c`` with
Newton's method on ``g(u) = ln mean_i exp(u x_i) - 1`` for ``u = 1/c``: ``g`` is convex and
increasing, with its root in ``[1/M, (1 + ln N)/M]`` (``M = max x``), so Newton started at
the right end decreases monotonically to it (5-10 steps); ``u x_i <= 1 + ln N`` keeps every
``exp`` small, and regrets are divided by their maximum first (the weights do not change),
so no size of regret overflows or underflows.  Each loss vector in ``feedback.losses`` is applied
in turn with the then-current ``p``.  ``selection`` as for :class:`Hedge`.

Example:

>>> import numpy as np
>>> from specmux.types import Feedback
>>> policy = NormalHedge(3, seed=0)
>>> policy.update(Feedback(arm=0, k=4, max_k=4, num_draft_tokens=4, num_accepted_tokens=1,
...                        losses=(np.array([0.6, 0.2, 0.8]),)))
>>> policy.regret.round(3).tolist(), policy.probabilities().tolist()
([-0.067, 0.333, -0.267], [0.0, 1.0, 0.0])
>>> x = np.array([0.5, 2.0, 0.0])
>>> round(float(np.mean(np.exp(x / solve_scale(x)))), 12)
2.718281828459
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from specmux.policies.hedge import FullInformationPolicy
from specmux.types import Feedback


def solve_scale(x: np.ndarray, tol: float = 1e-13, max_iter: int = 100) -> float:
    """``c > 0`` with ``mean(exp(x / c)) = e`` for ``x`` [N] >= 0, not all 0."""
    top = float(x.max())
    y = x / top  # scale-free: solve for max 1, then c = top * c(y)
    lo, u = 1.0, 1.0 + math.log(y.shape[0])  # bracket for u = 1/c(y)
    for _ in range(max_iter):
        e = np.exp(u * y)
        s = float(e.sum())
        g = math.log(s / y.shape[0]) - 1.0
        if abs(g) <= tol:
            break
        step = g * s / float(e @ y)  # g / g'
        u = max(u - step, lo)
        if abs(step) <= tol * u:
            break
    return top / u


def normalhedge_weights(regret: np.ndarray) -> np.ndarray:
    """NormalHedge's distribution [N] for regrets [N]."""
    pos = np.maximum(regret, 0.0)
    top = float(pos.max())
    if top <= 0.0:
        return np.full(regret.shape[0], 1.0 / regret.shape[0])
    pos /= top  # weights and c scale out; this keeps pos**2 finite and nonzero
    x = 0.5 * pos * pos
    w = pos * np.exp(x / solve_scale(x))  # the common factor 1/c cancels
    return w / w.sum()


class NormalHedge(FullInformationPolicy):
    """Parameter-free exponential weights on positive regret (HedgeSpec's learner)."""

    name: ClassVar[str] = "normalhedge"
    _state_keys: ClassVar[tuple[str, ...]] = ("regret",)

    def reset(self) -> None:
        self.t = 0
        self.regret = np.zeros(self.num_arms)  # [num_arms] R_i
        self._probs: np.ndarray | None = None  # cache: weights for the current regret

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._probs = None

    def _weights(self) -> np.ndarray:
        if self._probs is None:
            self._probs = normalhedge_weights(self.regret)
        return self._probs

    def probabilities(self) -> np.ndarray:
        return self._weights().copy()

    def preference(self) -> np.ndarray:
        return self.regret.copy()

    def update(self, feedback: Feedback) -> None:
        self.t += 1
        for loss in feedback.losses:
            loss = np.asarray(loss, dtype=float)
            self.regret += float(self._weights() @ loss) - loss
            self._probs = None
