"""The Selector: one home for arms, policy, counterfactual tracker, stats and timing."""

from __future__ import annotations

import numpy as np
import pytest

from specmux.errors import ConfigError
from specmux.policies import POLICIES, Arm
from specmux.selector import Outcome, Selector, make_arms


def _scores(n: int, num_drafters: int, hit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    gamma = np.full((n, num_drafters), hit)
    return gamma, gamma.copy()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_round_loop_for_every_policy(name: str) -> None:
    selector = Selector(make_arms(["a", "b"], [1, 3]), name, score_all=True, seed=1)
    assert [str(a) for a in selector.arms] == ["a@k=1", "a@k=3", "b@k=1", "b@k=3"]
    assert selector.arm_drafter == [0, 0, 1, 1] and selector.max_k == 3
    selector.start_query()
    for t in range(20):
        arm = selector.select()
        assert 0 <= arm < 4
        k = selector.arms[arm].k
        selector.observe(Outcome(arm, k, k // 2, None, finished=t == 19), _scores(k // 2 + 1, 2))
    selector.end_query()
    assert selector.tracker.num_pending == 0
    assert selector.stats.num_scored_rounds == 20  # every round's losses were delivered
    assert selector.policy.t == 20 and selector.policy_seconds > 0
    assert selector.probabilities().shape == (4,)


def test_end_query_is_where_delayed_feedback_arrives() -> None:
    selector = Selector(make_arms(["a", "b"], 4), "hedge")
    selector.start_query()
    arm = selector.select()
    selector.observe(Outcome(arm, 4, 0), _scores(1, 2))  # 1 of 4 positions known: pending
    assert selector.tracker.num_pending == 1 and selector.policy.num_losses == 0
    assert selector.policy.t == 1  # the realized outcome went to the policy at once
    arm = selector.select()
    selector.observe(Outcome(arm, 4, 0, finished=True), _scores(1, 2))
    assert selector.policy.t == 1  # the finished round waits for end_query...
    selector.end_query()
    assert selector.policy.t == 2  # ...which delivers it with every pending loss
    assert selector.policy.num_losses == 2 and selector.stats.num_scored_rounds == 2


def test_early_close_delivers_pending_losses_once() -> None:
    selector = Selector(make_arms(["a", "b"], 4), "hedge")
    selector.start_query()
    selector.observe(Outcome(selector.select(), 4, 0), _scores(1, 2))
    selector.end_query()  # the client went away
    assert selector.policy.num_losses == 1 and selector.tracker.num_pending == 0
    selector.end_query()  # nothing left: nothing delivered twice
    assert selector.policy.num_losses == 1 and selector.policy.t == 2


def test_state_round_trip_and_reset_per_query() -> None:
    arms = make_arms(["a", "b", "c"], 2)
    first = Selector(arms, "ucb", reset_per_query=True)
    first.start_query()
    for _ in range(5):
        first.observe(Outcome(first.select(), 2, 1))
    second = Selector(arms, "ucb")
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == first.state_dict()
    first.start_query()
    assert first.policy.t == 0  # reset-per-query forgets at the query start
    with pytest.raises(ConfigError):
        Selector(arms, "hedge").load_state_dict(second.state_dict())


def test_bad_arms() -> None:
    with pytest.raises(ConfigError, match=">= 1"):
        make_arms(["a"], [0])  # 0 (no speculation) only next to a k >= 1
    with pytest.raises(ConfigError, match=">= 1"):
        make_arms(["a"], [-1, 2])
    with pytest.raises(ConfigError, match="k = 0"):
        Selector([Arm("a", 0), Arm("a", 2)], "hedge")  # k = 0 is the 'none' arm's alone
    with pytest.raises(ConfigError, match="at least one"):
        Selector([], "hedge")
    with pytest.raises(ConfigError, match="unknown drafters"):
        Selector([Arm("x", 2)], "hedge", drafter_names=["a"])
    with pytest.raises(ConfigError, match="score_all"):
        Selector(make_arms(["a"], 2), "hedge", score_all=False)


def test_a_learner_leaves_a_failing_arm_before_its_losses_arrive() -> None:
    """Delayed losses arrive ``max_k`` positions after a round starts: ``max_k`` rounds
    where every draft fails.  A full-information learner selects as if the provisional
    losses of the pending rounds had arrived, so it leaves a drafter that stopped matching
    within a round or two; a learner fed the released losses only keeps it."""
    def run(provisional: bool) -> list[int]:
        selector = Selector(make_arms(["a", "b"], 8), "hedge",
                            policy_kwargs={"selection": "argmax"})
        if not provisional:
            selector._provisional = lambda playing: []  # type: ignore[method-assign]
        selector.start_query()
        for _ in range(2):  # a matches 8 of 8, b nothing: two losses (windows complete)
            arm = selector.select()
            gamma = np.tile([1.0, 0.0], (9, 1))
            selector.observe(Outcome(arm, 8, 8), (gamma, gamma.copy()))
        assert selector.policy.num_losses == 2 and selector.select() == 0
        played = []
        for _ in range(6):  # now a misses every first token, b matches
            arm = selector.select()
            played.append(arm)
            gamma = np.array([[0.0, 1.0]])
            selector.observe(Outcome(arm, 8, 0), (gamma, gamma.copy()))
        return played

    # pending rounds' b@8 (9 tokens, optimistic) against a@8 (1 token): the third one
    # outweighs a's two good rounds; the first real loss would come after 8 rounds
    assert run(provisional=True) == [0, 0, 0, 1, 1, 1]
    assert run(provisional=False) == [0] * 6


@pytest.mark.parametrize("name", ["hedge", "normalhedge"])
def test_full_information_learner_skips_arms_that_offer_nothing(name: str) -> None:
    """Under the length loss a full-information learner never plays an arm whose drafter
    offers no token this round while another drafts (a bandit keeps its exploration), and
    the no-speculation arm is such an arm; without the rule, some seeds do."""
    def picks(rule: bool) -> list[bool]:
        bad = []
        for seed in range(20):
            selector = Selector(make_arms(["head", "lm"], [0, 4]), name, loss="length",
                                seed=seed)
            assert selector.wants_signals
            selector.prior_arm = lambda *args, **kw: None  # type: ignore[method-assign]
            if not rule:
                selector.drafting = lambda allowed: allowed  # type: ignore[method-assign]
            selector.start_query()
            for r in range(6):
                offered = 0 if r % 3 == 0 else None  # the head has nothing every third round
                spec = selector.arms[selector.select([None, None], [offered, None])]
                bad.append(spec.k == 0 or (offered == 0 and spec.drafter == "head"))
                gamma = np.tile([1.0, 1.0], (5, 1))
                selector.observe(Outcome(selector.arms.index(spec), 4, 4),
                                 (gamma, gamma.copy()))
        return bad

    assert not any(picks(rule=True))
    assert any(picks(rule=False))  # uniform weights before the first loss: some seeds do
    selector = Selector(make_arms(["head", "lm"], [0, 4]), name, loss="length")
    selector._lengths = {}  # no offers (LMs draft k): only the k = 0 arms are out
    out = selector.drafting(None)
    assert out is not None and out.tolist() == [a.k > 0 for a in selector.arms]
    bandit = Selector(make_arms(["head", "lm"], 4), "ucb", loss="length")
    assert not bandit.wants_signals
    bandit._lengths = {"head": 0}
    assert bandit.drafting(None) is None
