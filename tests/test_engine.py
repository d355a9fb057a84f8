"""The engine: lossless for every drafter x policy, KV-cache reuse, stop rules, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix import SuffixDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError, PromptError, TokenizerMismatchError
from specmux.lm import CachedLM
from specmux.policies import POLICIES
from specmux.types import SamplingParams

from conftest import VOCAB, tiny_lm
from stats import assert_distribution, target_first_two

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [30, 31, 32, 33, 34, 35, 36, 37]]


def pool(drafter_models) -> list:
    small, good = drafter_models
    return [
        HFDrafter(small, name="small"),
        HFDrafter(good, name="good"),
        NgramDrafter(prompt_lookup_max=3),
        SuffixDrafter([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 7, 6]], max_n=3, name="corpus"),
    ]


@pytest.fixture(scope="module")
def references(target_model) -> dict:
    return {tuple(p): autoregressive_generate(target_model, p, 40) for p in PROMPTS}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_identical_to_target_for_every_policy(
    policy, k, target_model, drafter_models, references
) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), policy,
                                 num_speculative_tokens=k, score_all=True, seed=k)
    for prompt in PROMPTS:
        out = decoder.generate(prompt, max_new_tokens=40)
        assert out.token_ids == references[tuple(prompt)]
        assert out.stats.num_output_tokens == 40
    assert decoder.stats.num_drafts < 3 * 40  # some rounds committed more than one token


@pytest.mark.parametrize("index", range(4))
def test_greedy_is_identical_for_every_single_drafter(
    index, target_model, drafter_models, references
) -> None:
    drafter = pool(drafter_models)[index]
    decoder = SpeculativeDecoder(target_model, [drafter], "fixed", num_speculative_tokens=4)
    for prompt in PROMPTS:
        assert decoder.generate(prompt, 40).token_ids == references[tuple(prompt)]


def test_learner_choosing_k_is_lossless(target_model, drafter_models, references) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=[1, 2, 4, 6])
    assert len(decoder.selector.arms) == 16
    for prompt in PROMPTS:
        assert decoder.generate(prompt, 40).token_ids == references[tuple(prompt)]
    played = {decoder.selector.arms[s.arm].k for s in decoder.generate(PROMPTS[0], 40).steps}
    assert played <= {1, 2, 4, 6} and len(played) > 1


def test_good_drafter_is_accepted_and_learned(target_model, drafter_models) -> None:
    # Without the corpus drafter, which would memorize the repeated prompts' outputs.
    decoder = SpeculativeDecoder(target_model, pool(drafter_models)[:3], "hedge",
                                 num_speculative_tokens=4, policy_kwargs={"selection": "argmax"})
    for prompt in PROMPTS * 3:
        decoder.generate(prompt, 40)
    share = decoder.stats.selection_share()
    assert max(share, key=share.get) == "good"
    assert decoder.stats.mean_acceptance_length > 1.5
    # The counterfactual oracle in hindsight is the good drafter, and the regret is small.
    assert decoder.selector.arms[decoder.stats.oracle_arm].drafter == "good"
    assert 0 <= decoder.stats.regret < 0.1 * decoder.stats.num_scored_rounds


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6, top_p=0.9)],
    ids=["t1", "t0.7-topk-topp"],
)
def test_sampling_matches_target_distribution(sampling, target_model, drafter_models) -> None:
    """Over 10k seeded generations, the first two tokens follow the target's joint law."""
    small, good = drafter_models
    prompt = [3, 1, 4, 1, 5]
    drafters = [HFDrafter(small, "small"), HFDrafter(good, "good"), NgramDrafter(2)]
    decoder = SpeculativeDecoder(target_model, drafters, "hedge", num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(10_000):
        s = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, seed=seed)
        out = decoder.generate(prompt, max_new_tokens=2, sampling=s)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_accepted_tokens > 1000  # drafts were really accepted
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))  # first token
    assert_distribution(counts.sum(0), joint.sum(0))  # second token
    assert_distribution(counts, joint)  # both together


def test_kv_cache_feeds_only_new_tokens(target_model, drafter_models) -> None:
    target = CachedLM(target_model, name="target")
    decoder = SpeculativeDecoder(target, pool(drafter_models), "ucb", num_speculative_tokens=4)
    prompt = PROMPTS[0]
    fed = []
    for _ in decoder.generate_steps(prompt, max_new_tokens=200):
        fed.append(target.num_tokens_fed)
    per_round = np.diff([0, *fed])
    steps = decoder.generate(prompt, 1).steps  # warm start check below uses a fresh run
    assert steps
    # First round feeds the prompt (+ draft); later rounds feed the draft plus one token.
    assert per_round[0] <= len(prompt) + 4
    assert per_round[1:].max() <= 4 + 1
    assert target.num_forward_calls >= len(fed)
    assert np.mean(per_round[-10:]) <= np.mean(per_round[1:11]) + 2  # flat in context length


