"""The Python API: build a target + drafter pool + learner from specs, and generate.

>>> import specmux
>>> out = specmux.generate("embedded:qwen2.5-coder-1.5b",  # doctest: +SKIP
...                        ["embedded:qwen2.5-coder-0.5b", "ngram"],
...                        policy="hedge", prompt="def fib(n):", max_new_tokens=64)
>>> print(out.text, out.stats.mean_acceptance_length)  # doctest: +SKIP

(Skipped by the doctest run: it loads the GB-sized embedded models.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specmux.backends import check_backend
from specmux.config import DEFAULT_DRAFTERS, DEFAULT_POLICY, DEFAULT_TARGET, SpeculativeConfig
from specmux.drafters.base import Drafter
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.engine import GenerationResult, SpeculativeDecoder
from specmux.errors import ConfigError, PromptError, TokenizerMismatchError
from specmux.policies import Policy
from specmux.selector import Selector
from specmux.target import Target
from specmux.types import SamplingParams, Step

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_DRAFTERS", "DEFAULT_POLICY", "DEFAULT_TARGET", "Pipeline", "generate",
           "make_drafter"]

CONFIG_KEYS = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
               "suffix_decoding_max_tree_depth", "suffix_decoding_max_spec_factor",
               "suffix_decoding_min_token_prob", "suffix_decoding_max_cached_tokens",
               "suffix_decoding_eviction", "loss",
               "score_rate", "delayed_feedback", "reset_per_query", "contextual", "seed", "exact",
               "backend", "drafter_backend", "drafter_context_window",
               "draft_confidence_threshold")

DrafterSpec = str | Drafter | PreTrainedModel


def check_same_tokenizer(
    target: PreTrainedTokenizerBase, drafter: PreTrainedTokenizerBase, name: str
) -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map text to the same ids."""
    if target.get_vocab() != drafter.get_vocab():
        raise TokenizerMismatchError(
            f"drafter {name!r} has a different tokenizer ({len(drafter)} tokens) from the "
            f"target's ({len(target)} tokens); use a drafter of the target's model family"
        )


def make_drafter(
    spec: DrafterSpec,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    prompt_lookup_max: int = 4,
    prompt_lookup_min: int = 1,
    install: bool = False,
    backend: str = "transformers",
    target_lm: Any = None,
    threads: int | None = None,
    suffix_options: dict[str, Any] | None = None,
    context_window: int | None = None,
    confidence_threshold: float = 0.0,
) -> Drafter:
    """A drafter from a spec: ``ngram``, ``suffix`` (SuffixDecoding over the request and
    earlier outputs), ``suffix:PATH`` (the same, seeded with a corpus) or a model (HF id,
    dir, .gguf, ``embedded:NAME``), or an already-built :class:`Drafter` / HF model.

    With ``backend="llama.cpp"`` a model spec (a GGUF) runs on llama.cpp with ``threads``
    threads; its vocabulary is checked against ``target_lm`` if that is a ``LlamaCppLM``,
    else against ``tokenizer`` (a transformers target drafting with a GGUF).
    ``suffix_options``: keyword arguments of the suffix drafters
    (:meth:`SpeculativeConfig.suffix_options`); ``context_window`` and
    ``confidence_threshold``: an LM drafter's (:class:`~specmux.drafters.hf.HFDrafter`)."""
    lm_options = {"context_window": context_window, "confidence_threshold": confidence_threshold}
    if isinstance(spec, Drafter):
        return spec
    if isinstance(spec, PreTrainedModel):
        return HFDrafter(spec, name=type(spec).__name__, **lm_options)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"unknown drafter {spec!r}")
    if spec == "ngram":
        return NgramDrafter(prompt_lookup_max, prompt_lookup_min)
    if spec == "suffix":  # SuffixDecoding: the request + every earlier output
        return SuffixTreeDrafter(**(suffix_options or {}))
    if spec.startswith("suffix:"):
        if tokenizer is None:
            raise ConfigError("a suffix drafter needs the target's tokenizer")
        path = spec.removeprefix("suffix:")
        if not path.strip():
            raise ConfigError("drafter 'suffix:' needs a corpus path: suffix:PATH (a text or "
                              ".jsonl file, or a directory of them), or plain 'suffix'")
        return SuffixTreeDrafter.from_path(path, tokenizer, **(suffix_options or {}))
    if check_backend(backend) == "llama.cpp":
        from specmux.backends.llamacpp import (
            LlamaCppDrafter,
            LlamaCppLM,
            check_same_vocab,
            check_tokenizer_vocab,
        )

        lm = LlamaCppLM.load(spec, threads=threads, install=install)
        if isinstance(target_lm, LlamaCppLM):
            check_same_vocab(target_lm, lm)
        elif tokenizer is not None:
            check_tokenizer_vocab(tokenizer, lm, spec)
        return LlamaCppDrafter(lm, name=spec.removeprefix("embedded:"), **lm_options)
    from specmux.models import load_model

    model, drafter_tokenizer = load_model(spec, install=install)
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, drafter_tokenizer, spec)
    return HFDrafter(model, name=spec.removeprefix("embedded:"), **lm_options)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase | None, messages: Sequence[dict[str, str]]
) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template; use a plain prompt")
    ids = list(tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=False,
    ))
    if not ids:
        raise PromptError("the prompt is empty")
    return ids


