"""Counterfactual scoring: the unbiased estimator, and the delayed-feedback queue."""

from __future__ import annotations

import numpy as np
import torch

from specmux.feedback import CounterfactualTracker, expected_accepted, position_scores
from specmux.types import PathDistributions

# Toy case, vocabulary 4, depth 2.  Position 1: p1, q1.  Position 2 depends on token x1.
# The drafter agrees with the target at depth 2 exactly after the token it favours at depth 1,
# which the realized path (drawn from p) rarely takes: the naive product is biased low.
P1 = np.array([0.7, 0.1, 0.1, 0.1])
Q1 = np.array([0.1, 0.1, 0.1, 0.7])
P2 = np.array([[0.85, 0.05, 0.05, 0.05], [0.1, 0.7, 0.1, 0.1], [0.25] * 4, [0.1, 0.1, 0.1, 0.7]])
Q2 = np.array([[0.05, 0.05, 0.05, 0.85], [0.1, 0.1, 0.7, 0.1], [0.25] * 4, [0.1, 0.1, 0.1, 0.7]])


def _scores(x1: int, x2: int) -> tuple[np.ndarray, np.ndarray]:
    """gamma, w [2, 1] along the realized path (x1, x2) via specmux's own scoring."""
    p = torch.tensor(np.stack([P1, P2[x1]]), dtype=torch.float64)
    q = torch.tensor(np.stack([Q1, Q2[x1]]), dtype=torch.float64)
    dist = PathDistributions(tokens=q.argmax(-1), probs=q)
    return position_scores(torch.tensor([x1, x2]), p, [dist], greedy=False)


def test_unbiased_estimator_matches_monte_carlo_acceptance_where_naive_does_not() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    # Monte-Carlo truth: really run speculative verification with this drafter (depth 2).
    x1 = rng.choice(4, size=n, p=Q1)
    ok1 = rng.random(n) < np.minimum(1.0, P1[x1] / Q1[x1])
    x2 = np.array([rng.choice(4, p=Q2[a]) for a in x1[:20_000]])
    ok2 = rng.random(20_000) < np.minimum(1.0, P2[x1[:20_000], x2] / Q2[x1[:20_000], x2])
    mc_depth2 = float(np.mean(ok1[:20_000] & ok2))
    exact = float(sum(min(P1[a], Q1[a]) * np.minimum(P2[a], Q2[a]).sum() for a in range(4)))
    assert abs(mc_depth2 - exact) < 0.012  # the simulation agrees with the closed form

    # Estimators, averaged over realized paths x ~ p (what the engine observes).
    table = {(a, b): _scores(a, b) for a in range(4) for b in range(4)}
    xs1 = rng.choice(4, size=n, p=P1)
    xs2 = np.array([rng.choice(4, p=P2[a]) for a in xs1])
    pairs = list(zip(xs1, xs2, strict=True))
    unbiased = np.mean([table[a, b][1][0, 0] * table[a, b][0][1, 0] for a, b in pairs])
    naive = np.mean([table[a, b][0][0, 0] * table[a, b][0][1, 0] for a, b in pairs])
    assert abs(unbiased - mc_depth2) < 0.01
    assert abs(naive - mc_depth2) > 0.03  # the naive product is measurably biased


def test_expected_accepted_sums_reach_probabilities() -> None:
    gamma = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert expected_accepted(gamma, gamma, 3).tolist() == [2.0, 0.0]
    assert expected_accepted(gamma, gamma, 1).tolist() == [1.0, 0.0]


def test_greedy_scores_are_argmax_indicators() -> None:
    p = torch.eye(4)[[1, 2, 3]]  # target argmax 1, 2, 3
    dists = [PathDistributions(tokens=torch.tensor([1, 0, 3])),
             PathDistributions(tokens=torch.tensor([-1, 2, 3]))]
    gamma, weight = position_scores(torch.tensor([1, 2, 3]), p, dists, greedy=True)
    assert gamma.tolist() == [[1, 0], [0, 1], [1, 1]] and (gamma == weight).all()


