"""The LM drafter's context window: a bounded prefill, the same lossless output."""

from __future__ import annotations

import random

import pytest

from specmux.drafters.hf import HFDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.lm import CachedLM
from specmux.types import SamplingParams

from conftest import VOCAB


def test_window_bounds_what_the_lm_reads_and_output_stays_the_targets(target_model,
                                                                      drafter_models) -> None:
    random.seed(0)
    prompt = [random.randrange(VOCAB) for _ in range(300)]
    ref = autoregressive_generate(CachedLM(target_model), prompt, 40)
    largest = {}  # the most tokens one LM call fed
    for window in (None, 32):
        lm = CachedLM(drafter_models[1])
        calls: list[int] = []
        logits = lm.logits

        def counted(ids, num_last=1, lm=lm, calls=calls, logits=logits):
            before = lm.num_tokens_fed
            out = logits(ids, num_last)
            calls.append(lm.num_tokens_fed - before)
            return out

        lm.logits = counted  # type: ignore[method-assign]
        drafter = HFDrafter(lm, name="lm", context_window=window)
        decoder = SpeculativeDecoder(CachedLM(target_model), [drafter], "fixed",
                                     num_speculative_tokens=4)
        assert decoder.generate(prompt, max_new_tokens=40).token_ids == ref
        largest[window] = max(calls)
    # Without a window the drafter prefills the 300-token prompt (all but its last token in
    # one call: the engine's catch-up); with one, 32 tokens at a time (the query's start,
    # and once more when the window slides).
    assert largest[None] >= 299 and largest[32] == 32


def test_window_slides_once_the_context_outgrows_two_windows() -> None:
    class Fake:
        vocab_size = VOCAB

    drafter = HFDrafter.__new__(HFDrafter)
    drafter.context_window, drafter._anchor = 8, 0
    drafter.start_query(list(range(20)))
    assert drafter._anchor == 12  # the last 8 prompt tokens
    assert list(drafter._window(list(range(24)))) == list(range(12, 24))
    assert list(drafter._window(list(range(29)))) == list(range(21, 29))  # 17 > 16: slid
    with pytest.raises(ValueError, match="context_window"):
        HFDrafter(Fake(), context_window=0)  # type: ignore[arg-type]


def test_config_key_reaches_the_drafter(target_model, drafter_models) -> None:
    from specmux.api import Pipeline
    from specmux.config import parse_speculative_config
    from specmux.errors import ConfigError

    pipe = Pipeline(target_model, [drafter_models[1]], "hedge", drafter_context_window=16)
    assert pipe.decoder.drafters[0].context_window == 16
    assert parse_speculative_config('{"drafter_context_window": 64}').drafter_context_window == 64
    with pytest.raises(ConfigError, match="drafter_context_window"):
        parse_speculative_config('{"drafter_context_window": 0}')
    out = pipe.decoder.generate([1, 2, 3] * 20, max_new_tokens=8, sampling=SamplingParams())
    assert out.token_ids == autoregressive_generate(CachedLM(target_model), [1, 2, 3] * 20, 8)


SAMPLED_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]


