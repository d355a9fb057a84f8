"""A chi-square goodness-of-fit check without scipy (Wilson-Hilferty quantile)."""

from __future__ import annotations

import math

import numpy as np
import torch

Z_999 = 3.0902  # standard normal 0.999 quantile


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Approximate upper quantile of chi-square(df) (alpha = 0.001 by default)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[
    float, int
]:
    """Pearson's statistic over cells, pooling cells with small expected counts.

    Returns (statistic, degrees of freedom).  Observations in cells of probability 0
    make the statistic infinite.
    """
    counts = np.asarray(counts, dtype=float).ravel()
    probs = np.asarray(probs, dtype=float).ravel()
    n = counts.sum()
    expected = probs * n
    if np.any(counts[probs == 0] > 0):
        return math.inf, 1
    big = expected >= min_expected
    obs = list(counts[big])
    exp = list(expected[big])
    if (~big).any() and expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    o, e = np.array(obs), np.array(exp)
    return float(((o - e) ** 2 / e).sum()), max(len(o) - 1, 1)


def assert_distribution(counts: np.ndarray, probs: np.ndarray) -> None:
    """Fail if ``counts`` are unlikely (p < 0.001) under ``probs``."""
    stat, df = chi2_statistic(counts, probs)
    critical = chi2_critical(df)
    assert stat < critical, f"chi2={stat:.1f} with df={df} (critical {critical:.1f})"


def target_first_two(target_model: torch.nn.Module, prompt: list[int], sampling) -> np.ndarray:
    """Exact joint distribution [V, V] of the target's first two sampled tokens."""
    from specmux.lm import CachedLM
    from specmux.verify import process_logits

    lm = target_model if hasattr(target_model, "logits") else CachedLM(target_model)  # a Target
    p1 = process_logits(lm.logits(prompt, 1), sampling)[0]
    joint = np.zeros((lm.vocab_size, lm.vocab_size))
    for x in torch.nonzero(p1).flatten().tolist():
        p2 = process_logits(lm.logits([*prompt, x], 1), sampling)[0]
        joint[x] = float(p1[x]) * p2.double().numpy()
    return joint
