"""An online model of what a speculative round costs, in seconds, from measured timings only.

Nothing is assumed: every figure is fitted to wall-clock measurements of the rounds played,
with exponential forgetting (``half_life`` observations), so the model follows the machine
when it gets busier and the context when it gets longer.

* **Verification**, ``verify_seconds(n, context)``: one target pass scoring ``n`` positions
  (``n = drafted + 1``).  Per ``n`` a decayed least-squares line ``a_n + b_n * context``
  (``b_n >= 0``: attention grows with the context; ``a_n >= 0``: a pass reads the weights
  at any context; a line fitted to two clusters of contexts, e.g. short prompts and one
  long multi-turn one, otherwise crossed zero in between, and a 4-position pass at 256
  tokens was modelled as free in issue 14's sixth run).  An ``n`` never measured is
  interpolated linearly between its measured neighbours; past the largest one, extrapolated
  with the slope of a line through the per-``n`` predictions (``>= 0``), flat with one
  point.  No ``n`` is cheaper than the fewest positions measured.
* **Drafting**, ``draft_seconds(drafter, k)``: decayed least squares ``a + b * k`` over the
  rounds the drafter proposed ``k`` tokens (a model-free drafter fits ~0); while only one
  ``k`` has been measured, proportional to ``k``.
* **Counterfactual scoring**, ``score_seconds(drafter)``: the decayed mean of the seconds
  the drafter's run along a verified path took (for an LM drafter one forward pass, which
  also catches its KV cache up: see :mod:`specmux.feedback`).
* **Prefill and catch-up**, ``prefill_seconds(drafter, tokens)``: an LM drafter more than
  :data:`PREFILL_TOKENS` behind the context (a new prompt, or many rounds it did not run)
  first feeds it the tokens it lacks, in one batched call (less is fed within its next
  proposal or scoring run, which the draft and scoring lines price); decayed least
  squares ``a + b * tokens`` (``a, b >= 0``; through the origin while one length is
  measured).  It is a one-off cost, paid
  once per query: not part of any round's price, but of the decision to start the drafter
  (:meth:`specmux.selector.Selector.worth_starting`).
* **Proposal length**, ``proposal_length(drafter, k)``: a model-free drafter often has
  fewer than ``k`` tokens to offer (prompt lookup without a match offers none), and its
  round then costs a pass over fewer positions.  A drafter that says what it has this
  round (:meth:`~specmux.drafters.base.Drafter.offer`) is priced by that; otherwise the
  decayed mean length of its non-empty proposals at each ``k`` (``k`` until measured).  A
  model drafter that ends drafts early (:class:`~specmux.drafters.hf.HFDrafter`'s
  confidence threshold) counts its empty drafts too, and its drafting is priced by its
  mean steps, ``proposal_steps``: the step that found the unsure token is paid as well.
* **Throughput**, ``throughput()``: decayed total tokens / decayed total seconds of the
  rounds played: a ratio of sums, not a mean of per-round ratios (Dinkelbach's ``rho``).

One-off stalls (a page fault, another process) would stay in a decayed mean for a long
time, so once a line has :data:`ROBUST_AFTER` points an observation is clipped to
:data:`CLIP_FACTOR` times the line's prediction before it is added.  The caller leaves out
passes that do work no other round repeats (the engine: a query's first round, which
carries the prompt's prefill).

Example (a target whose pass costs 0.1 s + 0.01 s per scored position):

>>> model = CostModel(half_life=50)
>>> for n in (1, 2, 5):
...     model.observe_verify(n, context=100, seconds=0.1 + 0.01 * n)
>>> round(model.verify_seconds(3, 100), 4), round(model.verify_seconds(9, 100), 4)
(0.13, 0.19)
>>> model.observe_draft("lm", 4, 0.2); model.observe_draft("lm", 2, 0.1)
>>> round(model.draft_seconds("lm", 3), 3)
0.15
>>> model.observe_prefill("lm", 100, 0.5); model.observe_prefill("lm", 1000, 4.1)
>>> round(model.prefill_seconds("lm", 500), 3)  # 0.1 s + 4 ms per token
2.1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ROBUST_AFTER = 8  # points a line needs before its observations are clipped
CLIP_FACTOR = 3.0  # an observation counts at most this many times the prediction
PREFILL_TOKENS = 64  # a drafter further behind the context than this is prefilled apart


class DecayedLine:
    """Weighted least squares ``y = a + b x`` with exponentially decaying weights.

    Each observation multiplies the past weights by ``decay``.  With too little spread in
    ``x`` (or one point) the fit is the weighted mean (``b = 0``), or with
    ``proportional=True`` the line through the origin (``a = 0``, ``b = mean y / mean x``:
    drafting ``k`` tokens autoregressively costs about ``k`` times one);
    ``min_slope`` clamps ``b``; ``min_intercept`` clamps ``a`` (the slope is then refitted
    with the intercept held there).

    >>> line = DecayedLine(1.0, min_slope=0.0, min_intercept=0.0)
    >>> for x, y in [(150, 0.03), (160, 0.03), (1100, 0.9)]:  # two clusters, noisy
    ...     line.observe(x, y)
    >>> a, b = line.coefficients(); a, round(b, 6)  # unclamped: a = -0.11, 256 "free"
    (0.0, 0.000794)
    """

    def __init__(self, decay: float, min_slope: float | None = None,
                 proportional: bool = False, min_intercept: float | None = None) -> None:
        self.decay = decay
        self.min_slope = min_slope
        self.proportional = proportional
        self.min_intercept = min_intercept
        self.w = self.wx = self.wxx = self.wy = self.wxy = 0.0
        self.count = 0
        self._fit: tuple[float, float] | None = None  # coefficients since the last point

    def observe(self, x: float, y: float) -> None:
        if self.count >= ROBUST_AFTER:  # a one-off stall counts as a bounded outlier
            limit = CLIP_FACTOR * self.predict(x)
            if limit > 0:
                y = min(y, limit)
        d = self.decay
        self.w = d * self.w + 1.0
        self.wx = d * self.wx + x
        self.wxx = d * self.wxx + x * x
        self.wy = d * self.wy + y
        self.wxy = d * self.wxy + x * y
        self.count += 1
        self._fit = None

    def coefficients(self) -> tuple[float, float]:
        """``(a, b)``; ``(nan, nan)`` before the first observation."""
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> tuple[float, float]:
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
        a = my - b * mx
        if self.min_intercept is not None and a < self.min_intercept and self.wxx > 0:
            a = self.min_intercept  # least squares with the intercept held there
            b = (self.wxy - a * self.wx) / self.wxx
            if self.min_slope is not None:
                b = max(b, self.min_slope)
        return a, b

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
        self.prefill: dict[str, DecayedLine] = {}  # drafter -> seconds(tokens fed)
        # (drafter, k) -> decayed [sum of proposal lengths, count, sum of drafting steps]
        self.proposals: dict[tuple[str, int], list[float]] = {}
        self.tokens_sum = 0.0
        self.seconds_sum = 0.0

    # ------------------------------------------------------------------ measurements

    def observe_verify(self, positions: int, context: int, seconds: float) -> None:
        """One target pass that scored ``positions`` rows after ``context`` tokens."""
        line = self.verify.get(positions)
        if line is None:
            line = self.verify[positions] = DecayedLine(self.decay, min_slope=0.0,
                                                        min_intercept=0.0)
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

    def observe_prefill(self, drafter: str, tokens: int, seconds: float) -> None:
        """``drafter`` fed ``tokens`` context tokens it lacked in one call, in ``seconds``."""
        line = self.prefill.get(drafter)
        if line is None:
            line = self.prefill[drafter] = DecayedLine(self.decay, min_slope=0.0,
                                                       proportional=True, min_intercept=0.0)
        line.observe(float(tokens), float(seconds))

    def observe_proposal(self, drafter: str, k: int, drafted: int,
                         steps: int | None = None) -> None:
        """``drafter``, asked for ``k`` tokens, offered ``drafted`` (empty ones are not
        counted: the caller knows them from the drafter's signal), in ``steps`` drafting
        steps where that is not ``drafted`` (a model drafter that ended its draft early:
        its empty drafts count too, as nothing tells them in advance)."""
        if k < 1 or (drafted < 1 and steps is None):
            return
        entry = self.proposals.setdefault((drafter, int(k)), [0.0, 0.0, 0.0])
        entry[0] = self.decay * entry[0] + min(drafted, k)
        entry[1] = self.decay * entry[1] + 1.0
        entry[2] = self.decay * entry[2] + (min(drafted, k) if steps is None else steps)

    def proposal_length(self, drafter: str, k: int) -> float:
        """Mean length of ``drafter``'s non-empty proposals when asked for ``k`` (``k``
        until measured; a drafter that ends drafts early: of all of them)."""
        entry = self.proposals.get((drafter, int(k)))
        return float(k) if entry is None or entry[1] <= 0 else entry[0] / entry[1]

    def proposal_steps(self, drafter: str, k: int) -> float:
        """Mean drafting steps of those proposals (the step that ended one early
        included; ``k`` until measured)."""
        entry = self.proposals.get((drafter, int(k)))
        return float(k) if entry is None or entry[1] <= 0 else entry[2] / entry[1]

    def observe_round(self, tokens: int, seconds: float) -> None:
        """A played round committed ``tokens`` in ``seconds`` (wall clock, all included)."""
        self.tokens_sum = self.decay * self.tokens_sum + tokens
        self.seconds_sum = self.decay * self.seconds_sum + seconds

    # ------------------------------------------------------------------ predictions

    def throughput(self) -> float:
        """Decayed tokens / decayed seconds of the rounds played; nan before any."""
        return self.tokens_sum / self.seconds_sum if self.seconds_sum > 0 else math.nan

    def verify_seconds(self, positions: int, context: int) -> float:
        """Modelled seconds of a pass scoring ``positions`` rows; nan before any
        measurement.  Never below the fewest measured positions' (more rows cost more)."""
        if not self.verify:
            return math.nan
        least = min(self.verify)
        value = self._verify_line(positions, context)
        if positions > least:
            value = max(value, self._verify_line(least, context))
        return value

    def _verify_line(self, positions: int, context: int) -> float:
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

    def prefill_seconds(self, drafter: str, tokens: int) -> float:
        """Modelled seconds for ``drafter`` to feed ``tokens`` context tokens it lacks (0
        for none; nan if it never did)."""
        if tokens <= 0:
            return 0.0
        line = self.prefill.get(drafter)
        return math.nan if line is None else max(line.predict(float(tokens)), 0.0)

    def round_seconds(self, arms: Sequence[tuple[str, int]], context: int,
                      drafted: Sequence[int | None] | None = None) -> np.ndarray:
        """Modelled seconds of one round per arm ``(drafter, k)``: drafting + verification
        of its proposal: ``drafted[i]`` tokens where the caller knows what arm ``i`` would
        draft this round (0: one plain step), else its drafter's mean proposal length
        (drafted in its mean steps: :meth:`proposal_steps`).

        [num_arms]; a drafter never timed drafts for free (optimistic: a learner then
        tries it, and the first proposal measures it).
        """
        out = np.empty(len(arms))
        verify_of: dict[float, float] = {}  # positions -> seconds, this context
        for i, (drafter, k) in enumerate(arms):
            known = None if drafted is None else drafted[i]
            if k == 0:
                length = steps = 0.0
            elif known is not None:
                length = steps = float(known)
            else:
                length = self.proposal_length(drafter, k)
                steps = self.proposal_steps(drafter, k)
            draft = self.draft_seconds(drafter, math.ceil(steps)) if steps else 0.0
            verify = verify_of.get(length)
            if verify is None:
                verify = verify_of[length] = self._verify_fractional(length + 1.0, context)
            out[i] = (0.0 if math.isnan(draft) else draft) + (0.0 if math.isnan(verify) else verify)
        return out

    def _verify_fractional(self, positions: float, context: int) -> float:
        """:meth:`verify_seconds` interpolated between whole numbers of positions."""
        low = math.floor(positions)
        cost = self.verify_seconds(low, context)
        if positions > low:
            cost += (positions - low) * (self.verify_seconds(low + 1, context) - cost)
        return cost

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
            "prefill_seconds_per_token": {d: line.coefficients()[1]
                                          for d, line in self.prefill.items()},
            "proposal_length": {f"{d}@{k}": self.proposal_length(d, k)
                                for d, k in sorted(self.proposals)},
            "context": context,
        }