def _merge_config(config: SpeculativeConfig | None, policy: str | Policy | None,
                  kwargs: dict[str, Any]) -> SpeculativeConfig:
    """``config`` with the config keys found in ``kwargs`` (removed from it) and ``policy``."""
    values = {k: kwargs.pop(k) for k in CONFIG_KEYS if k in kwargs}
    for key in ("backend", "drafter_backend"):
        if isinstance(values.get(key), str):
            values[key] = check_backend(values[key])  # "llamacpp" -> "llama.cpp"
    if isinstance(values.get("num_speculative_tokens"), tuple):
        values["num_speculative_tokens"] = list(values["num_speculative_tokens"])
    if isinstance(policy, str):
        values["policy"] = policy
    if config is None:
        return SpeculativeConfig.build(values)
    if not values:
        return config
    return SpeculativeConfig.build({**config.model_dump(exclude_unset=True), **values})


def _unique_corpus_names(pool: list[Drafter], specs: list[DrafterSpec]) -> None:
    """Give corpus drafters from different paths with the same file name distinct names.

    ``suffix:a/corpus.txt`` and ``suffix:b/corpus.txt`` become ``suffix:a/corpus`` and
    ``suffix:b/corpus`` (the shortest distinguishing tail of their paths).  Identical specs
    stay identical (the engine refuses them as duplicates).
    """
    from pathlib import PurePath

    names = [d.name for d in pool]
    for name in {n for n in names if names.count(n) > 1}:
        group = [i for i, n in enumerate(names) if n == name
                 and isinstance(specs[i], str) and str(specs[i]).startswith("suffix:")
                 and isinstance(pool[i], SuffixTreeDrafter)]
        paths = {i: PurePath(str(specs[i]).removeprefix("suffix:")) for i in group}
        if len({str(p) for p in paths.values()}) < len(group):
            continue
        depth = 1
        while depth < 64:
            depth += 1
            tails = {i: "/".join((*p.parent.parts[-(depth - 1):], p.stem))
                     for i, p in paths.items()}
            if len(set(tails.values())) == len(group):
                break
        if len(set(tails.values())) < len(group):  # same stem, different extensions
            tails = {i: str(p) for i, p in paths.items()}
        for i in group:
            pool[i].name = f"suffix:{tails[i]}"


def _llamacpp_target(
    spec: str, tokenizer: PreTrainedTokenizerBase | None, threads: int | None, install: bool
) -> tuple[Any, PreTrainedTokenizerBase | None]:
    """A GGUF target on llama.cpp, and its tokenizer (``tokenizer``, else the one
    transformers builds from the GGUF, cached for embedded models)."""
    from specmux.backends.llamacpp import LlamaCppLM

    lm = LlamaCppLM.load(spec, name="target", threads=threads, install=install)
    if tokenizer is None:
        from specmux.models import load_tokenizer

        tokenizer = load_tokenizer(spec)
    return lm, tokenizer


