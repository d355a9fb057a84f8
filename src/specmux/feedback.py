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

* ``"time"``: Dinkelbach's loss for tokens per *second*.  With ``T_a = E[A_a] + 1`` the
  tokens arm ``a`` would have committed, ``c_a`` its modelled round seconds
  (:class:`specmux.costmodel.CostModel`) and ``rho`` the running throughput (tokens/s),
  the gain ``g_a = T_a - rho * c_a`` is maximized.  The loss is
  ``1/2 + (m - g_a) / (2 D)``: ``m`` is the round's mean gain over the arms scored exactly
  (a per-round shift, which exponential weights ignore), ``D`` a decayed maximum of
  ``|g_a - m|`` (half-life :data:`SCALE_HALF_LIFE` rounds, never below this round's
  spread: the losses of the exactly scored arms lie in [0, 1]; the worst-case bound
  ``max_k + rho * max c`` would shrink the loss differences tenfold and slow Hedge down
  as much, and an all-time maximum would let one outlier round do the same for good).
  Throughput is a ratio of expectations, ``sum T / sum c``; an arm beats ``rho`` exactly
  when its gain is positive (Dinkelbach 1967).  ``rho`` is the larger of the learner's
  own throughput and the best *fixed* arm's, ``sum T_a / sum c_a`` over the rounds it was
  scored in (full information gives it for free).  Both are lower bounds of the best
  achievable throughput ``rho*``, and for any ``rho <= rho*`` the arm of largest gain in
  each context makes ``sum (T - rho c) >= 0``, i.e. at least ``rho`` tokens/second
  (Dinkelbach's lemma): starting from the best fixed arm's rate, the learner can only
  improve on it.  In the stream's first round neither is known yet (``rho = 0`` would make
  the loss the ``length`` loss, which prefers the costliest arm), so the best exactly
  scored arm's rate in that round stands in.  The no-speculation arm (``k = 0``) has
  ``T = 1``.  Both terms come from the same verified path, so the loss is exact under
  greedy decoding and unbiased under sampling, like ``"length"``.

**Cheap counterfactuals (sub-sampled scoring).**  Running an LM drafter along the path
costs a forward pass.  The caller may skip a drafter ``i`` in a round and pass per-drafter
``factors[i]``: ``1`` (scored exactly, e.g. the drafter was played and its rows are
reused), ``1/pi > 1`` (scored because an independent coin of probability ``pi`` came up)
or ``0`` (not scored: its column is ``nan``).  An arm of an unscored drafter gets its
loss *imputed*: the decayed mean (half-life ``baseline_half_life`` samples) of that arm's
losses in the rounds its drafter was scored by a coin, in the same context (the round's
tag carries the context key, :mod:`specmux.selector`).  Coin rounds are a random sample
of the rounds, so the mean is a consistent estimate of the arm's loss there; rounds where
the drafter was played are a biased sample (the learner played it where it looked good).
But coins are rare (one round in tens to hundreds), and one coin round taken at face value
decided the imputed loss of every later round: in issue 11's seventh run the stream's
first round was such a coin, its losses said the LM drafter was best, and learners that
play their best arm kept playing it.  So the context's coin mean is shrunk toward the
coin mean over every context, and that toward the mean over every scored round (played
ones included), each by :data:`IMPUTE_PRIOR` pseudo-rounds: one coin moves the estimate
three quarters of the way, a dozen decide it.  (Shrinking toward 1/2 instead, which leaves
the played rounds out entirely, made the sampling learners play the LM drafter more and
cost them 4-11% in issue 11's ninth run.)  The unbiased alternative, ``b + factors[i] * (loss -
b)``, gives a coin round an importance weight of ``1/pi``: with ``pi`` = 1/80 (a 5% coin
in a quarter of the queries) one coin moved an arm's cumulative loss by tens of rounds'
worth, and learners that play their best arm locked onto whichever drafter a few coins
happened to favour (BENCHMARKS.md, issue 11, third run).
A coin-scored drafter needs its scores over the round's whole window: the
caller passes it in ``deferred`` (its columns ``nan`` for now) with a ``scorer``, and once
the window is verified the tracker asks ``scorer(drafter, lo, hi)`` for the drafter's
``(gamma, w)`` over log rows ``lo..hi`` (:attr:`CounterfactualTracker.next_row` numbers
them): one run of the drafter over all of them instead of one per round.  Rounds whose
window a request overlaps wait for it.  A scorer may answer ``nan`` rows (not run: the
engine does so for a played drafter's rows past its draft that would need a pass of their
own), which count as positions the drafter was not run on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from specmux.types import PathDistributions
from specmux.verify import acceptance_probability

