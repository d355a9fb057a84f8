"""Cost-aware selection: the cost model, the time loss, sub-sampled scoring, k = 0 arms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specmux.costmodel import CostModel, DecayedLine
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.engine import NO_DRAFT, SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError, PromptError
from specmux.feedback import CounterfactualTracker
from specmux.policies import POLICIES
from specmux.scoring import ScoringPlan
from specmux.selector import Outcome, Selector, make_arms
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


def test_subsampled_scores_are_consistent() -> None:
    """A drafter scored on a 1/4 coin: its unscored rounds get the mean of its coin rounds'
    losses, so its losses average to the exact ones."""
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
    # No start-up calibration: it would show at once that drafting never pays on these
    # tiny models, and this test needs drafts (their costs are learned as the rounds go).
    decoder.selector.cost_model.observe_verify(1, 5, 0.01)
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



def test_sampling_with_start_up_calibration_matches_target_distribution(
    target_model, drafter_models, monkeypatch
) -> None:
    """Start-up calibration runs the target and the LM drafters on the prompt's first
    tokens (their KV caches then serve the query's prefill).  Calibrating before every
    query, with a cost model then set to favour drafting so that drafts happen, 5k seeded
    generations still follow the target's joint law of the first two tokens."""
    calibrate = SpeculativeDecoder._calibrate

    def calibrate_then_favour_drafting(self, prompt_ids) -> None:
        calibrate(self, prompt_ids)
        model = self.selector.cost_model
        model.reset()
        for n in range(1, 5):  # verification as cheap for 4 positions as for 1
            model.observe_verify(n, len(prompt_ids), 0.01)
        for d in self.drafters:
            model.observe_draft(d.name, 1, 1e-5)

    monkeypatch.setattr(SpeculativeDecoder, "_wants_calibration", lambda self: True)
    monkeypatch.setattr(SpeculativeDecoder, "_calibrate", calibrate_then_favour_drafting)
    small, good = drafter_models
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8]  # 16 calibrate
    decoder = SpeculativeDecoder(target_model, [HFDrafter(small, "small"),
                                                HFDrafter(good, "good"), NgramDrafter(2)],
                                 "hedge", num_speculative_tokens=[0, 1, 3], loss="time",
                                 score_rate=0.5)
    calls = decoder.drafters[0].lm.num_forward_calls
    sampling = SamplingParams(temperature=1.0)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(5_000):
        out = decoder.generate(prompt, max_new_tokens=2,
                               sampling=SamplingParams(sampling.temperature, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.drafters[0].lm.num_forward_calls >= calls + 3 * 5_000  # calibrated each
    assert decoder.stats.num_accepted_tokens > 500
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)


# ------------------------------------------------------------------ round 3: robust costs,
# proposal lengths, the best fixed arm's rate, deferred scoring


def test_cost_model_clips_one_off_stalls_and_prices_short_proposals() -> None:
    model = CostModel(half_life=64)
    for _ in range(20):
        for n in (1, 5, 9):
            model.observe_verify(n, 100, 0.1 + 0.01 * n)
    model.observe_verify(9, 100, 5.0)  # one stall of 25x: counts as 3x at most
    assert model.verify_seconds(9, 100) < 0.25  # unclipped: 0.46
    assert model.proposal_length("suffix", 8) == 8.0  # unmeasured: k
    for drafted in (2, 4, 0, 0):  # empty proposals are not counted
        model.observe_proposal("suffix", 8, drafted)
    assert model.proposal_length("suffix", 8) == pytest.approx(3.0, rel=0.02)
    arms = [("suffix", 8), ("lm", 8), (NO_DRAFT, 0)]
    costs = model.round_seconds(arms, 100)
    assert costs[0] == pytest.approx(0.14, rel=0.05)  # a 4-position pass, not 9
    idle = model.round_seconds(arms, 100, drafted=[0, None, None])
    assert idle[0] == pytest.approx(idle[2])  # nothing to offer: one plain step
    assert "suffix@8" in model.snapshot()["proposal_length"]


def test_engine_leaves_the_prefill_round_out_of_the_cost_model(
    target_model, drafter_models
) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=[0, 2, 4], loss="time")
    decoder.warmup()  # calibration, on its own tokens
    model, contexts = decoder.cost_model, []
    observe = model.observe_verify

    def spy(positions: int, context: int, seconds: float) -> None:
        contexts.append(context)
        observe(positions, context, seconds)

    model.observe_verify = spy
    decoder.generate(PROMPTS[0], max_new_tokens=12)
    assert contexts and min(contexts) > len(PROMPTS[0])  # no pass right after the prompt


def test_time_loss_rho_starts_at_the_best_fixed_arm() -> None:
    """With rho from the learner's own (poor) throughput alone, an expensive arm that gives
    many tokens looks best; the best fixed arm's rate, known from the counterfactuals,
    corrects it: arm 1 (2 tokens in 0.1 s, 20 tok/s) beats arm 0 (5 tokens in 0.5 s)."""
    arms = [(0, 4), (1, 4)]
    gamma = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    costs = np.array([0.5, 0.1])
    tracker = CounterfactualTracker(arms, "time", delayed=False)
    first = tracker.add_round_tagged(gamma, gamma, 0, costs=costs, rho=2.0)[0][1]
    assert np.argmin(first) == 0  # rho = 2 tok/s: 5 - 1 > 2 - 0.2
    assert tracker.best_fixed_rate() == pytest.approx(20.0)
    second = tracker.add_round_tagged(gamma, gamma, 0, costs=costs, rho=2.0)[0][1]
    assert np.argmin(second) == 1  # rho = 20: 5 - 10 < 2 - 2
    tracker.forget()
    assert tracker.best_fixed_rate() == 0.0 and tracker.time_scale == 0.0
    # The stream's first round knows no rate at all (rho = 0): the round's best exact
    # arm's rate stands in, not the length loss that would prefer the 0.5 s arm.
    fresh = tracker.add_round_tagged(gamma, gamma, 0, costs=costs, rho=0.0)[0][1]
    assert np.argmin(fresh) == 1 and fresh[0] > fresh[1]


