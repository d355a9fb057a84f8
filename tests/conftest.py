"""Shared fixtures: tiny random-init models that share a vocabulary (fast, offline)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 48

# Tiny models run fastest single-threaded; several threads only contend on a 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SPECMUX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="needs the embedded models: set SPECMUX_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny_lm(seed: int, hidden: int = 32, layers: int = 2, vocab: int = VOCAB,
            max_positions: int = 512, init_range: float = 0.3) -> LlamaForCausalLM:
    """A random-init Llama whose logits are spread enough that argmax ties are unlikely."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=max_positions, initializer_range=init_range,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def target_model() -> LlamaForCausalLM:
    return tiny_lm(0, hidden=48)


def tiny_drafters() -> list[LlamaForCausalLM]:
    """Two drafters: a small one, and a copy of the target perturbed (a 'good' drafter)."""
    small = tiny_lm(1, hidden=32, layers=1)
    good = tiny_lm(0, hidden=48)
    with torch.no_grad():
        for p in good.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return [small, good]


@pytest.fixture(scope="session")
def drafter_models() -> list[LlamaForCausalLM]:
    return tiny_drafters()


@pytest.fixture(scope="session")
def tiny_head(target_model):
    """A draft head trained for a few seconds on the tiny target's states (tests/heads)."""
    from specmux.heads.extract import extract_one
    from specmux.heads.train import TrainConfig, train_head

    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, VOCAB, (48,), generator=gen).tolist() for _ in range(40)]
    shards = [extract_one(target_model, s) for s in seqs]
    cfg = TrainConfig(inner=64, draft_vocab=40, depth=2, epochs=4, batch_size=64, lr=3e-3,
                      holdout=0.1, max_seconds=20)
    head = train_head(target_model, shards, cfg, meta={"domain": "tiny"})
    head.meta["name"] = "head:tiny"
    return head
