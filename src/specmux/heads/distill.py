"""The target's own answers to the corpus prompts: self-distillation text for a head.

A head trained on corpus text learns the corpus's style, but at run time it drafts the
*target's* answers, and the two differ: on math the corpus holds human-written worked
solutions while the target answers "To solve this problem, we need to ...".  Medusa-2 and
EAGLE therefore train on text the target generated itself ("self-distillation").  Here the
prompts are the corpus items' prompts (:attr:`specmux.bench.datasets.DomainSplit.prompts`,
disjoint from the eval prompts), each answered greedily by the target; the training
sequence is prompt + answer, extracted like any text (:mod:`specmux.heads.extract`).

Generation runs on llama.cpp when the target is a GGUF (the embedded models are: 2-3.5 s
for a 48-token answer on two cores here, docs/ADAPTATION.md), else through transformers.
The quantized model's greedy answer can differ from the bf16 target's at a near-tie; that
only shifts which text is trained on, never the teacher, which is the bf16 target's own
distribution at every position (:func:`specmux.heads.extract.extract_one`).

Answers are cached one JSON file per prompt (``SHA.json``, written atomically, named by the
prompt's tokens, the token budget and the generator), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from specmux.heads.store import _atomic_write

log = logging.getLogger(__name__)

GENERATORS = ("auto", "llama.cpp", "transformers")
# generate(prompt_ids, max_new_tokens) -> the target's greedy answer (stop token included)
Generate = Callable[[Sequence[int], int], list[int]]


def stop_tokens(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    return frozenset(int(i) for i in ids)


def transformers_generator(model: Any, stop: frozenset[int]) -> Generate:
    """Greedy answers from the loaded transformers target (``model.generate``)."""
    import torch

    def generate(prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        x = torch.tensor([list(prompt)], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stop) or None,
                                 pad_token_id=min(stop) if stop else 0)
        return [int(t) for t in out[0, x.shape[1]:]]

    return generate


def llamacpp_generator(target: str, stop: frozenset[int], threads: int | None) -> Generate:
    """Greedy answers from the target's GGUF through llama-cpp-python's own loop."""
    from specmux.backends.llamacpp import LlamaCppLM
    from specmux.bench.anchors import run_anchor
    from specmux.types import SamplingParams

    lm = LlamaCppLM.load(target, name="distill", threads=threads)
    greedy = SamplingParams(temperature=0.0)

    def generate(prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        return run_anchor(lm.llama, prompt, max_new_tokens, greedy, stop, lm.max_context,
                          clear=lm.reset).tokens

    return generate


def make_generator(kind: str, target: str, model: Any, stop: frozenset[int],
                   threads: int | None = None) -> tuple[str, Generate]:
    """``(name, generate)`` for ``kind`` in :data:`GENERATORS`; ``auto`` = llama.cpp when
    the target is a GGUF and llama-cpp-python is installed, else transformers."""
    from specmux.errors import ConfigError, SpecmuxError

    if kind not in GENERATORS:
        raise ConfigError(f"unknown generator {kind!r}; known: {', '.join(GENERATORS)}")
    if kind == "auto":
        kind = "transformers"
        try:
            from specmux.backends.llamacpp import llama_cpp_module, resolve_gguf

            llama_cpp_module()
            resolve_gguf(target)
            kind = "llama.cpp"
        except SpecmuxError as err:  # not a GGUF, or no llama-cpp-python: the loaded model
            log.info("self-distillation through transformers (%s)", err)
    if kind == "llama.cpp":
        return kind, llamacpp_generator(target, stop, threads)
    return kind, transformers_generator(model, stop)


def check_request(split: Any, num_prompts: int, max_new_tokens: int = 1) -> None:
    """A :class:`~specmux.errors.ConfigError` unless ``split`` can give ``num_prompts``
    self-distilled answers of ``max_new_tokens`` tokens (checked before any model loads)."""
    from specmux.errors import ConfigError

    if num_prompts < 0 or max_new_tokens < 1:
        raise ConfigError("--self-distill must be >= 0 and --distill-tokens >= 1")
    if num_prompts and not split.prompts:
        raise ConfigError(f"{split.domain} has no corpus prompts to self-distill; pass "
                          "--self-distill 0")


def _answer_path(directory: pathlib.Path, prompt: Sequence[int], max_new_tokens: int,
                 generator: str) -> pathlib.Path:
    key = json.dumps([generator, max_new_tokens, list(prompt)])
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_answer(path: pathlib.Path, prompt: Sequence[int]) -> list[int] | None:
    """The cached answer at ``path`` (None when absent, unreadable or for another prompt)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("prompt") != list(prompt) or not isinstance(saved.get("answer"), list):
            return None
        answer = [int(t) for t in saved["answer"]]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return answer


