"""specmux bench / report: the pipeline end to end on tiny random models and synthetic data."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from specmux.bench.datasets import ALL_CATEGORIES, synthetic_splits
from specmux.bench.output import write_report
from specmux.bench.plots import PLOTS, regret_curves
from specmux.bench.report import (
    ORACLE_MAT,
    OVERALL,
    oracle_choices,
    render_markdown,
    summarize,
)
from specmux.bench.runner import (
    HF_ASSISTED,
    TARGET_ONLY,
    BenchConfig,
    BenchModels,
    BenchRunner,
    fork_suffix,
    read_trace,
    write_trace,
)
from specmux.cli import app
from specmux.drafters.suffix import SuffixDrafter
from specmux.errors import ConfigError
from specmux.policies import make_policy
from specmux.selector import Outcome, Selector, make_arms
from specmux.types import SamplingParams
from specmux.versions import cpu_name

from conftest import tiny_lm
from helpers import save_tiny_model, tiny_tokenizer

cli = CliRunner()
POLICIES = ("ucb", "exp3", "metasd", "hedge", "normalhedge")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)



@pytest.fixture(scope="module")
def models() -> BenchModels:
    target = tiny_lm(0, hidden=48, max_positions=2048)
    drafter = tiny_lm(0, hidden=48, max_positions=2048)  # the target, perturbed: a good drafter
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return BenchModels(target, tiny_tokenizer(), drafter, "tiny-target", "tiny-drafter")


def _config(**kw) -> BenchConfig:
    base = dict(target="tiny-target", drafter_model="tiny-drafter", prompts_per_domain=2,
                max_new_tokens=12, policies=POLICIES, dtype="float32",
                domains=("code", "math", "chat"))
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench_dir(models: BenchModels, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cfg = _config()
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=2, corpus_size=8))
    records = write_trace(runner.run(), out / "trace.jsonl")
    write_report(records, out)
    return out


def test_trace_has_every_method_on_every_query(bench_dir: Path) -> None:
    records = read_trace(bench_dir)
    meta = records[0]
    assert meta["type"] == "meta" and meta["pool"] == [
        "suffix:code", "suffix:math", "suffix:chat", "suffix", "ngram", "lm"]
    methods = meta["methods"]
    assert methods[0] == TARGET_ONLY and HF_ASSISTED in methods
    assert {f"only:{d}" for d in meta["pool"]} <= set(methods)
    assert set(POLICIES) <= set(methods)
    answers = [r for r in records if r["type"] == "answer"]
    assert len(answers) == len(methods) * 6  # 3 domains x 2 prompts
    # Interleaved mixed stream: the domains alternate.
    cats = [q["category"] for q in meta["queries"]]
    assert cats == ["code", "math", "chat"] * 2
    for a in answers:  # Spec-Bench answer fields
        assert {"question_id", "category", "model_id", "method", "choices", "tstamp"} <= set(a)
        assert isinstance(a["choices"][0]["turns"][0], str)
        assert a["choices"][0]["new_tokens"] == [len(a["token_ids"])]
        if a["method"] != TARGET_ONLY:
            assert a["lossless"] is True, (a["method"], a["question_id"])  # lossless is sacred
    rounds = [r for r in records if r["type"] == "round"]
    hedge = [r for r in rounds if r["method"] == "hedge"]
    assert hedge and all(set(r["gammas"]) == set(meta["pool"]) for r in hedge)
    assert all(r["policy_seconds"] >= 0 and r["seconds"] > 0 for r in hedge)
    assert not any(r["gammas"] for r in rounds if r["method"] == "ucb")  # bandit: no scoring
    # Rounds add up to the answer's tokens.
    for a in answers:
        rs = [r for r in rounds if r["method"] == a["method"]
              and r["query_index"] == a["query_index"]]
        if rs:
            assert sum(r["new_tokens"] for r in rs) == a["new_tokens"]
            assert len(rs) == a["num_target_calls"]


def test_table_and_plots(bench_dir: Path) -> None:
    text = (bench_dir / "results.md").read_text()
    for needle in ["| method |", "code ×", "overall MAT", "decode ×", "target only",
                   "HedgeSpec (Hedge)", "UCBSpec", "EXP3Spec", "HF assisted",
                   "only suffix:code", "oracle", "Learner overhead", "Goals"]:
        assert needle in text, needle
    assert "MISMATCH" not in text
    assert f"Machine: {cpu_name()}, " in text  # which CPU: kinds differ in rounding and cost
    for name in PLOTS:
        png = bench_dir / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_summary_numbers(bench_dir: Path) -> None:
    records = read_trace(bench_dir)
    summary = summarize(records)
    base = summary.row(TARGET_ONLY)
    assert base is not None and summary.speedup(base) == pytest.approx(1.0)
    assert base.cells[OVERALL].mat == 1.0
    assert summary.decode_speedup(base) == pytest.approx(1.0)
    assert summary.decode_speedup(summary.row(HF_ASSISTED)) is None  # HF: no first-call time
    assert summary.decode_speedup(summary.row("hedge")) > 0
    target_answers = [a for a in records if a["type"] == "answer" and a["method"] == TARGET_ONLY]
    assert all(a["first_tokens"] == 1 and 0 < a["first_seconds"] < a["seconds"]
               for a in target_answers)
    # The oracle picks, per query, the single drafter with the highest MAT.
    oracle = summary.row(ORACLE_MAT)
    chosen = oracle_choices(records)
    assert len(chosen) == 6
    singles = [r for r in summary.rows if r.kind == "single"]
    for q, a in chosen.items():
        best = max(1 + b["num_accepted_tokens"] / b["num_target_calls"]
                   for b in records if b["type"] == "answer" and b["query_index"] == q
                   and b["method"].startswith("only:"))
        assert 1 + a["num_accepted_tokens"] / a["num_target_calls"] == pytest.approx(best)
    assert oracle.cells[OVERALL].mat >= max(r.cells[OVERALL].mat for r in singles) - 1e-9
    hedge = summary.row("hedge")
    assert hedge.policy_ms is not None and hedge.scoring_ms is not None
    assert hedge.verify_ms and hedge.verify_ms > 0
    assert abs(sum(hedge.share.values()) - 1) < 1e-9
    assert {g.name for g in summary.goals} >= {"Hedge MAT / UCBSpec MAT",
                                               "Hedge MAT / per-query oracle MAT"}
    # Regret curves: one point per output token of the stream.
    curves = regret_curves(records, ["hedge", ORACLE_MAT])
    x, y = curves["hedge"]
    assert len(x) == len(y) == sum(a["new_tokens"] for a in chosen.values())
    assert np.all(np.diff(x) == 1)


def test_report_round_trip(bench_dir: Path, tmp_path: Path) -> None:
    records = read_trace(bench_dir)
    again = tmp_path / "again"
    result = cli.invoke(app, ["report", str(bench_dir), "--out", str(again)],
                        env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert (again / "results.md").read_text() == (bench_dir / "results.md").read_text()
    assert (again / "results.md").read_text() == render_markdown(summarize(records))
    assert "speedup over target-only" in _plain(result.output)
    for name in PLOTS:
        assert (again / name).is_file()


def test_fork_suffix_learns_alone() -> None:
    base = SuffixDrafter([[1, 2, 3, 4, 1, 2, 3, 5]], max_n=2, name="toy")
    table_before = {k: dict(v) for k, v in base.table.items()}
    a, b = fork_suffix(base), fork_suffix(base)
    greedy = SamplingParams()
    assert a.propose([9, 1, 2], 3, greedy).tokens.tolist() == base.propose(
        [9, 1, 2], 3, greedy).tokens.tolist()
    a.observe([7, 7], [8, 8, 8, 8])
    assert a.propose([7, 8], 2, greedy).tokens.tolist() == [8, 8]
    assert b.propose([7, 8], 2, greedy).tokens.tolist() == []  # b never saw a's output
    assert {k: dict(v) for k, v in base.table.items()} == table_before


def test_selector_times_its_policy() -> None:
    """The bench's per-round policy time comes from the selector (was TimedPolicy)."""
    inner = make_policy("hedge", 3, seed=1)
    selector = Selector(make_arms(["a", "b", "c"], 4), inner)
    assert selector.needs_scores and selector.name == "hedge" and len(selector.arms) == 3
    arm = selector.select()
    selector.observe(Outcome(arm, 4, 2), (np.ones((5, 3)), np.ones((5, 3))))
    assert inner.t == 1 and selector.policy_seconds > 0
    assert selector.probabilities().tolist() == inner.probabilities().tolist()