def test_stops_at_eos_and_counts_length(target_model, drafter_models, references) -> None:
    ref = references[tuple(PROMPTS[0])]
    eos = ref[7]
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge", eos_token_ids=[eos])
    out = decoder.generate(PROMPTS[0], 40)
    assert out.token_ids == ref[: ref.index(eos) + 1] and out.finish_reason == "stop"
    out = decoder.generate(PROMPTS[0], 5, stop_token_ids=[])
    assert out.token_ids == ref[:5] and out.finish_reason == "length"


def test_reset_per_query_forgets(target_model, drafter_models) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "ucb", reset_per_query=True)
    decoder.generate(PROMPTS[0], 20)
    first = decoder.selector.policy.state_dict()
    decoder.generate(PROMPTS[1], 20)
    assert decoder.selector.policy.t <= first["t"] + 20
    persistent = SpeculativeDecoder(target_model, pool(drafter_models), "ucb")
    persistent.generate(PROMPTS[0], 20)
    t1 = persistent.selector.policy.t
    persistent.generate(PROMPTS[1], 20)
    assert persistent.selector.policy.t > t1


def test_bad_input_errors(target_model, drafter_models) -> None:
    drafters = pool(drafter_models)
    decoder = SpeculativeDecoder(target_model, drafters, "hedge")
    with pytest.raises(PromptError, match="empty"):
        decoder.generate([], 5)
    with pytest.raises(PromptError, match="context"):
        decoder.generate([1] * 600, 5)  # tiny models have 512 positions
    with pytest.raises(ConfigError, match="max_new_tokens"):
        decoder.generate([1, 2], 0)
    with pytest.raises(ConfigError, match=">= 1"):
        SpeculativeDecoder(target_model, drafters, "hedge", num_speculative_tokens=0)
    with pytest.raises(ConfigError, match="unknown|Unknown"):
        SpeculativeDecoder(target_model, drafters, "nope")
    with pytest.raises(ConfigError, match="unique"):
        SpeculativeDecoder(target_model, [drafters[0], drafters[0]], "hedge")
    with pytest.raises(ConfigError, match="at least one"):
        SpeculativeDecoder(target_model, [], "hedge")
    other_vocab = HFDrafter(tiny_lm(5, vocab=64), name="other")
    with pytest.raises(TokenizerMismatchError, match="vocabulary"):
        SpeculativeDecoder(target_model, [other_vocab], "hedge")


def test_context_limit_stops_with_length(drafter_models) -> None:
    target = tiny_lm(0, hidden=48, max_positions=32)
    decoder = SpeculativeDecoder(target, [NgramDrafter()], "fixed")
    out = decoder.generate(list(range(1, 21)), 100)
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.token_ids == autoregressive_generate(target, list(range(1, 21)), 100)


def test_closing_the_stream_early_still_delivers_delayed_feedback(
    target_model, drafter_models
) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=4)
    steps = decoder.generate_steps(PROMPTS[0], max_new_tokens=40)
    for _ in range(3):
        next(steps)
    assert decoder.selector.tracker.num_pending > 0 or decoder.stats.num_scored_rounds == 3
    steps.close()  # e.g. a client disconnected
    assert decoder.selector.tracker.num_pending == 0
    assert decoder.stats.num_scored_rounds == 3  # every round's losses reached the learner


def test_hedge_scoring_of_a_fully_accepted_lm_draft_costs_no_forward_pass(target_model) -> None:
    """The played LM drafter's path scores come from the rows its draft already computed; the
    bonus position of a fully accepted draft is not scored (no arm needs it)."""
    prompt, fed = PROMPTS[0], {}
    for policy in ("fixed", "hedge"):
        drafter = HFDrafter(target_model, name="copy")  # the target itself: all accepted
        decoder = SpeculativeDecoder(target_model, [drafter], policy, num_speculative_tokens=4)
        result = decoder.generate(prompt, max_new_tokens=40)  # 8 rounds of 4 + bonus
        assert all(s.num_accepted_tokens == s.num_draft_tokens for s in result.steps)
        assert result.token_ids == autoregressive_generate(target_model, prompt, 40)
        fed[policy] = (drafter.lm.num_forward_calls, drafter.lm.num_tokens_fed)
        if policy == "hedge":
            assert all(len(g) == 4 for s in result.steps for g in s.gammas.values())
    assert fed["hedge"] == fed["fixed"]


@pytest.mark.parametrize(("policy", "reads"), [("metasd", True), ("hedge", False)])
def test_greedy_computes_the_target_softmax_only_for_a_learner_that_reads_it(
    policy, reads, target_model, drafter_models,
) -> None:
    """Greedy verification needs only the argmax; MetaSD's block divergence is the one
    reader of the target's softmax, so only MetaSD's rounds carry a divergence."""
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), policy,
                                 num_speculative_tokens=3)
    seen = []
    observe = decoder.selector.observe
    decoder.selector.observe = lambda outcome, *a, **kw: (seen.append(outcome.divergence),
                                                          observe(outcome, *a, **kw))[1]
    decoder.generate(PROMPTS[0], max_new_tokens=12)
    assert decoder.selector.needs_divergence is reads
    known = [d for d in seen if d is not None]  # None also where k was cut to 0
    assert seen and (len(known) > len(seen) // 2 if reads else not known)
    assert all(0.0 <= d <= 1.0 for d in known)