def test_one_coin_round_does_not_decide_the_imputed_losses() -> None:
    """Run 7 of issue 11: the stream's first round was the LM drafter's only coin round for
    a long time, and its loss was imputed to every later round where the LM was not
    scored.  Shrunk toward the mean of every scored round, one coin moves the estimate
    only part of the way; a dozen decide it."""
    arms = [(0, 2), (1, 2)]
    tracker = CounterfactualTracker(arms, "length", delayed=False)
    good, bad = np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])
    missing = good.copy()
    missing[:, 1] = np.nan

    def imputed() -> float:
        (loss,) = [v for _, v in tracker.add_round_tagged(
            missing, missing, 2, factors=np.array([1.0, 0.0]))]
        return float(loss[1])

    for _ in range(20):  # drafter 1 played and bad (loss 2/3), scored exactly
        tracker.add_round_tagged(bad, bad, 3, factors=np.array([1.0, 1.0]))
    tracker.add_round_tagged(good, good, 2, factors=np.array([1.0, 20.0]))  # one lucky coin
    after_one = imputed()
    assert 0.0 < after_one < 0.5 * 2 / 3  # pulled toward the coin, not onto it
    for _ in range(12):
        tracker.add_round_tagged(good, good, 2, factors=np.array([1.0, 20.0]))
    assert imputed() < 0.1 * after_one


def test_time_loss_scale_forgets_an_outlier() -> None:
    arms = [(0, 2), (1, 2)]
    tracker = CounterfactualTracker(arms, "time", delayed=False)
    gamma = np.array([[1.0, 0.0], [1.0, 0.0]])
    tracker.add_round_tagged(gamma, gamma, 0, costs=np.array([50.0, 0.0]), rho=1.0)
    outlier = tracker.time_scale
    for _ in range(2000):
        tracker.add_round_tagged(gamma, gamma, 0, costs=np.array([0.1, 0.1]), rho=1.0)
    assert outlier > 20 and tracker.time_scale == pytest.approx(1.0)  # the usual spread


