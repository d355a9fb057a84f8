"""Cost-aware selection: the cost model, the time loss, sub-sampled scoring, k = 0 arms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specmux.costmodel import CostModel, DecayedLine
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.engine import NO_DRAFT, SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError
from specmux.feedback import CounterfactualTracker
from specmux.policies import POLICIES
from specmux.scoring import ScoringPlan
from specmux.types import SamplingParams

from conftest import VOCAB
from stats import assert_distribution, target_first_two

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8]]
KS = [0, 1, 2, 3, 4, 6, 8]


def pool(drafter_models) -> list:
    small, good = drafter_models
    return [HFDrafter(small, name="small"), HFDrafter(good, name="good"),
            NgramDrafter(prompt_lookup_max=3)]


# ------------------------------------------------------------------ cost model


def test_decayed_line_fits_and_forgets() -> None:
    line = DecayedLine(decay=0.5 ** (1 / 10))
    for x in range(1, 50):
        line.observe(x, 2.0 + 0.5 * x)
    a, b = line.coefficients()
    assert math.isclose(a, 2.0, abs_tol=1e-9) and math.isclose(b, 0.5, abs_tol=1e-9)
    for _ in range(200):  # the machine gets busier: the old fit is forgotten
        line.observe(10, 30.0)
    assert abs(line.predict(10) - 30.0) < 1e-3


def test_cost_model_adapts_to_load_and_context() -> None:
    model = CostModel(half_life=20)
    assert math.isnan(model.verify_seconds(3, 100)) and math.isnan(model.throughput())
    for ctx in range(100, 400, 10):
        for n in (1, 5):
            model.observe_verify(n, ctx, 0.1 + 0.01 * n + 1e-4 * ctx)
    assert abs(model.verify_seconds(5, 1000) - (0.15 + 0.1)) < 1e-6  # context term
    assert abs(model.verify_seconds(3, 200) - 0.15) < 1e-6  # interpolated between 1 and 5
    assert model.verify_seconds(9, 200) > model.verify_seconds(5, 200)  # extrapolated up
    before = model.verify_seconds(5, 200)
    for _ in range(100):
        model.observe_verify(5, 200, 2 * before)  # busier machine
    assert abs(model.verify_seconds(5, 200) - 2 * before) < 0.05 * before
    for _ in range(10):
        model.observe_round(3, 0.3)
    assert math.isclose(model.throughput(), 10.0)
    model.observe_draft("lm", 2, 0.1)
    assert math.isclose(model.draft_seconds("lm", 6), 0.3)  # one k seen: proportional
    model.observe_draft("lm", 4, 0.2)
    costs = model.round_seconds([("lm", 4), ("ngram", 4), (NO_DRAFT, 0)], 200)
    assert costs[0] > costs[1] > costs[2] > 0  # an unmeasured drafter drafts for free
    snap = model.snapshot()
    assert math.isclose(snap["throughput"], 10.0) and snap["draft_seconds_per_token"]["lm"] > 0


# ------------------------------------------------------------------ the time loss


def test_time_loss_prefers_best_throughput_not_most_tokens() -> None:
    """Arm 0 accepts 4 of 4 at 0.5 s a round (10 tok/s); arm 1 accepts 2 of 4 at 0.2 s
    (15 tok/s); the no-speculation arm gives 1 token in 0.15 s (6.7 tok/s).  The length
    loss prefers arm 0; the time loss, at any rho between the arms' rates, arm 1."""
    arms = [(0, 4), (1, 4), (0, 0)]
    gamma = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    costs = np.array([0.5, 0.2, 0.15])
    length = CounterfactualTracker(arms, "length", delayed=False).add_round(gamma, gamma)[0]
    assert np.argmin(length) == 0
    for rho in (10.5, 12.0, 14.9):
        tracker = CounterfactualTracker(arms, "time", delayed=False)
        (loss,) = [v for _, v in tracker.add_round_tagged(gamma, gamma, 0, costs=costs, rho=rho)]
        assert np.all((loss >= 0) & (loss <= 1)) and np.argmin(loss) == 1
    with pytest.raises(ValueError, match="costs"):
        CounterfactualTracker(arms, "time").add_round(gamma, gamma)


