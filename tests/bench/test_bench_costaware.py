"""specmux bench over drafter x k: time loss, BanditSpec, fixed (drafter, k) baselines."""

from __future__ import annotations

import pytest
import torch

from specmux.bench.datasets import synthetic_splits
from specmux.bench.report import ORACLE_FIXED, ORACLE_TIME, OVERALL, render_markdown, summarize
from specmux.bench.runner import BenchConfig, BenchModels, BenchRunner, write_trace
from specmux.errors import ConfigError

from conftest import tiny_lm
from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def models() -> BenchModels:
    target = tiny_lm(0, hidden=48, max_positions=2048)
    drafter = tiny_lm(0, hidden=48, max_positions=2048)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return BenchModels(target, tiny_tokenizer(), drafter, "tiny-target", "tiny-drafter")


def _config(**kw) -> BenchConfig:
    base = dict(target="tiny-target", drafter_model="tiny-drafter", prompts_per_domain=1,
                max_new_tokens=12, dtype="float32", hf_baseline=False,
                drafters=("ngram", "lm"), k_choices=(0, 1, 3), loss="time", score_rate=0.5,
                policies=("hedge", "hedge:length", "normalhedge", "banditspec"))
    return BenchConfig(**{**base, **kw})


def test_bench_over_drafter_x_k(models: BenchModels, tmp_path) -> None:
    runner = BenchRunner(_config(), models, synthetic_splits(num_eval=1, corpus_size=8))
    ids = [m.id for m in runner.methods]
    assert {"only:ngram@1", "only:ngram@3", "only:lm@1", "only:lm@3"} <= set(ids)
    assert {"hedge", "hedge:length", "normalhedge", "banditspec"} <= set(ids)
    hedge = next(m for m in runner.methods if m.id == "hedge").decoder
    assert hedge is not None and hedge.selector.tracker.loss == "time"
    assert len(hedge.selector.arms) == 5
    records = write_trace(runner.run(), tmp_path / "trace.jsonl")
    answers = [r for r in records if r["type"] == "answer"]
    assert all(a["lossless"] for a in answers if a["lossless"] is not None)
    learner = [a for a in answers if a["method"] == "hedge"]
    assert learner and learner[0]["cost_model"]["verify_seconds"]
    summary = summarize(records)
    fixed, oracle = summary.row(ORACLE_FIXED), summary.row(ORACLE_TIME)
    assert fixed is not None and oracle is not None
    best = max((r for r in summary.rows if r.kind == "single"),
               key=lambda r: r.cells[OVERALL].tokens_per_second)
    assert fixed.cells[OVERALL].tokens == best.cells[OVERALL].tokens
    names = [g.name for g in summary.goals]
    assert any("best fixed (drafter, k)" in n for n in names)
    assert any("5th-percentile" in n for n in names)
    assert "BanditSpec" in render_markdown(summary)


@pytest.mark.parametrize("kw", [{"k_choices": (0,)}, {"k_choices": (2, 2)},
                                {"loss": "speed"}, {"policies": ("hedge:nope",)},
                                {"score_rate": 0.0}, {"single_ks": (0,)}])
def test_bench_config_rejects(kw) -> None:
    with pytest.raises(ConfigError):
        _config(**kw)


def test_issue12_goals_read_policy_variants_and_suffix_at_k() -> None:
    """The headroom goal reads a Hedge variant's row (``hedge:time:ctx:argmax``) when the
    run has no plain ``hedge``, and the suffix-MAT goals read ``only:suffix@k`` rows."""
    from specmux.bench.report import Cell, Row, Summary, choice_goals, family_row
    from specmux.bench.runner import SINGLE_PREFIX, TARGET_ONLY

    def row(method: str, kind: str, seconds: float, mat: float = 1.0) -> Row:
        r = Row(method, method, kind)
        for d in ("code_edit", OVERALL):
            r.cells[d] = Cell(queries=1, tokens=100, seconds=seconds, calls=100,
                              accepted=round(100 * (mat - 1)))
        return r

    rows = [row(TARGET_ONLY, "target", 10.0), row(SINGLE_PREFIX + "suffix@8", "single", 5.0, 3.5),
            row(SINGLE_PREFIX + "suffix@4", "single", 6.0, 3.0),
            row(ORACLE_TIME, "oracle", 4.0), row("ucb", "policy", 4.5),
            row("hedge:time", "policy", 4.8), row("hedge:time:ctx:argmax", "policy", 4.2)]
    summary = Summary(meta={}, domains=["code_edit"], rows=rows, goals=[])
    assert family_row(summary, "hedge").method == "hedge:time:ctx:argmax"  # the fastest
    assert family_row(summary, "normalhedge") is None
    assert family_row(summary, "hedge", losses=("length", "acceptance")) is None  # time only
    goals = {g.name: g for g in choice_goals(summary)}
    # speedups: fixed 2.0, oracle 2.5, hedge 10/4.2: share (2.381 - 2) / 0.5
    share = goals["hedge:time:ctx:argmax: share of the oracle's headroom over the best fixed "
                  "drafter (wall clock)"]
    assert share.value == pytest.approx((10 / 4.2 - 2.0) / 0.5)
    assert goals["suffix drafter alone: MAT on code_edit"].value == pytest.approx(3.5)
    rows.append(row("hedge", "policy", 9.0))
    assert family_row(summary, "hedge").method == "hedge"  # the plain one when it ran