@pytest.mark.parametrize("loss", ["length", "time"])
def test_deferred_scoring_gives_the_same_losses_as_scoring_every_row(loss) -> None:
    """Drafter 1 is coin-scored.  Giving the tracker its column over every row at once, or
    leaving it out and letting the tracker ask for it over each coin round's window in
    one call, releases the same loss vectors in the same order."""
    arms = [(0, 2), (0, 4), (1, 2), (1, 4)]
    rng = np.random.default_rng(3)
    truth = (rng.random((400, 2)) < [0.8, 0.6]).astype(float)  # per position scores
    calls: list[tuple[int, int, int]] = []

    def scorer(drafter: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((drafter, lo, hi))
        return truth[lo:hi, drafter], truth[lo:hi, drafter]

    full = CounterfactualTracker(arms, loss)
    deferred = CounterfactualTracker(arms, loss)
    out_full, out_deferred, row = [], [], 0
    costs = np.array([0.3, 0.5, 0.2, 0.3])
    while row < 380:
        n = int(rng.integers(1, 5))
        coin = rng.random() < 0.3
        factors = np.array([1.0, 1.0 / 0.3 if coin else 0.0])
        rows = truth[row : row + n]
        kwargs = {"costs": costs, "rho": 5.0, "factors": factors}
        out_full += full.add_round_tagged(rows, rows, row, **kwargs)
        partial = rows.copy()
        partial[:, 1] = np.nan
        out_deferred += deferred.add_round_tagged(partial, partial, row, **kwargs,
                                                  deferred=[1] if coin else [],
                                                  scorer=scorer)
        row += n
    out_full += full.flush_tagged()
    out_deferred += deferred.flush_tagged(scorer)
    assert [t for t, _ in out_full] == [t for t, _ in out_deferred]
    np.testing.assert_allclose(np.array([v for _, v in out_full]),
                               np.array([v for _, v in out_deferred]))
    assert calls and all(hi - lo <= 2 * 4 for _, lo, hi in calls)
    with pytest.raises(ValueError, match="scorer"):
        CounterfactualTracker(arms, loss).add_round_tagged(
            truth[:2], truth[:2], 0, costs=costs, deferred=[1])


def test_deferred_scoring_runs_the_lm_once_per_coin(
    target_model, drafter_models, monkeypatch
) -> None:
    """The expensive drafter is never played: each coin costs at most one run of it over
    the coin round's window, and greedy output stays the target's."""
    monkeypatch.setattr("specmux.scoring.MIN_WATCH", 1.0)  # every query watches it
    drafters = pool(drafter_models)
    decoder = SpeculativeDecoder(target_model, drafters, "fixed", num_speculative_tokens=3,
                                 score_all=True, score_rate=0.3, loss="time", seed=2,
                                 policy_kwargs={"arm": 2})  # ngram plays
    decoder.selector.scoring.expensive_fraction = 0.0
    decoder.selector.cost_model.observe_verify(1, 10, 0.01)  # no calibration passes
    for prompt in PROMPTS:
        out = decoder.generate(prompt, 40)
        assert out.token_ids == autoregressive_generate(target_model, prompt, 40)
    runs = int(decoder.selector.scoring.num_runs[1])  # coins, and exact runs while unmeasured
    skipped = int(decoder.selector.scoring.num_skipped[1])
    assert runs > 3 and skipped > runs
    assert drafters[1].lm.num_forward_calls <= runs


def test_played_lm_scores_its_bonus_row_later_without_an_extra_pass(
    target_model, drafter_models
) -> None:
    """After a fully accepted LM draft the bonus position's row is deferred: the next
    proposal computes it (the LM is played every round here), and the losses are the ones
    scoring every row at once gives, except that a query's last round has no next proposal:
    its bonus row stays unknown (a miss), which only the played drafter's longer arms
    (good@2, good@4) can feel."""
    results = {}
    for defer in (False, True):
        drafters = pool(drafter_models)
        decoder = SpeculativeDecoder(target_model, drafters, "fixed",
                                     num_speculative_tokens=[1, 2, 4], score_all=True,
                                     loss="length",  # the time loss depends on timings
                                     policy_kwargs={"arm": 3})  # good@k=1: often all accepted
        decoder.selector.scoring.expensive_fraction = 0.0 if defer else math.inf
        outs = [decoder.generate(p, 40).token_ids for p in PROMPTS]
        assert outs == [autoregressive_generate(target_model, p, 40) for p in PROMPTS]
        results[defer] = (drafters[1].lm.num_forward_calls, decoder.stats.arm_loss_sum,
                          decoder.stats.num_scored_rounds)
    (calls_now, losses_now, rounds_now), (calls_later, losses_later, rounds_later) = (
        results[False], results[True])
    assert rounds_now == rounds_later
    longer = [4, 5]  # good@2, good@4 (arms: drafter-major over k = 1, 2, 4)
    rest = [i for i in range(len(losses_now)) if i not in longer]
    np.testing.assert_allclose(losses_later[rest], losses_now[rest], atol=1e-12)
    assert np.all(losses_later[longer] >= losses_now[longer] - 1e-12)
    assert np.all(losses_later[longer] - losses_now[longer] <= 0.5 * len(PROMPTS) + 1e-12)
    assert calls_later < 0.8 * calls_now


def test_a_played_lm_bonus_row_is_left_unknown_rather_than_paid(
    target_model, drafter_models
) -> None:
    """The rows past a played LM's fully accepted draft come free from its next proposal;
    where the LM was not played again, they stay unknown (nan) and cost no forward pass,
    while a coin's rows (not optional) are run."""
    from specmux.engine import _RowLog

    drafters = pool(drafter_models)
    decoder = SpeculativeDecoder(target_model, drafters, "fixed", num_speculative_tokens=3,
                                 score_all=True)
    prompt, path = PROMPTS[0], [4, 5, 6]
    log_ = decoder._log = _RowLog(list(prompt), SamplingParams())
    log_.add(0, len(prompt), len(path), None)
    log_.tokens = [*prompt, *path]
    log_.optional = {(0, 1), (0, 2)}
    lm = drafters[0].lm
    calls = lm.num_forward_calls
    gamma, weight = decoder._score_span(0, 1, 3)
    assert np.isnan(gamma).all() and np.isnan(weight).all()
    assert lm.num_forward_calls == calls  # nothing run
    gamma, _ = decoder._score_span(0, 0, 3)  # row 0 is a coin's: the span is run
    assert not np.isnan(gamma).any() and lm.num_forward_calls > calls
    calls = lm.num_forward_calls
    gamma, _ = decoder._score_span(0, 1, 3)  # the LM has the tokens now: free rows, known
    assert not np.isnan(gamma).any()
    log_.prune(2)
    assert log_.optional == {(0, 2)}


def watch_rarely_played_lm(plan: ScoringPlan, prompt_tokens: int, watch: float,
                           rounds: int) -> tuple[list[float], int, int]:
    """4,000 queries of ``rounds`` rounds where ngram plays and the LM (played 1% of the
    time) is expensive: the LM's importance factors, coin runs and watched queries."""
    model = CostModel()
    model.observe_verify(1, 100, 0.2)
    model.observe_score("lm", 0.1)
    factors, runs, watched = [], 0, 0
    for _ in range(4000):
        plan.start_query([0.99, 0.01], prompt_tokens=prompt_tokens)
        assert plan.watch_rate[1] == pytest.approx(watch)
        watched += bool(plan.watched[1])
        for _ in range(rounds):
            _, f, deferred = plan.decide(played=0, model=model, context=100, defer=True)
            factors.append(1.0 if f is None else f[1])
            runs += bool(deferred)
    return factors, runs, watched


def test_watched_queries_keep_coin_factors_unbiased() -> None:
    """An expensive drafter the learner rarely plays is watched in a quarter of the queries;
    its mean importance factor over many rounds stays 1 (unbiased losses), and it is
    scored in about ``rate / 4`` of the rounds."""
    plan = ScoringPlan(["ngram", "lm"], rate=0.2, seed=5)
    factors, runs, _ = watch_rarely_played_lm(plan, 0, 0.25, rounds=10)
    assert np.mean(factors) == pytest.approx(1.0, abs=0.06)
    assert runs / len(factors) == pytest.approx(0.05, abs=0.006)
    plan.start_query([0.1, 0.9])  # a drafter it plays often: watched in every query
    assert plan.watch_rate[1] == 1.0 and plan.watched[1]


def test_long_prompts_are_watched_less_and_stay_unbiased(
    target_model, drafter_models, monkeypatch
) -> None:
    """Watching costs the drafter's prefill: past ``WATCH_PROMPT_TOKENS`` the floor falls
    as 1 / prompt length, the coin factors stay unbiased, and the engine passes the
    prompt's length."""
    plan = ScoringPlan(["ngram", "lm"], rate=0.5, seed=3)
    factors, _, watched = watch_rarely_played_lm(plan, 1024, 0.0625, rounds=4)
    assert watched / 4000 == pytest.approx(0.0625, abs=0.012)
    assert np.mean(factors) == pytest.approx(1.0, abs=0.15)
    plan.start_query([0.99, 0.01], prompt_tokens=256)
    assert plan.watch_rate[1] == pytest.approx(0.25)
    monkeypatch.setattr("specmux.scoring.WATCH_PROMPT_TOKENS", 2)
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "fixed",
                                 num_speculative_tokens=3, score_all=True, score_rate=0.3,
                                 loss="time", policy_kwargs={"arm": 2})
    # No calibration: its measured LM timings can make the LM dominated on a busy machine
    # (never watched, rate 0), which is not what this checks.
    decoder.selector.cost_model.observe_verify(1, 10, 0.01)
    decoder.generate(PROMPTS[0], 4)
    assert decoder.selector.scoring.watch_rate[1] == pytest.approx(0.5 / len(PROMPTS[0]))


def test_time_loss_counts_a_short_proposal_as_what_it_would_draft() -> None:
    """A model-free drafter offering 2 tokens this round: its k = 8 arm is worth at most 3
    tokens (its later per-position guesses do not count) and costs a 3-position pass."""
    arms = [(0, 8), (1, 8)]
    gamma = np.ones((8, 2))
    tracker = CounterfactualTracker(arms, "time", delayed=False)
    assert tracker.tokens(gamma, gamma).tolist() == [9.0, 9.0]
    assert tracker.tokens(gamma, gamma, np.array([2, 8])).tolist() == [3.0, 9.0]
    model = CostModel()
    for n in (1, 3, 9):
        model.observe_verify(n, 10, 0.1 * n)
    short = model.round_seconds([("suffix", 8), ("suffix", 2)], 10, drafted=[2, 2])
    assert short.tolist() == pytest.approx([0.3, 0.3])


def test_model_free_drafters_offer_their_signal_and_length() -> None:
    from specmux.drafters.suffix_tree import SuffixTreeDrafter

    ngram = NgramDrafter(prompt_lookup_max=3)
    assert ngram.offer([5, 6, 7, 8, 9, 5, 6, 7], 8) == (2, 5)  # 8 9 5 6 7
    assert ngram.offer([1, 2, 3], 8) == (0, 0)
    tree = SuffixTreeDrafter(name="t")
    tree.start_query([1, 2, 3, 4, 5, 9, 1, 2, 3])
    level, length = tree.offer([1, 2, 3, 4, 5, 9, 1, 2, 3], 4)
    assert level == tree.signal([1, 2, 3, 4, 5, 9, 1, 2, 3], 4) and 1 <= length <= 4
    assert HFDrafter.offer is not NgramDrafter.offer  # LM drafters: (None, None)


