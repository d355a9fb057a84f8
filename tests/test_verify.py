"""Verification: greedy rules, and rejection sampling that reproduces p exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specmux.types import Draft, SamplingParams
from specmux.verify import process_logits, verify, verify_greedy, verify_sampling

from stats import assert_distribution, chi2_statistic


def test_greedy_accepts_matching_prefix_then_recovers() -> None:
    logits = torch.full((4, 6), -5.0)
    for j, tok in enumerate([2, 3, 4, 5]):
        logits[j, tok] = 5.0
    v = verify_greedy(torch.tensor([2, 3, 1]), logits)
    assert v.num_accepted_tokens == 2 and not v.bonus
    assert v.tokens.tolist() == [2, 3, 4]  # recovered token = target argmax at the mismatch


def test_greedy_all_accepted_adds_bonus() -> None:
    logits = torch.full((3, 6), -5.0)
    for j, tok in enumerate([2, 3, 1]):
        logits[j, tok] = 5.0
    v = verify_greedy(torch.tensor([2, 3]), logits)
    assert v.bonus and v.num_accepted_tokens == 2 and v.tokens.tolist() == [2, 3, 1]


def test_empty_draft_is_one_target_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    v, _ = verify(Draft(torch.zeros(0, dtype=torch.long)), logits, SamplingParams())
    assert v.tokens.tolist() == [1] and v.bonus


def _draws(p: torch.Tensor, q: torch.Tensor | None, draft_fn, n: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    counts = np.zeros(p.shape[-1])
    for _ in range(n):
        tokens = draft_fn(gen)
        v = verify_sampling(tokens, q, p, gen)
        counts[int(v.tokens[0])] += 1
    return counts


P = torch.tensor([[0.45, 0.25, 0.2, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
Q = torch.tensor([[0.05, 0.1, 0.3, 0.3, 0.25], [0.5, 0.1, 0.1, 0.1, 0.2]])


def test_sampling_with_probabilistic_draft_matches_p() -> None:
    """First committed token ~ p_0 even though the drafter's q puts mass where p has none."""
    counts = _draws(P, Q, lambda g: torch.multinomial(Q[0], 1, generator=g), 20_000, 0)
    assert_distribution(counts, P[0].numpy())
    # The draft distribution itself is far from p: the test has power.
    assert chi2_statistic(counts, Q[0].numpy())[0] > 1000


def test_sampling_with_deterministic_draft_matches_p() -> None:
    counts = _draws(P, None, lambda g: torch.tensor([2]), 20_000, 1)
    assert_distribution(counts, P[0].numpy())


def test_bonus_token_follows_last_row() -> None:
    p = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])  # draft token 1 always accepted
    gen = torch.Generator().manual_seed(2)
    counts = np.zeros(3)
    for _ in range(10_000):
        v = verify_sampling(torch.tensor([1]), None, p, gen)
        assert v.bonus and v.tokens[0] == 1
        counts[int(v.tokens[1])] += 1
    assert_distribution(counts, p[1].numpy())


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_sampling_matches_p_on_random_distributions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = torch.tensor(rng.dirichlet(np.ones(4) * 0.5), dtype=torch.float32)[None].repeat(2, 1)
    q = torch.tensor(rng.dirichlet(np.ones(4) * 0.5), dtype=torch.float32)[None]
    counts = _draws(p, q, lambda g: torch.multinomial(q[0], 1, generator=g), 4_000, seed)
    assert_distribution(counts, p[0].numpy())


def test_process_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_p = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    hot = process_logits(logits, SamplingParams(temperature=2.0))
    assert hot[0, 3] > 0.05  # flatter than T = 1


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_params(bad: dict) -> None:
    from specmux.errors import ConfigError

    with pytest.raises(ConfigError):
        SamplingParams(**bad)


def test_greedy_without_probs_skips_the_softmax_only() -> None:
    """``probs=False`` changes nothing but the second result under greedy decoding; sampling
    always returns p (it verifies against it)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    draft = Draft(tokens=logits[:3].argmax(dim=-1).clone())
    draft.tokens[2] = (draft.tokens[2] + 1) % 50  # rejected at the third token
    greedy = SamplingParams()
    with_p, p = verify(draft, logits, greedy)
    without, none = verify(draft, logits, greedy, probs=False)
    assert none is None and torch.allclose(p, torch.softmax(logits, dim=-1))
    assert without.tokens.tolist() == with_p.tokens.tolist()
    assert without.num_accepted_tokens == with_p.num_accepted_tokens == 2
    _, sampled_p = verify(draft, logits, SamplingParams(temperature=1.0),
                          torch.Generator().manual_seed(0), probs=False)
    assert sampled_p is not None