LOSSES = ("length", "acceptance", "time")
# scorer(drafter, lo, hi) -> (gamma, w), each [hi - lo]: a drafter's scores over log rows
SpanScorer = Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]
SCALE_HALF_LIFE = 256.0  # rounds: how fast the "time" loss's scale D forgets a large spread
RATE_HALF_LIFE = 128.0  # rounds: the fixed arms' throughput estimates
IMPUTE_PRIOR = 1.0  # pseudo-rounds of the broader mean in an imputed loss (shrinkage)


def position_scores(
    path: torch.Tensor,
    target_probs: torch.Tensor | None,
    dists: Sequence[PathDistributions | None],
    greedy: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every drafter along a verified path.

    ``path`` [n] realized tokens; ``target_probs`` [n, V] processed p along it; ``dists`` one
    :class:`PathDistributions` per drafter (each [n] / [n, V]), or ``None`` for a drafter
    not scored this round (its columns are ``nan``).  Returns ``gamma`` and ``w``, both
    [n, N] float64.  Under greedy decoding the path *is* the target's argmax along it, so
    ``gamma = w = 1[guess == path]`` and ``target_probs`` is not read (an argmax over a
    150k vocabulary costs 0.13 ms per row on a CPU core): it may be ``None``.  A drafter's
    ``stops`` rows (it would end its draft before them) score 0 in both: a draft that
    reaches such a row drafts nothing there, so nothing from it on is accepted.
    """
    n = int(path.shape[0])
    if target_probs is None and not greedy:
        raise ValueError("sampled paths are scored against the target's distributions")
    gamma = np.zeros((n, len(dists)))
    weight = np.zeros((n, len(dists)))
    if n == 0:
        return gamma, weight
    if greedy:  # compared in numpy: a few tokens, where each torch op costs microseconds
        path_np = path.numpy()  # [n]
        for i, dist in enumerate(dists):
            if dist is None:
                gamma[:, i] = np.nan
            else:
                guess = dist.tokens if dist.probs is None else dist.probs.argmax(dim=-1)  # [n]
                gamma[:, i] = guess.numpy() == path_np
                if dist.stops is not None:
                    gamma[dist.stops.numpy(), i] = 0.0
        weight[:] = gamma
        return gamma, weight
    rows = torch.arange(n)
    for i, dist in enumerate(dists):
        if dist is None:
            gamma[:, i] = weight[:, i] = np.nan
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
        if dist is not None and dist.stops is not None:
            stops = dist.stops.numpy()  # [n]
            gamma[stops, i] = weight[stops, i] = 0.0
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
    costs: np.ndarray | None = None  # [num_arms] modelled seconds ("time" loss)
    rho: float = 0.0  # throughput (tokens/s) when the round was played ("time" loss)
    factors: np.ndarray | None = None  # [N] importance of each drafter's scores (None: all 1)
    ks: np.ndarray | None = None  # [num_arms] tokens each arm would draft (None: its k)


class CounterfactualTracker:
    """Turns per-position drafter scores into per-round loss vectors over arms.

    ``arms``: ``(drafter_index, k)`` per arm.  Call :meth:`add_round` once per round with the
    round's ``gamma``/``weight`` [n, N]; it returns the loss vectors [num_arms] that became
    known.  Call :meth:`flush` at the end of a query.
    """

    def __init__(
        self, arms: Sequence[tuple[int, int]], loss: str = "length", delayed: bool = True,
        baseline_half_life: float = 32.0,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.drafter_of_arm = np.array([d for d, _ in arms], dtype=int)  # [num_arms]
        self.k_of_arm = np.array([k for _, k in arms], dtype=int)  # [num_arms]
        self.drafter_of_arm.flags.writeable = self.k_of_arm.flags.writeable = False  # shared
        self.max_k = max(int(self.k_of_arm.max()), 1)
        self.loss = loss
        self.delayed = delayed
        # Sub-sampled scoring: decay of the imputation baselines (per sample).
        self._decay = 0.5 ** (1.0 / baseline_half_life)
        # Imputation baselines: key -> (decayed loss sums, decayed counts) [num_arms] each.
        self._baselines: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.time_scale = 0.0  # D of the "time" loss: decayed max of |gain - mean gain|
        self._scale_decay = 0.5 ** (1.0 / SCALE_HALF_LIFE)
        # Per arm, decayed sums of counterfactual tokens and modelled seconds ("time" loss).
        self._rate_decay = 0.5 ** (1.0 / RATE_HALF_LIFE)
        self._arm_tokens = np.zeros(len(self.k_of_arm))
        self._arm_seconds = np.zeros(len(self.k_of_arm))
        # Arms grouped by k once: (k, arm mask, drafter of each selected arm).
        self._groups = [
            (int(k), sel, self.drafter_of_arm[sel])
            for k in np.unique(self.k_of_arm)
            for sel in [self.k_of_arm == k]
        ]
        self.reset()

    def forget(self) -> None:
        """Forget what the ``"time"`` loss learned across queries (its scale, the fixed
        arms' rates)."""
        self.time_scale = 0.0
        self._arm_tokens[:] = 0.0
        self._arm_seconds[:] = 0.0
        self._baselines.clear()

    def reset(self) -> None:
        """Start a new query (pending rounds of the previous one must be flushed first)."""
        # The position log: rows [0, _len) of two growable [capacity, N] arrays.
        self._gamma: np.ndarray | None = None
        self._weight: np.ndarray | None = None
        self._len = 0
        self._offset = 0  # positions dropped from the front of the log
        self._pending: deque[_Pending] = deque()
        self._requests: list[list[int]] = []  # [drafter, lo, hi, due]: deferred scoring
        # Per arm, this query's sums of counterfactual tokens and modelled seconds.
        self._query_tokens = np.zeros(len(self.k_of_arm))
        self._query_seconds = np.zeros(len(self.k_of_arm))
        self._query_rounds = np.zeros(len(self.k_of_arm))

    @property
    def next_row(self) -> int:
        """The log row number the next round's first position gets (0 at query start)."""
        return self._offset + self._len

    @property
    def first_row(self) -> int:
        """The oldest log row still kept (a :data:`SpanScorer` is asked for no older)."""
        return self._offset

    def add_round(self, gamma: np.ndarray, weight: np.ndarray) -> list[np.ndarray]:
        """Record one round's path scores; return the loss vectors that became known."""
        return [losses for _, losses in self.add_round_tagged(gamma, weight, -1)]

    def flush(self) -> list[np.ndarray]:
        """End of query: resolve every pending round with the positions known."""
        return [losses for _, losses in self.flush_tagged()]

    def add_round_tagged(
        self, gamma: np.ndarray, weight: np.ndarray, tag: int, *,
        costs: np.ndarray | None = None, rho: float = 0.0, factors: np.ndarray | None = None,
        deferred: Sequence[int | tuple[int, int, int]] = (), scorer: SpanScorer | None = None,
        ks: np.ndarray | None = None,
    ) -> list[tuple[int, np.ndarray]]:
        """As :meth:`add_round`, pairing each released loss vector with its round's ``tag``.

        ``costs`` [num_arms] (modelled round seconds) and ``rho`` (tokens/s) are needed by
        the ``"time"`` loss; ``factors`` [N] are the drafters' scoring importances (see the
        module docstring; ``None``: every drafter scored exactly).  ``deferred``: drafters
        to score over this round's window later, with ``scorer`` (module docstring); an
        entry ``(drafter, lo, hi)`` asks for the round's rows ``lo..hi`` only.  ``ks``
        [num_arms]: how many tokens each arm would have drafted this round, where fewer
        than its ``k`` (a model-free drafter with a short proposal): its expected accepted
        length is counted up to that.
        """
        if deferred and scorer is None:
            raise ValueError("deferred scoring needs a scorer")
        if self.loss == "time" and costs is None:
            raise ValueError("the 'time' loss needs the arms' modelled costs")
        meta = _Pending(-1, tag, costs, float(rho) if np.isfinite(rho) else 0.0, factors, ks)
        if self.loss == "acceptance" or not self.delayed:
            return [(tag, self._losses(gamma, weight, meta))] if gamma.shape[0] else []
        n = gamma.shape[0]
        if self._gamma is None or self._len + n > self._gamma.shape[0]:
            self._grow(self._len + n, gamma.shape[1])
        assert self._gamma is not None and self._weight is not None
        self._gamma[self._len : self._len + n] = gamma
        self._weight[self._len : self._len + n] = weight
        meta.start = self._offset + self._len
        self._len += n
        self._pending.append(meta)
        for entry in deferred:  # due once the round's window is verified
            drafter, lo, hi = ((entry, 0, self.max_k) if isinstance(entry, (int, np.integer))
                               else entry)
            self._request(int(drafter), meta.start + lo, meta.start + hi,
                          meta.start + self.max_k)
        self._fill_due(scorer, final=False)
        return self._release(final=False)

    def _request(self, drafter: int, lo: int, hi: int, due: int) -> None:
        """Ask for ``drafter``'s scores over rows ``lo..hi`` (past its open requests) once
        ``due`` rows are verified."""
        for request in self._requests:
            if request[0] == drafter:
                lo = max(lo, request[2])
        if hi > lo:
            self._requests.append([drafter, lo, hi, due])

    def _fill_due(self, scorer: SpanScorer | None, final: bool) -> None:
        """Fill the requests whose rows are all verified (at the query's end: every one,
        cut at the last row), each drafter's adjacent ones in one ``scorer`` call."""
        end = self._offset + self._len
        due = [r for r in self._requests if final or r[3] <= end]
        if not due:
            return
        if scorer is None:
            raise ValueError("deferred scoring needs a scorer")
        assert self._gamma is not None and self._weight is not None
        self._requests = [r for r in self._requests if not (final or r[3] <= end)]
        spans: list[list[int]] = []
        for drafter, lo, hi, _ in sorted(due):
            hi = min(hi, end)
            if spans and spans[-1][0] == drafter and spans[-1][2] >= lo:
                spans[-1][2] = max(spans[-1][2], hi)
            elif hi > lo:
                spans.append([drafter, lo, hi])
        for drafter, lo, hi in spans:
            gamma, weight = scorer(drafter, lo, hi)
            rows = slice(lo - self._offset, hi - self._offset)
            self._gamma[rows, drafter] = gamma
            self._weight[rows, drafter] = weight

    def flush_tagged(self, scorer: SpanScorer | None = None) -> list[tuple[int, np.ndarray]]:
        """As :meth:`flush`, with tags; ``scorer`` fills the deferred requests first."""
        out: list[tuple[int, np.ndarray]] = []
        if self._gamma is not None:
            self._fill_due(scorer, final=True)
            out = self._release(final=True)
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
            if any(r[1] < pending[0].start + self.max_k for r in self._requests):
                break  # a deferred scoring run will fill part of its window
            if not (complete or final):
                # No drafter can get past the known positions: the rest contributes nothing.
                dead = hi > lo and not np.any(np.prod(self._weight[lo:hi], axis=0) > 0)
                if not dead:
                    break
            meta = pending.popleft()
            if hi > lo:
                out.append((meta.tag,
                            self._losses(self._gamma[lo:hi], self._weight[lo:hi], meta)))
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

    def provisional(self) -> list[tuple[int, np.ndarray]]:
        """``(tag, losses)`` of the rounds still waiting for their window (delayed
        ``length``/``time`` losses), from the positions verified so far: a drafter still
        matching at the last position it was run on is assumed to match the rest of the
        window (optimism; an LM drafter played in the round is run on that round's path
        only), a drafter not scored yet (its coin's run waits for the window) is imputed,
        as are the unscored ones.  Nothing changes: no rate, scale or imputation baseline
        moves.

        A round's loss arrives ``max_k`` positions after it starts; where drafts fail, that
        is ``max_k`` rounds of one token each, in which a learner reading only the
        released losses keeps playing the arm that fails (issue 11's twentieth run: a
        multi-turn query played ``head:code@2``, accepting nothing for ten rounds, while
        prompt lookup would have matched 8 of 8).  A learner may select as if these
        losses had arrived (:meth:`specmux.policies.hedge.FullInformationPolicy.ahead`);
        the real ones replace them once the window is verified.

        >>> tracker = CounterfactualTracker([(0, 4), (1, 4)], "length")
        >>> # one position verified: drafter 0 missed it, drafter 1 matched it
        >>> tracker.add_round(np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]]))
        []
        >>> [losses.tolist() for _, losses in tracker.provisional()]  # 1 and 5 tokens of 5
        [[0.8, 0.0]]
        """
        if self.loss == "acceptance" or not self.delayed:
            return []
        return [(meta.tag, self._losses(gamma, weight, meta, commit=False))
                for meta, gamma, weight in self._pending_windows()]

    def _pending_windows(self) -> Iterator[tuple[_Pending, np.ndarray, np.ndarray]]:
        """Per round still waiting for its window, with a position verified: the round
        (``factors`` 0 for a coin's drafter whose run has not come) and its optimistic
        ``gamma``, ``weight`` [max_k, N]: positions not verified yet, or where a drafter
        was not run, match (:meth:`provisional`)."""
        if self._gamma is None:
            return
        for meta in self._pending:
            lo = meta.start - self._offset
            hi = min(lo + self.max_k, self._len)
            if hi <= lo:
                continue
            gamma = np.ones((self.max_k, self._gamma.shape[1]))
            weight = gamma.copy()
            known = self._gamma[lo:hi]  # [n, N] (nan: not run there)
            gamma[: hi - lo] = np.where(np.isnan(known), 1.0, known)
            weight[: hi - lo] = np.where(np.isnan(known), 1.0, self._weight[lo:hi])
            if meta.factors is not None:  # a coin's drafter whose run has not come
                meta = replace(meta, factors=np.where(np.isnan(known).all(axis=0), 0.0,
                                                      meta.factors))
            yield meta, gamma, weight

    def _losses(self, gamma: np.ndarray, weight: np.ndarray, meta: _Pending,
                commit: bool = True) -> np.ndarray:
        """Loss vector [num_arms] from the scores along one round's (possibly longer) path
        (``commit=False``: no running statistic moves, :meth:`provisional`)."""
        factors = meta.factors
        # Positions a drafter was not run on are nan: past a drafter's first certain miss
        # (weight 0) they do not count, and a factor-0 drafter's arms use the baseline.
        if np.isnan(gamma).any() or np.isnan(weight).any():  # most rounds have none
            gamma, weight = np.nan_to_num(gamma), np.nan_to_num(weight)
        if self.loss == "acceptance":
            per_drafter = (1.0 - gamma).sum(axis=0) / (self.max_k + 1)  # [N]
            losses = per_drafter[self.drafter_of_arm]
        else:
            tokens = self.tokens(gamma, weight, meta.ks)  # [num_arms] E[A] + 1
            if self.loss == "length":
                losses = 1.0 - tokens / (self.max_k + 1)
            else:
                losses = self._time_losses(tokens, meta, commit)
        if factors is None:
            return losses
        return self._impute(losses, self._arm_factors(factors), meta.tag, commit)

    def _arm_factors(self, factors: np.ndarray) -> np.ndarray:
        """Per arm [num_arms]: its drafter's scoring factor (``factors`` [N]); 1 for the
        no-speculation arm, whose one token for a plain step is known without any drafter
        (its arms read drafter column 0, which may be an LM between scoring coins)."""
        return np.where(self.k_of_arm == 0, 1.0, factors[self.drafter_of_arm])

    def _impute(self, losses: np.ndarray, f: np.ndarray, tag: int,
                commit: bool = True) -> np.ndarray:
        """Losses of arms whose drafter was not scored (``f == 0``) replaced by the decayed
        mean of that arm's losses in the rounds its drafter was scored by a coin (``f >
        1``) in the round's context (``tag // num_arms``), shrunk toward the same mean in
        any context, itself shrunk toward the mean over every scored round, each by
        :data:`IMPUTE_PRIOR` pseudo-rounds (module docstring)."""
        num_arms = len(self.k_of_arm)
        keys = (max(tag, 0) // num_arms, -1)  # this round's context, every context
        empty = (np.zeros(num_arms), np.zeros(num_arms))
        total, weight = self._baselines.get(-2, empty)  # -2: every scored round
        base = np.where(weight > 0, total / np.maximum(weight, 1e-300), 0.5)
        for key in (keys[1], keys[0]):  # any context's coins, then this context's
            total, weight = self._baselines.get(key, empty)
            base = (total + IMPUTE_PRIOR * base) / (weight + IMPUTE_PRIOR)
        coins, scored = f > 1, f > 0
        for key, mask in ((keys[0], coins), (-1, coins), (-2, scored)) if commit else ():
            if not mask.any():  # most rounds: no coin came up
                continue
            total, weight = self._baselines.setdefault(
                key, (np.zeros(num_arms), np.zeros(num_arms)))
            total[mask] = self._decay * total[mask] + losses[mask]
            weight[mask] = self._decay * weight[mask] + 1.0
        return np.where(scored, losses, base)

    def best_fixed_rate(self) -> float:
        """The best fixed arm's throughput so far, ``sum T_a / sum c_a`` (tokens per
        modelled second; 0 before any round)."""
        ok = self._arm_seconds > 0
        if not ok.any():
            return 0.0
        return float(np.max(self._arm_tokens[ok] / self._arm_seconds[ok]))

    def seconds_per_token(self, query_rounds: float = math.inf) -> np.ndarray:
        """Each fixed arm's modelled seconds per token so far, ``sum c_a / sum T_a``
        [num_arms] (``"time"`` loss; ``nan`` for an arm never scored): over this query's
        rounds for an arm scored in at least ``query_rounds`` of them, else over the stream
        (decayed).  The query's rounds include those still waiting for their window, at
        their provisional tokens (:meth:`provisional`: exact for a drafter that already
        missed, optimistic for one still matching), so an arm that fails at once shows it
        in the rounds it fails, not ``max_k`` positions later.

        >>> tracker = CounterfactualTracker([(0, 4), (1, 4)], "time")
        >>> tracker._arm_tokens[:], tracker._arm_seconds[:] = [30.0, 30.0], [3.0, 6.0]
        >>> for _ in range(2):  # drafter 0 misses at once, drafter 1 matches
        ...     _ = tracker.add_round_tagged(np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]]),
        ...                                  -1, costs=np.array([0.3, 0.3]), rho=10.0)
        >>> tracker.seconds_per_token(query_rounds=2).round(3).tolist()  # 1 and 5 tokens
        [0.3, 0.06]
        >>> tracker.seconds_per_token(query_rounds=3).round(3).tolist()  # the stream's
        [0.1, 0.2]
        """
        out = np.full(len(self._arm_tokens), np.nan)
        ok = self._arm_tokens > 0
        out[ok] = self._arm_seconds[ok] / self._arm_tokens[ok]
        tokens, seconds = self._query_tokens.copy(), self._query_seconds.copy()  # [num_arms]
        rounds = self._query_rounds.copy()
        if math.isfinite(query_rounds) and self.loss == "time" and self.delayed:
            for meta, gamma, weight in self._pending_windows():
                assert meta.costs is not None
                seen = (np.ones(len(rounds), dtype=bool) if meta.factors is None
                        else self._arm_factors(meta.factors) > 0)
                tokens[seen] += self.tokens(gamma, weight, meta.ks)[seen]
                seconds[seen] += meta.costs[seen]
                rounds[seen] += 1.0
        mine = (rounds >= query_rounds) & (tokens > 0)
        out[mine] = seconds[mine] / tokens[mine]
        return out

    def _time_losses(self, tokens: np.ndarray, meta: _Pending, commit: bool = True) -> np.ndarray:
        """Dinkelbach's gain ``T - rho * c`` per arm, shifted and scaled (module docstring);
        ``commit=False`` leaves the arms' rates and the scale as they are."""
        assert meta.costs is not None
        # [num_arms]: each arm's scoring factor (None: every arm scored exactly)
        arm_factors = None if meta.factors is None else self._arm_factors(meta.factors)
        exact = (np.ones(len(tokens), dtype=bool) if arm_factors is None
                 else arm_factors == 1.0)
        if not exact.any():
            exact[:] = True
        rho = max(meta.rho, self.best_fixed_rate())
        if rho <= 0.0:  # the stream's first round: the best exact arm's rate in it
            timed = exact & (meta.costs > 0)
            rho = float(np.max(tokens[timed] / meta.costs[timed])) if timed.any() else 0.0
        gain = tokens - rho * meta.costs  # [num_arms], in tokens
        mean = float(gain[exact].mean())
        spread = float(np.abs(gain[exact] - mean).max())
        seen = exact if arm_factors is None else arm_factors > 0
        if seen.any():  # scored by a coin: known exactly too
            spread = max(spread, float(np.abs(gain[seen] - mean).max()))
        if not commit:
            return 0.5 + (mean - gain) / (2.0 * max(self.time_scale, spread, 1e-9))
        # This round's tokens and costs feed the fixed arms' rates only after its loss.
        d = self._rate_decay
        if meta.factors is None:  # every arm seen: whole arrays (masks cost more here)
            self._arm_tokens *= d
            self._arm_tokens += tokens
            self._arm_seconds *= d
            self._arm_seconds += meta.costs
            self._query_tokens += tokens
            self._query_seconds += meta.costs
            self._query_rounds += 1.0
        else:
            self._arm_tokens[seen] = d * self._arm_tokens[seen] + tokens[seen]
            self._arm_seconds[seen] = d * self._arm_seconds[seen] + meta.costs[seen]
            self._query_tokens[seen] += tokens[seen]
            self._query_seconds[seen] += meta.costs[seen]
            self._query_rounds[seen] += 1.0
        self.time_scale = max(self.time_scale * self._scale_decay, spread, 1e-9)
        return 0.5 + (mean - gain) / (2.0 * self.time_scale)

    def tokens(self, gamma: np.ndarray, weight: np.ndarray,
               ks: np.ndarray | None = None) -> np.ndarray:
        """Expected tokens per round ``E[min(A, k)] + 1`` of every arm [num_arms] (``ks``
        [num_arms]: each arm's ``k`` for this round instead of its own)."""
        out = np.empty(len(self.k_of_arm))
        if ks is None:
            for k, sel, drafters in self._groups:
                out[sel] = expected_accepted(gamma, weight, k)[drafters] + 1.0
            return out
        # every arm at once: E[min(A, k)] for each k is a prefix sum of the same terms
        m = min(int(ks.max()), gamma.shape[0])
        if m == 0:
            return np.ones(len(ks))
        reach = np.empty((m, gamma.shape[1]))  # [m, N] prod_{j<d} w_j, as expected_accepted
        reach[0] = 1.0
        if m > 1:
            np.cumprod(weight[: m - 1], axis=0, out=reach[1:])
        reach *= gamma[:m]
        prefix = np.zeros((m + 1, gamma.shape[1]))  # [m + 1, N]: row d = E[min(A, d)]
        np.cumsum(reach, axis=0, out=prefix[1:])
        return prefix[np.minimum(ks, m), self.drafter_of_arm] + 1.0
