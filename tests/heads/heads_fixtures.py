"""Fixtures: a tiny draft head trained on the tiny target's own states (seconds, offline)."""

from __future__ import annotations

import pytest
import torch

from specmux.heads.extract import extract_one
from specmux.heads.store import HeadFile
from specmux.heads.train import TrainConfig, train_head

from conftest import VOCAB


@pytest.fixture(scope="session")
def tiny_shards(target_model) -> list:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, VOCAB, (48,), generator=gen).tolist() for _ in range(40)]
    return [extract_one(target_model, s) for s in seqs]


@pytest.fixture(scope="session")
def tiny_head(target_model, tiny_shards) -> HeadFile:
    cfg = TrainConfig(inner=64, draft_vocab=40, depth=2, epochs=4, batch_size=64, lr=3e-3,
                      holdout=0.1, max_seconds=20)
    head = train_head(target_model, tiny_shards, cfg, meta={"domain": "tiny"})
    head.meta["name"] = "head:tiny"
    return head
