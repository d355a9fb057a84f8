"""The learning loop's home: which arm drafts each round, and what the learner is told.

A :class:`Selector` owns the arms (drafter, k), the policy (:mod:`specmux.policies`), the
counterfactual tracker (:mod:`specmux.feedback`), the selection/regret statistics and the
time its policy takes.  The engine and the regret simulator drive it the same way::

    selector.start_query()
    for each round:
        a = selector.select()                      # before drafting
        ...propose, score, verify, commit...
        selector.observe(Outcome(a, drafted, accepted, divergence, finished),
                         scores)                   # (gamma, w) [n, N] if needs_scores
    selector.end_query()                           # always, also when a query stops early

Contextual selection (``contextual=True``).  Which arm is fastest changes within a query:
where the output copies the prompt, prompt lookup drafts eight tokens for free; elsewhere
the LM drafter wins.  Model-free drafters say, before each round and for a fraction of a
millisecond, whether they have a guess (:meth:`specmux.drafters.base.Drafter.signal`:
0 none, 1 weak, 2 strong).  The selector turns the signals into one context key, *which
drafter is surest, how sure, and whether its guess in the query's previous round was
right* (:meth:`Selector.context_key`: ``1 + 4 * drafter + 2 * (level - 1) + hit``, or
``0`` when no drafter has a guess).  The last bit is the regime: where the output copies a
passage, a right guess is followed by another (86% of the strong-signal rounds after a hit
in issue 11's seventh run, 42% after a miss), while in free text a strong-looking match
is often a coincidence.  Full information gives it for free (every model-free drafter is
scored along every path); bandits know it for the drafter they played.  One learner per
key, each fed the losses of its own rounds only (Hedge over a finite set of contexts: the
regret bound holds per context, against the best arm *for that context*).  A key's
learner plays once it has :data:`CONTEXT_WARMUP` loss vectors (bandits: updates); until
then the global learner, which sees every round, plays for it.

Starting a drafter.  An LM drafter far behind the context first feeds the tokens it lacks
(:data:`~specmux.costmodel.PREFILL_TOKENS`): the whole prompt in a query's first round, or
many rounds it did not run.
That prefill is paid once, not per round, so it is no part of the time loss (one long
prompt would teach a context to avoid the LM on short ones too); it is a known cost of
*this* decision, given to the learner as a hint (:meth:`Selector.worth_starting`): the
prefill's modelled seconds spread over the tokens the query may still produce, added to
the seconds per token of each of the drafter's arms; an arm that then loses to the best
arm of a drafter with nothing to catch up (by its rate in this query, once known) is not
played this round (issue 11's runs 13
and 15: on a 1,100-token multi-turn prompt with 48 tokens to go the LM drafter's prefill
costs 5 s on llama.cpp, more than it saves; on a 150-token code prompt, 0.7 s).  The
learners' weights are untouched; the hint only narrows the arms they choose among.

Feedback to the policy.  Bandit policies learn from the played arm's realized
:class:`Outcome`; full-information policies from loss vectors over all arms, computed by
the tracker from every drafter's scores along the verified path.  Those losses arrive late
(a round's loss is known once ``max_k`` positions past its start are verified), so the ones
still pending when a query ends are delivered by :meth:`Selector.end_query`, the one place
where delayed feedback is flushed: together with the last round's own feedback when the
query finished, or on their own when it was closed early.  The policy sees exactly the same
``Feedback`` sequence either way.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from specmux.costmodel import PREFILL_TOKENS, CostModel
from specmux.errors import ConfigError
from specmux.feedback import CounterfactualTracker, SpanScorer
from specmux.metrics import SpecStats
from specmux.policies import Arm, Policy, make_policy
from specmux.scoring import ScoringPlan
from specmux.types import Feedback

logger = logging.getLogger(__name__)
Scores = tuple[np.ndarray, np.ndarray]  # gamma, w: [n, N] along a round's verified path
NO_DRAFT = "none"  # the drafter name of the no-speculation arm (k = 0)
CONTEXT_WARMUP = 8  # loss vectors (bandits: updates) a context's learner needs to play
CONTEXT_KEYS = "drafter-level-hit"  # the key scheme of :meth:`Selector.context_key` (state)
QUERY_RATE_ROUNDS = 3  # rounds an arm is scored in a query before its rate there counts
PRIOR_ACCEPTANCE = 0.5  # per-token acceptance assumed while the learner ranks all arms alike
PRIOR_PSEUDO_TRIALS = 2.0  # ...worth this many draft-token trials next to a drafter's own


def context_key(signals: Sequence[int | None], hits: Sequence[bool] | np.ndarray) -> int:
    """The key of :meth:`Selector.context_key` from the drafters' ``signals`` and ``hits``
    (each drafter's first guess in the previous round right), both in drafter order.

    >>> context_key([None, 0, 0], [False] * 3), context_key([None, 1, 2], [False, True, True])
    (0, 12)
    """
    best, first = 0, 0
    for i, level in enumerate(signals):
        if level is not None and level > best:
            best, first = min(int(level), 2), i
    return 0 if best == 0 else 1 + 4 * first + 2 * (best - 1) + int(hits[first])


@dataclass(frozen=True)
class Outcome:
    """What one round did with the arm it played (see :class:`specmux.types.Feedback`)."""

    arm: int
    num_draft_tokens: int  # tokens actually drafted (<= the arm's k)
    num_accepted_tokens: int
    divergence: float | None = None  # MetaSD block reward, when the caller computes it
    finished: bool = False  # the query ends with this round
    seconds: float | None = None  # wall clock of select + draft + verify (BanditSpec's reward)
    context: int = 0  # tokens before the round (the cost model's context term)


def make_arms(drafter_names: Sequence[str], ks: int | Sequence[int]) -> list[Arm]:
    """Every drafter with every ``k >= 1``, drafter-major; a ``0`` in ``ks`` adds the
    no-speculation arm ``none@k=0`` last (one target step, one token).  ConfigError on a
    negative or repeated ``k``, or without any ``k >= 1``.

    >>> [str(a) for a in make_arms(["lm", "ngram"], [0, 2, 4])]
    ['lm@k=2', 'lm@k=4', 'ngram@k=2', 'ngram@k=4', 'none@k=0']
    """
    values = [int(ks)] if isinstance(ks, int) else [int(k) for k in ks]
    if not values or min(values) < 0 or max(values) < 1:
        raise ConfigError(
            f"num_speculative_tokens must be >= 1 (0 only next to a k >= 1 in a list), got {ks}")
    if len(set(values)) != len(values):
        raise ConfigError(f"num_speculative_tokens has duplicates: {ks}")
    arms = [Arm(name, k) for name in drafter_names for k in values if k > 0]
    return arms + [Arm(NO_DRAFT, 0)] if 0 in values else arms


class Selector:
    """Arms + policy + counterfactual tracker + statistics: the online learner's state.

    ``arms``: the choices; ``drafter_names`` orders the drafters (the columns of the
    scores), by default in order of first appearance in ``arms``.  ``policy``: a
    :class:`Policy` or a name in :data:`specmux.policies.POLICIES`.  ``loss`` /
    ``delayed_feedback`` configure the tracker.  ``score_all`` (default: the policy is
    full-information) asks the caller for every drafter's scores each round
    (:attr:`needs_scores`).  ``reset_per_query``: forget everything at each query start.
    ``policy_seconds`` accumulates the wall clock of the policy's ``select``/``update``.

    Cost-aware selection (issue 11): ``cost_model`` (:class:`~specmux.costmodel.CostModel`,
    fed by the caller with measured timings) prices every arm; ``loss="time"`` turns it
    into Dinkelbach's tokens-per-second loss; ``score_rate < 1`` scores expensive drafters
    on that share of rounds only (:meth:`plan_scoring`, :mod:`specmux.scoring`).
    ``contextual``: one learner per context key (module docstring; :meth:`select` takes the
    drafters' signals).
    """

    def __init__(
        self,
        arms: Sequence[Arm],
        policy: Policy | str = "hedge",
        *,
        drafter_names: Sequence[str] | None = None,
        loss: str = "length",
        delayed_feedback: bool = True,
        reset_per_query: bool = False,
        score_all: bool | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        cost_model: CostModel | None = None,
        score_rate: float = 1.0,
        contextual: bool = False,
    ) -> None:
        if not arms:
            raise ConfigError("at least one arm is needed")
        if any(arm.k < 0 or (arm.k == 0) != (arm.drafter == NO_DRAFT) for arm in arms) or all(
                arm.k == 0 for arm in arms):
            raise ConfigError(f"every arm needs k >= 1 (k = 0 only for {NO_DRAFT!r}, next to "
                              f"one with k >= 1), got {[str(a) for a in arms]}")
        self.arms = list(arms)
        drafting = [a.drafter for a in arms if a.k > 0]
        names = list(dict.fromkeys(drafting) if drafter_names is None else drafter_names)
        missing = set(drafting) - set(names)
        if missing:
            raise ConfigError(f"arms name unknown drafters {sorted(missing)}")
        self.drafter_names = names
        # arm -> score column (the no-speculation arm reads none: column 0, k = 0)
        self.arm_drafter = [names.index(a.drafter) if a.k else 0 for a in self.arms]
        self.max_k = max(a.k for a in self.arms)
        if not 0.0 < score_rate <= 1.0:
            raise ConfigError(f"score_rate must be in (0, 1], got {score_rate}")
        self.cost_model = cost_model or CostModel()
        self.scoring = ScoringPlan(names, score_rate, seed=seed)
        self._arm_specs = [(a.drafter, a.k) for a in self.arms]
        self._drafts = np.array([a.k > 0 for a in self.arms])  # [num_arms]: not the plain arm
        if isinstance(policy, str):
            policy = make_policy(policy, len(self.arms), seed=seed, **(policy_kwargs or {}))
        if policy.num_arms != len(self.arms):
            raise ConfigError(f"policy has {policy.num_arms} arms, the pool {len(self.arms)}")
        self.policy = policy
        self.needs_scores = policy.full_information if score_all is None else score_all
        if policy.full_information and not self.needs_scores:
            raise ConfigError(f"policy {policy.name!r} needs score_all=True")
        self.tracker = CounterfactualTracker(
            [(self.arm_drafter[a], arm.k) for a, arm in enumerate(self.arms)], loss,
            delayed_feedback,
        )
        self.reset_per_query = reset_per_query
        self.contextual = contextual
        self.contexts: dict[int, Policy] = {}  # context key -> its own learner
        self.context_counts: dict[int, int] = {}  # key -> loss vectors (bandits: updates)
        self._key: int | None = None  # context key of the round being played
        self._lengths: dict[str, int] = {}  # drafter -> tokens it offers this round (max_k)
        # (the _lengths they were computed from, _drafted(), _draft_lengths()): once a round
        self._per_arm: tuple[dict[str, int], Any, np.ndarray | None] = ({}, None, None)
        self._chosen_by = "learner"  # who chose the round's arm: "learner" or "prior"
        self._ruled_out: tuple[str, ...] = ()  # arms worth_starting/drafting ruled out
        # [N]: drafters whose every arm worth_starting ruled out this round (their prefill
        # does not pay): a scoring coin does not pay it either (plan_scoring)
        self._unstarted: np.ndarray | None = None
        self._hits = np.zeros(len(names), dtype=bool)  # [N] last round's first guess right
        # [2, N]: the prior's acceptance evidence per drafter: its right guesses and the
        # positions it was scored on along the verified paths, or, in rounds it was played
        # and not scored, its accepted draft tokens and trials (accepted + first rejection)
        self._evidence = np.zeros((2, len(names)))
        # Scores a drafter over rows of the query's log (set by the engine: deferred scoring)
        self.span_scorer: SpanScorer | None = None
        self.stats = SpecStats()
        self.policy_seconds = 0.0
        # The finished round's feedback, its losses' tags and context key, for end_query.
        self._final: tuple[Feedback, list[int], int | None] | None = None

    @property
    def name(self) -> str:
        return self.policy.name

    def start_query(self, prompt_tokens: int = 0, backlogs: Sequence[int] | None = None,
                    budget: int = 0) -> None:
        """A query starts: forget everything in reset-per-query mode; empty the tracker;
        draw the expensive drafters it watches (``prompt_tokens``: the prompt's length,
        :meth:`ScoringPlan.start_query`; a drafter :meth:`worth_starting` rules out for
        the ``backlogs`` [N] and token ``budget`` counts as one the learner does not play)."""
        if self.reset_per_query:  # a fresh learner: its random stream restarts too
            self.policy.restart()
            self.tracker.forget()
            self.contexts.clear()
            self.context_counts.clear()
            self._evidence[:] = 0.0
        self.tracker.reset()
        self._final = None
        self._hits[:] = False
        if self.needs_scores and self.scoring.rate < 1.0:  # which drafters it watches
            plays = self.policy.probabilities() * self._drafts  # [num_arms]
            allowed = self.worth_starting(backlogs, budget)
            if allowed is not None:
                plays = plays * allowed
            self.scoring.start_query(np.bincount(  # each drafter's share of the plays [N]
                self.arm_drafter, weights=plays, minlength=len(self.drafter_names)),
                prompt_tokens, self.dominated_drafters(prompt_tokens))

    def dominated_drafters(self, context: int) -> np.ndarray:
        """Per drafter [N]: is every one of its arms slower than a plain target step even
        if all it drafts were accepted?  By the cost model, ``(k + 1) / (draft(k) +
        verify(k + 1)) < 1 / verify(1)`` after ``context`` tokens (a drafter not timed yet
        drafts for free: never dominated).

        >>> from specmux.costmodel import CostModel
        >>> model = CostModel()
        >>> for n, sec in [(1, 0.020), (3, 0.040), (5, 0.060)]:
        ...     model.observe_verify(n, 256, sec)
        >>> model.observe_draft("lm", 2, 0.030)
        >>> s = Selector(make_arms(["lm", "ngram"], [2, 4]), cost_model=model)
        >>> s.dominated_drafters(256).tolist()  # lm@2: 3 tokens in 70 ms < 1 in 20 ms
        [True, False]
        """
        model = self.cost_model
        plain = model.verify_seconds(1, context)
        if math.isnan(plain) or plain <= 0.0:
            return np.zeros(len(self.drafter_names), dtype=bool)
        ks = [k for _, k in self._arm_specs]
        best = model.round_seconds(self._arm_specs, context, ks)  # each arm drafting all k
        slower = (np.array(ks) + 1.0) * plain < best  # [num_arms]: even all accepted loses
        fast = np.bincount(self.arm_drafter, weights=self._drafts & ~slower,
                           minlength=len(self.drafter_names))
        mine = np.bincount(self.arm_drafter, weights=self._drafts,
                           minlength=len(self.drafter_names))
        return (mine > 0) & (fast == 0)

    def context_key(self, signals: Sequence[int | None]) -> int:
        """The context of a round from the drafters' signals (one per drafter, in
        :attr:`drafter_names` order; ``None`` for drafters without one): ``0`` when no
        drafter has a guess, else ``1 + 4 * i + 2 * (level - 1) + hit`` for the first
        drafter ``i`` with the highest level, ``hit`` = its first guess in this query's
        previous round was right (module docstring).

        >>> s = Selector(make_arms(["lm", "ngram", "suffix"], 4), contextual=True)
        >>> s.context_key([None, 0, 0]), s.context_key([None, 1, 2]), s.context_key([None, 2, 2])
        (0, 11, 7)
        """
        return context_key(signals, self._hits)

    def select(self, signals: Sequence[int | None] | None = None,
               lengths: Sequence[int | None] | None = None,
               backlogs: Sequence[int] | None = None, remaining: int = 0,
               context: int = 0) -> int:
        """The arm to play this round (an index into :attr:`arms`).  ``signals`` and
        ``lengths``: the drafters' :meth:`~specmux.drafters.base.Drafter.offer` (when
        :attr:`wants_signals`): the context key, and what each arm would draft.
        ``backlogs`` [N] (when :attr:`prices_backlog`) and ``remaining``, the query's token
        budget left: for :meth:`worth_starting`; ``context``: tokens before the round (the
        cost model's context term, for :meth:`prior_arm`)."""
        t0 = time.perf_counter()
        self._key = (self.context_key(signals)
                     if self.contextual and signals is not None else None)
        self._lengths = {} if lengths is None else {
            name: int(n) for name, n in zip(self.drafter_names, lengths, strict=True)
            if n is not None}
        starting = self.worth_starting(backlogs, remaining)  # [num_arms] or None: all
        self._unstarted = None if starting is None else np.bincount(
            self.arm_drafter, weights=starting & self._drafts,
            minlength=len(self.drafter_names)) == 0
        allowed = self.drafting(starting)  # None: all
        playing = self._playing()
        pending = self._provisional(playing)  # the rounds whose losses are on their way
        ranking = playing.ahead(pending) if pending else playing  # type: ignore[attr-defined]
        arm = self.prior_arm(playing, allowed, backlogs, remaining, context, ranking)
        self._chosen_by = "learner" if arm is None else "prior"
        self._ruled_out = () if allowed is None else tuple(
            str(self.arms[i]) for i in np.flatnonzero(~allowed))
        if arm is None:
            arm = (ranking.select() if allowed is None  # the copy draws from playing's rng
                   else ranking.select(allowed))  # type: ignore[call-arg]
        self.policy_seconds += time.perf_counter() - t0
        return arm

    def _provisional(self, playing: Policy) -> list[np.ndarray]:
        """For a full-information learner: the provisional losses of the query's rounds
        still waiting for their window (:meth:`CounterfactualTracker.provisional`), those of
        the playing learner's context when it is a context's (what :meth:`_update` will
        give it).  Selecting as if they had arrived lets a learner leave an arm that keeps
        failing at once rather than ``max_k`` rounds later."""
        if not (playing.full_information and self.needs_scores):
            return []
        pending = self.tracker.provisional()
        if playing is self.policy:
            return [losses for _, losses in pending]
        # a tag's context, decoded as _update_contexts does (a context learner plays only
        # with a key)
        return [losses for tag, losses in pending if tag // len(self.arms) - 1 == self._key]

    def prior_arm(self, playing: Policy, allowed: np.ndarray | None,
                  backlogs: Sequence[int] | None = None, remaining: int = 0,
                  context: int = 0, ranking: Policy | None = None) -> int | None:
        """The prior's arm, where a full-information learner (``"time"`` or ``"length"``
        loss) has no preference of its own (:meth:`_undecided`): at a cold start, while
        the ``playing`` learner ranks every allowed arm the same (no released loss yet: a
        round's loss arrives ``max_k`` positions later, eight plain steps where nothing is
        drafted), among all of them; later, where an argmax learner's ``ranking`` (the
        playing learner with the provisional losses in, :meth:`select`) puts several
        allowed arms first that would play different rounds, among those.

        The prior expects ``(1 - a^(n+1)) / (1 - a)`` tokens of an arm that would draft
        ``n`` this round (a model-free drafter's offer, an LM's ``k``).  ``a``, its
        drafter's per-token acceptance, is :data:`PRIOR_ACCEPTANCE` worth
        :data:`PRIOR_PSEUDO_TRIALS` draft tokens, updated by the positions it was scored
        on along the verified paths when the round was observed (with full information,
        every drafter's guesses, but not those of a deferred scoring run; else the rounds
        it was played: accepted tokens and first rejections): (matches + 2 · 0.5) /
        (positions + 2).  Under the length loss: the most tokens; under the time loss: the
        fewest modelled seconds per token, that round's modelled seconds over its tokens,
        plus its drafter's prefill as :meth:`worth_starting` prices it.  A drafter that
        keeps missing (a head outside its domain) soon yields to one not yet tried, the
        way a bandit's optimism would, while the loss of its rounds is still on its way.
        ``None`` (the learner decides) when it has a preference, for bandits and other
        losses, or while the cost model cannot price a plain step.

        >>> from specmux.costmodel import CostModel
        >>> model = CostModel()
        >>> for n, sec in [(1, 0.20), (3, 0.22), (5, 0.24)]:
        ...     model.observe_verify(n, 100, sec)
        >>> model.observe_draft("lm", 2, 0.05)
        >>> s = Selector(make_arms(["lm", "ngram"], [0, 2, 4]), loss="time", cost_model=model)
        >>> s._lengths = {"ngram": 0}  # prompt lookup offers nothing this round
        >>> str(s.arms[s.prior_arm(s.policy, None, context=100)])  # 1.75 tokens in 0.27 s
        'lm@k=2'
        >>> s = Selector(make_arms(["lm"], [0, 2]), loss="time", cost_model=model)
        >>> for _ in range(2):  # lm@k=2 played twice, its first token rejected both times
        ...     s.observe(Outcome(arm=0, num_draft_tokens=2, num_accepted_tokens=0))
        >>> str(s.arms[s.prior_arm(s.policy, None, context=100)])  # a = 1/4: 1.31 in 0.27 s
        'none@k=0'
        >>> s = Selector(make_arms(["suffix", "lm"], [4]), loss="length")
        >>> s._lengths = {"suffix": 1}  # a one-token match; the LM drafts 4
        >>> str(s.arms[s.prior_arm(s.policy, None)])  # 1.94 tokens expected against 1.5
        'lm@k=4'
        """
        loss = self.tracker.loss
        if not (playing.full_information and loss in ("time", "length")):
            return None
        mask = np.ones(len(self.arms), dtype=bool) if allowed is None else allowed
        mask = self._undecided(playing, ranking, mask) if mask.any() else None
        if mask is None:
            return None
        n = self._draft_lengths().astype(float)
        matches, positions = self._evidence  # [N] each
        a = np.minimum((matches + PRIOR_PSEUDO_TRIALS * PRIOR_ACCEPTANCE)
                       / (positions + PRIOR_PSEUDO_TRIALS), 0.999)[self.arm_drafter]  # [num_arms]
        tokens = (1.0 - a ** (n + 1.0)) / (1.0 - a)  # [num_arms]
        if loss == "length":
            return int(np.argmax(np.where(mask, tokens, -np.inf)))
        plain = self.cost_model.verify_seconds(1, context)
        if not plain > 0.0:  # nan before the first target pass is timed
            return None
        seconds = self.cost_model.round_seconds(self._arm_specs, context, self._drafted())
        per_token = seconds / tokens + self._prefill_surcharge(backlogs, remaining)
        return int(np.argmin(np.where(mask, per_token, np.inf)))

    def _undecided(self, playing: Policy, ranking: Policy | None,
                   mask: np.ndarray) -> np.ndarray | None:
        """The allowed arms (``mask`` [num_arms]) the prior chooses among
        (:meth:`prior_arm`), or ``None`` where the learner decides.  All of them while
        ``playing`` ranks them alike (the cold start: Hedge's cumulative losses,
        NormalHedge's regrets all equal); else, for a learner that plays its most likely
        arm, those its ``ranking`` puts first, when they would play different rounds:
        the length loss ties every arm still matching where the window is not verified
        yet, and a lower index is no reason to pick one.  Arms that would play one and the
        same round (a drafter offering nothing: each of its arms is a plain step) are left
        to the learner, at the cold start too: pricing them all would change nothing (and
        where nothing is ever offered, as in a contextual learner's no-signal context
        without an LM drafter in play, every arm keeps the same loss, so the context stays
        "cold" and the prior would price a plain step in every one of its rounds).  A
        learner that samples draws among its ties itself."""
        preference = playing.preference()  # [num_arms]
        if not preference[mask].max() > preference[mask].min():
            first = mask
        elif ranking is None or getattr(ranking, "selection", None) != "argmax":
            return None
        else:
            preference = ranking.preference()
            top = preference[mask].max()
            first = mask & (preference >= top - 1e-12 * max(1.0, abs(top)))
        lengths = self._draft_lengths()[first]  # [candidates]
        if not lengths.size or not lengths.max() > 0:  # none, or every one a plain step
            return None
        drafters = self.tracker.drafter_of_arm[first]
        same = lengths.min() == lengths.max() and drafters.min() == drafters.max()
        return None if same else first

    def _prefill_surcharge(self, backlogs: Sequence[int] | None, remaining: int) -> np.ndarray:
        """Per arm [num_arms]: its drafter's modelled prefill of ``backlogs`` [N] tokens
        (those past :data:`~specmux.costmodel.PREFILL_TOKENS`) spread over the ``remaining``
        tokens of the query, in seconds per token (0 where nothing to catch up or not
        measured)."""
        extra = np.zeros(len(self.drafter_names))  # [N]
        if backlogs is not None and remaining >= 1:
            for i, backlog in enumerate(backlogs):
                if backlog > PREFILL_TOKENS:
                    seconds = self.cost_model.prefill_seconds(self.drafter_names[i], backlog)
                    extra[i] = seconds / remaining if seconds > 0 else 0.0  # nan: not known
        return extra[self.arm_drafter] * self._drafts

    @property
    def prices_backlog(self) -> bool:
        """Whether :meth:`select` wants the drafters' backlogs: a full-information
        learner with the ``"time"`` loss (its arms' rates price a drafter's start)."""
        return self.policy.full_information and self.tracker.loss == "time"

    def drafting(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """Under the ``"length"`` and ``"acceptance"`` losses, ``allowed`` [num_arms] (bool,
        ``None``: all) less the arms that would draft nothing this round (their drafter
        offers no token: prompt lookup without a match, a draft head before the query's
        first target pass; or ``k = 0``) while another allowed arm drafts: such a round
        commits one token for a target call, which no draft can do worse than, so no
        outcome of it could be better.  The ``"time"`` loss prices them instead (an empty
        proposal is also the cheapest round), and learners without full information keep
        their exploration.  Losses are untouched: only the choice is.

        >>> s = Selector(make_arms(["head", "lm"], 4), loss="length")
        >>> s._lengths = {"head": 0}  # the LM drafts k
        >>> s.drafting(None).tolist()
        [False, True]
        >>> s._lengths = {"head": 0, "lm": 0}
        >>> s.drafting(None) is None  # nobody drafts: the learner's choice
        True
        >>> s = Selector(make_arms(["lm"], [0, 4]), loss="length")
        >>> s._lengths = {}  # no offer (an LM drafts k): only the no-speculation arm is out
        >>> [str(arm) for arm, ok in zip(s.arms, s.drafting(None)) if ok]
        ['lm@k=4']
        """
        if (self.tracker.loss == "time" or not self.needs_scores
                or not self.policy.full_information):
            return allowed
        drafts = self._draft_lengths() > 0  # [num_arms]
        mask = drafts if allowed is None else drafts & allowed
        if not mask.any() or (allowed is None and mask.all()):
            return allowed
        return mask

    def worth_starting(self, backlogs: Sequence[int] | None, remaining: int) -> np.ndarray | None:
        """Which arms are worth their drafter's backlog [num_arms] (bool), or ``None``
        when all are (module docstring).  A drafter that lacks more than
        :data:`~specmux.costmodel.PREFILL_TOKENS` tokens (``backlogs`` [N]) costs
        ``prefill_seconds(backlog) / remaining`` more per token; an arm of it is ruled out
        when its seconds per token so far plus that lose to the best arm's of a drafter
        with no such backlog (the no-speculation arm included), each over this query's
        rounds once it was scored in :data:`QUERY_RATE_ROUNDS` of them, those still
        waiting for their window included at their provisional tokens (a model-free
        drafter is scored every round: in chat it offers nothing, on a multi-turn prompt it
        copies), else over the stream's.  Arms never scored are never ruled out.  (Before
        issue 11's run 46 the query's rate counted once an arm had 8 counterfactual tokens
        released in the query: a drafter that fails at once earns 1 token a round, so the
        LM stayed ruled out for about 8 rounds: 7-11 in six queries of run 45's 14.
        Shrinking the query's rate toward the stream's by 4 pseudo-tokens instead started
        the LM sooner, on summaries and grounded answers too, where prompt lookup pays
        later: run 25, reverted.)

        >>> from specmux.costmodel import CostModel
        >>> model = CostModel()
        >>> model.observe_prefill("lm", 1000, 5.0)  # 5 ms a token
        >>> s = Selector(make_arms(["lm", "suffix"], [8]), loss="time", cost_model=model)
        >>> s.tracker._arm_tokens[:], s.tracker._arm_seconds[:] = [5.6, 1.7], [0.43, 0.205]
        >>> s.worth_starting([1100, 0], remaining=48).tolist()  # 77 + 115 ms > 121 ms
        [False, True]
        >>> s.worth_starting([150, 0], remaining=48) is None  # 77 + 16 ms < 121 ms
        True
        """
        if backlogs is None or remaining < 1 or not self.prices_backlog:
            return None
        surcharge = self._prefill_surcharge(backlogs, remaining)  # [num_arms]
        if not surcharge.any():
            return None
        # [num_arms] (nan: never scored): this query's own rates where known (model-free
        # drafters are scored every round), else the stream's
        per_token = self.tracker.seconds_per_token(query_rounds=QUERY_RATE_ROUNDS)
        free = (surcharge == 0) & np.isfinite(per_token)
        if not free.any():
            return None
        allowed = (surcharge == 0) | ~np.isfinite(per_token) | (
            per_token + surcharge < per_token[free].min())
        return None if allowed.all() else allowed

    @property
    def needs_divergence(self) -> bool:
        """Whether the learner reads MetaSD's block divergence (``Outcome.divergence``)."""
        return self.policy.reads_divergence

    @property
    def wants_signals(self) -> bool:
        """Whether :meth:`select` wants the drafters' offers: for the context key, for the
        ``"time"`` loss, which prices a model-free drafter's arms by the length of the
        proposal it has this round (none: one plain step), and for a full-information
        learner's :meth:`drafting` rule under the other losses."""
        return self.contextual or (self.needs_scores and (
            self.tracker.loss == "time" or self.policy.full_information))

    @property
    def round_choice(self) -> tuple[str, tuple[str, ...]]:
        """How the round last selected was decided: ``"learner"`` or ``"prior"``
        (:meth:`prior_arm`), and the arms :meth:`worth_starting` (the prefill hint) or
        :meth:`drafting` (nothing to draft) ruled out (their names)."""
        return self._chosen_by, self._ruled_out

    @property
    def round_context(self) -> int | None:
        """The context key of the round last selected (``None`` when not contextual)."""
        return self._key

    def _playing(self) -> Policy:
        """The learner that plays this round: its context's, once warmed up."""
        key = self._key
        if key is not None and self.context_counts.get(key, 0) >= CONTEXT_WARMUP:
            return self.contexts[key]
        return self.policy

    def plan_scoring(
        self, arm: int, context: int,
    ) -> tuple[list[bool], np.ndarray | None, list[int]]:
        """Which drafters to run along this round's path (``arm`` was played after
        ``context`` tokens), their importance factors for :meth:`observe`, and the drafters
        to score over the round's window later (only with a :attr:`span_scorer` and a
        delayed ``length``/``time`` loss; :mod:`specmux.scoring`).  A drafter whose every
        arm :meth:`worth_starting` ruled out this round is not run by a coin: its prefill,
        which did not pay for playing it, would be spent on scoring it."""
        played = self.arm_drafter[arm] if self.arms[arm].k else None
        return self.scoring.decide(played, self.cost_model, context, self.defers,
                                   blocked=self._unstarted)

    @property
    def defers(self) -> bool:
        """Whether scoring runs can be deferred: a :attr:`span_scorer` is set and the
        loss is a delayed ``length``/``time`` one (``acceptance`` is known at once)."""
        return (self.span_scorer is not None and self.tracker.delayed
                and self.tracker.loss != "acceptance")

    def observe(self, outcome: Outcome, scores: Scores | None = None,
                factors: np.ndarray | None = None,
                deferred: Sequence[int | tuple[int, int, int]] = ()) -> None:
        """Learn from one round.  ``scores``: every drafter's ``(gamma, w)`` [n, N] along
        the round's verified path, when :attr:`needs_scores` (``nan`` columns for drafters
        :meth:`plan_scoring` skipped or ``deferred``, with their ``factors``).  The losses
        that became known go to the policy with the outcome; a finished round's feedback
        waits for :meth:`end_query`, which adds the still-pending losses to it."""
        released: list[tuple[int, np.ndarray]] = []
        scored = np.zeros(len(self.drafter_names), dtype=bool)  # [N]: guesses on the path
        if scores is not None:
            costs, rho, ks = None, 0.0, None
            if self.tracker.loss == "time":  # modelled seconds per arm [num_arms], tokens/s
                drafted = self._drafted()
                costs = self.cost_model.round_seconds(self._arm_specs, outcome.context,
                                                      drafted)
                rho = self.cost_model.throughput()
                if drafted is not None:
                    ks = self._draft_lengths()
            tag = outcome.arm + len(self.arms) * (0 if self._key is None else 1 + self._key)
            released = self.tracker.add_round_tagged(
                scores[0], scores[1], tag, costs=costs, rho=rho, factors=factors,
                deferred=deferred, scorer=self.span_scorer, ks=ks)
            for tag, losses in released:
                self.stats.record_losses(tag % len(self.arms), losses)
            if len(scores[0]):  # [N]: each drafter's first guess on this round's path
                self._hits = scores[0][0] >= 0.5  # nan (not run): False
                seen = ~np.isnan(scores[0])  # [n, N]: the prior's evidence, every guess
                self._evidence += (np.where(seen, scores[0], 0.0).sum(axis=0), seen.sum(axis=0))
                scored = seen.any(axis=0)
        elif self.arms[outcome.arm].k and outcome.num_draft_tokens:  # bandits: the played one
            self._hits[self.arm_drafter[outcome.arm]] = outcome.num_accepted_tokens > 0
        if (self.arms[outcome.arm].k and outcome.num_draft_tokens
                and not scored[self.arm_drafter[outcome.arm]]):
            accepted = outcome.num_accepted_tokens
            missed = accepted < outcome.num_draft_tokens  # the first rejection: a trial
            self._evidence[:, self.arm_drafter[outcome.arm]] += (accepted, accepted + missed)
        feedback = Feedback(
            arm=outcome.arm, k=self.arms[outcome.arm].k, max_k=self.max_k,
            num_draft_tokens=outcome.num_draft_tokens,
            num_accepted_tokens=outcome.num_accepted_tokens, divergence=outcome.divergence,
            losses=tuple(losses for _, losses in released), seconds=outcome.seconds,
        )
        tags = [tag for tag, _ in released]
        if outcome.finished:
            self._final = (feedback, tags, self._key)
        else:
            self._update(feedback, tags, self._key)

    def _drafted(self) -> list[int | None] | None:
        """Per arm, how many tokens it would have drafted this round, where its drafter
        said what it has (``min(k, offered)``; ``None`` elsewhere); ``None`` without
        offers."""
        if not self._lengths:
            return None
        lengths, drafted, _ = self._per_arm
        if lengths is not self._lengths:  # this round's offers: computed once per round
            drafted = [min(k, self._lengths[d]) if d in self._lengths else None
                       for d, k in self._arm_specs]
            self._per_arm = (self._lengths, drafted, None)
        return drafted

    def _draft_lengths(self) -> np.ndarray:
        """Per arm [num_arms], how many tokens it would draft this round: ``min(k,
        offered)`` where its drafter said, else its ``k`` (do not modify: shared within
        the round)."""
        drafted = self._drafted()
        if drafted is None:
            return self.tracker.k_of_arm
        if self._per_arm[2] is None:
            lengths = np.array([k if n is None else n
                                for n, (_, k) in zip(drafted, self._arm_specs, strict=True)])
            lengths.flags.writeable = False
            self._per_arm = (self._lengths, drafted, lengths)
        return self._per_arm[2]

    def end_query(self) -> None:
        """The query ended (finished, or closed early): deliver the delayed feedback."""
        resolved = self.tracker.flush_tagged(self.span_scorer) if self.needs_scores else []
        for tag, losses in resolved:
            self.stats.record_losses(tag % len(self.arms), losses)
        final, self._final = self._final, None
        flushed = tuple(losses for _, losses in resolved)
        tags = [tag for tag, _ in resolved]
        if final is not None:
            feedback, final_tags, key = final
            self._update(replace(feedback, losses=feedback.losses + flushed),
                         final_tags + tags, key)
        elif resolved and self.policy.full_information:
            self._update(Feedback(
                arm=resolved[-1][0] % len(self.arms), k=0, max_k=self.max_k,
                num_draft_tokens=0, num_accepted_tokens=0, losses=flushed,
            ), tags, None)

    def _update(self, feedback: Feedback, tags: Sequence[int] = (),
                key: int | None = None) -> None:
        """``feedback`` to the global learner; in contextual mode each of its loss vectors
        (tagged by :meth:`observe`) also to its round's context learner, and the played
        arm's outcome to the context ``key`` of this round."""
        t0 = time.perf_counter()
        self.policy.update(feedback)
        if self.contextual:
            self._update_contexts(feedback, tags, key)
        self.policy_seconds += time.perf_counter() - t0

    def _update_contexts(self, feedback: Feedback, tags: Sequence[int],
                         key: int | None) -> None:
        groups: dict[int, list[np.ndarray]] = {}
        for tag, losses in zip(tags, feedback.losses, strict=True):
            if tag >= len(self.arms):  # rounds played without a context carry none
                groups.setdefault(tag // len(self.arms) - 1, []).append(losses)
        full = self.policy.full_information
        if key is not None:  # this round's own outcome (what bandits learn from)
            mine = groups.pop(key, [])
            self._context(key).update(replace(feedback, losses=tuple(mine)))
            self.context_counts[key] += len(mine) if full else 1
        if full:
            for other, losses in groups.items():
                self._context(other).update(replace(feedback, losses=tuple(losses)))
                self.context_counts[other] += len(losses)

    def _context(self, key: int) -> Policy:
        """The learner of context ``key`` (a fresh copy of the global one's kind)."""
        if key not in self.contexts:
            self.contexts[key] = self._fresh_context(key)
            self.context_counts[key] = 0
        return self.contexts[key]

    def _fresh_context(self, key: int) -> Policy:
        """A new learner of the global one's kind, with its own seed for context ``key``."""
        policy = copy.deepcopy(self.policy)
        policy.seed = (int(self.policy.seed) * 1_000_003 + key + 1) % 2**63
        policy.restart()
        return policy

    def probabilities(self) -> np.ndarray:
        """The policy's current selection distribution over arms [num_arms]."""
        return self.policy.probabilities()

    def reset(self) -> None:
        """Forget everything learned and every statistic."""
        self.policy.reset()
        self.contexts.clear()
        self.context_counts.clear()
        self.tracker.reset()
        self.tracker.forget()
        self.stats = SpecStats()
        self._final = None
        self._hits[:] = False
        self._evidence[:] = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The policy's JSON-able learned state (what a server persists); in contextual
        mode with ``"contexts"``: ``{key: {"count": n, "state": policy state}}``."""
        state = self.policy.state_dict()
        if self.contextual:
            state["context_keys"] = CONTEXT_KEYS
            state["contexts"] = {str(key): {"count": self.context_counts[key],
                                            "state": policy.state_dict()}
                                 for key, policy in sorted(self.contexts.items())}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ConfigError if it is for another policy or pool.
        Everything is checked before anything changes."""
        contexts: dict[int, Policy] = {}
        counts: dict[int, int] = {}
        raw = state.get("contexts", {}) if isinstance(state, dict) else {}
        if self.contextual and raw and state.get("context_keys") != CONTEXT_KEYS:
            logger.warning("policy state: its per-context learners use another context key "
                           "(%s); they start afresh", str(state.get("context_keys"))[:40])
            raw = {}
        if self.contextual and raw:
            if not isinstance(raw, dict):
                raise ConfigError("policy state 'contexts' must be a JSON object")
            for name, entry in raw.items():
                key = int(name) if isinstance(name, str) and name.isdigit() else -1
                if not 0 <= key <= 4 * len(self.drafter_names) or not isinstance(entry, dict):
                    raise ConfigError(f"policy state has a bad context {str(name)[:20]!r}")
                count = entry.get("count")
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise ConfigError(f"policy state context {key}: bad count")
                policy = self._fresh_context(key)
                policy.load_state_dict(entry.get("state"))  # type: ignore[arg-type]
                contexts[key], counts[key] = policy, count
        self.policy.load_state_dict(state)
        if self.contextual:
            self.contexts, self.context_counts = contexts, counts