def test_delayed_feedback_waits_for_future_positions() -> None:
    tracker = CounterfactualTracker([(0, 3), (1, 3)], loss="length", delayed=True)
    # Round 1 path has 2 positions: drafter 0 hit both, drafter 1 hit both too.
    ones = np.ones((2, 2))
    assert tracker.add_round(ones, ones) == []  # depth 3 unknown yet
    assert tracker.num_pending == 1
    # Round 2: position 3 (drafter 0 misses, drafter 1 hits), then one more position.
    g = np.array([[0.0, 1.0], [1.0, 1.0]])
    released = tracker.add_round(g, g)
    assert len(released) == 1
    # Round 1 counterfactual: drafter 0 gets 2 accepted, drafter 1 gets 3 (max_k = 3).
    assert np.allclose(released[0], [1 - 3 / 4, 1 - 4 / 4])
    rest = tracker.flush()
    assert len(rest) == 1 and tracker.num_pending == 0


def test_naive_truncation_underestimates_long_runners() -> None:
    ones = np.ones((2, 2))
    naive = CounterfactualTracker([(0, 3), (1, 3)], delayed=False)
    (losses,) = naive.add_round(ones, ones)
    assert np.allclose(losses, [1 - 3 / 4, 1 - 3 / 4])  # both capped at the path length


def test_acceptance_loss_is_immediate() -> None:
    tracker = CounterfactualTracker([(0, 4), (1, 4)], loss="acceptance")
    (losses,) = tracker.add_round(np.array([[1.0, 0.0], [0.5, 0.0]]), np.ones((2, 2)))
    assert np.allclose(losses, [0.5 / 5, 2.0 / 5])  # summed over the path, scaled by max_k + 1


def test_a_position_past_max_k_changes_no_released_loss() -> None:
    """The engine does not score the bonus position of a path longer than max_k: whatever its
    scores, the released losses are those of the path cut to max_k positions."""
    rng = np.random.default_rng(5)
    arms = [(d, k) for d in range(3) for k in (2, 4)]
    for delayed in (True, False):
        full, cut = (CounterfactualTracker(arms, "length", delayed) for _ in range(2))
        out_full, out_cut = [], []
        for _ in range(300):
            n = int(rng.integers(1, 6))  # 1..max_k + 1 positions
            gamma = rng.random((n, 3))
            weight = (rng.random((n, 3)) < 0.7) * rng.random((n, 3))
            out_full += full.add_round(gamma, weight)
            out_cut += cut.add_round(gamma[:4], weight[:4])
            if rng.random() < 0.05:
                out_full += full.flush()
                out_cut += cut.flush()
        out_full += full.flush()
        out_cut += cut.flush()
        assert len(out_full) == len(out_cut) == 300
        for a, b in zip(out_full, out_cut, strict=True):
            np.testing.assert_array_equal(a, b)


def test_provisional_losses_read_the_known_positions_and_move_nothing() -> None:
    """While a round's window is being verified, its provisional loss counts the positions
    known (a drafter that missed is final; one still matching is assumed to match the
    rest), changes no running statistic, and becomes the real loss once the window is
    complete with the optimistic guess right."""
    tracker = CounterfactualTracker([(0, 4), (1, 4), (1, 2)], "time")
    costs = np.array([0.4, 0.4, 0.3])
    hit_b = np.array([[0.0, 1.0]])  # drafter 0 misses, drafter 1 matches

    def add() -> list:
        return tracker.add_round_tagged(hit_b, hit_b.copy(), 7, costs=costs, rho=5.0)

    assert add() == []
    (tag, ahead), = tracker.provisional()
    np.testing.assert_array_equal(tracker.provisional()[0][1], ahead)  # nothing moved
    assert tag == 7 and ahead[1] < ahead[2] < ahead[0]  # b@4 (5 tokens) best, a@4 worst
    assert tracker.time_scale == 0.0 and tracker.best_fixed_rate() == 0.0
    released = [add() for _ in range(3)][-1]  # the fourth position completes the window
    np.testing.assert_allclose(released[0][1], ahead)  # b did match the rest: the same loss
    pending = CounterfactualTracker([(0, 4), (1, 4)], "length")
    pending.add_round_tagged(np.array([[0.0, np.nan]]), np.array([[0.0, np.nan]]), 0,
                             factors=np.array([1.0, 20.0]), deferred=[1],
                             scorer=lambda d, lo, hi: (np.ones(hi - lo), np.ones(hi - lo)))
    (_, ahead), = pending.provisional()  # drafter 1's coin run waits: imputed (1/2)
    assert ahead.tolist() == [0.8, 0.5]
    assert CounterfactualTracker([(0, 4)], "acceptance").provisional() == []