def test_sampling_mode_runs(models: BenchModels, tmp_path: Path) -> None:
    cfg = _config(temperature=0.8, prompts_per_domain=1, max_new_tokens=8,
                  policies=("hedge", "ucb"), domains=("code", "chat"))
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=4))
    records = write_trace(runner.run(), tmp_path / "trace.jsonl")
    summary = write_report(records, tmp_path)
    assert all(a["lossless"] is None for a in records if a["type"] == "answer")
    assert "n/a (sampling)" in (tmp_path / "results.md").read_text()
    assert summary.row("hedge").cells[OVERALL].tokens > 0


def test_reset_per_query_and_reduced_pool(models: BenchModels, tmp_path: Path) -> None:
    cfg = _config(prompts_per_domain=1, max_new_tokens=6, policies=("hedge",),
                  drafters=("ngram", "suffix:code"), hf_baseline=False, reset_per_query=True)
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=4))
    records = write_trace(runner.run(), tmp_path / "trace.jsonl")
    meta = records[0]
    assert meta["methods"] == [TARGET_ONLY, "only:ngram", "only:suffix:code", "hedge"]
    assert all(r["drafter"] in ("ngram", "suffix:code") for r in records
               if r["type"] == "round")


@pytest.mark.parametrize("kw", [
    dict(policies=("nope",)), dict(drafters=("suffix:law",)), dict(drafters=("bogus",)),
    dict(prompts_per_domain=0), dict(max_new_tokens=0), dict(order="random"),
    dict(drafters=("ngram", "ngram")), dict(temperature=-1.0), dict(dtype="int8"),
    dict(threads=0), dict(draft_confidence_threshold=1.0),
    dict(draft_confidence_threshold=-0.1), dict(draft_confidence_threshold=float("nan")),
])
def test_bad_config(kw) -> None:
    with pytest.raises(ConfigError):
        _config(**kw)


