"""Policies: convergence on a simulated drafter pool, Hedge vs EXP3 regret, state, errors."""

from __future__ import annotations

import doctest
import importlib
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from specmux.errors import ConfigError
from specmux.feedback import CounterfactualTracker
from specmux.policies import POLICIES, Policy, make_policy
from specmux.policies.normalhedge import normalhedge_weights, solve_scale
from specmux.types import Feedback

ALPHA = np.array([0.3, 0.5, 0.8, 0.4, 0.2])  # per-position acceptance probability per drafter
K = 4
ROUNDS = 3000
SEEDS = (0, 1, 2)

# name -> make_policy options; every learner (fixed excluded) and the MetaSD variants.
LEARNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ucb": ("ucb", {}),
    "exp3": ("exp3", {}),
    "metasd": ("metasd", {}),
    "metasd-efficiency": ("metasd", {"reward": "efficiency"}),
    "metasd-discount": ("metasd", {"discount": 0.995}),
    "metasd-window": ("metasd", {"window": 500}),
    "hedge": ("hedge", {}),
    "hedge-argmax": ("hedge", {"selection": "argmax"}),
    "normalhedge": ("normalhedge", {}),
    "banditspec": ("banditspec", {}),
}


def mean_tokens(alpha: np.ndarray, k: int = K) -> np.ndarray:
    """Expected tokens per round, 1 + sum_{d=1..k} alpha^d, per drafter."""
    return 1.0 + sum(alpha**d for d in range(1, k + 1))


def simulate(policy: Policy, seed: int, rounds: int = ROUNDS,
             alpha_after: np.ndarray | None = None) -> np.ndarray:
    """Run ``policy`` on the drafter pool; return the arm played each round [rounds].

    Every position of the generated sequence has one 0/1 acceptance indicator per drafter
    (greedy-style gamma = weight).  The chosen drafter's accepted count is its leading ones
    over ``K`` positions; the verified path is that plus one position.  Full-information
    policies get the tracker's (delayed) loss vectors, bandit ones the realized result.
    ``alpha_after`` switches the pool's probabilities halfway through.
    """
    rng = np.random.default_rng(1000 + seed)
    n = len(ALPHA)
    tracker = CounterfactualTracker([(i, K) for i in range(n)]) if policy.full_information \
        else None
    arms = np.empty(rounds, dtype=int)
    for t in range(rounds):
        alpha = ALPHA if alpha_after is None or t < rounds // 2 else alpha_after
        arm = policy.select()
        hits = (rng.random((K + 1, n)) < alpha).astype(float)  # [K + 1, N]
        accepted = int(np.argmin(np.append(hits[:K, arm], 0.0)))  # leading ones
        path = hits[: accepted + 1]
        losses = tuple(tracker.add_round(path, path)) if tracker else ()
        policy.update(Feedback(arm=arm, k=K, max_k=K, num_draft_tokens=K,
                               num_accepted_tokens=accepted, divergence=float(alpha[arm]),
                               losses=losses))
        arms[t] = arm
    return arms


def regret(arms: np.ndarray) -> float:
    """Expected tokens lost against always playing the best drafter."""
    mu = mean_tokens(ALPHA)
    return float(np.sum(mu.max() - mu[arms]))


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_converges_to_best_drafter(learner: str) -> None:
    name, options = LEARNERS[learner]
    best = int(np.argmax(ALPHA))
    for seed in SEEDS:
        arms = simulate(make_policy(name, len(ALPHA), seed=seed, **options), seed)
        share = float(np.mean(arms[int(0.8 * ROUNDS):] == best))
        assert share >= 0.8, f"{learner} seed {seed}: best arm {share:.1%} of the last 20%"


