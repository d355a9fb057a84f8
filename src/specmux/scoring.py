"""Which drafters to run along the verified path each round (cheap counterfactuals).

Full information (HedgeSpec) runs every drafter along every verified path.  For a model-free
drafter that is a table lookup; for an LM drafter it is a forward pass, which on a CPU costs
a third of a target step whenever a cheap drafter was played.  The plan here:

* the drafters whose measured scoring time (or drafting time per token, if larger) sum,
  cheapest first, to at most ``expensive_fraction`` (1%) of a one-position target pass
  (and any never measured yet) are scored every round, exactly (``factor 1``): the budget
  is for all of them together, so that three draft heads at 2.4% of a step each (bfloat16
  products, issue 11's run 25) do not add 7% to every round;
* the drafter that drafted this round is scored exactly too: its rows come from the draft;
* any other (expensive) drafter is scored on a random ``rate`` of the rounds (an
  independent coin; its factor ``1 / rate`` marks it as a random sample), else its factor
  is 0 and the tracker imputes its arms' losses from the coin rounds
  (:mod:`specmux.feedback`);
* a coin that comes up is **deferred** (``defer=True``, what the engine does): the drafter
  is run once the round's window (``max_k`` positions from its start) is verified, in
  ONE pass over the whole window, which is also the LM drafter's KV catch-up.  Scoring
  the round's own path at once would leave the rest of the window to later rounds, one
  forward pass each, and on a CPU a pass costs about the same for 1 position as for 8.

Keeping an LM drafter ready to be scored also means feeding it every committed token (its
KV catch-up), which costs about as much as scoring it.  So with ``rate < 1`` each expensive
drafter is also **watched** in a query only with probability ``q = min(1, max(1/4,
2 * share))``, ``share`` being the learner's probability of playing it when the query
starts (drawn then, before any of the query's tokens: independent of its paths); in an
unwatched query it is scored only where it is played (coin rounds carry the factor
``1 / (q * rate)``).  A drafter the learner has learned to avoid costs nothing in three
queries of four.  Watching also costs the drafter's prefill of the prompt, so the floor
falls with the prompt's length past ``WATCH_PROMPT_TOKENS``: ``max(1/4 * min(1, 256 /
prompt length), 2 * share)`` (a 1,000-token prompt is watched in one query of sixteen unless
the learner plays the drafter), which keeps the expected prefill spent on watching that of a
256-token prompt.  Within a watched query, a coin does not run a drafter whose every arm
the learner's prefill hint ruled out that round (``Selector.worth_starting``: its prefill
of the prompt would not pay for playing it): the coin would pay that prefill only to score
it (issue 11's run 39: three such coins, 1 to 3 s each, 5% of the learner's run).  A
drafter whose every arm is *dominated* by a plain step is never watched: even
with all ``k`` drafted tokens accepted, ``(k + 1) / (draft(k) + verify(k + 1)) < 1 /
verify(1)`` by the cost model (an LM drafter that costs nearly a target step per token:
0.5B against 1.5B on a GPU, or on llama.cpp with two threads), so no outcome of its
scoring could make it worth playing.

An expensive drafter never scored nor played yet is scored at its first round, as if its
coin had come up (unless dominated, or blocked as above: then at its first round that is
not): until one of its rounds is scored its arms' imputed
losses are a neutral 1/2, which ranks it behind whichever scored arm is best so far.  In
issue 11's twentieth run the first query played draft heads that accepted nothing for 11
rounds while the 0.5B LM drafter, which then accepted 8 of 8, waited for its first coin.

``rate = 1`` scores everything every round (the plain HedgeSpec behaviour).

>>> from specmux.costmodel import CostModel
>>> model = CostModel()
>>> model.observe_verify(1, 100, 0.15)
>>> model.observe_score("lm", 0.06); model.observe_score("ngram", 0.0002)
>>> plan = ScoringPlan(["ngram", "lm"], rate=0.25, seed=0)
>>> [plan.decide(played=0, model=model, context=100)[1] for _ in range(3)]
[array([1., 4.]), array([1., 0.]), array([1., 4.])]
>>> # the LM is expensive: scored in its first round (never scored before), then on a
>>> # quarter of the rounds, weighted 4, unless played
>>> plan.decide(played=1, model=model, context=100)
([True, True], None, [])
>>> plan.decide(played=0, model=model, context=100, defer=True)  # its coin: deferred
([True, False], array([1., 4.]), [1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from specmux.config import seed_entropy
from specmux.costmodel import CostModel

MIN_WATCH = 0.25  # least probability that a query watches an expensive drafter...
WATCH_PROMPT_TOKENS = 256  # ...with a prompt this long or shorter (longer: less, as 1/length)


class ScoringPlan:
    """Decides per round which drafters to score and with which importance factor."""

    def __init__(self, names: Sequence[str], rate: float = 1.0, *,
                 expensive_fraction: float = 0.01, seed: int = 0) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"score rate must be in (0, 1], got {rate}")
        self.names = list(names)
        self.rate = float(rate)
        self.expensive_fraction = float(expensive_fraction)
        self.rng = np.random.default_rng(seed_entropy(seed))  # any 64-bit seed
        self.num_runs = np.zeros(len(self.names), dtype=int)  # scoring runs per drafter
        self.num_skipped = np.zeros(len(self.names), dtype=int)
        self.watch_rate = np.ones(len(self.names))  # q per drafter, this query
        self.watched = np.ones(len(self.names), dtype=bool)

    def start_query(self, shares: Sequence[float] | None = None, prompt_tokens: int = 0,
                    dominated: Sequence[bool] | None = None) -> None:
        """A query starts: draw which drafters it watches (module docstring); ``shares``
        [N] are the learner's probabilities of playing each drafter (``None``: watch
        all); ``prompt_tokens`` the prompt's length (what a watching drafter prefills);
        ``dominated`` [N]: drafters never watched (slower than plain steps at best).

        >>> plan = ScoringPlan(["ngram", "lm"], rate=0.05)
        >>> plan.start_query([0.9, 0.0], prompt_tokens=100); plan.watch_rate.tolist()
        [1.0, 0.25]
        >>> plan.start_query([0.9, 0.0], prompt_tokens=1024); plan.watch_rate.tolist()
        [1.0, 0.0625]
        """
        if self.rate >= 1.0 or shares is None:
            self.watch_rate = np.ones(len(self.names))
        else:
            floor = MIN_WATCH * min(1.0, WATCH_PROMPT_TOKENS / max(1, prompt_tokens))
            self.watch_rate = np.clip(2.0 * np.asarray(shares, dtype=float), floor, 1.0)
            if dominated is not None:
                self.watch_rate[np.asarray(dominated, dtype=bool)] = 0.0
        self.watched = self.rng.random(len(self.names)) < self.watch_rate

    def expensive(self, model: CostModel, context: int) -> list[bool]:
        """Per drafter: outside the budget of exactly scored drafters.  Each drafter's cost
        is the larger of its measured scoring time and the time of one drafting step
        (neither measured: never expensive); cheapest first, drafters are scored every
        round while their costs sum to at most ``expensive_fraction`` of a one-position
        target pass.  One drafting step counts: an LM drafter scored every round must be
        fed every committed token, and a short scoring run of one that is kept up costs
        less than a pass, so that the scoring time alone once let the 0.5B drafter on
        llama.cpp (9 ms runs against a 200 ms target step) be scored every round, its
        prefill of every prompt included.

        >>> model = CostModel()
        >>> model.observe_verify(1, 100, 0.2)  # 2 ms of budget
        >>> for name, sec in [("a", 0.0005), ("b", 0.0012), ("c", 0.0013)]:
        ...     model.observe_score(name, sec)
        >>> ScoringPlan(["c", "b", "a", "new"]).expensive(model, 100)  # a + b fit, not c
        [True, False, False, False]
        """
        step = model.verify_seconds(1, context)
        out = [False] * len(self.names)
        if math.isnan(step):
            return out
        # max over the measured ones (nan: not measured; -1: neither), in plain Python:
        # np.nanmax over three floats took 30 us a drafter, every round
        costs = [max((c for c in (model.score_seconds(name), model.draft_seconds(name, 1))
                      if c == c), default=-1.0) for name in self.names]
        total = 0.0
        for i in sorted(range(len(costs)), key=costs.__getitem__):
            if costs[i] >= 0.0:  # measured
                total += costs[i]
                out[i] = total > self.expensive_fraction * step
        return out

    def decide(
        self, played: int | None, model: CostModel, context: int, defer: bool = False,
        blocked: Sequence[bool] | np.ndarray | None = None,
    ) -> tuple[list[bool], np.ndarray | None, list[int]]:
        """``(run, factors, deferred)``: run drafter i along this round's path?  Its
        importance ``factors`` [N] (``None`` when every drafter is scored exactly); the
        drafters whose coin came up, to be scored over the round's window later
        (``defer``; their ``run`` is ``False``).  ``blocked`` [N]: expensive drafters no
        coin runs this round (factor 0: imputed), as one whose prefill of the prompt the
        learner judged not worth paying (:meth:`specmux.selector.Selector.worth_starting`)."""
        if self.rate >= 1.0:
            self.num_runs += 1
            return [True] * len(self.names), None, []
        dear = self.expensive(model, context)
        run: list[bool] = []
        deferred: list[int] = []
        factors = np.ones(len(self.names))
        for i, is_dear in enumerate(dear):
            if not is_dear or i == played:
                run.append(True)
                continue
            coin = bool(self.watched[i]) and self.rng.random() < self.rate
            # Never scored yet (nor played): scored now, so imputing its arms' losses has
            # a sample of them instead of a neutral 1/2 (module docstring).
            coin = coin or bool(self.num_runs[i] == 0 and self.watch_rate[i] > 0.0)
            coin = coin and not (blocked is not None and blocked[i])
            factors[i] = 1.0 / (self.rate * self.watch_rate[i]) if coin else 0.0
            run.append(coin and not defer)
            if coin and defer:
                deferred.append(i)
        ran = np.array(run, dtype=int)
        ran[deferred] = 1
        self.num_runs += ran
        self.num_skipped += 1 - ran
        return run, None if np.all(factors == 1.0) else factors, deferred