class Pipeline:
    """A loaded target, its tokenizer and a :class:`SpeculativeDecoder` over a drafter pool.

    It is long-lived: the learner keeps what it learned across calls (unless
    ``reset_per_query``), which is how it learns a workload.

    The speculative options are one :class:`~specmux.config.SpeculativeConfig`: pass
    ``config=``, or the same keys as keyword arguments (``num_speculative_tokens``,
    ``prompt_lookup_max``, ``loss``, ``reset_per_query``, ``seed``...), which are validated
    into one.  It is kept as ``self.config`` and handed unchanged to the decoder.
    ``drafters`` and ``policy`` default to the config's, then to :data:`DEFAULT_DRAFTERS` and
    :data:`DEFAULT_POLICY`; ``policy`` may also be a :class:`Policy` instance.
    ``exact`` (default true) puts the target in exact mode (:mod:`specmux.exact`): its passes
    are batch-invariant, so greedy output is bit-identical to target-only decoding in
    bfloat16 too.
    """

    def __init__(
        self,
        target: str | PreTrainedModel = DEFAULT_TARGET,
        drafters: Iterable[DrafterSpec] | None = None,
        policy: str | Policy | None = None,
        *,
        config: SpeculativeConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        install: bool = False,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = config = _merge_config(config, policy, kwargs)
        self.backend = config.backend
        eos_ids: list[int] = []
        if isinstance(target, str) and self.backend == "llama.cpp":
            model, tokenizer = _llamacpp_target(target, tokenizer, threads, install)
            eos_ids += model.eos_token_ids()
            self.target_name = target
        elif isinstance(target, str):
            from specmux.models import load_model

            model, loaded_tokenizer = load_model(target, install=install)
            tokenizer = tokenizer or loaded_tokenizer
            self.target_name = target
        else:
            model, self.target_name = target, getattr(target, "name", type(target).__name__)
        if isinstance(model, PreTrainedModel):
            from specmux.exact import set_exact

            set_exact(model, config.exact)
        self.tokenizer = tokenizer
        specs = list(drafters) if drafters is not None else (
            config.drafter_specs() or list(DEFAULT_DRAFTERS))
        pool = [
            make_drafter(d, tokenizer, prompt_lookup_max=config.prompt_lookup_max,
                         prompt_lookup_min=config.prompt_lookup_min, install=install,
                         backend=config.drafter_backend or self.backend, target_lm=model,
                         threads=threads, suffix_options=config.suffix_options(),
                         context_window=config.drafter_context_window,
                         confidence_threshold=config.draft_confidence_threshold)
            for d in specs
        ]
        _unique_corpus_names(pool, specs)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(
            model, "generation_config") else None
        eos_ids += [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        kwargs.setdefault("eos_token_ids", eos_ids)
        self.decoder = SpeculativeDecoder.from_config(
            model, pool, policy if isinstance(policy, Policy) else config.policy, config,
            **kwargs)

    @classmethod
    def from_config(cls, target: str | PreTrainedModel, config: SpeculativeConfig,
                    **kwargs: Any) -> Pipeline:
        """A pipeline whose drafters, policy and options all come from ``config``."""
        return cls(target, None, None, config=config, **kwargs)

    @property
    def target(self) -> Target:
        """The target model (its ``max_context`` and ``vocab_size`` bound requests)."""
        return self.decoder.target

    @property
    def selector(self) -> Selector:
        """The online learner: arms, policy, statistics, learned state."""
        return self.decoder.selector

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt (text, or ids as they are); ``chat`` applies the template."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
        elif self.tokenizer is None:
            raise ConfigError("a text prompt needs a tokenizer; pass tokenizer= or token ids")
        elif chat:
            ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PromptError("the prompt is empty")
        return ids

    def check_fits(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """PromptError (with the numbers, as vLLM) unless prompt + ``max_new_tokens`` fit the
        target's context.  The engine itself stops at the context limit (finish "length");
        the CLI and the server refuse such requests up front instead."""
        context = self.decoder.target.max_context
        if len(prompt_ids) + max_new_tokens > context:
            raise PromptError(
                f"the model's context is {context} tokens, but {len(prompt_ids)} prompt tokens "
                f"+ {max_new_tokens} new tokens = {len(prompt_ids) + max_new_tokens}; shorten "
                f"the prompt or ask for at most {max(context - len(prompt_ids), 0)} new tokens")

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template."""
        return encode_chat(self.tokenizer, messages)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat: bool = False,
        stop_token_ids: Iterable[int] | None = None,
    ) -> Iterator[Step]:
        """Yield one :class:`Step` per round."""
        ids = self.encode(prompt, chat)
        yield from self.decoder.generate_steps(ids, max_new_tokens, sampling, stop_token_ids)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat: bool = False,
        stop_token_ids: Iterable[int] | None = None,
    ) -> GenerationResult:
        """Generate to the end; the result carries text, token ids, steps and stats."""
        ids = self.encode(prompt, chat)
        result = self.decoder.generate(ids, max_new_tokens, sampling, stop_token_ids)
        result.text = self.decode(result.token_ids)
        return result


def generate(
    target: str | PreTrainedModel = DEFAULT_TARGET,
    drafters: Iterable[DrafterSpec] | None = None,
    policy: str | Policy | None = None,
    prompt: str | Sequence[int] = "",
    *,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    **pipeline_kwargs: Any,
) -> GenerationResult:
    """One-shot: build a :class:`Pipeline` and generate (see its arguments)."""
    pipe = Pipeline(target, drafters, policy, **pipeline_kwargs)
    return pipe.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling, chat=chat)