def test_provisional_losses_count_positions_a_drafter_was_not_run_on_as_unknown() -> None:
    """An LM drafter played in a round is run on that round's path only (nan after it):
    there its later positions are unknown, so optimistic like the unverified ones, not
    misses; a drafter that missed where it was run stays final."""
    tracker = CounterfactualTracker([(0, 4), (1, 4)], "length")
    played = np.ones((2, 2))  # the LM (drafter 0) drafted 2, both accepted; ngram matched
    tracker.add_round_tagged(played, played.copy(), 0, factors=np.ones(2))
    later = np.array([[np.nan, 1.0]])  # the next round: prompt lookup played, LM not run
    tracker.add_round_tagged(later, later.copy(), 1, factors=np.array([0.0, 1.0]))
    (_, first), (_, second) = tracker.provisional()
    assert first.tolist() == [0.0, 0.0]  # both 5 of 5 (not the LM 3: a miss where not run)
    assert second.tolist() == [0.5, 0.0]  # the LM unscored there: imputed


def test_tokens_with_per_round_draft_lengths_match_each_length_on_its_own() -> None:
    """Every arm's expected tokens when drafters offer fewer than ``k`` this round (``ks``)
    come from one prefix sum; each must equal ``E[min(A, k_a)] + 1`` for its own ``k_a``,
    including ``k_a = 0``, ``k_a`` past the known rows and rows past every ``k_a``."""
    arms = [(d, k) for d in range(3) for k in (0, 2, 4, 8)]
    tracker = CounterfactualTracker(arms, "length")
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 11))  # rows of the path
        gamma = rng.random((n, 3))
        weight = np.where(rng.random((n, 3)) < 0.3, 0.0, rng.random((n, 3)))
        ks = np.array([min(k, int(rng.integers(0, 9))) for _, k in arms])
        want = np.array([expected_accepted(gamma, weight, int(k))[d] + 1.0
                         for (d, _), k in zip(arms, ks, strict=True)])
        np.testing.assert_allclose(tracker.tokens(gamma, weight, ks), want, rtol=0, atol=1e-12)
    assert tracker.tokens(gamma, weight, np.zeros(len(arms), dtype=int)).tolist() == [1.0] * 12


def test_greedy_scores_of_a_drafter_not_run_are_unknown_and_probs_are_argmaxed() -> None:
    """A drafter skipped this round (``None``) scores ``nan`` in both arrays; a drafter
    with full distributions is scored by its argmax; the arrays are separate copies."""
    path = torch.tensor([2, 0])
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])  # argmax 2, 0: both right
    gamma, weight = position_scores(path, None, [None, PathDistributions(
        tokens=probs.argmax(dim=-1), probs=probs)], greedy=True)
    assert np.isnan(gamma[:, 0]).all() and np.isnan(weight[:, 0]).all()
    assert gamma[:, 1].tolist() == [1.0, 1.0] and weight[:, 1].tolist() == [1.0, 1.0]
    gamma[0, 1] = 0.0
    assert weight[0, 1] == 1.0


def test_a_drafter_that_would_stop_scores_nothing_from_that_row_on() -> None:
    """``stops`` rows score 0 in gamma and w, greedy and sampled: a draft reaching them
    ends there, so expected_accepted counts only the rows before."""
    path = torch.tensor([5, 6, 7, 8])
    tokens = torch.tensor([5, 6, 7, 8])  # every guess right
    stops = torch.tensor([False, False, True, False])
    dists = [PathDistributions(tokens=tokens), PathDistributions(tokens=tokens, stops=stops)]
    gamma, w = position_scores(path, None, dists, greedy=True)
    assert gamma[:, 0].tolist() == [1, 1, 1, 1] and gamma[:, 1].tolist() == [1, 1, 0, 1]
    assert expected_accepted(gamma, w, 4).tolist() == [4.0, 2.0]
    p = torch.full((4, 10), 0.1)
    gamma, w = position_scores(path, p, dists, greedy=False)
    assert gamma[2, 1] == w[2, 1] == 0.0 and gamma[2, 0] > 0
    assert expected_accepted(gamma, w, 4)[1] == expected_accepted(gamma[:2], w[:2], 2)[1]
