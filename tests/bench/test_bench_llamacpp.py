"""``specmux bench --backend llama.cpp`` on tiny GGUFs: every method (anchors included) on
every query, lossless against llama.cpp target-only, goals against the anchors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specmux.bench.datasets import synthetic_splits
from specmux.bench.output import write_report
from specmux.bench.report import summarize
from specmux.bench.runner import TARGET_ONLY, BenchConfig, BenchModels, BenchRunner
from specmux.cli import app
from specmux.errors import ConfigError

from conftest import tiny_lm
from gguf_helpers import write_gguf
from helpers import tiny_tokenizer

pytest.importorskip("llama_cpp")

from specmux.backends.llamacpp import LlamaCppLM  # noqa: E402
from specmux.bench.anchors import ANCHOR_GENERATE, ANCHOR_PLD  # noqa: E402

cli = CliRunner()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bench-gguf")
    target = tiny_lm(0, hidden=48, max_positions=2048)
    drafter = tiny_lm(0, hidden=48, max_positions=2048)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return write_gguf(target, d / "target.gguf"), write_gguf(drafter, d / "drafter.gguf")


@pytest.fixture(scope="module")
def records(ggufs) -> list[dict]:
    target, drafter = (LlamaCppLM.load(p, threads=1, context=1024) for p in ggufs)
    models = BenchModels(target, tiny_tokenizer(), drafter, "tiny-target", "tiny-drafter")
    cfg = BenchConfig(target="tiny-target", drafter_model="tiny-drafter", prompts_per_domain=2,
                      max_new_tokens=12, policies=("hedge", "ucb"), hf_baseline=False,
                      backend="llama.cpp", threads=1)
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=2, corpus_size=8))
    return list(runner.run())


def test_every_method_runs_every_query_losslessly(records) -> None:
    meta = records[0]
    assert meta["machine"]["backend"] == "llama.cpp" and meta["machine"]["llama_cpp_python"]
    assert {ANCHOR_GENERATE, ANCHOR_PLD, TARGET_ONLY, "only:lm", "hedge"} <= set(meta["methods"])
    answers = [r for r in records if r["type"] == "answer"]
    assert len(answers) == len(meta["methods"]) * len(meta["queries"])
    checked = [a for a in answers if a["method"] != TARGET_ONLY]
    assert checked and all(a["lossless"] for a in checked), [
        (a["method"], a["divergence"]) for a in checked if not a["lossless"]]
    assert all(a["new_tokens"] > 0 and a["seconds"] > 0 for a in answers)


def test_report_has_the_anchor_goals(records, tmp_path) -> None:
    summary = write_report(records, tmp_path, plots=False)
    names = [g.name for g in summary.goals]
    assert "target-only / llama.cpp generate (tok/s)" in names
    assert any("worst category / llama.cpp generate" in n for n in names)
    assert any("on code / llama.cpp prompt lookup" in n for n in names)
    assert summarize(records).row(ANCHOR_PLD) is not None
    text = (tmp_path / "results.md").read_text()
    assert ANCHOR_GENERATE in text and ANCHOR_PLD in text


def test_hf_baseline_is_transformers_only() -> None:
    with pytest.raises(ConfigError, match="no-hf-baseline"):
        BenchConfig(backend="llama.cpp", hf_baseline=True)
    with pytest.raises(ConfigError, match="backend"):
        BenchConfig(backend="tensorrt")


def test_transformers_target_with_a_llamacpp_drafter(ggufs, tmp_path) -> None:
    """``drafter_backend="llama.cpp"``: the LM drafter is the GGUF on llama.cpp, the target a
    transformers model; every method stays identical to the target's own greedy output, and
    the report names the drafter's backend."""
    drafter = LlamaCppLM.load(ggufs[1], threads=1, context=1024)
    models = BenchModels(tiny_lm(0, hidden=48, max_positions=2048), tiny_tokenizer(), drafter,
                         "tiny-target", "tiny-drafter")
    cfg = BenchConfig(target="tiny-target", drafter_model="tiny-drafter", prompts_per_domain=1,
                      max_new_tokens=12, policies=("hedge:time:ctx",), hf_baseline=False,
                      drafter_backend="llama.cpp", dtype="float32", k_choices=(0, 2, 4),
                      drafter_context_window=16)
    records = list(BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=8)).run())
    machine = records[0]["machine"]
    assert machine["backend"] == "transformers" and machine["drafter_backend"] == "llama.cpp"
    answers = [r for r in records if r["type"] == "answer" and r["method"] != TARGET_ONLY]
    assert {"only:lm@2", "hedge:time:ctx"} <= {a["method"] for a in answers}
    assert all(a["lossless"] for a in answers), [a["divergence"] for a in answers]
    summary = write_report(records, tmp_path, plots=False)
    text = (tmp_path / "results.md").read_text()
    assert "on llama.cpp (llama-cpp-python" in text and "context window 16 tokens" in text
    assert summary.rows
    with pytest.raises(ConfigError, match="no-hf-baseline"):
        BenchConfig(drafter_backend="llama.cpp", hf_baseline=True)
    with pytest.raises(ConfigError, match="backend"):
        BenchConfig(drafter_backend="onnx", hf_baseline=False)


def test_cli_bench_with_llamacpp(ggufs, tmp_path) -> None:
    target, drafter = ggufs
    res = cli.invoke(app, [
        "bench", "--backend", "llama.cpp", "--target", str(target), "--drafter-model",
        str(drafter), "--quick", "--policies", "hedge", "--drafters", "ngram,lm",
        "--threads", "1", "--out", str(tmp_path / "out"), "--no-install", "--domains", "code",
    ])
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.output)
    if res.exit_code == 2 and "pip install" in text:
        pytest.skip("the benchmark datasets are not installed")
    assert res.exit_code == 0, text
    assert (tmp_path / "out" / "results.md").is_file()
    assert "LOSSLESS CHECK FAILED" not in text