def distill_sequences(
    prompts: Sequence[Sequence[int]],
    generate: Generate,
    directory: pathlib.Path,
    *,
    max_new_tokens: int,
    generator: str,
    on_item: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """``prompt + answer`` token ids for every prompt, the answers generated greedily by
    ``generate`` or read from ``directory`` (cached per prompt, atomically; a damaged file
    is generated again).  ``on_item(answer_tokens, done)`` reports progress."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, prompt in enumerate(prompts):
        path = _answer_path(directory, prompt, max_new_tokens, generator)
        answer = _read_answer(path, prompt)
        if answer is None:
            answer = generate(prompt, max_new_tokens)
            blob = json.dumps({"prompt": list(prompt), "answer": answer}).encode()
            _atomic_write(path, lambda p, b=blob: p.write_bytes(b))
        out.append([*prompt, *answer])
        if on_item is not None:
            on_item(len(answer), i + 1)
    return out


def self_distill(
    split: Any,
    tokenizer: Any,
    model: Any,
    target: str,
    *,
    num_prompts: int,
    max_new_tokens: int,
    generator: str = "auto",
    threads: int | None = None,
    on_item: Callable[[int, int], None] | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """The target's greedy answers to the first ``num_prompts`` corpus prompts of ``split``
    (a :class:`~specmux.bench.datasets.DomainSplit`) that fit the model's context (fewer
    when the corpus has fewer), as ``prompt + answer`` token ids, and the figures for the
    head's metadata (prompts, generator, answer tokens, seconds)."""
    import time

    from specmux.bench.runner import encode
    from specmux.errors import ConfigError
    from specmux.models import cache_dir

    check_request(split, num_prompts, max_new_tokens)
    t0 = time.perf_counter()
    # Prompts that leave room for the answer within the model's context, in corpus order.
    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30)) - max_new_tokens
    prompts: list[list[int]] = []
    for ex in split.prompts:
        if len(prompts) == num_prompts:
            break
        ids = encode(tokenizer, ex)
        if len(ids) <= limit:
            prompts.append(ids)
    if num_prompts and not prompts:
        raise ConfigError(f"{split.domain}: no corpus prompt leaves room for {max_new_tokens} "
                          "answer tokens in the model's context")
    if len(prompts) < num_prompts:
        log.info("%s: %d corpus prompts to self-distill (of %d asked)", split.domain,
                 len(prompts), num_prompts)
    name, seqs = "none", []
    if prompts:
        name, generate = make_generator(generator, target, model,
                                        stop_tokens(model, tokenizer), threads)
        seqs = distill_sequences(prompts, generate, cache_dir() / "distill" / split.domain,
                                 max_new_tokens=max_new_tokens, generator=f"{target}|{name}",
                                 on_item=on_item)
    meta = {"distill_prompts": len(prompts), "distill_generator": name,
            "distill_max_new_tokens": max_new_tokens,
            "distill_answer_tokens": sum(len(s) - len(p)
                                         for s, p in zip(seqs, prompts, strict=True)),
            "distill_seconds": round(time.perf_counter() - t0, 1)}
    return seqs, meta
