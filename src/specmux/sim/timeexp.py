"""Experiment (e): *time* regret over drafter x k arms, as the drafter pool grows.

Every drafter ``i`` hits each position independently with probability ``alpha_i`` (greedy
scores, ``gamma = w = hit``); a round of arm ``(i, k)`` costs, in target-step units,

    c(i, k) = verify(k + 1) + k * draft_i,     verify(n) = 1 + 0.03 (n - 1)

(a verification pass barely grows with the positions it scores, as in bf16 on the CPU),
with 5% multiplicative noise on the realized seconds.  ``k = 0`` is the no-speculation arm
(``c = 1``, one token).  Drafter 0 is *MAT-optimal* (``alpha = 0.8``, draft cost 0.35: an
LM drafter, best at ``k = 8`` with 4.3 tokens a round, at 1.07 tokens per unit of time),
drafter 1 is *time-optimal* (``alpha = 0.6`` for free: prompt lookup, best at ``k = 4``,
2.06 tokens per unit); the others are weaker (``alpha`` in [0.1, 0.5], cost in [0, 0.3]).

Time regret after ``T`` rounds (pseudo, in target steps): ``sum_t c(a_t) - sum_t mu(a_t) /
rho*`` with ``mu`` the expected tokens of a round and ``rho* = max_a mu_a / c_a``: the
extra time spent against the best fixed arm for the same expected tokens.

Learners: Hedge and NormalHedge on the ``time`` loss (the engine's tracker, with the true
expected costs as the cost model and their own running throughput as ``rho``), Hedge on the
``length`` loss, UCBSpec and EXP3Spec (tokens-per-round reward), and BanditSpec's released
rule (UCB on tokens per second).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from specmux.feedback import CounterfactualTracker
from specmux.policies import make_policy
from specmux.types import Feedback

KS = (1, 2, 4, 8)
POLICY_SPECS = ("hedge:time", "normalhedge:time", "hedge:length", "ucb", "exp3", "banditspec")


def time_pool(num_drafters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``alpha`` [N] and per-token draft cost [N] (drafters 0 and 1 as in the docstring)."""
    alpha = rng.uniform(0.1, 0.5, num_drafters)
    cost = rng.uniform(0.0, 0.3, num_drafters)
    alpha[0], cost[0] = 0.8, 0.35
    if num_drafters > 1:
        alpha[1], cost[1] = 0.6, 0.0
    return alpha, cost


def arm_table(alpha: np.ndarray, cost: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray,
                                                             np.ndarray]:
    """Arms ``(drafter, k)`` (+ the k = 0 arm last), expected tokens [A], costs [A]."""
    arms = [(i, k) for i in range(len(alpha)) for k in KS] + [(0, 0)]
    mu = np.array([sum(alpha[i] ** d for d in range(k + 1)) for i, k in arms])
    c = np.array([1.0 + 0.03 * k + k * cost[i] for i, k in arms])
    return arms, mu, c


def play(spec: str, alpha: np.ndarray, cost: np.ndarray, rounds: int, seed: int,
         checkpoints: np.ndarray) -> dict[str, Any]:
    """One run; returns the time regret at ``checkpoints`` and the most played arm."""
    name, _, loss = spec.partition(":")
    arms, mu, c = arm_table(alpha, cost)
    rho_star = float(np.max(mu / c))
    policy = make_policy(name, len(arms), seed=seed)
    tracker = (CounterfactualTracker(arms, loss or "length") if policy.full_information
               else None)
    rng = np.random.default_rng([seed, 41])
    max_k = max(KS)
    hits = (rng.random((rounds * (max_k + 1) + max_k + 1, len(alpha))) < alpha).astype(float)
    noise = np.exp(0.05 * rng.standard_normal(rounds))
    s, tokens_sum, seconds_sum, regret = 0, 0.0, 0.0, 0.0
    curve, counts = [], np.zeros(len(arms), dtype=int)
    marks = iter(checkpoints.tolist())
    mark = next(marks)
    for t in range(rounds):
        a = policy.select()
        i, k = arms[a]
        window = hits[s : s + k, i]
        acc = int(np.argmin(np.append(window, 0.0)))
        n = acc + 1
        seconds = float(c[a] * noise[t])
        losses: tuple[np.ndarray, ...] = ()
        if tracker is not None:
            rho = tokens_sum / seconds_sum if seconds_sum > 0 else 0.0
            losses = tuple(v for _, v in tracker.add_round_tagged(
                hits[s : s + n], hits[s : s + n], a, costs=c, rho=rho))
        policy.update(Feedback(arm=a, k=k, max_k=max_k, num_draft_tokens=k,
                               num_accepted_tokens=acc, losses=losses, seconds=seconds))
        s += n
        tokens_sum += n
        seconds_sum += seconds
        regret += float(c[a] - mu[a] / rho_star)
        counts[a] += 1
        if t + 1 == mark:
            curve.append(regret)
            mark = next(marks, -1)
    best = int(np.argmax(counts))
    return {"policy": spec, "regret": curve, "final": regret,
            "favourite": f"{arms[best][0]}@k={arms[best][1]}",
            "favourite_share": float(counts[best] / rounds),
            "throughput": tokens_sum / seconds_sum, "rho_star": rho_star}


