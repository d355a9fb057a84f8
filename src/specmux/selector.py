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

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from specmux.costmodel import CostModel
from specmux.errors import ConfigError
from specmux.feedback import CounterfactualTracker
from specmux.metrics import SpecStats
from specmux.policies import Arm, Policy, make_policy
from specmux.scoring import ScoringPlan
from specmux.types import Feedback

Scores = tuple[np.ndarray, np.ndarray]  # gamma, w: [n, N] along a round's verified path
NO_DRAFT = "none"  # the drafter name of the no-speculation arm (k = 0)


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
        self.stats = SpecStats()
        self.policy_seconds = 0.0
        self._final: Feedback | None = None  # the finished round's feedback, for end_query

    @property
    def name(self) -> str:
        return self.policy.name

    def start_query(self) -> None:
        """A query starts: forget everything in reset-per-query mode; empty the tracker."""
        if self.reset_per_query:  # a fresh learner: its random stream restarts too
            self.policy.restart()
        self.tracker.reset()
        self._final = None

    def select(self) -> int:
        """The arm to play this round (an index into :attr:`arms`)."""
        t0 = time.perf_counter()
        arm = self.policy.select()
        self.policy_seconds += time.perf_counter() - t0
        return arm

    def plan_scoring(self, arm: int, context: int) -> tuple[list[bool], np.ndarray | None]:
        """Which drafters to run along this round's path (``arm`` was played after
        ``context`` tokens), and their importance factors for :meth:`observe`."""
        played = self.arm_drafter[arm] if self.arms[arm].k else None
        return self.scoring.decide(played, self.cost_model, context, self.tracker.needs)

    def observe(self, outcome: Outcome, scores: Scores | None = None,
                factors: np.ndarray | None = None) -> None:
        """Learn from one round.  ``scores``: every drafter's ``(gamma, w)`` [n, N] along
        the round's verified path, when :attr:`needs_scores` (``nan`` columns for drafters
        :meth:`plan_scoring` skipped, with their ``factors``).  The losses that became known
        go to the policy with the outcome; a finished round's feedback waits for
        :meth:`end_query`, which adds the still-pending losses to it."""
        released: list[tuple[int, np.ndarray]] = []
        if scores is not None:
            costs, rho = None, 0.0
            if self.tracker.loss == "time":  # modelled seconds per arm [num_arms], tokens/s
                costs = self.cost_model.round_seconds(self._arm_specs, outcome.context)
                rho = self.cost_model.throughput()
            released = self.tracker.add_round_tagged(scores[0], scores[1], outcome.arm,
                                                     costs=costs, rho=rho, factors=factors)
            for tag, losses in released:
                self.stats.record_losses(tag, losses)
        feedback = Feedback(
            arm=outcome.arm, k=self.arms[outcome.arm].k, max_k=self.max_k,
            num_draft_tokens=outcome.num_draft_tokens,
            num_accepted_tokens=outcome.num_accepted_tokens, divergence=outcome.divergence,
            losses=tuple(losses for _, losses in released), seconds=outcome.seconds,
        )
        if outcome.finished:
            self._final = feedback
        else:
            self._update(feedback)

    def end_query(self) -> None:
        """The query ended (finished, or closed early): deliver the delayed feedback."""
        resolved = self.tracker.flush_tagged() if self.needs_scores else []
        for tag, losses in resolved:
            self.stats.record_losses(tag, losses)
        final, self._final = self._final, None
        flushed = tuple(losses for _, losses in resolved)
        if final is not None:
            self._update(replace(final, losses=final.losses + flushed))
        elif resolved and self.policy.full_information:
            self._update(Feedback(
                arm=resolved[-1][0], k=0, max_k=self.max_k, num_draft_tokens=0,
                num_accepted_tokens=0, losses=flushed,
            ))

    def _update(self, feedback: Feedback) -> None:
        t0 = time.perf_counter()
        self.policy.update(feedback)
        self.policy_seconds += time.perf_counter() - t0

    def probabilities(self) -> np.ndarray:
        """The policy's current selection distribution over arms [num_arms]."""
        return self.policy.probabilities()

    def reset(self) -> None:
        """Forget everything learned and every statistic."""
        self.policy.reset()
        self.tracker.reset()
        self.stats = SpecStats()
        self._final = None

    def state_dict(self) -> dict[str, Any]:
        """The policy's JSON-able learned state (what a server persists)."""
        return self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ConfigError if it is for another policy or pool."""
        self.policy.load_state_dict(state)