def test_metasd_variants_track_a_switch() -> None:
    """Halfway, drafter 0 (0.3 -> 0.7) overtakes drafter 2 (0.8 -> 0.6): plain UCB's long
    memory keeps it on drafter 2; the discounted and sliding-window variants move."""
    after = np.array([0.7, 0.5, 0.6, 0.4, 0.2])

    def share(**options: Any) -> float:
        shares = [np.mean(simulate(make_policy("metasd", len(ALPHA), seed=seed,
                                               reward="efficiency", **options),
                                   seed, alpha_after=after)[int(0.8 * ROUNDS):] == 0)
                  for seed in SEEDS]
        return float(np.mean(shares))

    stationary = share()
    for options in ({"discount": 0.995}, {"window": 300}):
        adaptive = share(**options)
        assert adaptive >= 0.7 and adaptive >= stationary + 0.3, (options, adaptive, stationary)


def test_hedge_regret_below_exp3() -> None:
    for seed in SEEDS:
        hedge = regret(simulate(make_policy("hedge", len(ALPHA), seed=seed), seed))
        exp3 = regret(simulate(make_policy("exp3", len(ALPHA), seed=seed), seed))
        assert hedge < 0.5 * exp3, (seed, hedge, exp3)


def feedback(arm: int, accepted: int, num_arms: int, rng: np.random.Generator) -> Feedback:
    losses = tuple(rng.random(num_arms) for _ in range(int(rng.integers(0, 3))))
    return Feedback(arm=arm, k=K, max_k=K, num_draft_tokens=K, num_accepted_tokens=accepted,
                    divergence=float(rng.random()), losses=losses)


@pytest.mark.parametrize(("name", "options"), [(name, {}) for name in sorted(POLICIES)] + [
    ("metasd", {"window": 7}), ("metasd", {"discount": 0.9}), ("hedge", {"eta": 0.5})])
def test_state_dict_json_round_trip(name: str, options: dict[str, Any]) -> None:
    rng = np.random.default_rng(7)
    policy = make_policy(name, 6, seed=3, **options)
    for _ in range(50):
        policy.update(feedback(policy.select(), int(rng.integers(0, K + 1)), 6, rng))
    state = json.loads(json.dumps(policy.state_dict()))
    clone = make_policy(name, 6, seed=99, **options)
    clone.update(feedback(clone.select(), 0, 6, np.random.default_rng(5)))  # stale caches
    clone.probabilities()
    clone.load_state_dict(state)
    assert clone.state_dict() == policy.state_dict()
    np.testing.assert_array_equal(clone.probabilities(), policy.probabilities())
    rng_a, rng_b = np.random.default_rng(8), np.random.default_rng(8)
    for _ in range(30):  # same next selections after the round trip
        arm = policy.select()
        assert clone.select() == arm
        policy.update(feedback(arm, 2, 6, rng_a))
        clone.update(feedback(arm, 2, 6, rng_b))
    with pytest.raises(ConfigError):
        make_policy("fixed" if name != "fixed" else "ucb", 6).load_state_dict(state)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_reset_forgets(name: str) -> None:
    rng = np.random.default_rng(0)
    fresh = make_policy(name, 4)
    policy = make_policy(name, 4)
    for _ in range(40):
        policy.update(feedback(policy.select(), 4 * int(policy.t % 4 == 1), 4, rng))
    policy.reset()
    state, expected = policy.state_dict(), fresh.state_dict()
    state.pop("rng"), expected.pop("rng")
    assert state == expected and policy.t == 0
    np.testing.assert_array_equal(policy.probabilities(), fresh.probabilities())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_probabilities_are_a_distribution(name: str) -> None:
    policy = make_policy(name, 64, seed=1)
    rng = np.random.default_rng(1)
    for _ in range(100):
        probs = policy.probabilities()
        assert probs.shape == (64,) and np.all(probs >= 0) and math.isclose(probs.sum(), 1.0)
        arm = policy.select()
        assert 0 <= arm < 64
        policy.update(feedback(arm, int(rng.integers(0, K + 1)), 64, rng))


