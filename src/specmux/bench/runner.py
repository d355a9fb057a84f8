"""The Spec-Bench-style benchmark: every method on the same prompts, one trace of records.

Methods, all greedy at batch 1 by default (``temperature > 0`` samples instead):

* ``target-only``: :func:`specmux.engine.autoregressive_generate`, one target call per token;
* ``only:<drafter>``: each drafter of the pool alone (a ``fixed`` policy over a pool of one);
* ``hf-assisted``: Hugging Face's own ``model.generate(assistant_model=...)`` with its
  default settings (the external baseline);
* one run per policy (``ucb``, ``exp3``, ``metasd``, ``hedge``, ``normalhedge``,
  ``banditspec``) over the whole pool; ``NAME:LOSS`` picks a full-information learner's
  loss (``hedge:length``; default ``BenchConfig.loss``);
* with ``exact_cost``, ``fast:target-only`` and ``fast:only:lm``: the same runs with exact
  mode off (today's bf16 path), so exact mode's cost is measured in the same run.

Arms are drafter x k over ``k_choices`` (``0`` adds the no-speculation arm); each drafter
alone runs at every ``single_ks`` (``only:lm@2``: the fixed (drafter, k) baselines).

In exact mode (:mod:`specmux.exact`, the default) the target computes every position
bitwise alike in one-token and verification passes, so any greedy mismatch is a real one.

With ``backend="llama.cpp"`` the target and the LM drafter are GGUFs on llama.cpp
(:class:`~specmux.backends.llamacpp.LlamaCppLM`), HF assisted generation is replaced by two
anchors from llama-cpp-python itself (:mod:`specmux.bench.anchors`): its plain
``Llama.generate`` loop and its ``LlamaPromptLookupDecoding``.

Every model is loaded once; the target and the LM drafter each sit behind one Target
(:class:`~specmux.lm.CachedLM`, or a ``LlamaCppLM``) shared by all methods.  The loop is
*query-major*: for each query of the (mixed) stream, every method runs it in turn, so slow
drifts of the machine's load hit all methods alike.  Each (method, query) run starts from
empty KV caches and its wall clock covers prefill plus decoding, as Spec-Bench times a query.

Each method keeps its own learner and its own copy of the stateful drafters (corpus
drafters index what they verify) across the stream, so a learner learns the workload and no
method sees another method's outputs.  Under greedy decoding every method's output is
checked against target-only (``lossless``).

:func:`run_bench` yields plain-dict records (``meta``, ``answer``, ``round``); they are the
JSONL trace, and :mod:`specmux.bench.report` builds every table and plot from them alone.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specmux.api import Pipeline
from specmux.backends import check_backend
from specmux.backends.llamacpp import LlamaCppLM
from specmux.bench.datasets import ALL_CATEGORIES, ORDERS, DomainSplit, Example, mixed_stream
from specmux.bench.prompts_file import PromptsFileInfo, example_at, iter_examples
from specmux.config import (
    DEFAULT_DRAFT_CONFIDENCE_THRESHOLD,
    DEFAULT_DRAFTER_MODEL,
    DEFAULT_TARGET,
)
from specmux.drafters.base import Drafter
from specmux.drafters.head import HeadDrafter
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix import SuffixDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError
from specmux.exact import is_exact, set_exact
from specmux.feedback import LOSSES
from specmux.heads.store import find_heads, load_head
from specmux.lm import as_target
from specmux.policies import POLICIES
from specmux.types import SamplingParams
from specmux.versions import cpu_name, package_versions

log = logging.getLogger(__name__)

TRACE_VERSION = 1
TARGET_ONLY = "target-only"
HF_ASSISTED = "hf-assisted"
SINGLE_PREFIX = "only:"
FAST_PREFIX = "fast:"  # a method run with exact mode off (exact_cost)
NEAR_TIE_ULP = 2.0  # top-two logit gap (in ulp) that rounding alone can flip, outside exact mode
LM_DRAFTER = "lm"
SUFFIX = "suffix"  # the SuffixDecoding drafter with no corpus (request + earlier outputs)
DEFAULT_POLICIES: tuple[str, ...] = ("ucb", "exp3", "metasd", "hedge", "normalhedge",
                                     "banditspec")
DEFAULT_DOMAINS: tuple[str, ...] = ALL_CATEGORIES
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


HEAD_PREFIX = "head:"


def _head_path(name: str) -> Path:
    """The trained head ``head:DOMAIN`` (``<cache>/heads/head-DOMAIN.json``)."""
    domain = name.removeprefix(HEAD_PREFIX)
    path = find_heads().get(f"head-{domain}")
    if path is None:
        raise ConfigError(f"no trained head for domain {domain!r}; run "
                          f"`specmux heads train --domain {domain}`")
    return path


def _trained_heads(target: str) -> dict[str, Path]:
    """``{domain: head json}`` of the saved heads trained for ``target``."""
    out = {}
    for path in find_heads().values():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("target") == target and "domain" in meta:
            out[str(meta["domain"])] = path
    return out


CONTEXT_FLAGS = {"ctx": True, "noctx": False}
SELECTIONS = ("sample", "argmax")  # a full-information learner's selection rule


@dataclass(frozen=True)
class PolicySpec:
    """A bench learner: ``NAME[:LOSS][:ctx|:noctx][:sample|:argmax]``."""

    name: str
    loss: str | None = None  # None: BenchConfig.loss
    contextual: bool | None = None  # None: BenchConfig.contextual
    selection: str | None = None  # Hedge/NormalHedge: draw from the weights, or play the best


def parse_policy_spec(spec: str) -> PolicySpec:
    """Parse a ``--policies`` entry; ConfigError on an unknown policy, loss or flag.

    >>> parse_policy_spec("hedge:time:ctx:argmax")
    PolicySpec(name='hedge', loss='time', contextual=True, selection='argmax')
    """
    name, *mods = spec.split(":")
    if name not in POLICIES or name == "fixed":
        known = ", ".join(p for p in sorted(POLICIES) if p != "fixed")
        raise ConfigError(f"unknown policy {spec!r}; known: {known}")
    out = PolicySpec(name)
    for mod in mods:
        if mod in LOSSES and out.loss is None:
            out = replace(out, loss=mod)
        elif mod in CONTEXT_FLAGS and out.contextual is None:
            out = replace(out, contextual=CONTEXT_FLAGS[mod])
        elif (mod in SELECTIONS and out.selection is None
              and POLICIES[name].full_information):
            out = replace(out, selection=mod)
        else:
            raise ConfigError(f"bad policy spec {spec!r}: after the name, at most one loss "
                              f"({', '.join(LOSSES)}), one of ctx, noctx and, for hedge and "
                              f"normalhedge, one of {', '.join(SELECTIONS)}")
    return out


@dataclass
class BenchConfig:
    """What :func:`run_bench` runs.  ``drafters`` names the pool: ``suffix:<domain>`` (a
    SuffixDecoding drafter seeded with the domain's corpus), ``suffix`` (one with no corpus),
    ``ngram`` and ``lm`` (the drafter model); ``None`` = one corpus drafter per domain, plus
    ``suffix``, ``ngram`` and ``lm`` (with ``prompts_file``: ``suffix``, ``ngram``, ``lm``).
    ``prompts_file``: a JSONL workload (see :mod:`specmux.bench.prompts_file`) replacing
    the built-in categories."""

    target: str = DEFAULT_TARGET
    drafter_model: str = DEFAULT_DRAFTER_MODEL
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    prompts_per_domain: int = 2
    max_new_tokens: int = 56
    policies: tuple[str, ...] = DEFAULT_POLICIES
    drafters: tuple[str, ...] | None = None
    num_speculative_tokens: int = 4
    k_choices: tuple[int, ...] | None = None  # learners' k set; None: (num_speculative_tokens,)
    single_ks: tuple[int, ...] | None = None  # k of the single-drafter runs; None: k_choices
    loss: str = "time"  # full-information learners' loss unless NAME:LOSS says otherwise
    contextual: bool = False  # learners keep one learner per drafter-signal context
    score_rate: float = 1.0  # share of rounds an expensive drafter is scored when not played
    temperature: float = 0.0
    seed: int = 0
    hf_baseline: bool = True
    single_drafters: bool = True
    order: str = "interleave"
    reset_per_query: bool = False
    max_corpus_chars: int = 2_000_000
    dtype: str = "bfloat16"  # both models; bf16 verifies k+1 tokens at ~1 step's cost here
    threads: int | None = None  # torch intra-op threads; None = torch's default
    prompts_file: str | None = None
    exact: bool = True  # batch-invariant target passes (specmux.exact): greedy is bit-exact
    exact_cost: bool = False  # also run target-only and only:lm with exact mode off
    backend: str = "transformers"  # or "llama.cpp": GGUFs run as they are (threads: llama's)
    # The LM drafter's backend (None: the target's).  A transformers target may draft with a
    # GGUF on llama.cpp: drafting is a proposal, so the output stays the target's.
    drafter_backend: str | None = None
    drafter_context_window: int | None = None  # the LM drafter's window (None: everything)
    # an LM drafter's or head's draft ends before a token it is less sure of (0: always k)
    draft_confidence_threshold: float = DEFAULT_DRAFT_CONFIDENCE_THRESHOLD
    anchors: bool = True  # llama.cpp: llama-cpp-python's own generate and PLD loops
    heads: bool = True  # default pool: add the trained heads of the benchmarked domains

    def __post_init__(self) -> None:
        if self.prompts_per_domain < 1:
            raise ConfigError(f"--prompts-per-domain must be >= 1, got {self.prompts_per_domain}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_speculative_tokens < 1:
            raise ConfigError(
                f"--num-speculative-tokens must be >= 1, got {self.num_speculative_tokens}"
            )
        if not self.temperature >= 0.0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        self.backend = check_backend(self.backend)
        if self.backend == "llama.cpp" and self.hf_baseline:
            raise ConfigError("HF assisted generation runs on transformers; use "
                              "--no-hf-baseline with --backend llama.cpp")
        if self.drafter_backend is not None:
            self.drafter_backend = check_backend(self.drafter_backend)
            if self.drafter_backend == "llama.cpp" and self.hf_baseline:
                raise ConfigError("HF assisted generation needs a transformers drafter; use "
                                  "--no-hf-baseline with --drafter-backend llama.cpp")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.exact_cost and not self.exact:
            raise ConfigError("--exact-cost compares exact mode with the fast path; it needs "
                              "--exact")
        if self.drafter_context_window is not None and self.drafter_context_window < 1:
            raise ConfigError(f"--drafter-context-window must be >= 1, got "
                              f"{self.drafter_context_window}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if not 0.0 <= self.draft_confidence_threshold < 1.0:
            raise ConfigError(f"--draft-confidence-threshold must be in [0, 1), got "
                              f"{self.draft_confidence_threshold}")
        if not self.domains and self.prompts_file is None:
            raise ConfigError("at least one category is needed")
        unknown = [d for d in self.domains if d not in ALL_CATEGORIES]
        if unknown and self.prompts_file is None:
            raise ConfigError(f"unknown category {unknown[0]!r}; known: "
                              f"{', '.join(ALL_CATEGORIES)}")
        if self.order not in ORDERS:
            raise ConfigError(f"unknown order {self.order!r}; known: {', '.join(ORDERS)}")
        for spec in self.policies:
            parse_policy_spec(spec)  # ConfigError if malformed
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; known: {', '.join(LOSSES)}")
        ks = self.learner_ks()
        if any(k < 0 for k in ks) or max(ks) < 1 or len(set(ks)) != len(ks):
            raise ConfigError(f"--num-speculative-tokens: bad k set {list(ks)}")
        if any(k < 1 for k in self.single_k_list()):
            raise ConfigError("single-drafter k must be >= 1")
        if not 0.0 < self.score_rate <= 1.0:
            raise ConfigError(f"--score-rate must be in (0, 1], got {self.score_rate}")
        if len(set(self.policies)) != len(self.policies):
            raise ConfigError(f"duplicate policies in {list(self.policies)}")
        names = self.pool_names()
        if not names:
            raise ConfigError("the drafter pool is empty")
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate drafters in {names}")
        for name in names:
            if name in ("ngram", LM_DRAFTER, SUFFIX):
                continue
            if name.startswith(HEAD_PREFIX):
                _head_path(name)  # ConfigError if it was never trained
                continue
            domain = name.removeprefix("suffix:")
            if not name.startswith("suffix:") or domain not in self.corpus_domains:
                raise ConfigError(
                    f"unknown drafter {name!r}; choose from {SUFFIX}, ngram, {LM_DRAFTER}, "
                    f"suffix:CATEGORY and head:CATEGORY for a benchmarked category "
                    f"({', '.join(self.corpus_domains) or 'none with --prompts'})"
                )

    @property
    def corpus_domains(self) -> tuple[str, ...]:
        """Categories with a corpus (none for a prompts file)."""
        return () if self.prompts_file is not None else tuple(self.domains)

    def learner_ks(self) -> tuple[int, ...]:
        return tuple(self.k_choices) if self.k_choices else (self.num_speculative_tokens,)

    def single_k_list(self) -> tuple[int, ...]:
        if self.single_ks:
            return tuple(self.single_ks)
        return tuple(k for k in self.learner_ks() if k > 0)

    def pool_names(self) -> list[str]:
        if self.drafters is not None:
            return list(self.drafters)
        found = _trained_heads(self.target) if self.heads else {}
        heads = [HEAD_PREFIX + d for d in self.domains if d in found]
        return ([f"suffix:{d}" for d in self.corpus_domains] + [SUFFIX, "ngram", LM_DRAFTER]
                + heads)

    @property
    def llamacpp(self) -> bool:
        return self.backend == "llama.cpp"

    @property
    def drafter_llamacpp(self) -> bool:
        """Whether the LM drafter runs on llama.cpp (by default where the target does)."""
        return (self.drafter_backend or self.backend) == "llama.cpp"

    @property
    def needs_drafter_model(self) -> bool:
        return self.hf_baseline or LM_DRAFTER in self.pool_names()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0.0


@dataclass
class BenchModels:
    """Loaded models: the target, its tokenizer and the LM drafter (``None`` when unused);
    HF models, or :class:`LlamaCppLM` s on the llama.cpp backend."""

    target: PreTrainedModel | LlamaCppLM
    tokenizer: PreTrainedTokenizerBase
    drafter: PreTrainedModel | LlamaCppLM | None = None
    target_name: str = "target"
    drafter_name: str = "drafter"


def _followed(prompt: Sequence[int], k: int) -> list[int]:
    """``prompt`` followed by ``k`` of its own tokens, cycled (a pass of ``k + 1``
    positions for a warm-up, however short the prompt: ``-k 16`` on an 8-token one).

    >>> _followed([1, 2, 3], 7)
    [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    """
    prompt = list(prompt)
    return prompt + (prompt * (k // len(prompt) + 1))[:k]


@dataclass(frozen=True)
class Query:
    """One prompt of the stream, tokenized as the target sees it."""

    index: int  # position in the stream
    question_id: str
    category: str
    prompt: str
    prompt_ids: tuple[int, ...]
    chat: bool


def load_models(
    cfg: BenchConfig, *, install: bool = True, announce: Callable[[str], None] | None = None
) -> BenchModels:
    """Load the target (and the drafter model if needed) once, installing embedded ones."""
    from specmux.models import load_model

    say = announce or log.info
    t0 = time.perf_counter()
    if cfg.llamacpp:
        return _load_llamacpp(cfg, install, say, t0)
    say(f"loading target {cfg.target} (about 30 s; embedded models install on first use)")
    dtype = DTYPES[cfg.dtype]
    target, tokenizer = load_model(cfg.target, install=install, dtype=dtype)
    drafter = _load_drafter(cfg, install, say, target, tokenizer)
    say(f"models loaded in {time.perf_counter() - t0:.0f} s")
    return BenchModels(target, tokenizer, drafter, cfg.target, cfg.drafter_model)


def _load_llamacpp(
    cfg: BenchConfig, install: bool, say: Callable[[str], None], t0: float
) -> BenchModels:
    from specmux.models import load_tokenizer

    say(f"loading target {cfg.target} on llama.cpp")
    target = LlamaCppLM.load(cfg.target, name="target", threads=cfg.threads, install=install)
    tokenizer = load_tokenizer(cfg.target)
    drafter = _load_drafter(cfg, install, say, target, tokenizer)
    say(f"models loaded in {time.perf_counter() - t0:.0f} s")
    return BenchModels(target, tokenizer, drafter, cfg.target, cfg.drafter_model)


def _load_drafter(
    cfg: BenchConfig, install: bool, say: Callable[[str], None],
    target: PreTrainedModel | LlamaCppLM, tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel | LlamaCppLM | None:
    """The LM drafter's model on its backend (``None`` when no method needs it), checked to
    share the target's vocabulary."""
    from specmux.api import check_same_tokenizer
    from specmux.backends.llamacpp import check_same_vocab, check_tokenizer_vocab
    from specmux.models import load_model

    if not cfg.needs_drafter_model:
        return None
    if cfg.drafter_llamacpp:
        say(f"loading drafter {cfg.drafter_model} on llama.cpp")
        lm = LlamaCppLM.load(cfg.drafter_model, name=LM_DRAFTER, threads=cfg.threads,
                             install=install)
        if isinstance(target, LlamaCppLM):
            check_same_vocab(target, lm)
        else:
            check_tokenizer_vocab(tokenizer, lm, cfg.drafter_model)
        return lm
    say(f"loading drafter {cfg.drafter_model}")
    model, drafter_tok = load_model(cfg.drafter_model, install=install,
                                    dtype=DTYPES[cfg.dtype])
    check_same_tokenizer(tokenizer, drafter_tok, cfg.drafter_model)
    return model


def _standard_strides(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    if x.dim() == 3 and x.stride(0) != x.shape[1] * x.shape[2]:
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return (x, *args[1:])


def fix_lm_head_strides(model: PreTrainedModel) -> bool:
    """Work around a slow CPU bf16 matmul: transformers slices the last hidden state for
    ``logits_to_keep`` (``h[:, -m:, :]`` of a ``[1, n, H]`` tensor keeps batch stride ``n*H``),
    and torch 2.13's bf16 ``linear`` on that layout takes ~50x longer than on a fresh
    ``[1, m, H]`` tensor (Qwen2.5-0.5B lm_head, m = 1: 820 ms instead of 17 ms; the 1.5B's,
    m = 5 after a 120-token prefill: 1.76 s instead of 28 ms; fp32 is unaffected).  A pre-hook
    on the output embedding copies such an input to standard strides (m x H values; the
    result is bitwise the same).  Returns whether the hook is installed."""
    if model.dtype == torch.float32:
        return False
    head = model.get_output_embeddings()
    if head is None:
        return False
    if not getattr(head, "_specmux_stride_fix", False):
        head.register_forward_pre_hook(_standard_strides)
        head._specmux_stride_fix = True
    return True


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids of an example: the chat template for chat examples (as
    :meth:`specmux.api.Pipeline.encode` does it), raw text otherwise; a conversation
    (``messages``) goes through the chat template, or is joined as text without one."""
    chat = example.chat and bool(getattr(tokenizer, "chat_template", None))
    if example.messages:
        if chat:
            from specmux.api import encode_chat

            return encode_chat(tokenizer, [{"role": r, "content": c}
                                           for r, c in example.messages])
        text = "\n\n".join(f"{r}: {c}" for r, c in example.messages) + "\n\nassistant:"
        return Pipeline.encode(SimpleNamespace(tokenizer=tokenizer), text)  # type: ignore[arg-type]
    return Pipeline.encode(SimpleNamespace(tokenizer=tokenizer), example.prompt, chat=chat)  # type: ignore[arg-type]


def to_query(index: int, ex: Example, tokenizer: PreTrainedTokenizerBase) -> Query:
    return Query(index, ex.id, ex.domain, ex.prompt, tuple(encode(tokenizer, ex)), ex.chat)


def make_queries(
    splits: dict[str, DomainSplit], tokenizer: PreTrainedTokenizerBase, order: str, seed: int
) -> list[Query]:
    """The benchmark stream: every eval example of ``splits`` in ``order``, tokenized."""
    stream = mixed_stream(splits, order=order, seed=seed)
    return [to_query(i, ex, tokenizer) for i, ex in enumerate(stream)]


# ------------------------------------------------------------------------- drafter pool


class _ForkTable(dict):  # type: ignore[type-arg]
    """Copy-on-write view of a :class:`SuffixDrafter` table: reads fall through to a shared
    base table, and a key is copied into this dict before its counts can change."""

    def __init__(self, base: dict[tuple[int, ...], dict[int, int]]) -> None:
        super().__init__()
        self.base = base

    def get(self, key: Any, default: Any = None) -> Any:
        counts = dict.get(self, key)
        if counts is None:
            shared = self.base.get(key)
            if shared is None:
                return default
            counts = self[key] = dict(shared)
        return counts


def fork_suffix(base: SuffixDrafter | SuffixTreeDrafter) -> Drafter:
    """A drafter that proposes exactly like ``base`` but learns online on its own: what it
    indexes never reaches ``base`` (one fork per method, so no method sees another's output).
    Eviction only counts the fork's own keys."""
    if isinstance(base, SuffixTreeDrafter):
        return base.fork()
    fork = SuffixDrafter(max_n=base.max_n, min_n=base.min_n, max_entries=base.max_entries,
                         learn_online=base.learn_online, name=base.name)
    fork.table = _ForkTable(base.table)
    fork.num_indexed_tokens = base.num_indexed_tokens
    return fork


class DrafterFactory:
    """Builds each method's pool: corpus drafters are built once and forked per method; the
    prompt-lookup drafter (its answers depend on the context only; its n-gram index is a cache
    that re-indexes when the context is not an extension) and the LM drafter (one KV cache)
    are shared."""

    def __init__(
        self,
        names: Sequence[str],
        splits: dict[str, DomainSplit],
        tokenizer: PreTrainedTokenizerBase,
        drafter_model: PreTrainedModel | LlamaCppLM | None,
        target_model: PreTrainedModel | LlamaCppLM | None = None,
        context_window: int | None = None,
        confidence_threshold: float = 0.0,
    ) -> None:
        self.names = list(names)
        self.suffix: dict[str, SuffixTreeDrafter] = {}
        self.shared: dict[str, Drafter] = {}
        for name in self.names:
            if name == SUFFIX:
                self.suffix[name] = SuffixTreeDrafter(name=SUFFIX)
            elif name.startswith("suffix:"):
                split = splits[name.removeprefix("suffix:")]
                t0 = time.perf_counter()
                self.suffix[name] = SuffixTreeDrafter.from_texts(split.corpus, tokenizer,
                                                                 name=name)
                log.info("%s: %d corpus tokens indexed in %.1f s", name,
                         self.suffix[name].num_indexed_tokens, time.perf_counter() - t0)
            elif name == "ngram":
                self.shared[name] = NgramDrafter(name="ngram")
            elif name.startswith(HEAD_PREFIX):
                if target_model is None:
                    raise ConfigError(f"the {name!r} drafter needs the target model")
                self.shared[name] = HeadDrafter(load_head(_head_path(name)), target_model,
                                                name=name,
                                                confidence_threshold=confidence_threshold)
            elif name == LM_DRAFTER:
                if drafter_model is None:
                    raise ConfigError("the 'lm' drafter needs a drafter model")
                self.shared[name] = HFDrafter(drafter_model, name=LM_DRAFTER,  # any backend
                                              context_window=context_window,
                                              confidence_threshold=confidence_threshold)
            else:
                raise ConfigError(f"unknown drafter {name!r}")

    def pool(self, names: Sequence[str] | None = None) -> list[Drafter]:
        return [fork_suffix(self.suffix[n]) if n in self.suffix else self.shared[n]
                for n in (names or self.names)]

    def reset_caches(self) -> None:
        lm = self.shared.get(LM_DRAFTER)
        if isinstance(lm, HFDrafter):
            lm.lm.reset()

    def corpus_tokens(self) -> dict[str, int]:
        return {n: d.num_indexed_tokens for n, d in self.suffix.items()}


# ------------------------------------------------------------------------- methods


@dataclass
class _Method:
    id: str  # trace key: target-only, only:<drafter>, hf-assisted, or a policy name
    kind: str  # target | single | hf | policy
    decoder: SpeculativeDecoder | None = None
    exact: bool = True  # exact mode on the target for this method's runs


@dataclass
class _Run:
    """What one (method, query) run produced."""

    tokens: list[int]
    seconds: float
    num_target_calls: int
    num_accepted_tokens: int
    finish_reason: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # The first target call (prefill + first round) and the tokens it committed; None when
    # the method does not expose it (HF assisted generation).
    first_seconds: float | None = None
    first_tokens: int | None = None
    cost_model: dict[str, Any] | None = None  # the learner's cost model after the run


def _stop_ids(models: BenchModels) -> list[int]:
    ids: list[int] = []
    eos = getattr(getattr(models.target, "generation_config", None), "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    if isinstance(models.target, LlamaCppLM):
        ids += models.target.eos_token_ids()
    if models.tokenizer.eos_token_id is not None:
        ids.append(int(models.tokenizer.eos_token_id))
    return sorted(set(ids))


class BenchRunner:
    """Holds the models, pools and per-method learners; :meth:`run` yields trace records."""

    def __init__(
        self,
        cfg: BenchConfig,
        models: BenchModels,
        splits: dict[str, DomainSplit],
        prompts: PromptsFileInfo | None = None,
    ) -> None:
        self.cfg = cfg
        self.models = models
        self.prompts = prompts
        # Built-in categories: the whole (small) stream, tokenized up front.  A prompts file
        # is streamed instead: ``queries`` is None and :meth:`iter_queries` reads it lazily.
        self.queries: list[Query] | None = None
        self.splits: dict[str, DomainSplit] = {}
        if prompts is None:
            missing = [d for d in cfg.domains if d not in splits]
            if missing:
                raise ConfigError(f"no data for category {missing[0]!r}")
            self.splits = {d: splits[d] for d in cfg.domains}
            self.queries = make_queries(self.splits, models.tokenizer, cfg.order, cfg.seed)
            if not self.queries:
                raise ConfigError("the benchmark stream is empty")
        self.stop = _stop_ids(models)
        for model in (models.target, models.drafter):
            if isinstance(model, PreTrainedModel) and fix_lm_head_strides(model):
                log.info("bf16 lm_head stride workaround installed on %s",
                         type(model).__name__)
        set_exact(models.target, cfg.exact)  # only the target's passes decide losslessness
        self.target = as_target(models.target, name="target")
        self.pld = None  # llama-cpp-python's prompt-lookup Llama (anchors only)
        if cfg.llamacpp and cfg.anchors:
            from specmux.bench.anchors import build_pld

            assert isinstance(self.target, LlamaCppLM)
            self.pld = build_pld(self.target)
        self.factory = DrafterFactory(cfg.pool_names(), self.splits, models.tokenizer,
                                      models.drafter, models.target,
                                      cfg.drafter_context_window,
                                      cfg.draft_confidence_threshold)
        self.methods = self._methods()
        self.calibration_seconds: dict[str, float] = {}  # method -> start-up calibration
        # (exact mode, query index) -> target-only output in that mode
        self.reference: dict[tuple[bool, int], list[int]] = {}
        self._hf_calls = 0

    def _methods(self) -> list[_Method]:
        cfg = self.cfg
        twins = cfg.exact and cfg.exact_cost
        methods = [_Method(TARGET_ONLY, "target", exact=cfg.exact)]
        if twins:
            methods.append(_Method(FAST_PREFIX + TARGET_ONLY, "target", exact=False))
        if cfg.single_drafters:
            single_ks = cfg.single_k_list()
            for name in cfg.pool_names():
                for k in single_ks:
                    twin = twins and name == LM_DRAFTER
                    for exact in (cfg.exact, False) if twin else (cfg.exact,):
                        decoder = SpeculativeDecoder(
                            self.target, self.factory.pool([name]), "fixed",
                            num_speculative_tokens=k, eos_token_ids=self.stop, seed=cfg.seed,
                        )
                        prefix = SINGLE_PREFIX if exact == cfg.exact else (
                            FAST_PREFIX + SINGLE_PREFIX)
                        suffix = f"@{k}" if len(single_ks) > 1 else ""
                        methods.append(_Method(prefix + name + suffix, "single", decoder,
                                               exact=exact))
        if cfg.hf_baseline:
            if self.models.drafter is None:
                raise ConfigError("the HF assisted-generation baseline needs a drafter model")
            methods.append(_Method(HF_ASSISTED, "hf", exact=cfg.exact))
        if cfg.llamacpp and cfg.anchors:
            from specmux.bench.anchors import ANCHORS

            methods += [_Method(a, "anchor") for a in ANCHORS]
        ks = cfg.learner_ks()
        for spec in cfg.policies:
            ps = parse_policy_spec(spec)
            full_information = POLICIES[ps.name].full_information
            decoder = SpeculativeDecoder(
                self.target, self.factory.pool(), ps.name,
                num_speculative_tokens=list(ks), eos_token_ids=self.stop,
                reset_per_query=cfg.reset_per_query, seed=cfg.seed,
                loss=(ps.loss or cfg.loss) if full_information else "length",
                score_rate=cfg.score_rate,
                contextual=cfg.contextual if ps.contextual is None else ps.contextual,
                policy_kwargs={"selection": ps.selection} if ps.selection else None,
            )
            methods.append(_Method(spec, "policy", decoder, exact=cfg.exact))
        return methods

    @property
    def num_queries(self) -> int:
        if self.queries is not None:
            return len(self.queries)
        assert self.prompts is not None
        return self.prompts.num_prompts

    @property
    def num_runs(self) -> int:
        return self.num_queries * len(self.methods)

    def iter_queries(self) -> Iterator[Query]:
        """The stream, one query at a time (a prompts file is read as it goes)."""
        if self.queries is not None:
            yield from self.queries
            return
        assert self.prompts is not None
        for i, ex in enumerate(iter_examples(self.prompts.path)):
            yield to_query(i, ex, self.models.tokenizer)

    def longest_prompt(self) -> list[int]:
        if self.queries is not None:
            return list(max(self.queries, key=lambda q: len(q.prompt_ids)).prompt_ids)
        assert self.prompts is not None
        ex = example_at(self.prompts.path, self.prompts.longest_line)
        return list(to_query(-1, ex, self.models.tokenizer).prompt_ids)

    def sampling_for(self, query: Query) -> SamplingParams:
        if not self.cfg.sampling:
            return SamplingParams()
        return SamplingParams(temperature=self.cfg.temperature,
                              seed=self.cfg.seed * 1_000_003 + max(query.index, 0))

    # ------------------------------------------------------------------ one run each

    def _cold_start(self) -> None:
        """Empty KV caches, so every run pays its own prefill."""
        self.target.reset()
        self.factory.reset_caches()

    def _run_target_only(self, query: Query) -> _Run:
        self._cold_start()
        sampling = self.sampling_for(query)
        t0 = time.perf_counter()
        # Two calls (the KV cache follows the sequence, so nothing is recomputed) to time
        # the prefill + first token apart from the decoding.
        out = autoregressive_generate(self.target, query.prompt_ids, 1, sampling, self.stop)
        t1 = time.perf_counter()
        if self.cfg.max_new_tokens > 1 and out[-1] not in self.stop:
            if sampling.seed is not None:
                sampling = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                                          top_p=sampling.top_p, seed=sampling.seed + 1)
            out += autoregressive_generate(self.target, [*query.prompt_ids, *out],
                                           self.cfg.max_new_tokens - 1, sampling, self.stop)
        seconds = time.perf_counter() - t0
        finish = "stop" if out and out[-1] in self.stop else "length"
        return _Run(out, seconds, len(out), 0, finish, first_seconds=t1 - t0, first_tokens=1)

    def _run_decoder(self, method: _Method, query: Query) -> _Run:
        assert method.decoder is not None
        self._cold_start()
        selector = method.decoder.selector
        policy_before = selector.policy_seconds
        rounds: list[dict[str, Any]] = []
        tokens: list[int] = []
        accepted = 0
        finish = "length"
        t0 = time.perf_counter()
        for step in method.decoder.generate_steps(
            query.prompt_ids, self.cfg.max_new_tokens, self.sampling_for(query), self.stop
        ):
            policy_now = selector.policy_seconds
            rounds.append({
                "round": step.round, "drafter": step.drafter, "k": step.k,
                "drafted": step.num_draft_tokens, "accepted": step.num_accepted_tokens,
                "new_tokens": len(step.tokens), "seconds": step.seconds,
                "draft_seconds": step.draft_seconds, "verify_seconds": step.verify_seconds,
                "learner_seconds": step.learner_seconds,
                "policy_seconds": policy_now - policy_before,
                "gammas": {k: list(v) for k, v in step.gammas.items()},
                "scored": sorted(step.gammas), "context": step.context,
                "chosen_by": step.chosen_by, "ruled_out": list(step.ruled_out),
            })
            policy_before = policy_now
            tokens.extend(step.tokens)
            accepted += step.num_accepted_tokens
            finish = step.finish_reason or "length"
        seconds = time.perf_counter() - t0
        cost = method.decoder.cost_model.snapshot(max_positions=max(self.cfg.learner_ks()) + 1,
                                                  context=len(query.prompt_ids) + len(tokens))
        return _Run(tokens, seconds, len(rounds), accepted,
                    finish, rounds,
                    first_seconds=rounds[0]["seconds"], first_tokens=rounds[0]["new_tokens"],
                    cost_model=cost if method.kind == "policy" else None)

    def _count_hf_call(self, *_: Any) -> None:
        self._hf_calls += 1

    def _run_hf(self, query: Query, max_new_tokens: int | None = None) -> _Run:
        target, drafter = self.models.target, self.models.drafter
        assert drafter is not None
        ids = torch.tensor([list(query.prompt_ids)], dtype=torch.long)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or self.cfg.max_new_tokens,
            "eos_token_id": self.stop,
            "pad_token_id": self.stop[0] if self.stop else 0,
        }
        if self.cfg.sampling:
            kwargs.update(do_sample=True, temperature=self.cfg.temperature, top_k=0, top_p=1.0)
            torch.manual_seed(self.sampling_for(query).seed or 0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        handle = target.register_forward_pre_hook(self._count_hf_call)
        self._hf_calls = 0
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(ids, attention_mask=torch.ones_like(ids),
                                      assistant_model=drafter, **kwargs)
            seconds = time.perf_counter() - t0
        finally:
            handle.remove()
        tokens = [int(t) for t in out[0, ids.shape[1]:]]
        for i, tok in enumerate(tokens):  # HF pads nothing at batch 1, but cut at a stop
            if tok in self.stop:
                tokens = tokens[: i + 1]
                break
        calls = max(self._hf_calls, 1)
        finish = "stop" if tokens and tokens[-1] in self.stop else "length"
        return _Run(tokens, seconds, calls, max(len(tokens) - calls, 0), finish)

    def _run(self, method: _Method, query: Query) -> _Run:
        set_exact(self.models.target, method.exact)  # no-op unless exact_cost twins run
        if method.kind == "target":
            return self._run_target_only(query)
        if method.kind == "hf":
            return self._run_hf(query)
        if method.kind == "anchor":
            return self._run_anchor(method, query)
        return self._run_decoder(method, query)

    def _run_anchor(self, method: _Method, query: Query, max_new: int | None = None) -> _Run:
        from specmux.bench.anchors import ANCHOR_PLD, run_anchor

        assert isinstance(self.target, LlamaCppLM)
        pld = method.id == ANCHOR_PLD
        self._cold_start()
        run = run_anchor(self.pld if pld else self.target.llama, query.prompt_ids,
                         max_new or self.cfg.max_new_tokens, self.sampling_for(query),
                         frozenset(self.stop), self.target.max_context,
                         clear=None if pld else self.target.reset)
        finish = "stop" if run.tokens and run.tokens[-1] in self.stop else "length"
        accepted = max(len(run.tokens) - run.num_target_calls, 0)
        return _Run(run.tokens, run.seconds, run.num_target_calls, accepted, finish,
                    first_seconds=run.first_seconds, first_tokens=1)

    def warm_up(self) -> None:
        """Short untimed generations per model (first calls allocate and are slow).

        The longest prompt of the stream is prefilled too: the first pass at a new, longer
        shape is slow again, and would land in whichever method's timing meets it first.
        Every pass size up to the largest k + 1 is run once: in bf16 on a CPU the first
        pass of a new number of positions took seconds (a 2-position verification: 2.7 s
        median over the first query, against 0.3 s once warm), which would be charged to
        whichever method meets it first.  Each learner's engine runs its start-up cost
        calibration here (:meth:`SpeculativeDecoder.warmup`), as a server does before it
        takes requests: a one-off cost per process (0.6 s on llama.cpp with two threads),
        recorded in the trace's ``meta`` as ``calibration_seconds``, not charged to the
        stream's first query.
        """
        longest = self.longest_prompt()
        short = longest[-8:]
        # Every pass size up to max k + 1: a drafter may return fewer tokens than its k
        # (a short match), and a shape first met mid-run cost 2.3 s instead of 0.2 s in
        # the issue-11 run, which the learners' cost model then kept.
        max_k = max([*self.cfg.learner_ks(), *self.cfg.single_k_list()])
        ks = list(range(1, max_k + 1))
        for exact in dict.fromkeys(m.exact for m in self.methods):
            set_exact(self.models.target, exact)
            self._cold_start()
            for prompt in (longest, short):
                autoregressive_generate(self.target, prompt, 2, SamplingParams(), ())
                for k in ks:  # verification-sized passes, one per k + 1
                    self.target.logits(_followed(prompt, k), k + 1)
        set_exact(self.models.target, self.cfg.exact)
        lm = self.factory.shared.get(LM_DRAFTER)
        if isinstance(lm, HFDrafter):
            for prompt in (longest, short):
                lm.propose(prompt, 2, SamplingParams())
                for k in ks:  # scoring / catch-up passes of up to max k + 1 positions
                    lm.lm.logits(_followed(prompt, k), k + 1)
        if self.cfg.hf_baseline and self.models.drafter is not None:
            self._run_hf(Query(-1, "warm-up", "warm-up", "", tuple(short), False), 4)
        for method in self.methods:
            if method.kind == "anchor":
                for prompt in (longest, short):
                    self._run_anchor(method, Query(-1, "warm-up", "warm-up", "",
                                                   tuple(prompt), False), 4)
            elif method.decoder is not None:  # the cost model's start-up calibration
                set_exact(self.models.target, method.exact)
                seconds = method.decoder.warmup()
                if seconds:
                    self.calibration_seconds[method.id] = seconds
        set_exact(self.models.target, self.cfg.exact)
        self._cold_start()

    # ------------------------------------------------------------------ the stream

    def meta(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "type": "meta", "version": TRACE_VERSION,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": asdict(cfg), "model_id": self.models.target_name,
            "drafter_model": self.models.drafter_name if self.models.drafter is not None
            else None,
            "pool": cfg.pool_names(), "methods": [m.id for m in self.methods],
            "method_kinds": {m.id: m.kind for m in self.methods},
            "queries": [{"index": q.index, "question_id": q.question_id,
                         "category": q.category, "prompt_tokens": len(q.prompt_ids)}
                        for q in self.queries or ()],
            "num_queries": self.num_queries,
            "categories": dict(self.prompts.categories) if self.prompts else dict(
                Counter(q.category for q in self.queries or ())),
            "prompts_file": str(self.prompts.path) if self.prompts else None,
            "corpus_tokens": self.factory.corpus_tokens(),
            "stop_token_ids": self.stop,
            "calibration_seconds": self.calibration_seconds,
            "machine": {**machine_info(), **self._backend_info()},
        }

    def _backend_info(self) -> dict[str, Any]:
        drafter = self.models.drafter
        on_llama = [m for m in (self.target, drafter) if isinstance(m, LlamaCppLM)]
        info: dict[str, Any] = {
            "backend": "llama.cpp" if isinstance(self.target, LlamaCppLM) else "transformers",
            "drafter_backend": None if drafter is None else (
                "llama.cpp" if isinstance(drafter, LlamaCppLM) else "transformers"),
            "dtype": self.cfg.dtype,
        }
        if on_llama:  # the target's threads and context where it runs there
            import llama_cpp

            info.update(llama_cpp_python=llama_cpp.__version__, llama_threads=on_llama[0].threads)
        if isinstance(self.target, LlamaCppLM):
            info.update(dtype="gguf (logits float32)", llama_context=self.target.max_context)
        return info

    def run(
        self, on_run: Callable[[str, Query], None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield the ``meta`` record, then per (query, method) its ``round`` records and
        its ``answer`` record.  ``on_run(method, query)`` is called before each run."""
        threads = torch.get_num_threads()
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        self.warm_up()
        gc.collect()
        gc.freeze()  # keep the big corpus tables out of the collector's timed passes
        try:
            yield self.meta()
            for query in self.iter_queries():
                for method in self.methods:
                    if on_run is not None:
                        on_run(method.id, query)
                    run = self._run(method, query)
                    yield from self._records(method, query, run)
                for exact in (True, False):  # only needed within the query
                    self.reference.pop((exact, query.index), None)
        finally:
            gc.unfreeze()
            torch.set_num_threads(threads)

    def _divergence(self, query: Query, ref: list[int], mine: list[int]) -> dict[str, Any]:
        """Where an output left the target-only reference, and how close the target's own
        choice was there: the logit gap between the two tokens, recomputed one token at a
        time as target-only decoding does, in units of the logits' precision (``ulp``).  A
        gap within :data:`NEAR_TIE_ULP` is a *near-tie*: outside exact mode the target's
        argmax there depends on rounding, which differs between a one-token step and a
        (k+1)-token verification pass.

        The same position is also computed as the first row of a verification-sized pass
        (``context`` plus the method's next ``max k`` tokens): when that row prefers the
        method's token (``batched_gap <= 0``), the flip is shown to come from the pass size,
        whatever the backend's rounding (llama.cpp's quantized batched kernels round far
        beyond float32 ulp).

        ``verdict``: ``"near-tie"`` (a rounding flip outside exact mode: expected, reported)
        or ``"mismatch"`` (a gap above the rounding that no pass-size change reproduces, or
        any difference in exact mode, where every pass computes a position bitwise alike: a
        bug)."""
        i = next((j for j, (a, b) in enumerate(zip(ref, mine, strict=False)) if a != b),
                 min(len(ref), len(mine)))
        info: dict[str, Any] = {"index": i, "reference_token": ref[i] if i < len(ref) else None,
                                "method_token": mine[i] if i < len(mine) else None,
                                "logit_gap": None, "ulp": None, "near_tie": None,
                                "exact": is_exact(self.models.target), "verdict": "mismatch"}
        if info["reference_token"] is None or info["method_token"] is None:
            return info
        context = [*query.prompt_ids, *ref[:i]]
        self.target.reset()
        if len(context) > 1:
            self.target.logits(context[:-1], 1)
        row = self.target.logits(context, 1)[0]
        k = max(self.cfg.learner_ks() + self.cfg.single_k_list())
        batch = [*context, *mine[i:i + k]]  # a verification-sized pass over the same position
        self.target.reset()
        if len(context) > 1:
            self.target.logits(context[:-1], 1)
        brow = self.target.logits(batch, len(batch) - len(context) + 1)[0]
        self.target.reset()
        gap = float(row[info["reference_token"]] - row[info["method_token"]])
        batched_gap = float(brow[info["reference_token"]] - brow[info["method_token"]])
        top = max(abs(float(row.max())), 1e-30)
        dtype = getattr(self.models.target, "dtype", torch.float32)  # llama.cpp: float32
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top))
        near_tie = abs(gap) <= NEAR_TIE_ULP * ulp or batched_gap <= 0.0
        info.update(logit_gap=gap, batched_gap=batched_gap, ulp=ulp, near_tie=near_tie,
                    verdict="near-tie" if near_tie and not info["exact"] else "mismatch")
        return info

    def _records(self, method: _Method, query: Query, run: _Run) -> Iterator[dict[str, Any]]:
        common = {"method": method.id, "question_id": query.question_id,
                  "category": query.category, "query_index": query.index}
        for r in run.rounds:
            yield {"type": "round", **common, **r}
        lossless: bool | None = None
        divergence: dict[str, Any] | None = None
        ref_key = (method.exact, query.index)
        if method.kind == "target":
            self.reference[ref_key] = run.tokens
        elif not self.cfg.sampling and ref_key in self.reference:
            lossless = run.tokens == self.reference[ref_key]
            if not lossless:
                divergence = self._divergence(query, self.reference[ref_key], run.tokens)
                level = logging.WARNING if divergence["verdict"] == "near-tie" else logging.ERROR
                log.log(level, "LOSSLESS %s: %s on %s differs from target-only at token %d "
                        "(%s)", divergence["verdict"].upper(), method.id, query.question_id,
                        divergence["index"], divergence)
        text = self.models.tokenizer.decode(run.tokens, skip_special_tokens=True)
        yield {
            "type": "answer", **common,
            "model_id": self.models.target_name, "kind": method.kind, "exact": method.exact,
            "answer_id": f"{method.id}/{query.index}",
            "choices": [{
                "index": 0, "turns": [text], "new_tokens": [len(run.tokens)],
                "wall_time": [run.seconds], "decoding_steps": [run.num_target_calls],
                "accept_lengths": [r["accepted"] + 1 for r in run.rounds],
            }],
            "tstamp": time.time(),
            "prompt_tokens": len(query.prompt_ids),
            "token_ids": run.tokens,
            "new_tokens": len(run.tokens), "seconds": run.seconds,
            "num_target_calls": run.num_target_calls,
            "num_accepted_tokens": run.num_accepted_tokens,
            "finish_reason": run.finish_reason, "lossless": lossless, "divergence": divergence,
            "first_seconds": run.first_seconds, "first_tokens": run.first_tokens,
            "cost_model": run.cost_model,
        }


def machine_info() -> dict[str, Any]:
    """The facts a benchmark table needs next to it."""
    import transformers

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": package_versions(),
    }


def write_trace(records: Iterator[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write records to a JSONL file as they come (flushed per line); return them all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            kept.append(rec)
    return kept


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL trace; ConfigError if it is missing or unreadable."""
    if path.is_dir():
        path = path / "trace.jsonl"
    if not path.is_file():
        raise ConfigError(f"no benchmark trace at {path}; run `specmux bench --out DIR` first")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not records or records[0].get("type") != "meta":
        raise ConfigError(f"{path} is not a specmux bench trace (no meta record first)")
    return records