def assert_samples_target_law(target_model, drafter: HFDrafter, policy: str,
                              min_accepted: int) -> None:
    """Over 4k seeded generations at temperature 1 after :data:`SAMPLED_PROMPT`, the first
    two tokens follow the target's joint law, with at least ``min_accepted`` drafted tokens
    accepted (drafts really took part)."""
    import numpy as np

    from stats import assert_distribution, target_first_two

    decoder = SpeculativeDecoder(CachedLM(target_model), [drafter], policy,
                                 num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(4_000):
        out = decoder.generate(SAMPLED_PROMPT, max_new_tokens=2,
                               sampling=SamplingParams(1.0, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_accepted_tokens > min_accepted
    joint = target_first_two(target_model, SAMPLED_PROMPT, SamplingParams(temperature=1.0))
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts, joint)


def test_windowed_drafter_samples_the_target_law(target_model, drafter_models) -> None:
    """With a drafter that sees only the last 4 of 12 prompt tokens, sampling follows the
    target's law (its q is what it sampled)."""
    drafter = HFDrafter(CachedLM(drafter_models[1]), name="lm", context_window=4)
    assert_samples_target_law(target_model, drafter, "fixed", min_accepted=500)


def test_backlog_and_catch_up_leave_a_proposal_its_usual_cost(drafter_models) -> None:
    """``backlog`` counts the context tokens the LM's cache lacks; ``catch_up`` feeds all
    but the last, so the next proposal feeds one token per pass, and drafts the same."""
    ctx = [(5 * i + 1) % VOCAB for i in range(40)]
    fresh = HFDrafter(drafter_models[0])
    fresh.start_query(ctx)
    expected = fresh.propose(ctx, 3, SamplingParams()).tokens.tolist()
    d = HFDrafter(drafter_models[0])
    d.start_query(ctx)
    assert d.backlog(ctx) == 40
    d.catch_up(ctx)
    assert d.backlog(ctx) == 1
    fed = d.lm.num_tokens_fed
    assert d.propose(ctx, 3, SamplingParams()).tokens.tolist() == expected
    assert d.lm.num_tokens_fed - fed == 3  # the last context token, then two drafted ones
    assert d.backlog([*ctx, *expected[:2]]) == 0  # its cache: ctx + two drafted tokens
    windowed = HFDrafter(drafter_models[0], context_window=16)
    windowed.start_query(ctx)
    assert windowed.backlog(ctx) == 16  # a window bounds the prefill


def _confidences(drafter_model, ids: list[int]) -> list[float]:
    """The drafter's top probability after each prefix ``ids[:j]``, j >= 1."""
    lm = CachedLM(drafter_model)
    import torch

    return torch.softmax(lm.logits(ids, len(ids)).float(), -1).max(-1).values.tolist()


def test_confidence_threshold_ends_drafts_and_scores_the_played_arm_exactly(
        target_model, drafter_models) -> None:
    """A draft ends before the first token the LM is less sure of than the threshold; the
    output stays the target's, and counterfactual scoring applies the same rule along the
    verified path: the played arm's leading matched rows are exactly what was accepted."""
    random.seed(1)
    prompt = [random.randrange(VOCAB) for _ in range(12)]
    ref = autoregressive_generate(CachedLM(target_model), prompt, 48)
    threshold = sorted(_confidences(drafter_models[1], prompt + ref))[len(ref) // 2]  # median
    drafter = HFDrafter(CachedLM(drafter_models[1]), name="lm", confidence_threshold=threshold)
    decoder = SpeculativeDecoder(CachedLM(target_model), [drafter], "hedge",
                                 num_speculative_tokens=4)
    out = decoder.generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref
    drafted = [s.num_draft_tokens for s in out.steps]
    assert any(0 < d < 4 for d in drafted) and 4 in drafted  # some drafts ended early
    for s in out.steps:
        gammas = s.gammas["lm"]
        lead = next((j for j, g in enumerate(gammas) if g < 0.5), len(gammas))
        assert min(lead, 4) == s.num_accepted_tokens, (s, gammas)
    unsure = HFDrafter(CachedLM(drafter_models[1]), confidence_threshold=0.999)
    assert len(unsure.propose(prompt, 4, SamplingParams())) == 0  # nothing it is sure of
    with pytest.raises(ValueError, match="confidence_threshold"):
        HFDrafter(CachedLM(drafter_models[1]), confidence_threshold=1.0)


def test_confidence_threshold_samples_the_target_law(target_model, drafter_models) -> None:
    """With drafts cut at the drafter's median confidence (scored by Hedge), sampling
    follows the target's law."""
    conf = sorted(_confidences(drafter_models[1], SAMPLED_PROMPT))
    drafter = HFDrafter(CachedLM(drafter_models[1]), name="lm",
                        confidence_threshold=conf[len(conf) // 2])
    assert_samples_target_law(target_model, drafter, "hedge", min_accepted=300)


def test_confidence_threshold_config_key_reaches_the_drafter(target_model, drafter_models) -> None:
    from specmux.api import Pipeline
    from specmux.config import DEFAULT_DRAFT_CONFIDENCE_THRESHOLD, parse_speculative_config
    from specmux.errors import ConfigError

    pipe = Pipeline(target_model, [drafter_models[1]], "hedge", draft_confidence_threshold=0.2)
    assert pipe.decoder.drafters[0].confidence_threshold == 0.2
    assert Pipeline(target_model, [drafter_models[1]], "hedge").decoder.drafters[
        0].confidence_threshold == DEFAULT_DRAFT_CONFIDENCE_THRESHOLD
    for bad in ("1.0", "-0.1", '"0.5"'):
        with pytest.raises(ConfigError, match="draft_confidence_threshold"):
            parse_speculative_config(f'{{"draft_confidence_threshold": {bad}}}')


def test_deferred_scoring_keeps_the_drafters_stops(target_model, drafter_models) -> None:
    """A deferred scoring run (engine ``_score_span``) scores the rows the drafter would
    stop before as 0, as scoring at once does."""
    from specmux.engine import _RowLog

    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    path = autoregressive_generate(CachedLM(target_model), prompt, 3)
    spans = {}
    for threshold in (0.0, 0.999):
        drafter = HFDrafter(CachedLM(drafter_models[1]), confidence_threshold=threshold)
        decoder = SpeculativeDecoder(CachedLM(target_model), [drafter], "fixed",
                                     num_speculative_tokens=3, score_all=True)
        log_ = decoder._log = _RowLog(list(prompt), SamplingParams())
        log_.add(0, len(prompt), len(path), None)
        log_.tokens = [*prompt, *path]
        spans[threshold] = decoder._score_span(0, 0, 3)[0]
    assert spans[0.0].sum() > 0 and not spans[0.999].any()
