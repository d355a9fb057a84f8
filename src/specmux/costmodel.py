"""An online model of what a speculative round costs, in seconds, from measured timings only.

Nothing is assumed: every figure is fitted to wall-clock measurements of the rounds played,
with exponential forgetting (``half_life`` observations), so the model follows the machine
when it gets busier and the context when it gets longer.

* **Verification**, ``verify_seconds(n, context)``: one target pass scoring ``n`` positions
  (``n = drafted + 1``).  Per ``n`` a decayed least-squares line ``a_n + b_n * context``
  (``b_n >= 0``: attention grows with the context).  An ``n`` never measured is
  interpolated linearly between its measured neighbours; past the largest one, extrapolated
  with the slope of a line through the per-``n`` predictions (``>= 0``), flat with one point.
* **Drafting**, ``draft_seconds(drafter, k)``: decayed least squares ``a + b * k`` over the
  rounds the drafter proposed ``k`` tokens (a model-free drafter fits ~0); while only one
  ``k`` has been measured, proportional to ``k``.
* **Counterfactual scoring**, ``score_seconds(drafter)``: the decayed mean of the seconds
  the drafter's run along a verified path took (for an LM drafter one forward pass, which
  also catches its KV cache up: see :mod:`specmux.feedback`).
* **Throughput**, ``throughput()``: decayed total tokens / decayed total seconds of the
  rounds played: a ratio of sums, not a mean of per-round ratios (Dinkelbach's ``rho``).

Example (a target whose pass costs 0.1 s + 0.01 s per scored position):

>>> model = CostModel(half_life=50)
>>> for n in (1, 2, 5):
...     model.observe_verify(n, context=100, seconds=0.1 + 0.01 * n)
>>> round(model.verify_seconds(3, 100), 4), round(model.verify_seconds(9, 100), 4)
(0.13, 0.19)
>>> model.observe_draft("lm", 4, 0.2); model.observe_draft("lm", 2, 0.1)
>>> round(model.draft_seconds("lm", 3), 3)
0.15
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class DecayedLine:
    """Weighted least squares ``y = a + b x`` with exponentially decaying weights.

    Each observation multiplies the past weights by ``decay``.  With too little spread in
    ``x`` (or one point) the fit is the weighted mean (``b = 0``), or with
    ``proportional=True`` the line through the origin (``a = 0``, ``b = mean y / mean x``:
    drafting ``k`` tokens autoregressively costs about ``k`` times one);
    ``min_slope`` clamps ``b``.
    """

    def __init__(self, decay: float, min_slope: float | None = None,
                 proportional: bool = False) -> None:
        self.decay = decay
        self.min_slope = min_slope
        self.proportional = proportional
        self.w = self.wx = self.wxx = self.wy = self.wxy = 0.0
        self.count = 0

    def observe(self, x: float, y: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.wx = d * self.wx + x
        self.wxx = d * self.wxx + x * x
        self.wy = d * self.wy + y
        self.wxy = d * self.wxy + x * y
        self.count += 1

    def coefficients(self) -> tuple[float, float]:
        """``(a, b)``; ``(nan, nan)`` before the first observation."""
        if self.count == 0:
            return math.nan, math.nan
        mx, my = self.wx / self.w, self.wy / self.w
        var = self.wxx / self.w - mx * mx
        if var > 1e-9 * max(1.0, mx * mx):
            b = (self.wxy / self.w - mx * my) / var
        elif self.proportional and mx > 0:
            return 0.0, my / mx
        else:
            b = 0.0
        if self.min_slope is not None:
            b = max(b, self.min_slope)
        return my - b * mx, b

    def predict(self, x: float) -> float:
        a, b = self.coefficients()
        return a + b * x


class CostModel:
    """Online, measured costs of verification, drafting and counterfactual scoring."""

    def __init__(self, half_life: float = 64.0) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self.reset()

    def reset(self) -> None:
        self.verify: dict[int, DecayedLine] = {}  # positions scored -> seconds(context)
        self.draft: dict[str, DecayedLine] = {}  # drafter -> seconds(k)
        self.score: dict[str, DecayedLine] = {}  # drafter -> seconds (x unused)
        self.tokens_sum = 0.0
        self.seconds_sum = 0.0

    # ------------------------------------------------------------------ measurements

    def observe_verify(self, positions: int, context: int, seconds: float) -> None:
        """One target pass that scored ``positions`` rows after ``context`` tokens."""
        line = self.verify.get(positions)
        if line is None:
            line = self.verify[positions] = DecayedLine(self.decay, min_slope=0.0)
        line.observe(float(context), float(seconds))

    def observe_draft(self, drafter: str, k: int, seconds: float) -> None:
        """``drafter`` proposed ``k`` tokens (``k >= 1``) in ``seconds``."""
        line = self.draft.get(drafter)
        if line is None:
            line = self.draft[drafter] = DecayedLine(self.decay, min_slope=0.0,
                                                     proportional=True)
        line.observe(float(k), float(seconds))

    def observe_score(self, drafter: str, seconds: float) -> None:
        """``drafter`` was run along a verified path (counterfactual scoring) in ``seconds``."""
        line = self.score.get(drafter)
        if line is None:
            line = self.score[drafter] = DecayedLine(self.decay)
        line.observe(0.0, float(seconds))

    def observe_round(self, tokens: int, seconds: float) -> None:
        """A played round committed ``tokens`` in ``seconds`` (wall clock, all included)."""
        self.tokens_sum = self.decay * self.tokens_sum + tokens
        self.seconds_sum = self.decay * self.seconds_sum + seconds

    # ------------------------------------------------------------------ predictions

    def throughput(self) -> float:
        """Decayed tokens / decayed seconds of the rounds played; nan before any."""
        return self.tokens_sum / self.seconds_sum if self.seconds_sum > 0 else math.nan

    def verify_seconds(self, positions: int, context: int) -> float:
        """Modelled seconds of a pass scoring ``positions`` rows; nan before any measurement."""
        if not self.verify:
            return math.nan
        line = self.verify.get(positions)
        if line is not None:
            return max(line.predict(context), 0.0)
        ns = sorted(self.verify)
        ys = np.array([max(self.verify[n].predict(context), 0.0) for n in ns])
        if positions < ns[0]:
            return float(ys[0])
        if positions < ns[-1]:
            return float(np.interp(positions, ns, ys))
        slope = 0.0
        if len(ns) > 1:
            slope = max(float(np.polyfit(np.array(ns, dtype=float), ys, 1)[0]), 0.0)
        return float(ys[-1] + slope * (positions - ns[-1]))

    def draft_seconds(self, drafter: str, k: int) -> float:
        """Modelled seconds for ``drafter`` to propose ``k`` tokens (0 for ``k == 0``)."""
        if k <= 0:
            return 0.0
        line = self.draft.get(drafter)
        if line is None:
            return math.nan
        return max(line.predict(k), 0.0)

    def score_seconds(self, drafter: str) -> float:
        """Mean measured seconds of one counterfactual scoring run; nan if never measured."""
        line = self.score.get(drafter)
        return math.nan if line is None else max(line.predict(0.0), 0.0)

    def round_seconds(self, arms: Sequence[tuple[str, int]], context: int) -> np.ndarray:
        """Modelled seconds of one round per arm ``(drafter, k)``: drafting + verification.

        [num_arms]; a drafter never timed drafts for free (optimistic: a learner then
        tries it, and the first proposal measures it).
        """
        out = np.empty(len(arms))
        for i, (drafter, k) in enumerate(arms):
            draft = self.draft_seconds(drafter, k)
            verify = self.verify_seconds(k + 1, context)
            out[i] = (0.0 if math.isnan(draft) else draft) + (0.0 if math.isnan(verify) else verify)
        return out

    def snapshot(self, max_positions: int = 9, context: int = 256) -> dict[str, Any]:
        """The fitted model as plain numbers (for the trace, logs and ``/metrics``)."""
        return {
            "throughput": self.throughput(),
            "verify_seconds": {n: self.verify_seconds(n, context)
                               for n in range(1, max_positions + 1)} if self.verify else {},
            "verify_per_context_token": {n: line.coefficients()[1]
                                         for n, line in sorted(self.verify.items())},
            "draft_seconds_per_token": {d: line.coefficients()[1]
                                        for d, line in self.draft.items()},
            "draft_seconds_fixed": {d: line.coefficients()[0] for d, line in self.draft.items()},
            "score_seconds": {d: self.score_seconds(d) for d in self.score},
            "context": context,
        }
