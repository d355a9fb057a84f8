"""Contextual selection: one learner per drafter-signal context (specmux.selector)."""

from __future__ import annotations

import numpy as np
import pytest

from specmux.bench.runner import BenchConfig, PolicySpec, parse_policy_spec
from specmux.config import SpeculativeConfig
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError
from specmux.policies import POLICIES
from specmux.selector import CONTEXT_WARMUP, Outcome, Selector, make_arms
from specmux.types import SamplingParams

from conftest import VOCAB
from stats import assert_distribution, target_first_two

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [4, 4, 4, 4, 4, 4]]


def pool(drafter_models) -> list:
    small, good = drafter_models
    return [HFDrafter(small, name="small"), HFDrafter(good, name="good"),
            NgramDrafter(prompt_lookup_max=3), SuffixTreeDrafter(name="suffix")]


def _train(selector: Selector, rounds: int) -> None:
    """Two contexts: when drafter ``b`` signals a strong match it is always right and ``a``
    always wrong; without a signal it is the other way round."""
    selector.start_query()
    for t in range(rounds):
        strong = t % 2 == 0
        arm = selector.select([None, 2 if strong else 0])
        gamma = np.array([[0.0, 1.0]] * 2) if strong else np.array([[1.0, 0.0]] * 2)
        selector.observe(Outcome(arm, 1, 0), (gamma, gamma.copy()))
    selector.end_query()


@pytest.mark.parametrize("name", ["hedge", "normalhedge"])
def test_each_context_learns_its_own_best_arm(name: str) -> None:
    arms = make_arms(["a", "b"], 1)
    ctx = Selector(arms, name, contextual=True, seed=0)
    flat = Selector(arms, name, seed=0)
    for s in (ctx, flat):
        _train(s, 400)
    strong, none = ctx.context_key([None, 2]), ctx.context_key([None, 0])
    assert sorted(ctx.contexts) == sorted([strong, none])
    assert ctx.context_counts[strong] >= CONTEXT_WARMUP
    assert ctx.contexts[strong].probabilities()[1] > 0.95  # b where b signals
    assert ctx.contexts[none].probabilities()[0] > 0.95  # a elsewhere
    picks = {key: [ctx.select(sig) for _ in range(50)] for key, sig in
             ((strong, [None, 2]), (none, [None, 0]))}
    assert np.mean(np.array(picks[strong]) == 1) > 0.9
    assert np.mean(np.array(picks[none]) == 0) > 0.9
    # Without contexts the two halves cancel: one learner cannot be right in both.
    assert abs(flat.probabilities()[0] - 0.5) < 0.3
    assert ctx.policy.t == flat.policy.t  # the global learner still sees every round


def test_context_key_says_whether_the_surest_drafter_was_right_last_round() -> None:
    """The key's last bit: the signalling drafter's first guess of the query's previous
    round was right (from its counterfactual scores; bandits: when it was played)."""
    selector = Selector(make_arms(["a", "b"], 1), "hedge", contextual=True)
    selector.start_query()
    arm = selector.select([None, 2])
    keys = [selector.round_context]
    for first_guess_right in (1.0, 0.0, 1.0):
        gamma = np.array([[0.0, first_guess_right], [0.0, 0.0]])
        selector.observe(Outcome(arm, 1, 0), (gamma, gamma.copy()))
        arm = selector.select([None, 2])
        keys.append(selector.round_context)
    assert keys == [7, 8, 7, 8]  # 1 + 4 * 1 + 2 * (2 - 1) + hit
    selector.start_query()  # a new query: no previous round
    assert selector.context_key([None, 2]) == 7
    bandit = Selector(make_arms(["a", "b"], 1), "ucb", contextual=True)
    bandit.start_query()
    bandit.select([None, 1])
    bandit.observe(Outcome(1, 1, 1))  # played b, its draft accepted
    assert bandit.context_key([None, 1]) == 6 and bandit.context_key([1, 0]) == 1


def test_bandits_learn_per_context_from_their_own_rounds() -> None:
    selector = Selector(make_arms(["a", "b"], 1), "ucb", contextual=True)
    selector.start_query()
    for t in range(300):
        strong = t % 2 == 0
        arm = selector.select([None, 2 if strong else 0])
        good = 1 if strong else 0
        selector.observe(Outcome(arm, 1, int(arm == good)))
    selector.end_query()
    assert selector.select([None, 2]) == 1 and selector.select([None, 0]) == 0