@pytest.mark.parametrize(("name", "options"), [
    ("nope", {}), ("hedge", {"eta": 0.0}), ("hedge", {"eta": -1.0}), ("exp3", {"eta": 0.0}),
    ("hedge", {"selection": "best"}), ("normalhedge", {"selection": "best"}),
    ("ucb", {"c": -1.0}), ("ucb", {"beta": 1.0}), ("metasd", {"beta": float("nan")}),
    ("metasd", {"reward": "speed"}), ("metasd", {"discount": 0.0}),
    ("metasd", {"window": 0}), ("metasd", {"window": 5, "discount": 0.9}),
    ("fixed", {"arm": 4}), ("fixed", {"arm": -1}), ("metasd", {"discount": 1.5}),
])
def test_make_policy_rejects_bad_config(name: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_policy(name, 4, **options)


def test_make_policy_unknown_lists_names() -> None:
    with pytest.raises(ConfigError, match="exp3, fixed, hedge, metasd, normalhedge, ucb"):
        make_policy("ucb1", 3)
    with pytest.raises(ConfigError):
        make_policy("ucb", 0)


@pytest.mark.parametrize("module", ["__init__", "fixed", "ucb", "exp3", "metasd", "hedge",
                                    "normalhedge", "banditspec"])
def test_doctests(module: str) -> None:
    name = "specmux.policies" + ("" if module == "__init__" else f".{module}")
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=64))
@example([0.0, 3.040216514443683e-161])  # 0.5 * r**2 is subnormal: only the rescaled check
def test_normalhedge_scale_solves_constraint(regret: list[float]) -> None:
    r = np.asarray(regret)
    pos = np.maximum(r, 0.0)
    probs = normalhedge_weights(r)
    assert math.isclose(probs.sum(), 1.0) and np.all(probs >= 0)
    if not pos.any():
        np.testing.assert_array_equal(probs, np.full(len(r), 1.0 / len(r)))
        return
    assert np.all(probs[pos == 0] == 0)
    for x in (0.5 * pos**2, (pos / pos.max()) ** 2):  # raw (may underflow) and rescaled
        if x.max() > 1e-300:  # c ~ max / (1 + ln N) must be a normal float to be exact
            c = solve_scale(x)
            assert c > 0 and abs(np.mean(np.exp(x / c)) - math.e) <= 1e-6 * math.e


def test_hedge_uniform_until_losses_and_fixed_eta() -> None:
    policy = make_policy("hedge", 3, eta=2.0)
    policy.update(Feedback(arm=0, k=K, max_k=K, num_draft_tokens=K, num_accepted_tokens=0))
    np.testing.assert_array_equal(policy.probabilities(), np.full(3, 1 / 3))
    loss = np.array([1.0, 0.0, 0.5])
    policy.update(Feedback(arm=0, k=K, max_k=K, num_draft_tokens=K, num_accepted_tokens=0,
                           losses=(loss, loss)))
    expected = np.exp(-2.0 * 2 * loss)
    np.testing.assert_allclose(policy.probabilities(), expected / expected.sum())


@pytest.mark.parametrize("name", ["hedge", "normalhedge"])
def test_ahead_ranks_with_the_provisional_losses_and_leaves_the_learner_alone(name: str) -> None:
    """``ahead`` (what :meth:`Selector.select` ranks by) has the provisional losses in; the
    learner's own state does not move, and the copy draws from the learner's random
    stream, as the learner itself would (the selector selects on the copy)."""
    policy = make_policy(name, 4, seed=3)
    policy.update(Feedback(arm=0, k=1, max_k=1, num_draft_tokens=1, num_accepted_tokens=0,
                           losses=(np.array([0.1, 0.2, 0.3, 0.4]),)))
    before = json.dumps(policy.state_dict())
    ahead = policy.ahead([np.array([1.0, 0.0, 0.0, 0.0])] * 3)
    assert np.argmax(policy.probabilities()) == 0 and np.argmax(ahead.probabilities()) != 0
    assert json.dumps(policy.state_dict()) == before
    twin = make_policy(name, 4, seed=3)
    twin.load_state_dict(json.loads(before))
    ahead.select()
    policy.select()  # the stream moved once for the copy's draw: the third draw alike
    twin.select(), twin.select()
    assert policy.rng.random() == twin.rng.random()
