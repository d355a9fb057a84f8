"""The Python API: build a target + drafter pool + learner from specs, and generate.

>>> import specmux                                                     # doctest: +SKIP
>>> out = specmux.generate("embedded:qwen2.5-coder-1.5b",
...                        ["embedded:qwen2.5-coder-0.5b", "ngram"],
...                        policy="hedge", prompt="def fib(n):", max_new_tokens=64)
>>> print(out.text, out.stats.mean_acceptance_length)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specmux.drafters.base import Drafter
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix import SuffixDrafter
from specmux.engine import GenerationResult, SpeculativeDecoder
from specmux.errors import ConfigError, PromptError, TokenizerMismatchError
from specmux.policies import Policy
from specmux.selector import Selector
from specmux.target import Target
from specmux.types import SamplingParams, Step

log = logging.getLogger(__name__)

DEFAULT_TARGET = "embedded:qwen2.5-coder-1.5b"
DEFAULT_DRAFTERS = ("embedded:qwen2.5-coder-0.5b", "ngram")

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
) -> Drafter:
    """A drafter from a spec: ``ngram``, ``suffix:PATH`` or a model (HF id, dir, .gguf,
    ``embedded:NAME``), or an already-built :class:`Drafter` / HF model."""
    if isinstance(spec, Drafter):
        return spec
    if isinstance(spec, PreTrainedModel):
        return HFDrafter(spec, name=type(spec).__name__)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"unknown drafter {spec!r}")
    if spec == "ngram":
        return NgramDrafter(prompt_lookup_max, prompt_lookup_min)
    if spec.startswith("suffix:"):
        if tokenizer is None:
            raise ConfigError("a suffix drafter needs the target's tokenizer")
        return SuffixDrafter.from_path(spec.removeprefix("suffix:"), tokenizer)
    from specmux.models import load_model

    model, drafter_tokenizer = load_model(spec, install=install)
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, drafter_tokenizer, spec)
    return HFDrafter(model, name=spec.removeprefix("embedded:"))


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


class Pipeline:
    """A loaded target, its tokenizer and a :class:`SpeculativeDecoder` over a drafter pool.

    It is long-lived: the learner keeps what it learned across calls (unless
    ``reset_per_query``), which is how it learns a workload.
    """

    def __init__(
        self,
        target: str | PreTrainedModel = DEFAULT_TARGET,
        drafters: Iterable[DrafterSpec] = DEFAULT_DRAFTERS,
        policy: str | Policy = "hedge",
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        num_speculative_tokens: int | Sequence[int] = 4,
        prompt_lookup_max: int = 4,
        prompt_lookup_min: int = 1,
        install: bool = False,
        **decoder_kwargs: Any,
    ) -> None:
        if isinstance(target, str):
            from specmux.models import load_model

            model, loaded_tokenizer = load_model(target, install=install)
            tokenizer = tokenizer or loaded_tokenizer
            self.target_name = target
        else:
            model, self.target_name = target, type(target).__name__
        self.tokenizer = tokenizer
        pool = [
            make_drafter(d, tokenizer, prompt_lookup_max=prompt_lookup_max,
                         prompt_lookup_min=prompt_lookup_min, install=install)
            for d in drafters
        ]
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(
            model, "generation_config") else None
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        decoder_kwargs.setdefault("eos_token_ids", eos_ids)
        self.decoder = SpeculativeDecoder(
            model, pool, policy, num_speculative_tokens=num_speculative_tokens, **decoder_kwargs
        )

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
    drafters: Iterable[DrafterSpec] = DEFAULT_DRAFTERS,
    policy: str | Policy = "hedge",
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
