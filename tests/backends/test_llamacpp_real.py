"""The llama.cpp backend on the embedded real GGUFs (slow: SPECMUX_SLOW=1, GB-sized)."""

from __future__ import annotations

import math

import pytest
import torch

from specmux.engine import autoregressive_generate

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

PROMPT = "def quicksort(xs):\n    \"\"\"Sort a list.\"\"\"\n"


def test_real_models_greedy_equal_or_near_tie() -> None:
    """Hedge over the 0.5B drafter + ngram equals llama.cpp target-only greedy, or leaves it
    only where the target's top-two logits are within 4 float32 ulp (batched rounding)."""
    from specmux.api import Pipeline

    pipe = Pipeline("embedded:qwen2.5-coder-1.5b", ["embedded:qwen2.5-coder-0.5b", "ngram"],
                    "hedge", backend="llama.cpp", threads=2)
    ids = pipe.encode(PROMPT)
    target = pipe.decoder.target
    ref = autoregressive_generate(target, ids, 48)
    out = pipe.generate(PROMPT, max_new_tokens=48).token_ids
    if out != ref:
        i = next(j for j, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b)
        target.reset()
        row = target.logits([*ids, *ref[:i]], 1)[0]
        gap = float(row[ref[i]] - row[out[i]])
        ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(abs(float(row.max()))))
        assert abs(gap) <= 4 * ulp, f"diverged at {i} with a logit gap of {gap / ulp:.1f} ulp"
    assert pipe.decoder.stats.mean_acceptance_length > 1.2
