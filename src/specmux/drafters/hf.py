"""A small causal LM drafter sharing the target's tokenizer, with a KV cache.

The LM is any :class:`specmux.target.Target` (a transformers model is wrapped in
:class:`specmux.lm.CachedLM`), so another backend's LM can draft too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from specmux.drafters.base import Drafter, check_confidence_threshold, unsure_rows
from specmux.lm import as_target
from specmux.target import Target, common_prefix_length
from specmux.types import Draft, PathDistributions, SamplingParams
from specmux.verify import process_logits, sample


class HFDrafter(Drafter):
    """Autoregressive drafting with a Hugging Face causal LM.

    Each proposal costs ``k`` forward passes of one token each (the first also catches the
    cache up with tokens committed since this drafter last ran, and keeps the row before
    the last context token too).  ``distributions`` scores a
    whole path in one forward pass, so counterfactual scoring is cheap.

    ``context_window``: the drafter sees only the context from an *anchor* on, at most
    ``context_window`` tokens back when a query starts (the anchor moves forward by a window
    once the context outgrows two), so its prefill of a long prompt costs at most a window's
    tokens.  Drafts are proposals: the output stays the target's, only acceptance can change.

    ``confidence_threshold`` (HF assisted generation's ``assistant_confidence_threshold``,
    SpecDec++'s stopping rule in its simplest form): a draft ends before the first token whose
    probability under the drafter, ``max q``, is below it (0: never; the first token too, so
    a draft can be empty).  Its forward pass was paid, but neither the tokens after it, nor
    the verification positions they would take: where the drafter is unsure it is mostly
    wrong.  The rule reads only the path before the token, so counterfactual scoring applies
    it exactly along a verified path (:attr:`PathDistributions.stops`).
    """

    model_based = True

    def __init__(self, model: PreTrainedModel | Target, name: str = "lm",
                 context_window: int | None = None, confidence_threshold: float = 0.0) -> None:
        if context_window is not None and context_window < 1:
            raise ValueError(f"context_window must be >= 1, got {context_window}")
        self.confidence_threshold = check_confidence_threshold(confidence_threshold)
        self.lm: Target = as_target(model, name=name)
        self.name = name
        self.vocab_size = self.lm.vocab_size
        self.context_window = context_window
        self._prompt_len = 1 << 62  # set by start_query
        self._anchor = 0  # the first context token this drafter feeds its LM

    def start_query(self, prompt: Sequence[int]) -> None:
        self._prompt_len = len(prompt)
        self._anchor = max(0, len(prompt) - (self.context_window or len(prompt)))

    def _window(self, context: Sequence[int]) -> Sequence[int]:
        """``context`` from the anchor on (all of it without a window)."""
        w = self.context_window
        if w is None:
            return context
        if len(context) - self._anchor > 2 * w:  # slide: one re-prefill of w tokens
            self._anchor = len(context) - w
        return context[min(self._anchor, max(len(context) - 1, 0)):]

    def backlog(self, context: Sequence[int]) -> int:
        """Tokens of the (windowed) context the LM's cache lacks."""
        seq = self._window(context)
        cached = getattr(self.lm, "cached_ids", None)
        if cached is None:  # a backend that does not say: no backlog known
            return 0
        m = len(cached)
        if m <= len(seq) and cached == list(seq[:m]):  # the usual case, at C speed
            return len(seq) - m
        return len(seq) - common_prefix_length(cached, seq)

    def catch_up(self, context: Sequence[int]) -> None:
        seq = self._window(context)
        if len(seq) > 1:
            self.lm.logits(seq[:-1], 1)  # the row propose's first pass would recompute

    def propose(
        self,
        context: Sequence[int],
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        seq = list(self._window(context))
        skipped = len(context) - len(seq)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        steps = 0
        for j in range(k):
            # The first pass also keeps the row before the last context token: after a
            # fully accepted draft that is the bonus position's row, which counterfactual
            # scoring asks for later (engine: deferred scoring), at no extra pass.  (Not at
            # a query's first proposal: that row would be inside the prompt.)
            both = j == 0 and len(seq) + skipped > self._prompt_len
            rows = self.lm.logits(seq, 2 if both else 1)  # [1 or 2, V]
            q = process_logits(rows[-1:], sampling)[0]  # [V]
            steps += 1
            if self.confidence_threshold and float(q.max()) < self.confidence_threshold:
                break  # unsure: the draft ends here
            x = int(q.argmax()) if sampling.greedy else sample(q, generator)
            tokens.append(x)
            probs.append(q)
            seq.append(x)
        ended = None if steps == len(tokens) else steps  # one step found the unsure token
        if not tokens:
            return Draft(tokens=torch.zeros(0, dtype=torch.long), probs=None, steps=ended)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long), probs=torch.stack(probs),
                     steps=ended)

    def distributions(
        self, context: Sequence[int], path: Sequence[int], sampling: SamplingParams
    ) -> PathDistributions:
        if not path:
            return PathDistributions(tokens=torch.zeros(0, dtype=torch.long))
        logits = self.lm.logits([*self._window(context), *path[:-1]], len(path))  # [L, V]
        if sampling.greedy and not self.confidence_threshold:  # only the argmax matters
            return PathDistributions(tokens=logits.argmax(dim=-1))
        probs = process_logits(logits, sampling)  # [L, V]
        stops = unsure_rows(probs, self.confidence_threshold)  # [L]
        if sampling.greedy:
            return PathDistributions(tokens=probs.argmax(dim=-1), stops=stops)
        return PathDistributions(tokens=probs.argmax(dim=-1), probs=probs, stops=stops)