def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    r = cli.invoke(app, ["bench", "--policies", "hedge,nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown policy 'nope'" in _plain(r.output)
    r = cli.invoke(app, ["bench", "--draft-confidence-threshold", "1.5", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--draft-confidence-threshold must be in [0, 1)" in _plain(
        r.output)
    r = cli.invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no benchmark trace" in _plain(r.output)
    (tmp_path / "trace.jsonl").write_text('{"type": "answer"}\n')
    r = cli.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a specmux bench trace" in _plain(r.output)


def test_cli_help_documents_options() -> None:
    r = cli.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = _plain(r.output)
    for opt in ["--prompts-per-domain", "--max-new-tokens", "--policies", "--drafters",
                "--domains", "--out", "--target", "--drafter-model", "--num-speculative-tokens",
                "--temperature", "--seed", "--no-hf-baseline", "--quick"]:
        assert opt in text, opt


def test_cli_bench_on_local_tiny_models(tmp_path: Path, models: BenchModels,
                                        monkeypatch) -> None:
    """The real command on local model directories and the real (shipped) datasets; a real
    mismatch (injected into the report) makes it exit 1."""
    import specmux.bench.output as report_mod

    write = report_mod.write_report

    def with_a_real_mismatch(records, out, **kw):
        bad = [dict(a) if a.get("method") == "hedge" else a for a in records]
        a = next(a for a in bad if a.get("method") == "hedge" and a["type"] == "answer")
        a.update(lossless=False, divergence={"index": 0, "logit_gap": 3.0, "ulp": 0.0625,
                                             "near_tie": False, "verdict": "mismatch"})
        return write(bad, out, **kw)

    monkeypatch.setattr(report_mod, "write_report", with_a_real_mismatch)
    target = save_tiny_model(tmp_path / "target", tiny_lm(0, hidden=48, max_positions=4096))
    drafter = save_tiny_model(tmp_path / "drafter", tiny_lm(1, hidden=32, layers=1,
                                                            max_positions=4096))
    out = tmp_path / "out"
    r = cli.invoke(app, ["bench", "--quick", "--target", str(target), "--drafter-model",
                         str(drafter), "--policies", "hedge,ucb", "--corpus-chars", "3000",
                         "--dtype", "float32", "--threads", "1",
                         "--out", str(out)], env={"COLUMNS": "250"})
    text = _plain(r.output)
    assert r.exit_code == 1, r.output
    assert "LOSSLESS CHECK FAILED: HedgeSpec (Hedge)" in text
    assert "HedgeSpec (Hedge)" in text and "goals" in text
    records = read_trace(out)
    assert records[0]["command"].startswith("specmux ")
    assert records[-1]["type"] == "end"
    assert [q["category"] for q in records[0]["queries"]] == list(ALL_CATEGORIES)
    assert all(a["lossless"] for a in records if a["type"] == "answer" and a["lossless"]
               is not None)
    assert json.loads((out / "trace.jsonl").read_text().splitlines()[0])["type"] == "meta"


@pytest.mark.slow
def test_real_models_short_bench(tmp_path: Path) -> None:
    """One short bench on the embedded models (SPECMUX_SLOW=1)."""
    assert os.environ.get("SPECMUX_SLOW") == "1"
    out = tmp_path / "out"
    r = cli.invoke(app, ["bench", "--quick", "--domains", "code,chat", "--policies",
                         "hedge,ucb", "--out", str(out)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    records = read_trace(out)
    answers = [a for a in records if a["type"] == "answer"]
    assert answers
    for a in answers:  # bf16 in exact mode (the default): bit-identical
        assert a["lossless"] in (True, None), a["divergence"]
    summary = summarize(records)
    assert summary.row("hedge").cells[OVERALL].mat > 1.0


def test_bf16_lm_head_stride_fix_keeps_logits() -> None:
    from specmux.bench.runner import fix_lm_head_strides

    model = tiny_lm(3, hidden=32).to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    seen: list[tuple[int, ...]] = []
    with torch.inference_mode():
        before = [model(input_ids=ids, logits_to_keep=m).logits for m in (1, 3)]
        assert fix_lm_head_strides(model)
        model.get_output_embeddings().register_forward_pre_hook(
            lambda _, args: seen.append(args[0].stride()))
        after = [model(input_ids=ids, logits_to_keep=m).logits for m in (1, 3)]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert seen == [(32, 32, 1), (96, 32, 1)]  # standard strides reach the lm_head
    assert not fix_lm_head_strides(tiny_lm(3, hidden=32))  # fp32: nothing to fix


def test_divergence_and_loud_mismatch_report(models: BenchModels, bench_dir: Path) -> None:
    cfg = _config(prompts_per_domain=1, max_new_tokens=6, policies=(), hf_baseline=False,
                  drafters=("ngram",))
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=4))
    query = runner.queries[0]
    ref = [5, 6, 7, 8]
    info = runner._divergence(query, ref, [5, 6, 9, 8])
    assert info["index"] == 2 and info["reference_token"] == 7 and info["method_token"] == 9
    assert info["ulp"] > 0 and isinstance(info["near_tie"], bool)
    assert not info["exact"]  # exact mode covers bf16; this target is fp32
    assert info["verdict"] == ("near-tie" if info["near_tie"] else "mismatch")
    # The logit gap is the target's own preference at that point, one token at a time.
    from specmux.lm import CachedLM
    row = CachedLM(models.target).logits([*query.prompt_ids, 5, 6], 1)[0]
    assert info["logit_gap"] == pytest.approx(float(row[7] - row[9]), abs=1e-4)
    assert runner._divergence(query, ref, ref[:2])["logit_gap"] is None  # stopped early
    bf16 = BenchModels(copy.deepcopy(models.target).to(torch.bfloat16), models.tokenizer)
    strict = BenchRunner(cfg, bf16, synthetic_splits(num_eval=1, corpus_size=4))
    info_bf16 = strict._divergence(query, ref, [5, 6, 9, 8])
    assert info_bf16["exact"] and info_bf16["verdict"] == "mismatch"  # exact mode: no excuse
    # Three verdicts in the table: identical, a near-tie flip outside exact mode, a mismatch.
    records = read_trace(bench_dir)
    hedge = [a for a in records if a["type"] == "answer" and a["method"] == "hedge"]
    hedge[0].update(lossless=False, divergence={**info, "logit_gap": 0.0625, "ulp": 0.0625,
                                                "near_tie": True, "verdict": "near-tie"})
    text = render_markdown(summarize(records))
    assert "≈ 5/6 (1 near-tie flip, gap ≤ 1.0 ulp)" in text
    assert "LOSSLESS CHECK FAILED" not in text and "**near-tie**" in text
    assert summarize(records).row("hedge").real_mismatches == 0
    hedge[1].update(lossless=False, divergence={**info, "logit_gap": 0.5, "ulp": 0.0625,
                                                "near_tie": False, "verdict": "mismatch"})
    text = render_markdown(summarize(records))
    assert "**MISMATCH 1/6** (+1 near-tie flip, gap ≤ 1.0 ulp)" in text
    assert "LOSSLESS CHECK FAILED** for: HedgeSpec (Hedge)" in text and "**mismatch**" in text


def test_exact_cost_runs_fast_twins(models: BenchModels, tmp_path: Path) -> None:
    """--exact-cost adds target-only and only:lm with exact mode off, checked against their
    own reference, and the report states exact mode's cost."""
    from specmux.exact import is_exact

    cfg = _config(prompts_per_domain=1, max_new_tokens=6, policies=("hedge",),
                  hf_baseline=False, drafters=("ngram", "lm"), exact_cost=True)
    models = BenchModels(copy.deepcopy(models.target).to(torch.bfloat16), models.tokenizer,
                         models.drafter)
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=4))
    ids = [m.id for m in runner.methods]
    assert ids[:2] == [TARGET_ONLY, "fast:target-only"] and "fast:only:lm" in ids
    records = write_trace(runner.run(), tmp_path / "trace.jsonl")
    answers = [a for a in records if a["type"] == "answer"]
    assert {a["method"] for a in answers if not a["exact"]} == {"fast:target-only",
                                                                 "fast:only:lm"}
    assert all(a["lossless"] for a in answers if a["kind"] != "target")
    assert is_exact(models.target)
    text = render_markdown(summarize(records))
    assert "Exact mode's cost" in text and "only lm [exact mode off]" in text
    with pytest.raises(ConfigError):
        _config(exact=False, exact_cost=True)


def test_timing_outlier_is_flagged(bench_dir: Path) -> None:
    records = read_trace(bench_dir)
    slow = next(a for a in records if a["type"] == "answer" and a["method"] == TARGET_ONLY)
    slow["seconds"] = slow["first_seconds"] + 50 * (slow["seconds"] - slow["first_seconds"])
    summary = summarize(records)
    assert (TARGET_ONLY, slow["question_id"]) in [(o["method"], o["question_id"])
                                                 for o in summary.outliers]
    assert "Timing outliers" in render_markdown(summary)


def test_all_categories_many_arms_report(models: BenchModels, tmp_path: Path) -> None:
    """Seven categories and a ten-drafter pool: the wide table, MAT and regret per
    category, the issue-12 goals and family-grouped plots."""
    from specmux.bench.plots import drafter_colors, drafter_family, grouped_pool
    from specmux.bench.report import regret_by_category

    cfg = _config(domains=ALL_CATEGORIES, prompts_per_domain=1, max_new_tokens=8,
                  policies=("hedge", "ucb"), hf_baseline=False)
    assert len(cfg.pool_names()) == 10 and "suffix" in cfg.pool_names()
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=4))
    records = write_trace(runner.run(), tmp_path / "trace.jsonl")
    summary = write_report(records, tmp_path)
    text = (tmp_path / "results.md").read_text()
    for needle in ["code_edit ×", "multiturn ×", "rag ×", "overall MAT", "## MAT per category",
                   "## Regret per category", "share of the oracle's headroom",
                   "suffix drafter alone: MAT on code_edit", "per-query oracle (time)"]:
        assert needle in text, needle
    assert "MISMATCH" not in text
    regret = regret_by_category(records, ["hedge", "ucb"])
    assert set(regret["hedge"]) <= set(ALL_CATEGORIES)
    goal = next(g for g in summary.goals if g.name.startswith("per-query oracle (time)"))
    assert goal.value is not None and goal.value >= 1.0 - 1e-9  # the oracle is per query best
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    pool = ["suffix:code", "lm", "suffix", "ngram", "suffix:math", "lm@8"]
    assert grouped_pool(pool) == ["suffix:code", "suffix", "suffix:math", "lm", "lm@8", "ngram"]
    assert drafter_family("lm@8") == "lm" and drafter_family("suffix:code") == "suffix"
    colors = drafter_colors(pool)
    assert len(set(colors.values())) == len(pool)


def test_cost_goals_are_met_at_or_below_their_target() -> None:
    from specmux.bench.report import Goal

    assert Goal("scoring share", 0.01, 0.02, at_most=True).met
    assert not Goal("scoring share", 0.05, 0.02, at_most=True).met
    assert Goal("speedup", 2.1, 2.0).met and Goal("x", None, 1.0).met is None