def test_context_state_round_trip_and_validation() -> None:
    arms = make_arms(["a", "b"], 1)
    first = Selector(arms, "hedge", contextual=True)
    _train(first, 60)
    state = first.state_dict()
    assert set(state["contexts"]) == {str(k) for k in first.contexts}
    second = Selector(arms, "hedge", contextual=True)
    second.load_state_dict(state)
    assert second.state_dict() == state
    plain = Selector(arms, "hedge")  # a non-contextual selector keeps the global part
    plain.load_state_dict(state)
    assert plain.policy.num_losses == first.policy.num_losses
    for bad in ({"99": {"count": 1, "state": {}}}, {"x": {}}, [1],
                {"1": {"count": -1, "state": state}}, {"1": {"count": 1, "state": {"a": 1}}}):
        with pytest.raises(ConfigError):
            Selector(arms, "hedge", contextual=True).load_state_dict({**state, "contexts": bad})
    legacy = {key: value for key, value in state.items() if key != "context_keys"}
    older = Selector(arms, "hedge", contextual=True)  # a state from before the hit bit
    older.load_state_dict(legacy)
    assert not older.contexts and older.policy.num_losses == first.policy.num_losses
    second.start_query()
    assert second.contexts  # persistent by default
    reset = Selector(arms, "hedge", contextual=True, reset_per_query=True)
    reset.load_state_dict(state)
    reset.start_query()
    assert not reset.contexts and reset.policy.num_losses == 0


def test_drafter_signals() -> None:
    ngram = NgramDrafter(prompt_lookup_max=4)
    assert ngram.signal([1, 2, 3, 9, 1, 2, 3], 4) == 2  # 3-gram matched
    assert ngram.signal([1, 2, 8, 9, 1, 2], 4) == 1  # 2-gram only
    assert ngram.signal([1, 2, 3, 4], 4) == 0
    suffix = SuffixTreeDrafter(name="s")
    suffix.start_query([5, 6, 7, 8, 5, 6, 7])
    assert suffix.signal([5, 6, 7, 8, 5, 6, 7], 4) >= 1
    assert suffix.signal([5, 6, 7, 8, 5, 6, 7, 3], 4) == 0
    assert suffix.learned.num_tokens == 0  # a signal learns nothing


@pytest.mark.parametrize("policy", [*sorted(set(POLICIES) - {"fixed"}), "hedge:argmax"])
def test_greedy_identical_with_contexts(policy, target_model, drafter_models) -> None:
    policy, _, selection = policy.partition(":")
    full_info = POLICIES[policy].full_information
    decoder = SpeculativeDecoder(
        target_model, pool(drafter_models), policy, num_speculative_tokens=[0, 1, 3, 6],
        loss="time" if full_info else "length", score_rate=0.5, seed=2, contextual=True,
        policy_kwargs={"selection": selection} if selection else None,
    )
    keys = set()
    for prompt in PROMPTS * 2:
        out = decoder.generate(prompt, max_new_tokens=30)
        assert out.token_ids == autoregressive_generate(target_model, prompt, 30)
        keys |= {s.context for s in out.steps}
    assert None not in keys and keys <= set(decoder.selector.contexts)
    assert len(keys) >= 2  # rounds with and without a prompt-lookup match


def test_sampling_with_contexts_matches_target_distribution(
    target_model, drafter_models
) -> None:
    """6k seeded generations, contextual time-loss Hedge over an LM drafter, prompt lookup
    and the suffix drafter: the first two tokens follow the target's joint law."""
    small, _ = drafter_models
    prompt = [3, 1, 4, 1, 3, 1]
    drafters = [HFDrafter(small, "small"), NgramDrafter(2), SuffixTreeDrafter(name="suffix")]
    decoder = SpeculativeDecoder(target_model, drafters, "hedge", num_speculative_tokens=[0, 1, 3],
                                 loss="time", score_rate=0.5, contextual=True)
    sampling = SamplingParams(temperature=1.0)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(6_000):
        out = decoder.generate(prompt, 2, SamplingParams(sampling.temperature, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert len(decoder.selector.contexts) >= 2
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts, joint)


def test_config_and_bench_specs() -> None:
    assert SpeculativeConfig.model_validate({"contextual": True}).contextual
    with pytest.raises(ValueError):
        SpeculativeConfig.model_validate({"contextual": "yes"})
    assert parse_policy_spec("hedge:ctx:time") == PolicySpec("hedge", "time", True)
    assert parse_policy_spec("ucb:noctx") == PolicySpec("ucb", None, False)
    assert parse_policy_spec("normalhedge:argmax").selection == "argmax"
    for bad in ("hedge:ctx:ctx", "hedge:time:length", "hedge:fast", "nope:ctx", "fixed",
                "ucb:argmax", "hedge:argmax:sample"):
        with pytest.raises(ConfigError):
            parse_policy_spec(bad)
    with pytest.raises(ConfigError, match="bad policy spec"):
        BenchConfig(policies=("hedge:quick",))
