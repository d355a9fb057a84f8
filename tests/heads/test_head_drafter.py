"""The head drafter: hidden-state capture, greedy losslessness, chi-square, online learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmux.drafters.head import HeadDrafter
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError
from specmux.heads.online import OnlineHeadDrafter, expected_length
from specmux.heads.replay import HiddenReplayTarget, record_greedy
from specmux.lm import CachedLM
from specmux.types import SamplingParams

from conftest import VOCAB
from stats import assert_distribution, target_first_two

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [30, 31, 32, 33, 34, 35, 36]]


@pytest.fixture(scope="module")
def references(target_model) -> dict:
    return {tuple(p): autoregressive_generate(target_model, p, 40) for p in PROMPTS}


def test_hidden_states_are_the_lm_head_input_at_no_extra_pass(target_model) -> None:
    plain, lm = CachedLM(target_model), CachedLM(target_model)
    lm.enable_hidden_states()
    ids = PROMPTS[0]
    assert torch.equal(lm.logits(ids, 3), plain.logits(ids, 3))  # logits untouched
    assert torch.equal(lm.logits([*ids, 5, 6], 3), plain.logits([*ids, 5, 6], 3))
    assert lm.num_forward_calls == plain.num_forward_calls == 2
    h = lm.hidden_states(3)  # after ids + [5], ids + [5, 6] and ... rows of the last call
    full = target_model.base_model(input_ids=torch.tensor([[*ids, 5, 6]])).last_hidden_state[0]
    torch.testing.assert_close(h, full[-3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm.hidden_states(1, ids=ids)[0], full[len(ids) - 1],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(LookupError):
        lm.hidden_states(1, ids=ids[:3])  # never computed (the prompt's inner rows)
    with pytest.raises(LookupError):
        plain.hidden_states(1)


def pool(tiny_head, target_model, drafter_models) -> list:
    return [HeadDrafter(tiny_head, target_model, name="head"),
            HFDrafter(drafter_models[0], name="small"), NgramDrafter(prompt_lookup_max=3)]


@pytest.mark.parametrize("policy", ["fixed", "hedge", "ucb", "exp3"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_identical_to_target(policy, k, tiny_head, target_model, drafter_models,
                                       references) -> None:
    drafters = pool(tiny_head, target_model, drafter_models)
    decoder = SpeculativeDecoder(target_model, drafters, policy, num_speculative_tokens=k)
    for p in PROMPTS:
        assert decoder.generate(p, 40).token_ids == references[tuple(p)]
    if policy == "fixed":  # the head drafts every round after the first
        assert decoder.stats.num_draft_tokens > 0


def test_head_drafts_from_the_verification_rows(tiny_head, target_model) -> None:
    target = CachedLM(target_model)
    head = HeadDrafter(tiny_head, target_model, target=target)
    decoder = SpeculativeDecoder(target, [head], "fixed", num_speculative_tokens=3)
    steps = decoder.generate(PROMPTS[0], 20).steps
    assert steps[0].num_draft_tokens == 0  # no pass yet: nothing to draft from
    assert all(s.num_draft_tokens == min(3, 20 - sum(len(t.tokens) for t in steps[:i]) - 1)
               for i, s in enumerate(steps) if i > 0)
    # one target pass per round: the head costs no extra forward
    assert target.num_forward_calls == len(steps)


def test_head_offers_nothing_where_it_has_no_state(tiny_head, target_model) -> None:
    """A cost-aware selector prices a head's arms by its offer: 0 tokens in a query's first
    round (no pass has computed the state it drafts from), ``k`` (None) after a pass."""
    target = CachedLM(target_model)
    head = HeadDrafter(tiny_head, target_model, target=target)
    ctx = PROMPTS[1]
    assert head.offer(ctx, 4) == (None, 0)
    assert len(head.propose(ctx, 4, SamplingParams()).tokens) == 0  # as offered
    target.logits(ctx, 1)
    nxt = int(target.logits(ctx, 1)[0].argmax())
    assert head.offer([*ctx, nxt], 4) == (None, None)
    assert len(head.propose([*ctx, nxt], 4, SamplingParams()).tokens) == 4


def _head(tiny_head, target_model, dtype: torch.dtype, **kwargs) -> HeadDrafter:
    head = HeadDrafter(tiny_head, target_model, **kwargs)
    head.product_dtype, head._w_run = dtype, head.w_draft.to(dtype)
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counterfactual_rows_match_what_the_head_would_draft(tiny_head, target_model,
                                                             dtype) -> None:
    target = CachedLM(target_model)
    head = _head(tiny_head, target_model, dtype, target=target)
    ctx = PROMPTS[1]
    target.logits(ctx[:-1], 1)
    drafted = head.propose(ctx, 4, SamplingParams()).tokens.tolist()
    rows = head.distributions(ctx, drafted, SamplingParams()).tokens.tolist()
    assert rows == drafted  # reused from drafting
    fresh = _head(tiny_head, target_model, dtype, target=target)  # computed along the path
    assert fresh.distributions(ctx, drafted, SamplingParams()).tokens.tolist() == drafted
    probs = fresh.distributions(ctx, drafted, SamplingParams(temperature=0.7)).probs
    assert probs is not None and torch.allclose(probs.sum(-1), torch.ones(4))
    outside = torch.ones(fresh.vocab_size, dtype=torch.bool)
    outside[fresh.draft_vocab] = False
    assert float(probs[:, outside].sum()) == 0.0  # q = 0 outside the draft vocabulary


def test_product_dtype_follows_the_cpu_and_a_bfloat16_head_stays_lossless(
        tiny_head, target_model, references, monkeypatch) -> None:
    """The draft product's dtype is decided by the CPU's flags, not by a timing (which
    made drafts differ between processes), so it is the same every time on one machine."""
    import specmux.drafters.head as head_module
    from specmux.drafters.head import BF16_FROM, native_bfloat16, product_dtype

    big = torch.ones(BF16_FROM // 64, 64)
    assert product_dtype(torch.ones(8, 4)) == torch.float32  # small: float32 everywhere
    assert product_dtype(big) == (torch.bfloat16 if native_bfloat16() else torch.float32)
    assert len({product_dtype(big) for _ in range(3)}) == 1
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(head_module, "native_bfloat16", lambda native=native: native)
        assert product_dtype(big) == dtype
    monkeypatch.undo()
    head = HeadDrafter(tiny_head, target_model, name="head")
    assert head.product_dtype == torch.float32 and head._w_run is head.w_draft
    head.product_dtype, head._w_run = torch.bfloat16, head.w_draft.to(torch.bfloat16)
    decoder = SpeculativeDecoder(target_model, [head], "fixed", num_speculative_tokens=3)
    for p in PROMPTS:
        assert decoder.generate(p, 40).token_ids == references[tuple(p)]
    assert decoder.stats.num_draft_tokens > 0
    ctx = PROMPTS[1]
    target = CachedLM(target_model)
    head.bind_target(target)
    target.logits(ctx[:-1], 1)
    drafted = head.propose(ctx, 3, SamplingParams(temperature=0.7))
    assert drafted.probs is not None and torch.allclose(drafted.probs.sum(-1), torch.ones(3))


def test_wrong_target_is_a_clear_error(tiny_head, drafter_models) -> None:
    with pytest.raises(ConfigError, match="hidden size"):
        HeadDrafter(tiny_head, drafter_models[0])
    head = HeadDrafter(tiny_head, _model_with_hidden(48))
    with pytest.raises(ConfigError, match="hidden states"):
        head.bind_target(object())


def _model_with_hidden(h: int):
    from conftest import tiny_lm
    return tiny_lm(3, hidden=h)


def test_sampling_matches_target_distribution(tiny_head, target_model) -> None:
    """10k seeded generations at temperature 0.7, top-k 6, top-p 0.9 (the head's q is 0
    outside its draft vocabulary and after truncation).  The target's cache holds the
    prompt's inner row first, so the head drafts from the very first round (2 tokens); the
    first two tokens follow the target's exact joint law."""
    sampling = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    prompt = [3, 1, 4, 1, 5]
    target = CachedLM(target_model)
    head = HeadDrafter(tiny_head, target_model, target=target)
    decoder = SpeculativeDecoder(target, [head], "fixed", num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(10_000):
        target.logits(prompt[:-1], 1)  # cached after the first time (no forward pass)
        s = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, seed=seed)
        out = decoder.generate(prompt, max_new_tokens=3, sampling=s)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_draft_tokens >= 20_000  # it drafted in every first round
    assert decoder.stats.num_accepted_tokens > 1000  # and drafts were really accepted
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)


