"""The suffix drafter's RAM budget (max_memory_mb -> max_entries)."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from specmux.drafters.suffix import BYTES_PER_ENTRY, SuffixDrafter, entries_for_memory
from specmux.errors import ConfigError
from specmux.types import SamplingParams


def test_memory_budget_sets_max_entries() -> None:
    assert SuffixDrafter().max_entries == 2_000_000  # default unchanged
    d = SuffixDrafter(max_memory_mb=1)
    assert d.max_entries == entries_for_memory(1) == 2**20 // BYTES_PER_ENTRY
    assert SuffixDrafter(max_entries=100, max_memory_mb=1).max_entries == 100  # the tighter one
    with pytest.raises(ConfigError):
        SuffixDrafter(max_memory_mb=0)


def test_memory_stays_within_budget_while_learning_online() -> None:
    rng = random.Random(0)
    # Zipf-ish token stream over a large id range (like a real tokenizer's ids).
    vocab = [rng.randrange(300, 150_000) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    docs = [rng.choices(vocab, weights, k=400) for _ in range(60)]
    budget_mb = 2.0
    tracemalloc.start()
    d = SuffixDrafter(max_n=6, max_memory_mb=budget_mb)
    for doc in docs:  # served outputs arrive round by round
        for i in range(0, len(doc) - 4, 4):
            d.observe(doc[:i], doc[i : i + 4])
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(d.table) == d.max_entries  # it filled up and evicted
    assert used <= budget_mb * 2**20, (used, len(d.table))
    assert d.approx_memory_bytes <= budget_mb * 2**20
    assert d.propose(docs[-1][:50], 3, SamplingParams()).tokens.numel() >= 0