def test_imputed_losses_follow_the_context_and_ignore_played_rounds() -> None:
    """Drafter 1 is good in context 0 and bad in context 1; it is scored by coins in both,
    and exactly where it is played (context 1 only, where it looked good by chance): its
    imputed losses are per context and not pulled toward the played rounds."""
    arms = [(0, 2), (1, 2)]
    tracker = CounterfactualTracker(arms, "length", delayed=False)
    rng = np.random.default_rng(0)
    out = {0: [], 1: []}
    for _ in range(3000):
        key = int(rng.integers(2))
        good = key == 0
        row = np.array([[1.0, 1.0 if good else 0.0], [1.0, 1.0 if good else 0.0]])
        coin, played = rng.random() < 0.1, key == 1 and rng.random() < 0.3
        seen = row.copy()
        if not (coin or played):
            seen[:, 1] = np.nan
        factors = np.array([1.0, 10.0 if coin and not played else 1.0 if played else 0.0])
        if played:  # a lucky round where it was played
            seen[:, 1] = row[:, 1] = 1.0
        tag = (1 if played else 0) + 2 * (1 + key)
        (loss,) = [v for _, v in tracker.add_round_tagged(seen, seen, tag, factors=factors)]
        if not (coin or played):
            out[key].append(loss[1])
    # Shrinkage toward all scored rounds (one pseudo-round) pulls a little, no more.
    assert np.mean(out[0]) == pytest.approx(0.0, abs=0.025)  # 3 of 3 tokens: loss 0
    assert np.mean(out[1]) == pytest.approx(2 / 3, abs=0.025)  # 1 of 3: not the played 0


def test_a_drafter_slower_than_plain_steps_at_best_is_never_watched(
    target_model, drafter_models, monkeypatch
) -> None:
    """An LM drafter that costs more per drafted token than a target step can never beat
    plain decoding (even fully accepted): the selector marks it dominated, and the scoring
    plan never watches it, so it costs no pass where it is not played."""

    def selector(draft_per_token: float) -> Selector:
        model = CostModel()
        for n in range(1, 10):
            model.observe_verify(n, 100, 0.100 + 0.010 * n)
        for k in (2, 4, 8):
            model.observe_draft("lm", k, draft_per_token * k)
        return Selector(make_arms(["lm", "ngram"], [0, 2, 4, 8]), "hedge", cost_model=model,
                        score_rate=0.05, loss="time", drafter_names=["lm", "ngram"])

    slow, cheap = selector(0.120), selector(0.030)
    assert slow.dominated_drafters(100).tolist() == [True, False]
    assert cheap.dominated_drafters(100).tolist() == [False, False]
    slow.start_query(100)
    cheap.start_query(100)
    assert slow.scoring.watch_rate[0] == 0.0 and not slow.scoring.watched[0]
    assert cheap.scoring.watch_rate[0] == pytest.approx(6 / 7)  # 2 x its share (3 of 7 arms)
    assert selector(0.120).dominated_drafters(100).tolist() == [True, False]

    monkeypatch.setattr(Selector, "dominated_drafters",
                        lambda self, context: np.array([True, False, False]))
    monkeypatch.setattr("specmux.scoring.MIN_WATCH", 1.0)  # would watch every query
    drafters = pool(drafter_models)
    decoder = SpeculativeDecoder(target_model, drafters, "fixed", num_speculative_tokens=3,
                                 score_all=True, score_rate=0.5, loss="time",
                                 policy_kwargs={"arm": 2})  # ngram plays
    decoder.selector.scoring.expensive_fraction = 0.0
    decoder.selector.cost_model.observe_score("small", 1.0)  # known to be expensive
    decoder.selector.cost_model.observe_verify(1, 10, 0.01)  # no calibration passes
    for prompt in PROMPTS:
        assert decoder.generate(prompt, 30).token_ids == autoregressive_generate(
            target_model, prompt, 30)
    # the dominated one: run only in the stream's first round (no target step timed yet,
    # so nothing counts as expensive)
    assert drafters[0].lm.num_forward_calls <= 1
    assert drafters[1].lm.num_forward_calls > 0  # the other expensive one: watched


def test_first_query_calibrates_the_cost_model(target_model, drafter_models) -> None:
    """A selector that prices arms by the cost model gets it measured before its first
    round: a plain target step, a pass of max_k + 1 positions, and the LM drafters' one- and
    two-token proposals, even for drafters it never plays; output stays the target's, and
    a selector that needs no costs runs no calibration."""
    drafters = pool(drafter_models)
    decoder = SpeculativeDecoder(target_model, drafters, "fixed", num_speculative_tokens=[0, 3],
                                 score_all=True, score_rate=0.3, loss="time",
                                 policy_kwargs={"arm": 2})  # ngram plays
    model = decoder.selector.cost_model
    assert math.isnan(model.verify_seconds(1, 0))
    calls = drafters[0].lm.num_forward_calls
    prompt = [*PROMPTS[0], *PROMPTS[1]]  # 17 tokens: 16 calibrate, and one more
    assert decoder.generate(prompt, 12).token_ids == autoregressive_generate(
        target_model, prompt, 12)
    assert set(model.verify) >= {1, 4}
    for name in ("small", "good"):
        assert model.draft_seconds(name, 2) > 0.0
    assert drafters[0].lm.num_forward_calls >= calls + 3  # prefill, then 1 + 2 passes
    assert decoder.warmup() == 0.0  # measured already
    with pytest.raises(PromptError):
        decoder.warmup([])

    plain = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                               num_speculative_tokens=3)  # length loss, every round scored
    steps = list(plain.generate_steps(prompt, 1))
    assert len(steps) == 1 and math.isnan(plain.selector.cost_model.verify_seconds(3, 0))


# ------------------------------------------------------------------ starting a drafter


def test_an_lm_kept_up_for_scoring_counts_as_expensive_by_its_drafting_pass() -> None:
    """Scoring runs of a drafter fed every round are short (9 ms for the 0.5B drafter on
    llama.cpp; 1.5 ms here, within the 1% budget), but keeping it fed costs its drafting
    pass (24 ms against a 200 ms step)."""
    model = CostModel()
    model.observe_verify(1, 100, 0.2)
    model.observe_score("lm", 0.0015)
    plan = ScoringPlan(["lm"], rate=0.05)
    assert plan.expensive(model, 100) == [False]
    model.observe_draft("lm", 1, 0.024)
    assert plan.expensive(model, 100) == [True]


