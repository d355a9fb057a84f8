"""Tests for the regret simulator (specmux.sim) and the tracker fast path it relies on."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from specmux.feedback import CounterfactualTracker, expected_accepted
from specmux.policies import POLICIES
from specmux.sim import experiments
from specmux.sim.cli import register
from specmux.sim.env import DrafterPool, SimEnv, iid_pool, make_stream
from specmux.sim.runner import arm_means, default_arms, regret_curve, simulate, stop_regret

# --------------------------------------------------------------------------------------
# Tracker fast path: identical results to the original list-based implementation.
# --------------------------------------------------------------------------------------


def _reference_expected_accepted(gamma: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """The original ``expected_accepted`` (commit e91895a), kept as the oracle."""
    m = min(k, gamma.shape[0])
    if m == 0:
        return np.zeros(gamma.shape[1])
    reach = np.cumprod(np.vstack([np.ones((1, gamma.shape[1])), weight[: m - 1]]), axis=0)
    return (reach * gamma[:m]).sum(axis=0)


class _ReferenceTracker:
    """The original list-of-rows CounterfactualTracker (commit cf63d7a), kept as the oracle."""

    def __init__(self, arms: Sequence[tuple[int, int]], loss: str, delayed: bool) -> None:
        self.drafter_of_arm = np.array([d for d, _ in arms], dtype=int)
        self.k_of_arm = np.array([k for _, k in arms], dtype=int)
        self.max_k = int(self.k_of_arm.max())
        self.loss, self.delayed = loss, delayed
        self.reset()

    def reset(self) -> None:
        self._gamma: list[np.ndarray] = []
        self._weight: list[np.ndarray] = []
        self._offset = 0
        self._pending: deque[tuple[int, int]] = deque()

    def add_round_tagged(self, gamma, weight, tag):  # type: ignore[no-untyped-def]
        if self.loss == "acceptance" or not self.delayed:
            return [(tag, self._losses(gamma, weight))] if gamma.shape[0] else []
        start = self._offset + len(self._gamma)
        self._gamma.extend(gamma)
        self._weight.extend(weight)
        self._pending.append((start, tag))
        return self._release(final=False)

    def flush_tagged(self):  # type: ignore[no-untyped-def]
        out = self._release(final=True)
        self.reset()
        return out

    def _release(self, final: bool):  # type: ignore[no-untyped-def]
        out = []
        end = self._offset + len(self._gamma)
        while self._pending:
            lo = self._pending[0][0] - self._offset
            hi = min(lo + self.max_k, len(self._gamma))
            gamma = np.asarray(self._gamma[lo:hi])
            weight = np.asarray(self._weight[lo:hi])
            complete = end - self._pending[0][0] >= self.max_k
            dead = gamma.shape[0] > 0 and not np.any(np.prod(weight, axis=0) > 0)
            if not (complete or dead or final):
                break
            _, tag = self._pending.popleft()
            if gamma.shape[0]:
                out.append((tag, self._losses(gamma, weight)))
        keep_from = self._pending[0][0] if self._pending else end
        drop = keep_from - self._offset
        if drop > 0:
            del self._gamma[:drop], self._weight[:drop]
            self._offset += drop
        return out

    def _losses(self, gamma: np.ndarray, weight: np.ndarray) -> np.ndarray:
        if self.loss == "acceptance":
            return ((1.0 - gamma).sum(axis=0) / (self.max_k + 1))[self.drafter_of_arm]
        losses = np.empty(len(self.k_of_arm))
        for k in np.unique(self.k_of_arm):
            mean_accepted = _reference_expected_accepted(gamma, weight, int(k))
            sel = self.k_of_arm == k
            losses[sel] = 1.0 - (mean_accepted[self.drafter_of_arm[sel]] + 1.0) / (self.max_k + 1)
        return losses


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
@pytest.mark.parametrize("ks", [(4,), (1, 3, 8)])
@pytest.mark.parametrize(("loss", "delayed"), [("length", True), ("length", False),
                                               ("acceptance", True)])
def test_tracker_fast_path_is_bitwise_identical(
    mode: str, ks: tuple[int, ...], loss: str, delayed: bool
) -> None:
    rng = np.random.default_rng(7)
    num = 5
    arms = [(i, k) for i in range(num) for k in ks]
    fast = CounterfactualTracker(arms, loss=loss, delayed=delayed)
    ref = _ReferenceTracker(arms, loss, delayed)
    released = 0
    for _query in range(30):
        for _round in range(int(rng.integers(0, 40))):
            n = int(rng.integers(1, 10))
            p = rng.uniform(0.0, 1.0)  # some rounds have every drafter dead
            weight = (rng.random((n, num)) < p).astype(float)
            if mode == "sampling":
                weight *= rng.random((n, num))
                gamma = rng.random((n, num))
            else:
                gamma = weight
            got = fast.add_round_tagged(gamma, weight, _round)
            want = ref.add_round_tagged(gamma, weight, _round)
            assert [t for t, _ in got] == [t for t, _ in want]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
            assert fast.num_pending == len(ref._pending)
            released += len(got)
        got, want = fast.flush_tagged(), ref.flush_tagged()
        assert [t for t, _ in got] == [t for t, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
        released += len(got)
    assert released > 100


def test_expected_accepted_fast_path_is_bitwise_identical() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        m, num, k = int(rng.integers(0, 12)), int(rng.integers(1, 9)), int(rng.integers(1, 10))
        gamma, weight = rng.random((m, num)), rng.random((m, num))
        assert np.array_equal(expected_accepted(gamma, weight, k),
                              _reference_expected_accepted(gamma, weight, k))


# --------------------------------------------------------------------------------------
# The simulator.
# --------------------------------------------------------------------------------------



def _hits(buf, num: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.frombuffer(buf.hits, dtype=bool).reshape(num, buf.size)


def test_iid_hits_match_configured_acceptance() -> None:
    alpha = np.array([[0.2, 0.55, 0.9], [0.7, 0.1, 0.4]])
    env = SimEnv(iid_pool(alpha), np.random.default_rng(0), block_cells=600_000)
    for d in range(2):
        buf = env.draw(d, 200_000)
        rate = _hits(buf, 3).mean(axis=1)
        assert np.allclose(rate, alpha[d], atol=0.004)  # 4.4 sigma at n = 2e5
        assert np.array_equal(buf.weight.T.astype(bool), _hits(buf, 3))
        assert buf.gamma is buf.weight  # greedy: gamma = w


def test_accepted_lengths_match_configured_profiles() -> None:
    """Per-position (run-length) profiles: P(accept >= d) from a fresh start, and rates."""
    hazard = np.array([[[0.9, 0.35, 0.35], [0.6, 0.95, 0.8]]])
    pool = DrafterPool(hazard)
    env = SimEnv(pool, np.random.default_rng(1))
    buf = env.draw(0, 400_000)
    hits = _hits(buf, 2)
    k = 4
    for i in range(2):
        fresh = np.flatnonzero(~hits[i, : -k - 1]) + 1  # positions right after a miss
        lengths = np.array([buf.accepted(i, int(s), k) for s in fresh[:30_000]])
        reach = pool.reach(k)[0, i, 1:]  # P(A >= d), d = 1..k
        got = np.array([(lengths >= d).mean() for d in range(1, k + 1)])
        assert np.allclose(got, reach, atol=0.012)
        assert abs(lengths.mean() - pool.expected_accepted(k)[0, i]) < 0.03
    assert np.allclose(hits.mean(axis=1), pool.marginal_acceptance()[0], atol=0.005)


def test_sampling_gamma_is_calibrated() -> None:
    """Sampling mode: E[w | gamma] = gamma (the tracker's estimator stays unbiased)."""
    pool = iid_pool(np.array([0.3, 0.75]))
    env = SimEnv(pool, np.random.default_rng(2), mode="sampling")
    buf = env.draw(0, 200_000)
    assert buf.gamma is not None and buf.weight is not None
    for i in range(2):
        g, w = buf.gamma[:, i], buf.weight[:, i]
        assert abs(g.mean() - pool.hazard[0, i, 0]) < 0.005
        for lo in (0.1, 0.4, 0.7):
            sel = (g >= lo) & (g < lo + 0.2)
            assert abs(w[sel].mean() - g[sel].mean()) < 0.02


def test_simulated_rounds_match_the_configured_tokens_per_round() -> None:
    pool = iid_pool(np.array([0.85, 0.5]))
    arms = default_arms(2, (4,))
    mu = arm_means(pool, arms)[0]
    stream = make_stream("stationary", 1, 2000, np.random.default_rng(3))
    for arm in range(2):
        policy = POLICIES["fixed"](2, arm=arm)
        trace = simulate(policy, SimEnv(pool, np.random.default_rng(4), scores=False), stream,
                         arms, tokens=200_000)
        # Query ends cut a few rounds short; 256-token queries lose < 1.5%.
        assert abs(trace.mean_tokens_per_round - mu[arm]) / mu[arm] < 0.02
        assert set(np.unique(trace.accepted)) <= set(range(5))


def test_policies_are_the_engines_classes() -> None:
    pool = iid_pool(np.array([0.8, 0.6, 0.5]))
    arms = default_arms(3, (4,))
    stream = make_stream("blocks", 1, 10, np.random.default_rng(0))
    for name in ("fixed", "ucb", "exp3", "metasd", "hedge", "normalhedge"):
        policy = experiments._policy(name, 3, seed=0)
        assert type(policy) is POLICIES[name]
        trace = experiments._play(policy, pool, stream, arms, 0, "greedy", rounds=200)
        assert trace.policy == name and trace.num_rounds == 200


def test_hedge_beats_exp3_at_32_drafters() -> None:
    n, rounds = 32, 4000
    pool = experiments.gap_pool(n, np.random.default_rng(11))
    arms = default_arms(n, (4,))
    mu = arm_means(pool, arms)
    regret = {}
    for name in ("hedge", "exp3"):
        stream = make_stream("stationary", 1, 100, np.random.default_rng(5))
        policy = experiments._policy(name, n, seed=5)
        trace = experiments._play(policy, pool, stream, arms, 5, "greedy", rounds=rounds)
        regret[name] = float(regret_curve(trace, mu, np.array([rounds]))[0])
    assert regret["hedge"] < 0.5 * regret["exp3"], regret


def test_stopping_time_regret_of_the_best_fixed_arm_is_about_zero() -> None:
    pool = iid_pool(np.array([0.8, 0.6]))
    arms = default_arms(2, (4,))
    realized = []
    for seed in range(40):
        stream = make_stream("stationary", 1, 30, np.random.default_rng(seed), query_tokens=100)
        trace = simulate(POLICIES["fixed"](2, arm=0),
                         SimEnv(pool, np.random.default_rng(seed + 99), scores=False), stream,
                         arms, tokens=3000)
        got, pseudo = stop_regret(trace, pool, arms, np.array([3000]))
        assert abs(pseudo[0]) < 1e-6
        realized.append(got[0])
    assert abs(np.mean(realized)) < 4 * np.std(realized) / np.sqrt(len(realized)) + 0.5


def test_adaptive_adversary_breaks_ucb_not_exp3() -> None:
    pool = iid_pool(np.array([[0.85, 0.45], [0.45, 0.85]]))
    arms = default_arms(2, (4,))
    mu = arm_means(pool, arms)
    regret = {}
    for name in ("ucb", "exp3"):
        stream = make_stream("alternating", 2, 4000, np.random.default_rng(0), query_tokens=5)
        trace = experiments._play(experiments._policy(name, 2, 0), pool, stream, arms, 0,
                                  "greedy", rounds=3000)
        regret[name] = float(regret_curve(trace, mu, np.array([3000]))[0])
    assert regret["ucb"] > 0.4 * 3000 and regret["exp3"] < 0.25 * regret["ucb"], regret


def test_cli_quick_writes_jsonl_png_and_markdown(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """specmux (test app)."""

    out = tmp_path / "sim"
    result = CliRunner().invoke(app, ["simulate", "--quick", "--rounds", "1500", "--seeds", "1",
                                      "--num-drafters", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["experiment"] for r in rows} == {"a", "b", "c", "d", "e"}
    assert sum(1 for r in rows if r.get("summary")) == 5
    for png in ("a_regret_vs_n.png", "b_stopping_time.png", "c_feedback.png",
                "d_metasd_reward.png", "e_time_regret.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000
    summary = (out / "summary.md").read_text()
    assert "## (a)" in summary and "## (e)" in summary and "specmux simulate" in summary


def test_cli_help_documents_every_option() -> None:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """specmux (test app)."""

    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--experiment", "--rounds", "--seeds", "--out", "--policies",
                   "--num-drafters", "--env", "--mode", "--k", "--quick"):
        assert option in result.output


def test_cli_rejects_bad_options(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """specmux (test app)."""

    runner = CliRunner()
    bad = runner.invoke(app, ["simulate", "--experiment", "z", "--out", str(tmp_path)])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["simulate", "--quick", "--policies", "nope", "--experiment", "run",
                              "--out", str(tmp_path)])
    assert bad.exit_code == 2
