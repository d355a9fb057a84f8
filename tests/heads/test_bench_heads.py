"""The benchmark finds the heads trained for its target and adds them to the pool."""

from __future__ import annotations

import pytest

from specmux.bench.datasets import synthetic_splits
from specmux.bench.runner import BenchConfig, BenchModels, BenchRunner
from specmux.errors import ConfigError
from specmux.heads.store import HeadFile, save_head

from conftest import tiny_lm
from helpers import tiny_tokenizer


def test_bench_pool_gets_the_trained_head(tmp_path, monkeypatch, target_model, tiny_head) -> None:
    monkeypatch.setenv("SPECMUX_CACHE", str(tmp_path))
    head = HeadFile(tiny_head.net, tiny_head.draft_vocab,
                    {**tiny_head.meta, "target": "tiny-target", "domain": "code"})
    save_head(head, tmp_path / "heads", "head-code")
    base = dict(target="tiny-target", drafter_model="tiny-drafter", prompts_per_domain=1,
                max_new_tokens=10, policies=("hedge",), dtype="float32", hf_baseline=False,
                domains=("code", "math"))
    cfg = BenchConfig(**base)
    assert cfg.pool_names()[-1] == "head:code"  # only code has a head
    assert "head:code" not in BenchConfig(**base, heads=False).pool_names()
    assert "head:code" not in BenchConfig(**{**base, "target": "other"}).pool_names()
    with pytest.raises(ConfigError, match="heads train --domain math"):
        BenchConfig(**base, drafters=("ngram", "head:math"))
    models = BenchModels(target_model, tiny_tokenizer(), tiny_lm(1, hidden=32, layers=1),
                         "tiny-target", "tiny-drafter")
    runner = BenchRunner(cfg, models, synthetic_splits(num_eval=1, corpus_size=4))
    answers = [r for r in runner.run() if r["type"] == "answer"]
    assert {a["method"] for a in answers} >= {"only:head:code", "hedge"}
    assert all(a["lossless"] is True for a in answers if a["method"] != "target-only")