def test_an_expensive_drafter_is_scored_in_its_first_round() -> None:
    """Until an expensive drafter is scored once its arms' imputed losses are a neutral
    1/2; so its first round is scored whatever its coin says (even in a query that does
    not watch it), and later rounds follow the coin again; a dominated one never is."""
    model = CostModel()
    model.observe_verify(1, 100, 0.2)
    model.observe_draft("lm", 1, 0.05)
    plan = ScoringPlan(["ngram", "lm"], rate=0.01, seed=0)
    plan.start_query([1.0, 0.0], prompt_tokens=100_000)  # watched with probability 1/1024
    assert not plan.watched[1]
    run, factors, deferred = plan.decide(played=0, model=model, context=100, defer=True)
    assert deferred == [1] and factors is not None and factors[1] > 1.0  # a coin's mark
    later = [plan.decide(played=0, model=model, context=100, defer=True)[2]
             for _ in range(200)]
    assert not any(later)  # unwatched: the coin never comes up
    fresh = ScoringPlan(["ngram", "lm"], rate=0.01, seed=0)
    fresh.start_query([1.0, 0.0], dominated=[False, True])
    assert fresh.decide(played=0, model=model, context=100, defer=True)[2] == []
    played = ScoringPlan(["ngram", "lm"], rate=0.01, seed=0)
    played.decide(played=1, model=model, context=100, defer=True)  # played: scored exactly
    played.start_query([1.0, 0.0], prompt_tokens=100_000)
    assert not played.watched[1]
    assert not any(played.decide(played=0, model=model, context=100, defer=True)[2]
                   for _ in range(20))


def test_cold_start_prior_learns_each_drafters_acceptance_from_its_plays() -> None:
    """While the learner has no loss yet, the prior's per-token acceptance of a drafter
    moves from 1/2 with the rounds it was played: one that keeps missing yields to one
    not tried; a reset forgets it."""
    model = CostModel()
    for n, sec in [(1, 0.20), (3, 0.22), (5, 0.24)]:
        model.observe_verify(n, 100, sec)
    model.observe_draft("head", 2, 0.01)
    model.observe_draft("lm", 2, 0.04)
    selector = Selector(make_arms(["head", "lm"], [2]), loss="time", cost_model=model)
    assert str(selector.arms[selector.prior_arm(selector.policy, None, context=100)]) \
        == "head@k=2"  # cheaper at the same assumed acceptance
    for _ in range(2):
        selector.observe(Outcome(arm=0, num_draft_tokens=2, num_accepted_tokens=0))
    assert str(selector.arms[selector.prior_arm(selector.policy, None, context=100)]) \
        == "lm@k=2"
    selector.observe(Outcome(arm=1, num_draft_tokens=2, num_accepted_tokens=2))
    assert selector._evidence[:, 1].tolist() == [2.0, 2.0]  # all accepted: no rejection
    selector.reset()
    assert str(selector.arms[selector.prior_arm(selector.policy, None, context=100)]) \
        == "head@k=2"


def test_prefill_line_prices_a_drafters_start() -> None:
    model = CostModel()
    assert math.isnan(model.prefill_seconds("lm", 100))
    assert model.prefill_seconds("lm", 0) == 0.0
    model.observe_prefill("lm", 100, 0.3)
    assert model.prefill_seconds("lm", 200) == pytest.approx(0.6)  # one length: proportional
    model.observe_prefill("lm", 1000, 2.1)
    assert model.prefill_seconds("lm", 550) == pytest.approx(1.2)  # 0.1 s + 2 ms a token
    assert model.snapshot()["prefill_seconds_per_token"]["lm"] == pytest.approx(0.002)


def rated_selector(policy: str = "hedge", **kwargs) -> Selector:
    """lm and ngram at k = 4, 8 and the plain arm, with 5 ms a token of LM prefill and
    these modelled seconds per token so far: lm 80 / 70, ngram 120 / 110, none 200 ms."""
    model = CostModel()
    model.observe_prefill("lm", 1000, 5.0)
    selector = Selector(make_arms(["lm", "ngram"], [0, 4, 8]), policy, loss="time",
                        cost_model=model, **kwargs)
    selector.tracker._arm_tokens[:] = 10.0
    selector.tracker._arm_seconds[:] = [0.8, 0.7, 1.2, 1.1, 2.0]
    return selector


def test_worth_starting_rules_out_a_drafter_whose_prefill_does_not_pay() -> None:
    s = rated_selector()
    # 1,100 tokens of prefill over 48 tokens left: +115 ms a token, 70 + 115 > 110
    assert s.worth_starting([1100, 0], remaining=48).tolist() == [False, False, True, True, True]
    # at +34 ms a token lm@8 still pays (104 < 110), lm@4 does not (114)
    assert s.worth_starting([1100, 0], remaining=160).tolist() == [False, True, True, True, True]
    assert s.worth_starting([1100, 0], remaining=10_000) is None  # amortized away
    assert s.worth_starting([64, 0], remaining=1) is None  # fed within a proposal: no hint
    assert s.worth_starting(None, remaining=48) is None
    s.tracker._arm_tokens[1] = 0.0  # lm@8 never scored: not ruled out
    assert s.worth_starting([1100, 0], remaining=48).tolist() == [False, True, True, True, True]
    chat = rated_selector()  # this query ngram offers nothing: plain steps, 200 ms a token
    chat.tracker._query_tokens[:] = [0.0, 0.0, 3.0, 3.0, 3.0]
    chat.tracker._query_seconds[:] = [0.0, 0.0, 0.6, 0.6, 0.6]
    chat.tracker._query_rounds[:] = [0.0, 0.0, 3.0, 3.0, 3.0]
    assert chat.worth_starting([1100, 0], remaining=48) is None  # 80 + 115 < 200 ms
    chat.tracker.reset()  # a new query: the stream's rates again
    assert chat.worth_starting([1100, 0], remaining=48).tolist()[:2] == [False, False]
    unknown = rated_selector()
    unknown.cost_model.prefill.clear()  # prefill never measured: no hint
    assert unknown.worth_starting([1100, 0], remaining=48) is None
    bandit = rated_selector("ucb", score_all=True)
    assert not bandit.prices_backlog and bandit.worth_starting([1100, 0], 48) is None


