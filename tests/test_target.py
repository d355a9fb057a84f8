"""The Target protocol: every model wrapper implements it and shares one prefix-sync rule."""

from __future__ import annotations

import torch

from specmux.adapt.drafter import AdaptiveLM
from specmux.adapt.replay import ReplayLM, ReplayTarget
from specmux.drafters.hf import HFDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.lm import CachedLM, as_target
from specmux.target import Target, common_prefix_length, prefix_to_keep

from conftest import VOCAB, tiny_lm


def test_every_wrapper_is_a_target() -> None:
    model = tiny_lm(3)
    wrappers = [CachedLM(model), AdaptiveLM(model, None, "a"), ReplayTarget(VOCAB),
                ReplayLM(model.get_output_embeddings(), VOCAB, None)]
    for lm in wrappers:
        assert isinstance(lm, Target), type(lm).__name__
        assert lm.vocab_size == VOCAB
    assert not isinstance(model, Target)
    assert isinstance(as_target(model), CachedLM)
    assert as_target(wrappers[0]) is wrappers[0]


def test_prefix_sync_rule() -> None:
    assert common_prefix_length([], [1]) == 0
    assert prefix_to_keep([1, 2, 3, 9], [1, 2, 3, 4, 5], first_row=5) == 3
    assert prefix_to_keep([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], first_row=4) == 3  # re-feed 4th


def test_adaptive_lm_reuses_the_cache_like_cached_lm() -> None:
    """Both wrappers sync to the common prefix and give the same frozen logits."""
    model = tiny_lm(3)
    plain, adaptive = CachedLM(model), AdaptiveLM(model, None, "a")
    for ids, num_last in [([1, 2, 3, 4], 1), ([1, 2, 3, 4, 5, 6], 3), ([1, 2, 7], 1)]:
        torch.testing.assert_close(adaptive.logits(ids, num_last), plain.logits(ids, num_last))
    assert plain.num_tokens_fed == 4 + 2 + 1  # row 4 is remembered: feeds 5, 6 only
    assert adaptive.num_tokens_fed == 4 + 3 + 1  # re-feeds position 4 for its row


def test_drafter_accepts_any_target(target_model, drafter_models) -> None:
    lm = CachedLM(drafter_models[1], name="good")
    drafter = HFDrafter(lm, name="good")
    assert drafter.lm is lm
    decoder = SpeculativeDecoder(CachedLM(target_model), [drafter], "fixed")
    prompt = [1, 2, 3, 4]
    assert decoder.generate(prompt, 12).token_ids == autoregressive_generate(
        target_model, prompt, 12)
    assert lm.num_forward_calls > 0


def test_cached_lm_returns_more_rows_than_it_remembers() -> None:
    """A pass asked for more rows than ``max_saved_rows`` (a long window, a large k) returns
    all of them, equal to one uncached pass."""
    model = tiny_lm(3)
    lm = CachedLM(model)
    ids = [(7 * i) % VOCAB for i in range(40)]
    lm.logits(ids[:10], 1)
    rows = lm.logits(ids, 30)  # 30 > max_saved_rows
    assert rows.shape == (30, VOCAB) and len(lm.rows) <= lm.max_saved_rows
    fresh = CachedLM(model).logits(ids, 30)
    torch.testing.assert_close(rows, fresh, rtol=1e-4, atol=1e-4)
