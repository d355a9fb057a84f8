"""The prompt-lookup drafter's incremental n-gram index answers as the full scan does."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from specmux.drafters.ngram import NgramDrafter, NgramIndex, match
from specmux.types import SamplingParams

GREEDY = SamplingParams()


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=2, max_size=60),
       ends=st.lists(st.integers(0, 60), min_size=1, max_size=12),
       max_n=st.integers(1, 4), k=st.integers(1, 6))
def test_index_matches_the_scan_for_any_order_of_queries(tokens, ends, max_n, k) -> None:
    """Growing, repeated and earlier ends, and sequences that diverge from the indexed one."""
    index = NgramIndex(max_n=max_n, min_n=1)
    arr = np.array(tokens)
    for i, end in enumerate(ends):
        end = min(end, len(tokens))
        seq = tokens if i % 3 else [*tokens[: end // 2], *reversed(tokens[end // 2 :])]
        want, n = match(np.array(seq), end, max_n, 1, k)
        assert index.match(seq, end, k) == (want.tolist(), n)
    want, n = match(arr, len(tokens), max_n, 1, k)
    assert index.match(tokens, len(tokens), k) == (want.tolist(), n)


def test_drafter_over_a_growing_context_equals_the_scan() -> None:
    rng = np.random.default_rng(0)
    context = rng.integers(0, 6, 80).tolist()
    drafter = NgramDrafter(prompt_lookup_max=3, prompt_lookup_min=2)
    for _ in range(30):
        path = rng.integers(0, 6, 3).tolist()
        arr = np.array([*context, *path])
        assert drafter.propose(context, 4, GREEDY).tokens.tolist() == match(
            arr, len(context), 3, 2, 4)[0].tolist()
        got = drafter.distributions(context, path, GREEDY).tokens.tolist()
        want = [int(m[0]) if (m := match(arr, len(context) + j, 3, 2, 1)[0]).size else -1
                for j in range(len(path))]
        assert got == want
        context = [*context, *path]
    assert drafter.index.indexed == context[:-2]  # the last path position looked up: end - 1
