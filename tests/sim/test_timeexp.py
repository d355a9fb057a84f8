"""Experiment (e): the time loss finds the time-optimal arm where MAT and time disagree."""

from __future__ import annotations

import numpy as np

from specmux.sim.timeexp import arm_table, play, time_pool


def test_pool_has_distinct_mat_and_time_optima() -> None:
    alpha, cost = time_pool(6, np.random.default_rng(0))
    arms, mu, c = arm_table(alpha, cost)
    assert arms[int(np.argmax(mu))] == (0, 8)  # MAT-optimal: the LM-like drafter, k = 8
    assert arms[int(np.argmax(mu / c))] == (1, 4)  # time-optimal: free drafter, k = 4
    assert arms[-1] == (0, 0) and mu[-1] == 1.0 and c[-1] == 1.0  # no speculation


def test_time_loss_learners_beat_bandits_and_the_length_loss() -> None:
    alpha, cost = time_pool(8, np.random.default_rng(1))
    marks = np.array([1500])
    runs = {spec: play(spec, alpha, cost, 1500, 0, marks)
            for spec in ("hedge:time", "normalhedge:time", "hedge:length", "ucb")}
    for spec in ("hedge:time", "normalhedge:time"):
        assert runs[spec]["favourite"] == "1@k=4", runs[spec]
        assert runs[spec]["final"] < 0.1 * runs["ucb"]["final"]
        assert runs[spec]["final"] < 0.1 * runs["hedge:length"]["final"]
    assert runs["hedge:length"]["favourite"] == "0@k=8"  # tokens per call, not per second
