"""llama-cpp-python's own decoding loops, the anchors of ``specmux bench --backend llama.cpp``.

* ``llama.cpp-generate``: plain decoding through ``Llama.generate`` (one ``llama_decode`` of
  one token per new token, llama.cpp's own sampler), on the very ``Llama`` object the
  specmux target wraps: what a llama-cpp-python user gets without speculation;
* ``llama.cpp-pld``: llama-cpp-python's built-in speculative decoding with
  ``LlamaPromptLookupDecoding(num_pred_tokens=10)`` (its documented setting).  It needs a
  ``Llama`` built with ``logits_all=True`` (without it, ``eval`` writes the logits of every
  token of a prompt longer than ``n_batch`` into an ``n_batch``-row buffer and crashes with
  "could not broadcast input array"), so it gets its own ``Llama`` over the same file.

Each run starts from an empty KV cache and its wall clock covers prefill plus decoding, as
for every other method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specmux.backends.llamacpp import LlamaCppLM, new_llama
from specmux.types import SamplingParams

ANCHOR_GENERATE = "llama.cpp-generate"
ANCHOR_PLD = "llama.cpp-pld"
ANCHORS = (ANCHOR_GENERATE, ANCHOR_PLD)
PLD_TOKENS = 10


@dataclass
class AnchorRun:
    tokens: list[int]
    seconds: float
    num_target_calls: int  # llama_decode batches (eval calls) after the prompt's
    first_seconds: float  # prefill + first token


def build_pld(target: LlamaCppLM) -> Any:
    """A second ``Llama`` over the target's GGUF with prompt-lookup speculative decoding."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    return new_llama(
        model_path=target.path, n_ctx=target.max_context, n_batch=target.n_batch,
        n_ubatch=target.n_batch, n_threads=target.threads, n_threads_batch=target.threads,
        logits_all=True, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=PLD_TOKENS),
        verbose=False,
    )


def _sampler_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """llama.cpp sampler settings equal to ``sampling`` (temperature 0 = greedy)."""
    return {"temp": 0.0 if sampling.greedy else float(sampling.temperature),
            "top_k": int(sampling.top_k), "top_p": float(sampling.top_p), "min_p": 0.0,
            "typical_p": 1.0, "repeat_penalty": 1.0}


def run_anchor(
    llama: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    stop: frozenset[int] | set[int],
    max_context: int,
    clear: Callable[[], None] | None = None,
) -> AnchorRun:
    """Run ``llama.generate`` from an empty cache until a stop token or the length limit."""
    if clear is not None:
        clear()
    else:
        llama.reset()
    calls = {"n": 0}
    eval_ = llama.eval

    def counting_eval(tokens: Sequence[int]) -> None:
        calls["n"] += 1
        eval_(tokens)

    llama.eval = counting_eval  # instance attribute: generate() calls self.eval
    if sampling.seed is not None:
        llama.set_seed(int(sampling.seed))
    limit = min(max_new_tokens, max_context - len(prompt_ids))
    out: list[int] = []
    first = 0.0
    try:
        t0 = time.perf_counter()
        for tok in llama.generate(list(prompt_ids), reset=True, **_sampler_kwargs(sampling)):
            if not out:
                first = time.perf_counter() - t0
            out.append(int(tok))
            if tok in stop or len(out) >= limit:
                break
        seconds = time.perf_counter() - t0
    finally:
        del llama.eval
        if clear is not None:
            clear()
        else:
            llama.reset()
    return AnchorRun(out, seconds, max(calls["n"] - 1, 0) + 1, first)


def anchor_goals(summary: Any) -> list[Any]:
    """Issue 14's goals for a llama.cpp run (empty without the anchors): specmux target-only
    within 5% of llama-cpp-python's own loop; every learner >= 0.98x that loop on every
    category; on code (drafts accepted often) >= 1.3x it and ahead of its prompt lookup."""
    from specmux.bench.report import OVERALL, TARGET_ONLY, Goal

    plain, pld = summary.row(ANCHOR_GENERATE), summary.row(ANCHOR_PLD)
    if plain is None:
        return []

    def ratio(row: Any, base: Any, domain: str = OVERALL) -> float | None:
        if row is None or base is None or domain not in row.cells or domain not in base.cells:
            return None
        ref = base.cells[domain].tokens_per_second
        return row.cells[domain].tokens_per_second / ref if ref > 0 else None

    out = [Goal("target-only / llama.cpp generate (tok/s)",
                ratio(summary.row(TARGET_ONLY), plain), 0.95)]
    for row in summary.rows:
        if row.kind != "policy":
            continue
        worst = [r for d in summary.domains if (r := ratio(row, plain, d)) is not None]
        out.append(Goal(f"{row.label}: worst category / llama.cpp generate",
                        min(worst) if worst else None, 0.98))
        if "code" in summary.domains:
            out.append(Goal(f"{row.label} on code / llama.cpp generate",
                            ratio(row, plain, "code"), 1.3))
            out.append(Goal(f"{row.label} on code / llama.cpp prompt lookup",
                            ratio(row, pld, "code"), 1.0))
    return out