def test_subsampled_scores_are_unbiased() -> None:
    """A drafter scored with probability 1/4 and factor 4 gets, on average, its exact loss."""
    arms = [(0, 2), (1, 2)]
    rng = np.random.default_rng(0)
    exact, estimated = [], []
    tracker = CounterfactualTracker(arms, "length", delayed=False)
    for _ in range(20_000):
        gamma = (rng.random((3, 2)) < [0.9, 0.6]).astype(float)
        full = CounterfactualTracker(arms, "length", delayed=False).add_round(gamma, gamma)[0]
        coin = rng.random() < 0.25
        seen = gamma.copy()
        if not coin:
            seen[:, 1] = np.nan
        factors = np.array([1.0, 4.0 if coin else 0.0])
        (loss,) = [v for _, v in tracker.add_round_tagged(seen, seen, 0, factors=factors)]
        exact.append(full)
        estimated.append(loss)
    exact_mean, est_mean = np.mean(exact, axis=0), np.mean(estimated, axis=0)
    assert est_mean[0] == pytest.approx(exact_mean[0])
    assert abs(est_mean[1] - exact_mean[1]) < 0.01


# ------------------------------------------------------------------ engine: new arms


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"fixed"}))
def test_greedy_identical_with_k_choices_time_loss_and_subsampled_scoring(
    policy, target_model, drafter_models
) -> None:
    full_info = POLICIES[policy].full_information
    decoder = SpeculativeDecoder(
        target_model, pool(drafter_models), policy, num_speculative_tokens=KS,
        loss="time" if full_info else "length", score_rate=0.3, seed=1,
    )
    assert len(decoder.selector.arms) == 3 * 6 + 1 and decoder.selector.arms[-1].k == 0
    for prompt in PROMPTS:
        out = decoder.generate(prompt, max_new_tokens=40)
        assert out.token_ids == autoregressive_generate(target_model, prompt, 40)
    assert decoder.cost_model.verify  # the model measured something
    assert not math.isnan(decoder.cost_model.throughput())


def test_no_speculation_arm_is_plain_decoding(target_model, drafter_models) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "fixed",
                                 num_speculative_tokens=[0, 4], policy_kwargs={"arm": 3})
    assert decoder.selector.arms[3].drafter == NO_DRAFT
    out = decoder.generate(PROMPTS[0], 12)
    assert out.token_ids == autoregressive_generate(target_model, PROMPTS[0], 12)
    assert len(out.steps) == 12 and all(s.k == 0 and s.drafter == NO_DRAFT for s in out.steps)
    with pytest.raises(ConfigError):
        SpeculativeDecoder(target_model, pool(drafter_models), "hedge", num_speculative_tokens=[0])
    with pytest.raises(ConfigError, match="duplicates"):
        SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                           num_speculative_tokens=[2, 2])
    with pytest.raises(ConfigError, match="score_rate"):
        SpeculativeDecoder(target_model, pool(drafter_models), "hedge", score_rate=0.0)


def test_subsampled_scoring_saves_lm_forward_passes(target_model, drafter_models) -> None:
    """With an expensive drafter never played, it is run along the path on a fraction of the
    rounds only (the plan measures it as expensive after the first scoring run)."""
    calls = {}
    for rate in (1.0, 0.2):
        drafters = pool(drafter_models)
        decoder = SpeculativeDecoder(target_model, drafters, "fixed", num_speculative_tokens=3,
                                     score_all=True, score_rate=rate,
                                     policy_kwargs={"arm": 2})  # ngram plays
        decoder.selector.scoring.expensive_fraction = 0.0  # every timed LM run is "expensive"
        out = decoder.generate(PROMPTS[0], 40)
        assert out.token_ids == autoregressive_generate(target_model, PROMPTS[0], 40)
        calls[rate] = drafters[1].lm.num_forward_calls
    assert calls[0.2] < 0.7 * calls[1.0]


def test_scoring_plan_rejects_bad_rate() -> None:
    with pytest.raises(ValueError):
        ScoringPlan(["a"], rate=1.5)


def test_sampling_with_k_choices_matches_target_distribution(
    target_model, drafter_models
) -> None:
    """10k seeded generations with a no-speculation arm, k choices, the time loss and
    sub-sampled scoring: the first two tokens follow the target's joint law."""
    small, good = drafter_models
    prompt = [3, 1, 4, 1, 5]
    drafters = [HFDrafter(small, "small"), HFDrafter(good, "good"), NgramDrafter(2)]
    decoder = SpeculativeDecoder(target_model, drafters, "hedge", num_speculative_tokens=[0, 1, 3],
                                 loss="time", score_rate=0.5)
    sampling = SamplingParams(temperature=1.0)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(10_000):
        s = SamplingParams(sampling.temperature, seed=seed)
        out = decoder.generate(prompt, max_new_tokens=2, sampling=s)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_accepted_tokens > 1000
    assert len(decoder.stats.drafter_selections) >= 2
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)

