"""The simulator's experiments: (a)-(d) reproduce the seed papers' claims; ``run`` is a plain run.

Each experiment reads as grid -> fit -> figure -> markdown: a ``_Grid*`` dataclass holds its
parameters, ``_run_*`` plays the real policy classes through
:func:`specmux.sim.runner.simulate` over the grid (one JSON-able row per run), ``_fit_*``
computes the fitted numbers, ``_figure_*`` draws the PNG and ``_markdown_*`` writes the
section; together an :class:`ExperimentResult`.  :func:`run_experiments`
writes them all under one output directory (``results.jsonl``, ``*.png``, ``summary.md``).

* **a** (Not-a-Bandit): static regret after ``T`` rounds vs the number of drafters ``N`` for
  full-information learners (Hedge, NormalHedge) and bandits (UCBSpec, EXP3Spec), with
  log-log slopes and a fit against ``ln N``.
* **b** (BanditSpec): UCBSpec's stopping-time regret vs the token budget ``T`` on a
  stochastic pool, fitted to ``a + b ln T``; then an adaptive adversary that alternates the
  domain against the favoured arm, where the deterministic UCB index fails and EXP3Spec does not.
* **c** (HedgeSpec's feedback): delayed vs naive (truncated) counterfactual feedback, and the
  acceptance-length loss vs the acceptance-probability loss.
* **d** (MetaSD): the block-divergence reward vs the block-efficiency reward for MetaSD's UCB,
  over its exploration scale ``beta``.
* **e** (issue 11, :mod:`specmux.sim.timeexp`): *time* regret over drafter x k arms (with a
  no-speculation arm) as the pool grows, where the MAT-optimal and time-optimal arms differ.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from specmux.errors import ConfigError  # noqa: E402
from specmux.policies import POLICIES, Policy, make_policy  # noqa: E402
from specmux.sim.env import (  # noqa: E402
    STREAMS,
    DrafterPool,
    SimEnv,
    Stream,
    expert_pool,
    iid_pool,
    make_stream,
)
from specmux.sim.runner import (  # noqa: E402
    Trace,
    arm_means,
    checkpoints,
    default_arms,
    regret_curve,
    segment_regret,
    simulate,
    stop_regret,
)

log = logging.getLogger(__name__)

EXPERIMENTS = ("a", "b", "c", "d", "e", "run")
StepFn = Callable[[str, int], None]  # (description, jobs done so far in this experiment)


@dataclass(frozen=True)
class SimConfig:
    """Options shared by the experiments (``None``: the experiment's own default)."""

    out: Path = Path("sim-out")
    seeds: int | None = None
    rounds: int | None = None
    policies: tuple[str, ...] | None = None
    num_drafters: int | None = None
    env: str | None = None
    mode: str = "greedy"
    k: int = 4
    quick: bool = False
    command: str = "specmux simulate"

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


@dataclass
class ExperimentResult:
    name: str
    title: str
    rows: list[dict[str, Any]]
    fits: dict[str, Any]
    figure: Path | None
    markdown: str
    seconds: float = 0.0
    jobs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _policy(name: str, num_arms: int, seed: int, **kwargs: Any) -> Policy:
    policy = make_policy(name, num_arms, seed=seed, **kwargs)
    assert type(policy) is POLICIES[name]  # the engine's own classes, never copies
    return policy


def _stream_for(kind: str, num_domains: int, rounds: int, k: int, seed: int,
                query_tokens: int = 256) -> Stream:
    """A stream long enough for ``rounds`` rounds of at most ``k + 1`` tokens."""
    num_queries = rounds * (k + 1) // query_tokens + 2
    return make_stream(kind, num_domains, num_queries, np.random.default_rng([seed, 17]),
                       query_tokens=query_tokens)


def _play(
    policy: Policy,
    pool: DrafterPool,
    stream: Stream,
    arms: Sequence[tuple[int, int]],
    seed: int,
    mode: str,
    *,
    rounds: int | None = None,
    tokens: int | None = None,
    loss: str = "length",
    delayed: bool = True,
    reset_per_query: bool = False,
) -> Trace:
    needs_scores = policy.full_information or (
        mode == "sampling" and policy.reads_divergence
    )
    env = SimEnv(pool, np.random.default_rng([seed, 29]), mode=mode, scores=needs_scores)
    return simulate(policy, env, stream, arms, rounds=rounds, tokens=tokens, loss=loss,
                    delayed=delayed, reset_per_query=reset_per_query)


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: (a, b, R^2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return float(a), float(b), r2


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float | None:
    """Slope of ``log y`` vs ``log x`` over the points with ``y > 0`` (None if < 2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = y > 0
    if ok.sum() < 2:
        return None
    return fit_line(np.log(x[ok]), np.log(y[ok]))[1]


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, float)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), se


COLORS = {"hedge": "C0", "normalhedge": "C1", "ucb": "C2", "exp3": "C3", "metasd": "C4",
          "fixed": "C7"}


# ----------------------------------------------------------------------------- (a)


def gap_pool(num_drafters: int, rng: np.random.Generator, best: float = 0.8,
             others: tuple[float, float] = (0.45, 0.75)) -> DrafterPool:
    """One domain; drafter 0 accepts ``best`` per position, the rest uniform in ``others``."""
    alpha = rng.uniform(*others, size=num_drafters)
    alpha[0] = best
    return iid_pool(alpha, tuple(["best"] + [f"d{i}" for i in range(1, num_drafters)]))


@dataclass
class _GridA:
    """Experiment (a)'s grid, and the rows its runs produce."""

    sizes: list[int]
    rounds: int
    pq_rounds: int
    seeds: int
    pq_seeds: int
    policies: tuple[str, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: SimConfig) -> _GridA:
        max_n = cfg.num_drafters or cfg.pick(1024, 64)
        rounds = cfg.rounds or cfg.pick(20_000, 3_000)
        return cls(sizes=[2**j for j in range(1, int(math.log2(max_n)) + 1)], rounds=rounds,
                   pq_rounds=max(rounds // 2, 500), seeds=cfg.seeds or cfg.pick(3, 1),
                   pq_seeds=cfg.seeds or cfg.pick(2, 1),
                   policies=cfg.policies or ("hedge", "normalhedge", "ucb", "exp3"))


def experiment_a(cfg: SimConfig, step: StepFn) -> ExperimentResult:
    """Regret vs N: full information (log N) against bandits (N or sqrt N).

    Panel *static*: one domain, regret against the best fixed drafter after ``T`` rounds.
    Panel *per query*: four domains with domain experts, queries of 256 tokens in i.i.d.
    domains, every learner reset at each query (the engine's ``reset_per_query``), regret
    against the best drafter of each query, per query.
    """
    grid = _GridA.of(cfg)
    jobs = _run_a(cfg, grid, step)
    fits, points = _fit_a(grid)
    figure = _figure_a(cfg, grid, points)
    return ExperimentResult("a", "(a) Not-a-Bandit: regret vs number of drafters", grid.rows,
                            fits, figure, _markdown_a(cfg, grid, fits), jobs=jobs)


def _run_a(cfg: SimConfig, grid: _GridA, step: StepFn) -> int:
    jobs = 0
    for n in grid.sizes:
        for seed in range(grid.seeds):
            pool = gap_pool(n, np.random.default_rng([n, seed, 1]))
            arms = default_arms(n, (cfg.k,))
            mu = arm_means(pool, arms)
            stream = _stream_for("stationary", 1, grid.rounds, cfg.k, seed)
            for name in grid.policies:
                policy = _policy(name, len(arms), seed)
                trace = _play(policy, pool, stream, arms, seed, cfg.mode, rounds=grid.rounds)
                regret = float(regret_curve(trace, mu, np.array([trace.num_rounds]))[0])
                grid.rows.append({"experiment": "a", "panel": "static", "policy": name,
                                  "num_drafters": n, "seed": seed, "rounds": trace.num_rounds,
                                  "regret": regret, "mat": trace.mean_tokens_per_round,
                                  "best_mat": float(mu.max()),
                                  "rounds_per_s": trace.rounds_per_second,
                                  "rounds_per_cpu_s": trace.rounds_per_cpu_second})
                jobs += 1
                step(f"(a) static N={n} {name} seed {seed}", jobs)
        for seed in range(grid.pq_seeds):
            pool = expert_pool(n, 4, np.random.default_rng([n, seed, 2]))
            arms = default_arms(n, (cfg.k,))
            mu = arm_means(pool, arms)
            stream = _stream_for("stationary", 4, grid.pq_rounds, cfg.k, seed)
            for name in grid.policies:
                policy = _policy(name, len(arms), seed)
                trace = _play(policy, pool, stream, arms, seed, cfg.mode,
                              rounds=grid.pq_rounds, reset_per_query=True)
                queries = max(int(np.count_nonzero(np.diff(trace.domain) != 0)) + 1,
                              int(round(trace.num_tokens / stream.query_tokens)))
                grid.rows.append({"experiment": "a", "panel": "per_query", "policy": name,
                                  "num_drafters": n, "seed": seed, "rounds": trace.num_rounds,
                                  "queries": queries,
                                  "regret": segment_regret(trace, mu) / queries,
                                  "mat": trace.mean_tokens_per_round,
                                  "rounds_per_s": trace.rounds_per_second})
                jobs += 1
                step(f"(a) per-query N={n} {name} seed {seed}", jobs)
    return jobs


_Points = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # panel -> policy -> mean, se


def _fit_a(grid: _GridA) -> tuple[dict[str, Any], _Points]:
    """Regret vs N per panel and policy: the fits, and the (mean, se) points plotted."""
    fits: dict[str, Any] = {"static": {}, "per_query": {}}
    points: _Points = {"static": {}, "per_query": {}}
    for panel in ("static", "per_query"):
        for name in grid.policies:
            stats = [_mean_se([r["regret"] for r in grid.rows if r["panel"] == panel
                               and r["policy"] == name and r["num_drafters"] == n])
                     for n in grid.sizes]
            mean = np.array([m for m, _ in stats])
            points[panel][name] = (mean, np.array([e for _, e in stats]))
            _, b, r2 = fit_line(np.log(grid.sizes), mean)
            fits[panel][name] = {
                "loglog_slope": loglog_slope(np.array(grid.sizes), mean),
                "per_ln_n": b, "per_ln_n_r2": r2,
                "regret_by_n": dict(zip(grid.sizes, mean.round(2).tolist(), strict=True)),
            }
    return fits, points


def _figure_a(cfg: SimConfig, grid: _GridA, points: _Points) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, panel in zip(axes, ("static", "per_query"), strict=True):
        for name in grid.policies:
            mean, se = points[panel][name]
            ax.errorbar(grid.sizes, np.maximum(mean, 1e-2), yerr=se, marker="o", ms=3,
                        label=name, color=COLORS.get(name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of drafters N")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("regret (expected tokens lost)")
    axes[0].set_title(f"static: one domain, {grid.rounds} rounds")
    axes[1].set_ylabel("regret per query (tokens)")
    axes[1].set_title("per query: 4 domains, reset each query")
    axes[0].legend(fontsize=8)
    return _save(fig, cfg.out / "a_regret_vs_n.png")


def _markdown_a(cfg: SimConfig, grid: _GridA, fits: dict[str, Any]) -> str:
    sizes = grid.sizes
    md_parts = [
        f"*Static*: one domain; drafter 0 accepts 0.8 per position, the other N-1 uniform in "
        f"[0.45, 0.75]; k={cfg.k}, {grid.rounds} rounds, {grid.seeds} seed(s).  Regret = "
        f"expected tokens lost against the best fixed drafter (pseudo-regret).  *Per query*: "
        f"4 domains, drafter 0 a generalist (0.7 everywhere), the others experts (0.75-0.9 "
        f"at home, 0.3-0.5 elsewhere); queries of 256 tokens in i.i.d. domains, every "
        f"learner reset at each query; {grid.pq_rounds} rounds, {grid.pq_seeds} seed(s); "
        f"regret against the best drafter of each query, per query.  "
        f"N = {', '.join(map(str, sizes))}.", ""]
    for panel in ("static", "per_query"):
        md_parts += [f"| {panel}: policy | feedback | log-log slope vs N | "
                     f"regret per unit ln N (R²) | at N={sizes[0]} | at N={sizes[-1]} |",
                     "|---|---|---|---|---|---|"]
        for name in grid.policies:
            f = fits[panel][name]
            kind = "full information" if POLICIES[name].full_information else "bandit"
            md_parts.append(f"| {name} | {kind} | {_fmt(f['loglog_slope'])} | "
                            f"{_fmt(f['per_ln_n'], 2)} ({_fmt(f['per_ln_n_r2'])}) | "
                            f"{f['regret_by_n'][sizes[0]]} | {f['regret_by_n'][sizes[-1]]} |")
        md_parts.append("")
    return "\n".join(md_parts)


# ----------------------------------------------------------------------------- (b)


@dataclass
class _GridB:
    """Experiment (b)'s grid, and what its runs produce."""

    seeds: int
    n: int
    alpha: np.ndarray  # [n] per-position acceptance (stochastic part)
    max_tokens: int
    budgets: np.ndarray  # token budgets T
    configs: list[tuple[str, str, dict[str, Any]]]  # (label, policy, options)
    adv_rounds: int
    adv_policies: tuple[str, ...]
    at: np.ndarray  # rounds at which the adversarial regret is read
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[np.ndarray]] = field(default_factory=dict)  # pseudo stop-regret
    real_curves: dict[str, list[np.ndarray]] = field(default_factory=dict)
    adv_curves: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: SimConfig) -> _GridB:
        n = cfg.num_drafters or 8
        max_tokens = cfg.pick(300_000, 20_000) if cfg.rounds is None else cfg.rounds * 3
        # (label, policy, options): UCBSpec with its default radius and with the paper's.
        configs: list[tuple[str, str, dict[str, Any]]] = [
            ("ucb", "ucb", {}), ("ucb c=1", "ucb", {"c": 1.0}), ("exp3", "exp3", {}),
            ("hedge", "hedge", {})]
        if cfg.policies is not None:
            configs = [c for c in configs if c[1] in cfg.policies]
        adv_rounds = cfg.rounds or cfg.pick(50_000, 4_000)
        return cls(
            seeds=cfg.seeds or cfg.pick(5, 2), n=n,
            alpha=np.linspace(0.8, 0.45, n) if n > 1 else np.array([0.8]),
            max_tokens=max_tokens,
            budgets=np.unique(np.geomspace(1_000, max_tokens, 14).round(-1).astype(np.int64)),
            configs=configs, adv_rounds=adv_rounds,
            adv_policies=cfg.policies or ("ucb", "exp3", "hedge", "normalhedge"),
            at=checkpoints(adv_rounds, 40))

    @property
    def stoch(self) -> list[str]:
        return [label for label, _, _ in self.configs]


def experiment_b(cfg: SimConfig, step: StepFn) -> ExperimentResult:
    """UCBSpec's stopping-time regret vs T (stochastic), then an adaptive adversary."""
    grid = _GridB.of(cfg)
    jobs = _run_b_stochastic(cfg, grid, step, 0)
    jobs = _run_b_adversarial(cfg, grid, step, jobs)
    fits = _fit_b(grid)
    figure = _figure_b(cfg, grid, fits)
    return ExperimentResult("b", "(b) BanditSpec: stopping-time regret; adversarial domains",
                            grid.rows, fits, figure, _markdown_b(cfg, grid, fits), jobs=jobs)


def _run_b_stochastic(cfg: SimConfig, grid: _GridB, step: StepFn, jobs: int) -> int:
    pool = iid_pool(grid.alpha)
    arms = default_arms(grid.n, (cfg.k,))
    grid.curves = {p: [] for p in grid.stoch}
    grid.real_curves = {p: [] for p in grid.stoch}
    for seed in range(grid.seeds):
        stream = _stream_for(cfg.env or "stationary", 1, grid.max_tokens, 0, seed)
        for name, policy_name, options in grid.configs:
            policy = _policy(policy_name, len(arms), seed, **options)
            trace = _play(policy, pool, stream, arms, seed, cfg.mode, tokens=grid.max_tokens)
            realized, pseudo = stop_regret(trace, pool, arms, grid.budgets)
            grid.curves[name].append(pseudo)
            grid.real_curves[name].append(realized)
            grid.rows.append({"experiment": "b", "part": "stochastic", "policy": name,
                              "options": options, "seed": seed,
                              "num_drafters": grid.n, "budgets": grid.budgets.tolist(),
                              "stop_regret": realized.round(2).tolist(),
                              "stop_regret_pseudo": pseudo.round(2).tolist(),
                              "rounds": trace.num_rounds, "mat": trace.mean_tokens_per_round,
                              "rounds_per_s": trace.rounds_per_second})
            jobs += 1
            step(f"(b) stochastic {name} seed {seed}", jobs)
    return jobs


_ADV_ALPHA = np.array([[0.85, 0.45], [0.45, 0.85]])  # (b): each drafter good in one domain


def _run_b_adversarial(cfg: SimConfig, grid: _GridB, step: StepFn, jobs: int) -> int:
    """Two drafters, two domains, each drafter good in one.  Queries are one draft long
    (k + 1 tokens) and the adversary picks each one's domain against the policy's
    favoured arm."""
    adv_pool = iid_pool(_ADV_ALPHA)
    adv_arms = default_arms(2, (cfg.k,))
    adv_mu = arm_means(adv_pool, adv_arms)
    grid.adv_curves = {p: [] for p in grid.adv_policies}
    for seed in range(grid.seeds):
        stream = make_stream("alternating", 2, grid.adv_rounds + 2,
                             np.random.default_rng(seed), query_tokens=cfg.k + 1)
        for name in grid.adv_policies:
            policy = _policy(name, 2, seed)
            trace = _play(policy, adv_pool, stream, adv_arms, seed, cfg.mode,
                          rounds=grid.adv_rounds)
            curve = regret_curve(trace, adv_mu, grid.at)
            grid.adv_curves[name].append(curve)
            grid.rows.append({"experiment": "b", "part": "adversarial", "policy": name,
                              "seed": seed, "rounds": trace.num_rounds,
                              "regret": float(curve[-1]), "mat": trace.mean_tokens_per_round,
                              "domain_share": float(np.mean(trace.stream.domains == 0)),
                              "at": grid.at.tolist(), "regret_curve": curve.round(2).tolist()})
            jobs += 1
            step(f"(b) adversarial {name} seed {seed}", jobs)
    return jobs


def _fit_b(grid: _GridB) -> dict[str, Any]:
    fits: dict[str, Any] = {"stochastic": {}, "adversarial": {}}
    budgets = grid.budgets
    for name in grid.stoch:
        mean = np.mean(grid.curves[name], axis=0)
        a, b, r2 = fit_line(np.log(budgets), mean)
        _, sqrt_coef, sqrt_r2 = fit_line(np.sqrt(budgets), mean)
        fits["stochastic"][name] = {
            "per_ln_T": b, "intercept": a, "r2": r2, "per_sqrt_T": sqrt_coef,
            "sqrt_r2": sqrt_r2,
            "loglog_slope": loglog_slope(budgets, mean),
            "pseudo_at_max": float(mean[-1]),
            "realized_at_max": float(np.mean(grid.real_curves[name], axis=0)[-1]),
            "realized_se_at_max": _mean_se([c[-1] for c in grid.real_curves[name]])[1],
        }
    tail = grid.at >= max(10, grid.adv_rounds // 100)
    for name in grid.adv_policies:
        mean = np.mean(grid.adv_curves[name], axis=0)
        fits["adversarial"][name] = {"loglog_slope": loglog_slope(grid.at[tail], mean[tail]),
                                     "regret_at_end": float(mean[-1]),
                                     "per_round": float(mean[-1] / grid.adv_rounds)}
    return fits


def _figure_b(cfg: SimConfig, grid: _GridB, fits: dict[str, Any]) -> Path:
    budgets = grid.budgets
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in grid.stoch:
        mean = np.mean(grid.curves[name], axis=0)
        color = "C8" if name == "ucb c=1" else COLORS.get(name)
        axes[0].plot(budgets, mean, marker="o", ms=3, label=f"{name} (pseudo)", color=color)
        if name == "ucb":  # the realized curve: same mean, far noisier
            axes[0].plot(budgets, np.mean(grid.real_curves[name], axis=0), ls=":", lw=1,
                         color=color, label=f"{name} (realized)")
        if name.startswith("ucb"):
            f = fits["stochastic"][name]
            axes[0].plot(budgets, f["intercept"] + f["per_ln_T"] * np.log(budgets), "k--",
                         lw=1, label=f"fit {f['intercept']:.0f}+{f['per_ln_T']:.1f} ln T")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("token budget T")
    axes[0].set_ylabel("stopping-time regret (rounds)")
    axes[0].set_title(f"stochastic, N={grid.n}")
    axes[0].legend(fontsize=7)
    for name in grid.adv_policies:
        axes[1].plot(grid.at, np.mean(grid.adv_curves[name], axis=0), label=name,
                     color=COLORS.get(name))
    axes[1].set_xscale("log")
    axes[1].set_yscale("symlog", linthresh=10)
    axes[1].set_xlabel("rounds")
    axes[1].set_ylabel("regret vs best fixed drafter (tokens)")
    axes[1].set_title("adaptive adversary alternating domains")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, cfg.out / "b_stopping_time.png")


def _markdown_b(cfg: SimConfig, grid: _GridB, fits: dict[str, Any]) -> str:
    st = fits["stochastic"]
    lines = ["| policy | stop-regret = a + b ln T: b | R² | R² of a + c sqrt(T) | "
             "log-log slope | pseudo at T_max | realized at T_max (± se) |",
             "|---|---|---|---|---|---|---|"]
    for name in grid.stoch:
        f = st[name]
        lines.append(f"| {name} | {_fmt(f['per_ln_T'], 1)} | {_fmt(f['r2'], 3)} | "
                     f"{_fmt(f['sqrt_r2'], 3)} | "
                     f"{_fmt(f['loglog_slope'])} | {_fmt(f['pseudo_at_max'], 1)} | "
                     f"{_fmt(f['realized_at_max'], 1)} (± {_fmt(f['realized_se_at_max'], 1)}) |")
    lines += ["", "| policy (adversary) | regret after "
              f"{grid.adv_rounds} rounds | per round | log-log slope vs rounds |",
              "|---|---|---|---|"]
    for name in grid.adv_policies:
        f = fits["adversarial"][name]
        lines.append(f"| {name} | {_fmt(f['regret_at_end'], 1)} | {_fmt(f['per_round'], 3)} | "
                     f"{_fmt(f['loglog_slope'])} |")
    return (f"Stochastic: one domain, N={grid.n} drafters with per-position acceptance "
            f"{', '.join(f'{x:.2f}' for x in grid.alpha)}, k={cfg.k}, token budgets up to "
            f"{grid.max_tokens}, {grid.seeds} seeds.  Adversarial: two drafters, two domains "
            f"(acceptance 0.85/0.45 and 0.45/0.85), queries of k+1 tokens, each query's "
            f"domain chosen against the policy's favoured arm, {grid.adv_rounds} rounds.\n\n"
            + "\n".join(lines))


# ----------------------------------------------------------------------------- (c)

_C_VARIANTS: tuple[tuple[str, str, str, bool], ...] = (
    # label, policy, loss, delayed
    ("hedge / length / delayed", "hedge", "length", True),
    ("hedge / length / naive", "hedge", "length", False),
    ("hedge / acceptance", "hedge", "acceptance", True),
    ("normalhedge / length / delayed", "normalhedge", "length", True),
    ("normalhedge / length / naive", "normalhedge", "length", False),
    ("normalhedge / acceptance", "normalhedge", "acceptance", True),
)


@dataclass
class _GridC:
    """Experiment (c)'s grid, and what its runs produce (one summary per part and variant)."""

    seeds: int
    rounds: int
    variants: list[tuple[str, str, str, bool]]
    k: int = 8  # long drafts make truncation matter
    rows: list[dict[str, Any]] = field(default_factory=list)
    c1_share: dict[str, np.ndarray] = field(default_factory=dict)  # share-on-B curves
    summaries: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    fits: dict[str, Any] = field(default_factory=dict)  # analytic reference numbers
    window: int = 10
    switch_round: float = 0.0

    @classmethod
    def of(cls, cfg: SimConfig) -> _GridC:
        return cls(seeds=cfg.seeds or cfg.pick(3, 1),
                   rounds=cfg.rounds or cfg.pick(20_000, 3_000),
                   variants=[v for v in _C_VARIANTS
                             if cfg.policies is None or v[1] in cfg.policies])


def experiment_c(cfg: SimConfig, step: StepFn) -> ExperimentResult:
    """Truncated/delayed feedback vs naive; length loss vs acceptance loss."""
    grid = _GridC.of(cfg)
    jobs = _run_c_two_phase(cfg, grid, step, 0)
    jobs = _run_c_stationary(cfg, grid, step, jobs)
    jobs = _run_c_profiles(cfg, grid, step, jobs)
    fits = _fit_c(grid)
    figure = _figure_c(cfg, grid, fits)
    return ExperimentResult("c", "(c) Delayed vs naive feedback; length vs acceptance loss",
                            grid.rows, fits, figure, _markdown_c(grid, fits), jobs=jobs)


def _run_c_two_phase(cfg: SimConfig, grid: _GridC, step: StepFn, jobs: int) -> int:
    """Two phases.  Domain 0: the early stopper A is best (A 0.85, B 0.5).  Domain 1: the
    long-run drafter B is best (A 0.8, B 0.9).  The switch comes after a quarter of the run."""
    k, rounds = grid.k, grid.rounds
    c1_pool = iid_pool(np.array([[0.85, 0.5], [0.8, 0.9]]), ("A-early-stopper", "B-long-runs"))
    c1_arms = default_arms(2, (k,))
    c1_mu = arm_means(c1_pool, c1_arms)
    q_tokens = 256
    num_queries = rounds * (k + 1) // q_tokens + 2
    switch_query = max(1, int(rounds * c1_mu[0].max() / 4 / q_tokens))
    grid.switch_round = switch_query * q_tokens / c1_mu[0].max()
    domains = np.ones(num_queries, dtype=int)
    domains[:switch_query] = 0
    c1_stream = Stream(domains, q_tokens)
    window = grid.window = max(rounds // 100, 10)
    summary: dict[str, dict[str, float]] = {}
    for label, name, loss, delayed in [v for v in grid.variants if v[2] == "length"]:
        shares, after_b, regrets = [], [], []
        for seed in range(grid.seeds):
            policy = _policy(name, 2, seed)
            trace = _play(policy, c1_pool, c1_stream, c1_arms, seed, cfg.mode, rounds=rounds,
                          loss=loss, delayed=delayed)
            on_b = (trace.arm == 1).astype(float)
            shares.append(np.convolve(on_b, np.ones(window) / window, mode="valid")[::window])
            phase2 = trace.domain == 1
            after_b.append(float(on_b[phase2][-len(on_b) // 4:].mean()) if phase2.any() else 0.0)
            regrets.append(float(regret_curve(trace, c1_mu, np.array([trace.num_rounds]))[0]))
            grid.rows.append({"experiment": "c", "part": "two-phase", "variant": label,
                              "seed": seed, "rounds": trace.num_rounds,
                              "share_B_late": after_b[-1], "regret": regrets[-1],
                              "segment_regret": segment_regret(trace, c1_mu),
                              "mat": trace.mean_tokens_per_round})
            jobs += 1
            step(f"(c) two-phase {label} seed {seed}", jobs)
        grid.c1_share[label] = np.mean(shares, axis=0)
        summary[label] = {"share_B_late": float(np.mean(after_b)),
                          "regret": float(np.mean(regrets))}
    grid.summaries["two_phase"] = summary
    return jobs


_C2_DRAFTERS = 8  # (c) stationary: 7 early stoppers (0.8 per position), one long-run (0.9)


def _run_c_stationary(cfg: SimConfig, grid: _GridC, step: StepFn, jobs: int) -> int:
    n2, k, rounds = _C2_DRAFTERS, grid.k, grid.rounds
    c2_pool = iid_pool(np.array([0.8] * (n2 - 1) + [0.9]))
    c2_arms = default_arms(n2, (k,))
    c2_mu = arm_means(c2_pool, c2_arms)
    summary: dict[str, dict[str, float]] = {}
    for label, name, loss, delayed in grid.variants:
        mats, share, regrets, chosen_loss, other_loss = [], [], [], [], []
        chosen_pos, other_pos = [], []
        for seed in range(grid.seeds):
            stream = _stream_for("stationary", 1, rounds, k, seed)
            policy = _policy(name, n2, seed)
            trace = _play(policy, c2_pool, stream, c2_arms, seed, cfg.mode,
                          rounds=rounds, loss=loss, delayed=delayed)
            mats.append(trace.mean_tokens_per_round)
            share.append(float((trace.arm[-rounds // 4:] == n2 - 1).mean()))
            regrets.append(float(regret_curve(trace, c2_mu, np.array([trace.num_rounds]))[0]))
            split = _loss_split(trace, n2 - 1)
            chosen_loss.append(split[0])
            other_loss.append(split[1])
            chosen_pos.append(split[2])
            other_pos.append(split[3])
            grid.rows.append({"experiment": "c", "part": "stationary", "variant": label,
                              "seed": seed, "rounds": trace.num_rounds, "mat": mats[-1],
                              "share_B_late": share[-1], "regret": regrets[-1],
                              "B_loss_when_played": chosen_loss[-1],
                              "B_loss_when_not_played": other_loss[-1],
                              "B_loss_per_position_when_played": chosen_pos[-1],
                              "B_loss_per_position_when_not_played": other_pos[-1]})
            jobs += 1
            step(f"(c) stationary {label} seed {seed}", jobs)
        summary[label] = {"mat": float(np.mean(mats)), "share_B_late": float(np.mean(share)),
                          "regret": float(np.mean(regrets)),
                          "B_loss_played": float(np.nanmean(chosen_loss)),
                          "B_loss_not_played": float(np.nanmean(other_loss)),
                          "B_loss_per_position_played": float(np.nanmean(chosen_pos)),
                          "B_loss_per_position_not_played": float(np.nanmean(other_pos))}
    grid.summaries["stationary"] = summary
    grid.fits["stationary_fixed_mat"] = {"A": float(c2_mu[0, 0]), "B": float(c2_mu[0, -1])}
    # What an unbiased loss gives B.  Length loss, per round: 1 - E[tokens of a B round] /
    # (k+1).  Acceptance loss: it sums (1 - gamma) over the round's path / (k+1), so its
    # per-round mean depends on how long the played drafter's paths are; per path position,
    # (sum of losses) * (k+1) / positions, it should be B's rejection rate 1 - alpha_B.
    grid.fits["stationary_true_B_loss"] = {
        "length": 1.0 - float(c2_mu[0, -1]) / (k + 1),
        "acceptance_per_position": 1.0 - float(c2_pool.marginal_acceptance()[0, -1])}
    return jobs


def _run_c_profiles(cfg: SimConfig, grid: _GridC, step: StepFn, jobs: int) -> int:
    """Per-position profiles (renewal model): A starts runs well then drops, B starts worse
    but runs long."""
    k, rounds = grid.k, grid.rounds
    c3_pool = DrafterPool(np.array([[[0.9, 0.6], [0.7, 0.95]]]), ("A", "B"))
    c3_arms = default_arms(2, (k,))
    summary: dict[str, dict[str, float]] = {}
    for label, name, loss, delayed in grid.variants:
        share = []
        for seed in range(grid.seeds):
            stream = _stream_for("stationary", 1, rounds // 3, k, seed)
            policy = _policy(name, 2, seed)
            trace = _play(policy, c3_pool, stream, c3_arms, seed, cfg.mode,
                          rounds=rounds // 3, loss=loss, delayed=delayed)
            share.append(float((trace.arm[-rounds // 12:] == 1).mean()))
            grid.rows.append({"experiment": "c", "part": "profiles", "variant": label,
                              "seed": seed, "rounds": trace.num_rounds,
                              "share_B_late": share[-1], "mat": trace.mean_tokens_per_round})
            jobs += 1
            step(f"(c) profiles {label} seed {seed}", jobs)
        summary[label] = {"share_B_late": float(np.mean(share))}
    grid.summaries["profiles"] = summary
    grid.fits["profiles_played_rate"] = c3_pool.tokens_per_round(k)[0].round(3).tolist()
    grid.fits["profiles_marginal"] = c3_pool.marginal_acceptance()[0].round(3).tolist()
    return jobs


def _fit_c(grid: _GridC) -> dict[str, Any]:
    """The per-part summaries next to the analytic reference numbers."""
    ref = grid.fits
    return {"two_phase": grid.summaries["two_phase"], "stationary": grid.summaries["stationary"],
            "stationary_fixed_mat": ref["stationary_fixed_mat"],
            "stationary_true_B_loss": ref["stationary_true_B_loss"],
            "profiles": grid.summaries["profiles"],
            "profiles_played_rate": ref["profiles_played_rate"],
            "profiles_marginal": ref["profiles_marginal"]}


def _figure_c(cfg: SimConfig, grid: _GridC, fits: dict[str, Any]) -> Path:
    c1_share, c2_summary, window = grid.c1_share, fits["stationary"], grid.window
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = (np.arange(len(next(iter(c1_share.values())))) + 1) * window if c1_share else []
    for label, share_curve in c1_share.items():
        axes[0].plot(x, share_curve, label=label, ls="-" if "delayed" in label else "--")
    if c1_share:
        axes[0].axvline(grid.switch_round, color="k", lw=0.8, ls=":")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("share of rounds on B (long runs)")
    axes[0].set_title("two phases: B becomes best at the dotted line")
    axes[0].legend(fontsize=7)
    labels = list(c2_summary)
    mats = [c2_summary[lab]["mat"] for lab in labels]
    axes[1].barh(range(len(labels)), mats, color=["C0" if "delayed" in lab else
                                                  ("C3" if "naive" in lab else "C2")
                                                  for lab in labels])
    axes[1].axvline(fits["stationary_fixed_mat"]["B"], color="k", ls="--", lw=1,
                    label="fixed B")
    axes[1].axvline(fits["stationary_fixed_mat"]["A"], color="grey", ls=":", lw=1,
                    label="fixed A")
    axes[1].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[1].set_xlabel("mean tokens per round")
    axes[1].set_title("7 early stoppers + 1 long-run drafter")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, cfg.out / "c_feedback.png")


def _markdown_c(grid: _GridC, fits: dict[str, Any]) -> str:
    c1_summary, c2_summary, c3_summary = (fits["two_phase"], fits["stationary"],
                                          fits["profiles"])
    lines = ["| variant | two-phase: share on B, last quarter | two-phase regret | "
             "stationary: MAT | share on B | regret | B's loss played / not played* |"
             " profiles: share on B |", "|---|---|---|---|---|---|---|---|"]
    for label in c2_summary:
        t = c1_summary.get(label, {})
        s2 = c2_summary[label]
        s3 = c3_summary[label]
        per_pos = "acceptance" in label
        b_played = s2["B_loss_per_position_played" if per_pos else "B_loss_played"]
        b_other = s2["B_loss_per_position_not_played" if per_pos else "B_loss_not_played"]
        lines.append(f"| {label} | {_fmt(t.get('share_B_late'))} | {_fmt(t.get('regret'), 0)} "
                     f"| {_fmt(s2['mat'])} | {_fmt(s2['share_B_late'])} | "
                     f"{_fmt(s2['regret'], 0)} | {_fmt(b_played, 3)} / "
                     f"{_fmt(b_other, 3)} | {_fmt(s3['share_B_late'])} |")
    true_b = fits["stationary_true_B_loss"]
    lines.append(f"\n\\* Length loss: mean per round, unbiased value "
                 f"{true_b['length']:.3f}.  Acceptance loss: per path position, (sum of "
                 f"losses) x (k+1) / positions, unbiased value "
                 f"{true_b['acceptance_per_position']:.3f}.")
    return (f"k={grid.k}, {grid.rounds} rounds, {grid.seeds} seed(s).  *Two-phase*: domain 0 "
            f"(A 0.85, B 0.5 per position) for the first quarter, then domain 1 (A 0.8, B 0.9)."
            f"  *Stationary*: 7 drafters at 0.8 and one (B) at 0.9; fixed A makes "
            f"{fits['stationary_fixed_mat']['A']:.2f} tokens/round, fixed B "
            f"{fits['stationary_fixed_mat']['B']:.2f}.  *Profiles*: renewal model, A = "
            f"[0.9 first, 0.6 after a hit], B = [0.7, 0.95]; played every round A makes "
            f"{fits['profiles_played_rate'][0]} and B {fits['profiles_played_rate'][1]} "
            f"tokens/round.\n\n" + "\n".join(lines))


def _loss_split(trace: Trace, arm: int) -> tuple[float, float, float, float]:
    """The losses ``arm`` received from the selector, split by whether it was played in the
    round: (mean when played, mean when not played, per path position when played, when
    not).  Per position: (sum of losses) x (max_k + 1) / path positions.

    Rounds release their loss vectors in order, so the scored rounds are the first
    ``num_scored_rounds`` of the trace.
    """
    assert trace.selector is not None
    stats, max_k = trace.selector.stats, trace.selector.max_k
    scored = stats.num_scored_rounds
    if stats.arm_loss_sum is None or stats.played_loss_sum is None:
        return (float("nan"),) * 4
    played = trace.arm[:scored] == arm
    positions = trace.tokens[:scored].astype(float)
    sum_played = float(stats.played_loss_sum[arm])
    sum_other = float(stats.arm_loss_sum[arm]) - sum_played
    n_played, n_other = int(played.sum()), int((~played).sum())
    pos_played, pos_other = float(positions[played].sum()), float(positions[~played].sum())

    def ratio(num: float, den: float) -> float:
        return num / den if den else float("nan")

    return (ratio(sum_played, n_played), ratio(sum_other, n_other),
            ratio(sum_played * (max_k + 1), pos_played),
            ratio(sum_other * (max_k + 1), pos_other))


# ----------------------------------------------------------------------------- (d)


@dataclass
class _GridD:
    """Experiment (d)'s grid, and the final regrets and curves of its runs."""

    seeds: int
    rounds: int
    n: int
    alpha: np.ndarray  # [n] per-position acceptance
    num_domains: int
    betas: tuple[float, ...]
    at: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    results: dict[tuple[str, float | None], list[float]] = field(default_factory=dict)
    curves: dict[tuple[str, float | None], list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: SimConfig) -> _GridD:
        n = cfg.num_drafters or 8
        base = np.array([0.8, 0.77, 0.74, 0.7, 0.65, 0.6, 0.5, 0.4])
        alpha = base[:n] if n <= base.size else np.concatenate(
            [base, np.random.default_rng(5).uniform(0.4, 0.75, n - base.size)])
        rounds = cfg.rounds or cfg.pick(50_000, 4_000)
        return cls(seeds=cfg.seeds or cfg.pick(6, 2), rounds=rounds, n=n, alpha=alpha,
                   num_domains=1 if (cfg.env or "stationary") == "stationary" else 2,
                   betas=cfg.pick((0.05, 0.075, 0.1, 0.15, 0.25, 0.5), (0.1, 0.25)),
                   at=checkpoints(rounds, 40))


def experiment_d(cfg: SimConfig, step: StepFn) -> ExperimentResult:
    """MetaSD's UCB with the block-divergence reward vs the block-efficiency reward."""
    grid = _GridD.of(cfg)
    jobs = _run_d(cfg, grid, step)
    fits = _fit_d(grid)
    figure = _figure_d(cfg, grid, fits)
    return ExperimentResult("d", "(d) MetaSD: block-divergence vs block-efficiency reward",
                            grid.rows, fits, figure, _markdown_d(cfg, grid, fits), jobs=jobs)


def _run_d(cfg: SimConfig, grid: _GridD, step: StepFn) -> int:
    alpha = grid.alpha
    # With a changing stream, a second domain reverses the ranking.
    pool = iid_pool(alpha if grid.num_domains == 1 else np.vstack([alpha, alpha[::-1]]))
    arms = default_arms(grid.n, (cfg.k,))
    mu = arm_means(pool, arms)
    jobs = 0
    configs: list[tuple[str, str, dict[str, Any]]] = [
        (f"metasd/{reward}", "metasd", {"reward": reward, "beta": beta})
        for beta in grid.betas for reward in ("divergence", "efficiency")
    ]
    configs.append(("ucb (UCBSpec)", "ucb", {}))
    for seed in range(grid.seeds):
        stream = _stream_for(cfg.env or "stationary", grid.num_domains, grid.rounds, cfg.k,
                             seed)
        for label, name, kwargs in configs:
            policy = _policy(name, len(arms), seed, **kwargs)
            trace = _play(policy, pool, stream, arms, seed, cfg.mode, rounds=grid.rounds)
            curve = regret_curve(trace, mu, grid.at)
            key = (label, kwargs.get("beta"))
            grid.results.setdefault(key, []).append(float(curve[-1]))
            grid.curves.setdefault(key, []).append(curve)
            grid.rows.append({"experiment": "d", "variant": label, "beta": kwargs.get("beta"),
                              "seed": seed, "rounds": trace.num_rounds,
                              "regret": float(curve[-1]), "mat": trace.mean_tokens_per_round,
                              "mode": cfg.mode})
            jobs += 1
            step(f"(d) {label} beta={kwargs.get('beta')} seed {seed}", jobs)
    return jobs


def _fit_d(grid: _GridD) -> dict[str, Any]:
    results, betas = grid.results, grid.betas
    fits: dict[str, Any] = {}
    for reward in ("divergence", "efficiency"):
        per_beta = {b: _mean_se(results[(f"metasd/{reward}", b)]) for b in betas}
        best_beta = min(per_beta, key=lambda b: per_beta[b][0])
        fits[reward] = {"regret_by_beta": {str(b): round(v[0], 1) for b, v in per_beta.items()},
                        "median_by_beta": {str(b): round(float(np.median(
                            results[(f"metasd/{reward}", b)])), 1) for b in betas},
                        "se_by_beta": {str(b): round(v[1], 1) for b, v in per_beta.items()},
                        "best_beta": best_beta, "best_regret": per_beta[best_beta][0]}
    ucb_mean, ucb_se = _mean_se(results[("ucb (UCBSpec)", None)])
    fits["ucb"] = {"regret": ucb_mean, "se": ucb_se}
    return fits


def _figure_d(cfg: SimConfig, grid: _GridD, fits: dict[str, Any]) -> Path:
    results, curves, betas, at = grid.results, grid.curves, grid.betas, grid.at
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for reward, color in (("divergence", "C4"), ("efficiency", "C1")):
        runs = [np.asarray(results[(f"metasd/{reward}", b)]) for b in betas]
        axes[0].plot(betas, [float(np.median(r)) for r in runs], marker="o", ms=4,
                     color=color, label=f"MetaSD, {reward} reward (median)")
        axes[0].plot(betas, [float(r.mean()) for r in runs], ls="--", lw=1, color=color,
                     label=f"MetaSD, {reward} reward (mean)")
    axes[0].axhline(fits["ucb"]["regret"], color="C2", ls="--", lw=1, label="UCBSpec (c=0.35)")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xticks(list(betas), [str(b) for b in betas])
    axes[0].minorticks_off()
    axes[0].set_xlabel("MetaSD exploration scale beta")
    axes[0].set_ylabel(f"regret after {grid.rounds} rounds (tokens)")
    axes[0].legend(fontsize=7)
    show_beta = min(betas, key=lambda b: abs(b - 0.1))
    for reward, color in (("divergence", "C4"), ("efficiency", "C1")):
        for beta, ls in ((show_beta, "-"), (0.25, "--")):
            if (f"metasd/{reward}", beta) in curves:
                axes[1].plot(at, np.mean(curves[(f"metasd/{reward}", beta)], axis=0), ls=ls,
                             color=color, label=f"{reward}, beta={beta}")
    axes[1].plot(at, np.mean(curves[("ucb (UCBSpec)", None)], axis=0), color="C2",
                 label="UCBSpec")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("rounds")
    axes[1].set_ylabel("regret (tokens)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, cfg.out / "d_metasd_reward.png")


def _markdown_d(cfg: SimConfig, grid: _GridD, fits: dict[str, Any]) -> str:
    betas = grid.betas
    lines = ["| beta | " + " | ".join(f"{b}" for b in betas) + " |",
             "|---|" + "---|" * len(betas)]
    for reward in ("divergence", "efficiency"):
        f = fits[reward]
        lines.append(f"| {reward} | " + " | ".join(
            f"{f['regret_by_beta'][str(b)]} ± {f['se_by_beta'][str(b)]} "
            f"({f['median_by_beta'][str(b)]})" for b in betas) + " |")
    ucb_mean, ucb_se = fits["ucb"]["regret"], fits["ucb"]["se"]
    return (f"N={grid.n} drafters, acceptance {', '.join(f'{x:.2f}' for x in grid.alpha)}, "
            f"k={cfg.k}, {grid.rounds} rounds, {grid.seeds} seeds, {cfg.mode} mode, stream "
            f"{cfg.env or 'stationary'}.  Regret (tokens) of MetaSD's UCB by reward and beta "
            f"(mean ± se (median)); UCBSpec (tokens-per-round reward, c=0.35): "
            f"{ucb_mean:.1f} ± {ucb_se:.1f}.\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- run


def experiment_run(cfg: SimConfig, step: StepFn) -> ExperimentResult:
    """A plain run: every policy over one environment; regret curves and rounds/s."""
    n = cfg.num_drafters or 64
    rounds = cfg.rounds or cfg.pick(100_000, 5_000)
    seeds = cfg.seeds or 1
    kind = cfg.env or "stationary"
    if kind not in STREAMS:
        raise ConfigError(f"env must be one of {STREAMS}, got {kind!r}")
    policies = cfg.policies or ("hedge", "normalhedge", "ucb", "exp3", "metasd")
    num_domains = 4
    rows: list[dict[str, Any]] = []
    jobs = 0
    at = checkpoints(rounds, 40)
    curves: dict[str, list[np.ndarray]] = {p: [] for p in policies}
    for seed in range(seeds):
        pool = expert_pool(n, num_domains, np.random.default_rng([n, seed, 3]))
        arms = default_arms(n, (cfg.k,))
        mu = arm_means(pool, arms)
        query_tokens = cfg.k + 1 if kind == "alternating" else 256
        stream = _stream_for(kind, num_domains, rounds, cfg.k, seed, query_tokens=query_tokens)
        for name in policies:
            policy = _policy(name, len(arms), seed)
            trace = _play(policy, pool, stream, arms, seed, cfg.mode, rounds=rounds)
            curve = regret_curve(trace, mu, at[at <= trace.num_rounds])
            curves[name].append(curve)
            rows.append({"experiment": "run", "policy": name, "seed": seed, "env": kind,
                         "num_drafters": n, "mode": cfg.mode, "rounds": trace.num_rounds,
                         "tokens": trace.num_tokens, "seconds": trace.seconds,
                         "rounds_per_s": trace.rounds_per_second,
                         "rounds_per_cpu_s": trace.rounds_per_cpu_second,
                         "mat": trace.mean_tokens_per_round, "regret": float(curve[-1]),
                         "segment_regret": segment_regret(trace, mu)})
            jobs += 1
            step(f"run {name} seed {seed}", jobs)
    fits = _fit_run(rows, policies)
    figure = _figure_run(cfg, curves, at, n, kind)
    md = (f"{n} domain-expert drafters over {num_domains} domains (drafter 0 a generalist), "
          f"k={cfg.k}, env {kind}, {rounds} rounds, {seeds} seed(s), {cfg.mode} mode.\n\n"
          + _markdown_run(fits))
    return ExperimentResult("run", "Plain run", rows, fits, figure, md, jobs=jobs)


def _fit_run(rows: list[dict[str, Any]], policies: Sequence[str]) -> dict[str, Any]:
    return {name: {k: float(np.mean([r[k] for r in rows if r["policy"] == name]))
                   for k in ("rounds_per_s", "rounds_per_cpu_s", "mat", "regret",
                             "segment_regret")}
            for name in policies}


def _figure_run(cfg: SimConfig, curves: dict[str, list[np.ndarray]], at: np.ndarray, n: int,
                kind: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, runs in curves.items():
        length = min(len(c) for c in runs)
        ax.plot(at[:length], np.mean([c[:length] for c in runs], axis=0), label=name,
                color=COLORS.get(name))
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("rounds")
    ax.set_ylabel("regret vs best fixed drafter (tokens)")
    ax.set_title(f"N={n}, env={kind}, {cfg.mode}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, cfg.out / "run_regret.png")


def _markdown_run(fits: dict[str, Any]) -> str:
    lines = ["| policy | rounds/s (wall) | rounds/s (CPU) | mean tokens/round | "
             "regret (best fixed) | regret (best per segment) |", "|---|---|---|---|---|---|"]
    for name, f in fits.items():
        lines.append(f"| {name} | {f['rounds_per_s']:.0f} | {f['rounds_per_cpu_s']:.0f} | "
                     f"{f['mat']:.3f} | "
                     f"{f['regret']:.1f} | {f['segment_regret']:.1f} |")
    return "\n".join(lines)


RUNNERS: dict[str, Callable[[SimConfig, StepFn], ExperimentResult]] = {
    "a": experiment_a, "b": experiment_b, "c": experiment_c, "d": experiment_d,
    "run": experiment_run,
}


from specmux.sim.timeexp import experiment_e  # noqa: E402  (it imports helpers above)

RUNNERS["e"] = experiment_e


def machine() -> str:
    """A one-line description of this machine (for the summary)."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from specmux.versions import versions_line

    return f"{cpu}, {os.cpu_count()} CPU core(s), {versions_line(('specmux', 'numpy'))}"


def run_experiments(
    names: Sequence[str], cfg: SimConfig, step: StepFn | None = None,
    start: Callable[[str, str], None] | None = None,
) -> list[ExperimentResult]:
    """Run the named experiments; write results.jsonl, the PNGs and summary.md under cfg.out.

    ``start(name, title)`` is called before each experiment, ``step(description, jobs)``
    after each simulation run.
    """
    for name in names:
        if name not in RUNNERS:
            raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    if cfg.mode not in ("greedy", "sampling"):
        raise ConfigError(f"mode must be greedy or sampling, got {cfg.mode!r}")
    if cfg.policies is not None:
        for p in cfg.policies:
            if p not in POLICIES:
                raise ConfigError(f"unknown policy {p!r}; known: {', '.join(sorted(POLICIES))}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: list[ExperimentResult] = []
    total_start, cpu_start = time.perf_counter(), time.process_time()
    with open(cfg.out / "results.jsonl", "w") as fh:
        for name in names:
            if start is not None:
                start(name, RUNNERS[name].__doc__ or name)
            t0 = time.perf_counter()
            result = RUNNERS[name](cfg, step or (lambda _d, _j: None))
            result.seconds = time.perf_counter() - t0
            log.info("experiment %s: %d runs in %.1f s", name, result.jobs, result.seconds)
            for row in result.rows:
                fh.write(json.dumps(_jsonable(row)) + "\n")
            fh.write(json.dumps(_jsonable({"experiment": name, "summary": True,
                                           "fits": result.fits,
                                           "seconds": result.seconds})) + "\n")
            results.append(result)
    total = time.perf_counter() - total_start
    write_summary(results, replace(cfg), total, time.process_time() - cpu_start)
    return results


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def write_summary(results: Sequence[ExperimentResult], cfg: SimConfig, total: float,
                  cpu: float | None = None) -> Path:
    """summary.md: one section per experiment, with the command, machine and timings."""
    lines = ["# specmux simulate: summary", "",
             f"- command: `{cfg.command}`",
             f"- machine: {machine()}",
             f"- total wall time: {total:.1f} s"
             + (f" (process CPU time {cpu:.1f} s)" if cpu is not None else ""), ""]
    for r in results:
        lines += [f"## {r.title}", "",
                  f"{r.jobs} simulation runs in {r.seconds:.1f} s.", ""]
        if r.figure is not None:
            lines += [f"![{r.name}]({r.figure.name})", ""]
        lines += [r.markdown, ""]
    path = cfg.out / "summary.md"
    path.write_text("\n".join(lines))
    return path