def _median_confidence(tiny_head, target_model) -> float:
    """The head's median top probability (draft vocabulary) along PROMPTS' greedy outputs."""
    target = CachedLM(target_model)
    head = HeadDrafter(tiny_head, target_model, target=target)
    conf = []
    for p in PROMPTS:
        out = autoregressive_generate(target, p, 20)
        target.logits(p[:-1], 1)  # the state the head drafts from
        probs = head.distributions(p, out, SamplingParams(temperature=1.0)).probs  # [20, V]
        conf += probs.max(-1).values.tolist()
    return sorted(conf)[len(conf) // 2]


def test_confidence_threshold_ends_head_drafts_losslessly(tiny_head, target_model,
                                                          references) -> None:
    """With drafts cut at the head's median confidence: some drafts end early, greedy output
    stays the target's, and the played arm's scored rows give exactly its accepted tokens."""
    threshold = _median_confidence(tiny_head, target_model)
    target = CachedLM(target_model)
    head = HeadDrafter(tiny_head, target_model, target=target, confidence_threshold=threshold)
    decoder = SpeculativeDecoder(target, [head], "hedge", num_speculative_tokens=4)
    drafted = []
    for p in PROMPTS:
        out = decoder.generate(p, 40)
        assert out.token_ids == references[tuple(p)]
        for step in out.steps[1:]:  # the first round has no state to draft from
            drafted.append(step.num_draft_tokens)
            gammas = step.gammas[head.name]
            lead = next((j for j, g in enumerate(gammas) if g < 0.5), len(gammas))
            assert min(lead, 4) == step.num_accepted_tokens, (step, gammas)
    assert any(d < 4 for d in drafted) and any(d > 0 for d in drafted)
    with pytest.raises(ConfigError, match="confidence_threshold"):
        HeadDrafter(tiny_head, target_model, confidence_threshold=1.0)


def test_confidence_threshold_head_samples_the_target_law(tiny_head, target_model) -> None:
    """4k seeded generations at temperature 1 with the head's drafts cut at its median
    confidence: the first two tokens follow the target's joint law."""
    sampling = SamplingParams(temperature=1.0)
    prompt = [3, 1, 4, 1, 5]
    target = CachedLM(target_model)
    head = HeadDrafter(tiny_head, target_model, target=target,
                       confidence_threshold=_median_confidence(tiny_head, target_model))
    decoder = SpeculativeDecoder(target, [head], "fixed", num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(4_000):
        target.logits(prompt[:-1], 1)
        out = decoder.generate(prompt, max_new_tokens=3, sampling=SamplingParams(1.0, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert 0 < decoder.stats.num_draft_tokens < 3 * 4_000 * 2  # drafts, some cut short
    assert decoder.stats.num_accepted_tokens > 200
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts, joint)


# ---------------------------------------------------------------- online evolution


@pytest.mark.parametrize("kind", ["ogd", "opt", "ens"])
def test_online_update_changes_the_head_and_stays_lossless(kind, tiny_head, target_model,
                                                          references) -> None:
    head = OnlineHeadDrafter(tiny_head, target_model, kind=kind, lr=0.05,
                             lrs=(0.0, 0.02, 0.05), stride=2, gate=False)
    before = [p.detach().clone() for p in head.copies[-1].parameters()]
    decoder = SpeculativeDecoder(target_model, [head], "fixed", num_speculative_tokens=3)
    for p in PROMPTS:
        assert decoder.generate(p, 40).token_ids == references[tuple(p)]
    assert len(head.history) > 5
    moved = [not torch.equal(a, b) for a, b in zip(before, head.copies[-1].parameters(),
                                                     strict=True)]
    assert any(moved)
    assert all(torch.equal(a, b) for a, b in zip(tiny_head.net.parameters(),
                                                  head.frozen.parameters(), strict=True))
    if kind == "ens":
        assert abs(sum(head.history[-1].weights) - 1) < 1e-9


def test_online_state_survives_a_restart(tmp_path, tiny_head, target_model) -> None:
    a = OnlineHeadDrafter(tiny_head, target_model, kind="opt", lr=0.05, stride=2, gate=False)
    SpeculativeDecoder(target_model, [a], "fixed", num_speculative_tokens=3).generate(
        PROMPTS[0], 30)
    a.save(str(tmp_path / "state.pt"))
    b = OnlineHeadDrafter(tiny_head, target_model, kind="opt", lr=0.05, stride=2, gate=False)
    b.load(str(tmp_path / "state.pt"))
    for x, y in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(x, y)
    assert b.num_rounds == a.num_rounds
    assert all(torch.equal(x, y) for x, y in zip(a.optimizers[0].y, b.optimizers[0].y, strict=True))
    c = OnlineHeadDrafter(tiny_head, target_model, kind="ens", stride=2)
    with pytest.raises(ConfigError):
        c.load(str(tmp_path / "state.pt"))


def test_net_gain_rule_pauses_useless_updates(tiny_head, target_model) -> None:
    # lr 0: the served head never improves on the frozen one, so the rule must fail.
    head = OnlineHeadDrafter(tiny_head, target_model, kind="ogd", lr=0.0, stride=1,
                             min_updates=2, patience=2, pause_rounds=1000)
    decoder = SpeculativeDecoder(target_model, [head], "fixed", num_speculative_tokens=3)
    decoder.generate(PROMPTS[0], 40)
    assert any(r.worth is False for r in head.history)
    assert head.paused_until > head.num_rounds
    assert expected_length(0.5, 4) == pytest.approx(1.9375)


def test_replay_matches_a_real_run(tiny_head, target_model) -> None:
    lm = CachedLM(target_model)
    rec = record_greedy(lm, PROMPTS[2], 30)
    assert rec.output == autoregressive_generate(target_model, PROMPTS[2], 30)
    real_target = CachedLM(target_model)
    real = SpeculativeDecoder(real_target, [HeadDrafter(tiny_head, target_model)], "fixed",
                              num_speculative_tokens=3).generate(PROMPTS[2], 30)
    replay = HiddenReplayTarget(target_model.config.vocab_size)
    replay.use(rec)
    dec = SpeculativeDecoder(replay, [HeadDrafter(tiny_head, target_model)], "fixed",
                             num_speculative_tokens=3)
    out = dec.generate(PROMPTS[2], 30)
    assert out.token_ids == real.token_ids
    assert [s.num_accepted_tokens for s in out.steps] == [
        s.num_accepted_tokens for s in real.steps]