def test_a_free_drafter_failing_at_once_lets_the_lm_start_in_three_rounds() -> None:
    """The query's rate of a drafter that misses at once counts after three one-token
    rounds, not eight tokens (the rounds still waiting for their window count too:
    CounterfactualTracker.seconds_per_token's doctest)."""
    s = rated_selector(score_rate=0.05)
    costs = np.array([0.3, 0.4, 0.22, 0.24, 0.2])  # [num_arms]: lm@4, lm@8, ngram@4/8, none
    for _ in range(3):
        assert s.worth_starting([1100, 0], remaining=48).tolist()[:2] == [False, False]
        # [1, N = (lm, ngram)]: the LM not run (factor 0), prompt lookup misses
        s.tracker.add_round_tagged(np.array([[np.nan, 0.0]]), np.array([[np.nan, 0.0]]), 0,
                                   costs=costs, rho=5.0, factors=np.array([0.0, 1.0]))
    assert s.worth_starting([1100, 0], remaining=48) is None  # 70-80 + 115 < 200 ms
    # copying: prompt lookup still matching, so its windows wait (8 positions); by the
    # stream's rates (ngram and plain steps 200 ms a token) the LM would start
    prompt_lookup = rated_selector(score_rate=0.05)
    prompt_lookup.tracker._arm_seconds[:] = [0.8, 0.7, 2.0, 2.0, 2.0]
    assert prompt_lookup.worth_starting([1100, 0], remaining=48) is None
    for _ in range(3):
        prompt_lookup.tracker.add_round_tagged(
            np.ones((1, 2)), np.ones((1, 2)), 0, costs=costs, rho=5.0,
            factors=np.array([0.0, 1.0]))
    assert len(prompt_lookup.tracker._pending) == 3  # nothing released: all pending
    # ngram@8: 9 provisional tokens a round for 0.24 s (27 ms a token) rules the LM out
    assert prompt_lookup.worth_starting([1100, 0], remaining=48).tolist()[:2] == [False, False]


def test_the_plain_arm_is_known_exactly_when_column_0_is_an_unscored_lm() -> None:
    """The no-speculation arm reads drafter column 0; a plain step's one token is known
    without any drafter, so an LM in column 0 left unscored by its coin (factor 0) neither
    imputes the plain arm's loss nor keeps its rounds out of the query's rate."""
    s = rated_selector(score_rate=0.05)  # arms lm@4, lm@8, ngram@4, ngram@8, none
    costs = np.array([0.3, 0.4, 0.22, 0.24, 0.2])
    assert s.tracker._arm_factors(np.array([0.0, 1.0])).tolist() == [0, 0, 1, 1, 1]
    for _ in range(3):
        s.tracker.add_round_tagged(
            np.array([[np.nan, 0.0]]), np.array([[np.nan, 0.0]]), 0, costs=costs, rho=5.0,
            factors=np.array([0.0, 1.0]))
    assert s.tracker._query_rounds.tolist() == [0.0, 0.0, 3.0, 3.0, 3.0]
    assert s.tracker.seconds_per_token(query_rounds=3)[4] == pytest.approx(0.2)


def test_a_coin_does_not_pay_the_prefill_of_a_drafter_not_worth_starting() -> None:
    """Where every arm of the LM is ruled out by its prefill, no scoring coin runs it (it
    would pay that prefill to score it); once one arm of it pays, coins run again."""
    s = rated_selector(score_rate=0.5, seed=3)
    s.cost_model.observe_verify(1, 100, 0.2)
    s.cost_model.observe_score("lm", 0.05)  # expensive: coin-scored
    s.cost_model.observe_score("ngram", 0.0001)
    ngram8 = 3
    coins = {48: 0, 10_000: 0}
    for remaining in coins:
        for _ in range(200):
            s.select(backlogs=[1100, 0], remaining=remaining)
            run, factors, deferred = s.plan_scoring(ngram8, context=100)
            coins[remaining] += bool(run[0] or 0 in deferred)
            assert factors is None or factors[0] in (0.0, 1.0 / 0.5)
    assert coins[48] == 0 and 60 < coins[10_000] < 140  # ruled out / amortized: coins


@pytest.mark.parametrize("policy", ["hedge", "normalhedge"])
def test_ruled_out_arms_are_never_played(policy: str) -> None:
    s = rated_selector(policy)
    assert s.prices_backlog
    picks = {s.select(backlogs=[1100, 0], remaining=48) for _ in range(300)}
    assert picks and picks <= {2, 3, 4}
    assert len({s.select(backlogs=[0, 0], remaining=48) for _ in range(300)}) == 5


def test_ruled_out_arms_with_all_the_weight_leave_the_best_allowed_one() -> None:
    """NormalHedge gives no weight to arms without positive regret; when those are all
    that is left, the allowed arm of highest regret plays."""
    s = rated_selector("normalhedge")
    s.policy.regret[:] = [1.0, 2.0, -0.5, -0.1, -3.0]
    s.policy._probs = None
    assert s.probabilities()[2:].sum() == 0.0
    assert s.select(backlogs=[1100, 0], remaining=48) == 3


class DearPrefill(CostModel):
    """Every drafter's prefill costs a thousand seconds (as if it were a huge LM)."""

    def prefill_seconds(self, drafter: str, tokens: int) -> float:
        return 1e3 if tokens > 0 else 0.0


def test_engine_does_not_start_an_lm_whose_prefill_does_not_pay(
    target_model, drafter_models
) -> None:
    """Once the arms' rates are known, a query whose LM drafters would have to prefill
    its prompt first opens with a model-free arm; the output stays the target's."""
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=[0, 2, 4], loss="time",
                                 cost_model=DearPrefill())
    for prompt in (PROMPTS[0] * 8, PROMPTS[1] * 12):  # 80 and 84 tokens: prefills
        steps = list(decoder.generate_steps(prompt, 12))
        assert [t for s in steps for t in s.tokens] == autoregressive_generate(
            target_model, prompt, 12)
    assert steps[0].drafter not in ("small", "good")  # the second query's opening round
    assert {"small@k=2", "good@k=4"} <= set(steps[0].ruled_out)  # the trace says why
    assert all(s.chosen_by == "learner" for s in steps)  # the arms' rates were known
    model = decoder.cost_model
    assert set(model.prefill) == {"small", "good"}  # calibration, then each query's start