def experiment_e(cfg: Any, step: Callable[[str, int], None]) -> Any:
    """(e) Time regret of full-information vs bandit learners over drafter x k."""
    from specmux.sim.experiments import ExperimentResult, _save, fit_line, loglog_slope

    rounds = cfg.rounds or cfg.pick(4000, 1000)
    seeds = cfg.seeds or cfg.pick(3, 1)
    max_n = cfg.num_drafters or cfg.pick(64, 8)
    sizes = [n for n in (2, 4, 8, 16, 32, 64, 128) if n <= max_n]
    specs = cfg.policies and [s for s in POLICY_SPECS if s.partition(":")[0] in cfg.policies]
    specs = specs or list(POLICY_SPECS)
    marks = np.unique(np.geomspace(10, rounds, 30).astype(int))
    rows, jobs = [], 0
    for n in sizes:
        for seed in range(seeds):
            alpha, cost = time_pool(n, np.random.default_rng([seed, n, 7]))
            for spec in specs:
                row = play(spec, alpha, cost, rounds, seed, marks)
                rows.append({"experiment": "e", "num_drafters": n, "num_arms": n * len(KS) + 1,
                             "seed": seed, "rounds": rounds, **row})
                jobs += 1
                step(f"(e) N={n} {spec} seed {seed}", jobs)
    final = {(s, n): float(np.mean([r["final"] for r in rows
                                    if r["policy"] == s and r["num_drafters"] == n]))
             for s in specs for n in sizes}
    xs = np.array(sizes, float)
    fits = {s: {"slope_vs_N": loglog_slope(xs, np.array([final[s, n] for n in sizes])),
                "fit_vs_lnN": fit_line(np.log(xs), np.array([final[s, n] for n in sizes])),
                "regret_by_N": {n: final[s, n] for n in sizes}} for s in specs}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in specs:
        ax1.plot(sizes, [final[s, n] for n in sizes], marker="o", label=s)
        mid = sizes[len(sizes) // 2]
        curves = [r["regret"] for r in rows if r["policy"] == s and r["num_drafters"] == mid]
        ax2.plot(marks, np.mean(curves, axis=0), label=s)
    ax1.set_xscale("log", base=2)
    ax1.set(yscale="log", xlabel="drafters N (arms 4N + 1)",
            ylabel=f"time regret after {rounds} rounds (target steps)")
    ax2.set(xscale="log", yscale="log", xlabel="rounds",
            ylabel=f"time regret, N = {sizes[len(sizes) // 2]}")
    ax1.legend(fontsize=7)
    fig.suptitle("(e) time regret over drafter x k (MAT-optimal != time-optimal arm)")
    figure = _save(fig, Path(cfg.out) / "e_time_regret.png")
    header = ("| learner | " + " | ".join(f"N={n}" for n in sizes)
              + " | log-log slope vs N | a + b ln N: b (R²) |")
    lines = [header, "|---" * (len(sizes) + 3) + "|"]
    for s in specs:
        slope, (_, b, r2) = fits[s]["slope_vs_N"], fits[s]["fit_vs_lnN"]
        lines.append(f"| {s} | " + " | ".join(f"{final[s, n]:.1f}" for n in sizes)
                     + f" | {'–' if slope is None else f'{slope:.2f}'} | {b:.1f} ({r2:.2f}) |")
    fav = {s: [r["favourite"] for r in rows if r["policy"] == s and r["num_drafters"] == sizes[-1]]
           for s in specs}
    lines += ["", f"Most played arm at N = {sizes[-1]} (drafter@k; the time-optimal arm is "
              "1@k=4, the MAT-optimal 0@k=8): "
              + "; ".join(f"{s}: {', '.join(v)}" for s, v in fav.items())]
    return ExperimentResult("e", "(e) time regret over drafter x k", rows, fits, figure,
                            "\n".join(lines), jobs=jobs)