def test_catch_up_is_timed_apart_from_drafting(target_model, drafter_models) -> None:
    """An LM drafter's prefill of a prompt is timed on its own, into the prefill line
    (calibration times two lengths), not into its first proposal."""
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "fixed",
                                 num_speculative_tokens=[0, 3], loss="time", score_all=True,
                                 policy_kwargs={"arm": 0})  # small@3 plays
    decoder.warmup()
    model = decoder.cost_model
    assert model.prefill["small"].count == 2 and model.prefill_seconds("small", 500) > 0.0
    long_prompt = [(7 * i + 3) % VOCAB for i in range(300)]
    assert decoder.generate(long_prompt, 6).token_ids == autoregressive_generate(
        target_model, long_prompt, 6)
    assert model.prefill["small"].count == 3  # the long prompt's prefill, timed apart
    assert model.prefill["good"].count == 3  # scored, so caught up too


def test_sampling_with_the_prefill_hint_matches_target_distribution(
    target_model, drafter_models
) -> None:
    """With the LM drafters' prefill so dear that the hint rules them out at every query's
    start (two 80-token prompts alternate, so each query starts with a prefill), 3,000
    seeded generations of the counted prompt follow the target's joint law of the first
    two tokens."""
    prompt, other = PROMPTS[0] * 8, PROMPTS[1] * 12
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=[0, 1, 3], loss="time",
                                 cost_model=DearPrefill())
    sampling = SamplingParams(temperature=1.0)
    decoder.generate(other, 12, sampling=SamplingParams(1.0, seed=-1))  # the arms' rates
    steps = list(decoder.generate_steps(prompt, 2, SamplingParams(1.0, seed=-2)))
    assert steps[0].drafter not in ("small", "good")  # the hint fired
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(3_000):
        decoder.generate(other, 1, sampling=SamplingParams(1.0, seed=seed))
        out = decoder.generate(prompt, max_new_tokens=2,
                               sampling=SamplingParams(sampling.temperature, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)


# ------------------------------------------------------------------ the cold start


def priced_selector(policy: str = "hedge", **kwargs) -> Selector:
    """lm and ngram at k = 2, 4 and the plain arm: a 200 ms plain step, 10 ms more per
    verified position, 25 ms a drafted LM token, 5 ms a token of LM prefill."""
    model = CostModel()
    for n, sec in [(1, 0.20), (3, 0.22), (5, 0.24)]:
        model.observe_verify(n, 100, sec)
    model.observe_draft("lm", 2, 0.05)
    model.observe_prefill("lm", 1000, 5.0)
    return Selector(make_arms(["lm", "ngram"], [0, 2, 4]), policy, loss="time",
                    cost_model=model, **kwargs)


@pytest.mark.parametrize("policy", ["hedge", "normalhedge", "hedge:argmax"])
def test_a_learner_without_a_preference_plays_the_priors_fastest_arm(policy: str) -> None:
    """Before any loss the learner ranks all arms alike; the prior (half of each drafted
    token accepted) prices them: lm@2 1.75 tokens in 0.27 s beats a plain step (1 in
    0.2 s) and prompt lookup when it offers nothing; a long match makes ngram@4 the
    fastest (1.94 tokens in 0.24 s); a dear prefill rules the LM's arms down."""
    name, _, selection = policy.partition(":")
    s = priced_selector(name, policy_kwargs={"selection": selection} if selection else None)
    names = [str(a) for a in s.arms]
    assert names[s.select(lengths=[None, 0], context=100)] == "lm@k=2"
    assert names[s.select(lengths=[None, 8], context=100)] == "ngram@k=4"
    # 1,000 tokens to prefill over 48 left: +104 ms a token for every LM arm
    assert names[s.select(lengths=[None, 0], backlogs=[1000, 0], remaining=48,
                          context=100)] in {"ngram@k=2", "ngram@k=4", "none@k=0"}
    s.observe(Outcome(0, 2, 2), (np.ones((3, 2)), np.ones((3, 2))))
    s.end_query()  # the first loss vector: the learner has a preference
    assert s.prior_arm(s.policy, None, context=100) is None


def test_the_prior_leaves_bandits_other_losses_and_unpriced_steps_alone() -> None:
    bandit = priced_selector("ucb")
    assert bandit.prior_arm(bandit.policy, None) is None
    acceptance = Selector(make_arms(["lm", "ngram"], [0, 2, 4]), "hedge", loss="acceptance",
                          cost_model=priced_selector().cost_model)
    assert acceptance.prior_arm(acceptance.policy, None, context=100) is None
    fresh = Selector(make_arms(["lm", "ngram"], [0, 2, 4]), "hedge", loss="time")
    assert fresh.prior_arm(fresh.policy, None) is None  # no plain step timed yet
    s = priced_selector()
    s.policy.cumulative_loss[:] = [0.0, 0.1, 0.0, 0.0, 0.0]  # a preference: the learner plays
    assert s.prior_arm(s.policy, None, context=100) is None
    allowed = np.array([False, True, True, True, True])  # only lm@2 is preferred less
    assert s.prior_arm(s.policy, allowed, context=100) is None
    allowed[1] = False  # the allowed arms tie: the prior picks among them
    assert s.prior_arm(s.policy, allowed, context=100) in {2, 3, 4}


@pytest.mark.parametrize("prior", [True, False])
def test_the_prior_opens_a_length_loss_query(prior: bool) -> None:
    """Under the length loss with per-query resets (issue 16's MAT goal) a query's first
    rounds are a cold start: no loss is released before a window of ``max_k`` positions
    is verified, and the provisional losses rank every arm still matching alike, a head
    not run before the first target pass too.  The prior chooses by the tokens it
    expects: the LM's four drafted tokens over prompt lookup's one-token match (1.94
    against 1.5), and after a round whose one verified position the LM guessed, the LM
    (acceptance 2/3 from that guess) over the head (1/2, never scored).  Without it the
    lowest index wins both times."""
    s = Selector(make_arms(["head", "suffix", "lm"], 4), "hedge", loss="length",
                 policy_kwargs={"selection": "argmax"}, reset_per_query=True)
    if not prior:
        s.prior_arm = lambda *args, **kw: None  # type: ignore[method-assign]
    s.start_query()
    names = [str(a) for a in s.arms]
    first = names[s.select([0, 1, None], [0, 1, None])]  # the head has no state yet
    assert first == ("lm@k=4" if prior else "suffix@k=4")
    gamma = np.array([[np.nan, 0.0, 1.0]])  # suffix played, rejected; the LM's guess right
    s.observe(Outcome(1, 1, 0), (gamma, gamma.copy()))
    second = names[s.select([2, 0, None], [4, 0, None])]
    assert second == ("lm@k=4" if prior else "head@k=4")
    assert s.round_choice[0] == ("prior" if prior else "learner")


def test_the_prior_breaks_an_argmax_learners_ties_between_different_rounds() -> None:
    """Past the cold start the prior chooses among the arms an argmax learner's ranking
    (with the provisional losses in) puts first, where they would play different rounds;
    arms that would play one and the same round (a drafter offering nothing: each of its
    arms is a plain step) are left to the learner (the same arm, without pricing them); a
    learner that samples draws among its ties itself."""
    s = priced_selector(policy_kwargs={"selection": "argmax"})  # lm@2 lm@4 ngram@2 ngram@4 none
    s.policy.cumulative_loss[:] = [0.3, 0.3, 0.1, 0.1, 0.1]
    s._lengths = {"ngram": 0}  # ngram@2, ngram@4 and none: three plain steps
    assert s.prior_arm(s.policy, None, context=100, ranking=s.policy) is None
    s._lengths = {"ngram": 3}  # they differ: ngram@4 drafts 3, 1.875 tokens in 0.23 s
    assert s.prior_arm(s.policy, None, context=100, ranking=s.policy) == 3
    ranking = s.policy.ahead([np.array([-0.3, -0.3, 0.0, 0.0, 0.0])])  # the LM's arms first
    assert s.prior_arm(s.policy, None, context=100, ranking=ranking) == 0  # lm@2: 1.75 in 0.27
    untied = s.policy.ahead([np.array([-0.4, -0.3, 0.0, 0.0, 0.0])])
    assert s.prior_arm(s.policy, None, context=100, ranking=untied) is None
    assert s.prior_arm(s.policy, None, context=100) is None  # no ranking: the learner's
    cold = priced_selector(policy_kwargs={"selection": "argmax"})
    cold._lengths = {"ngram": 3}  # the cold start: among all, whatever the provisional say
    assert cold.prior_arm(cold.policy, None, context=100, ranking=untied) == 3
    sampling = priced_selector()
    sampling.policy.cumulative_loss[:] = [0.3, 0.3, 0.1, 0.1, 0.1]
    sampling._lengths = {"ngram": 3}
    assert sampling.prior_arm(sampling.policy, None, context=100,
                              ranking=sampling.policy) is None


def test_a_cold_context_of_identical_rounds_is_left_to_the_learner() -> None:
    """A cold learner whose allowed arms would all play one and the same round (nothing
    offered and the LM ruled out: plain steps only; or one drafter's arms that would all
    draft the same tokens) is left to the learner, which picks the same round; where
    they differ the prior prices them, as at any cold start."""
    s = priced_selector(policy_kwargs={"selection": "argmax"})  # lm@2 lm@4 ngram@2 ngram@4 none
    no_lm = np.array([False, False, True, True, True])
    s._lengths = {"ngram": 0}  # ngram@2, ngram@4 and none: three plain steps
    assert s.prior_arm(s.policy, no_lm, context=100) is None
    s._lengths = {"ngram": 1}  # ngram@2 and ngram@4 both draft the one token; none differs
    assert s.prior_arm(s.policy, no_lm, context=100) is not None
    only_ngram = np.array([False, False, True, True, False])
    assert s.prior_arm(s.policy, only_ngram, context=100) is None  # one round, twice
    s._lengths = {"ngram": 0}  # with the LM allowed its arms differ: the prior prices
    assert s.prior_arm(s.policy, None, context=100) == 0  # lm@2: 1.75 tokens in 0.27 s


def test_engine_from_a_cold_start_is_greedy_identical(target_model, drafter_models) -> None:
    """Learners reset at every query start cold each time (the prior decides their opening
    rounds); the output stays the target's."""
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=[0, 2, 4], loss="time",
                                 reset_per_query=True)
    for prompt in PROMPTS:
        steps = list(decoder.generate_steps(prompt, 16))
        assert [t for s in steps for t in s.tokens] == autoregressive_generate(
            target_model, prompt, 16)
        assert steps[0].chosen_by == "prior"  # the trace says who chose


def test_sampling_from_a_cold_start_matches_target_distribution(
    target_model, drafter_models
) -> None:
    """3,000 seeded generations, each by a learner reset at the query's start (its first
    round chosen by the prior), follow the target's joint law of the first two tokens."""
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), "hedge",
                                 num_speculative_tokens=[0, 1, 3], loss="time",
                                 reset_per_query=True)
    prompt = PROMPTS[0]
    decoder.generate(prompt, 2, sampling=SamplingParams(1.0, seed=-1))  # costs timed
    selector, decided = decoder.selector, []
    prior_arm = selector.prior_arm

    def spy(*args, **kwargs):
        arm = prior_arm(*args, **kwargs)
        decided.append(arm is not None)
        return arm

    selector.prior_arm = spy
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(3_000):
        out = decoder.generate(prompt, max_new_tokens=2, sampling=SamplingParams(1.0, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert sum(decided) >= 3_000  # the prior chose every query's opening round
    joint = target_first_two(target_model, prompt, SamplingParams(temperature=1.0))
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)


def test_a_drafter_that_ends_drafts_early_is_priced_by_its_steps() -> None:
    """An LM drafter that ends drafts early (an empty one too) is priced at its mean
    proposal length for verification and its mean drafting steps (the step that found
    the unsure token included) for drafting."""
    model = CostModel()
    model.observe_verify(1, 100, 0.1)
    model.observe_verify(5, 100, 0.3)  # 50 ms a position more
    model.observe_draft("lm", 1, 0.02)
    model.observe_draft("lm", 4, 0.08)  # 20 ms a step
    for drafted, steps in ((0, 1), (2, 3), (4, None)):  # ended early twice, then all 4
        model.observe_proposal("lm", 4, drafted, steps)
    d = model.decay
    length = (2 * d + 4) / (d * d + d + 1)
    steps = (1 * d * d + 3 * d + 4) / (d * d + d + 1)
    assert model.proposal_length("lm", 4) == pytest.approx(length)
    assert model.proposal_steps("lm", 4) == pytest.approx(steps)
    expected = model.draft_seconds("lm", math.ceil(steps)) + model._verify_fractional(
        length + 1.0, 100)
    assert model.round_seconds([("lm", 4)], 100)[0] == pytest.approx(expected)
    model.observe_proposal("ngram", 4, 0)  # a model-free drafter's empty offer: not counted
    assert model.proposal_length("ngram", 4) == 4.0
