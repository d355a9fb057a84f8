"""A Hugging Face causal LM whose KV cache follows the caller's token sequence.

:class:`CachedLM` implements :class:`specmux.target.Target` for transformers models.  It
keeps the token ids its KV cache holds; each call syncs to the longest common prefix with
the requested sequence (:func:`specmux.target.prefix_to_keep`), crops the cache back to it
(rolling back rejected draft positions) and feeds only the new tokens
(:meth:`CachedLM.feed`).  A long generation therefore never re-encodes its context: per
round the target is fed the drafted tokens plus the one committed last round.

It also remembers the logit rows of its last calls, so a drafter asked to score the path it
just drafted (counterfactual feedback) gets them without another forward pass.  Once
:meth:`CachedLM.enable_hidden_states` is called it keeps, for the same rows, the final-layer
hidden states the LM head read (a forward pre-hook on the LM head: no extra pass, and the
logits are computed exactly as before): draft heads (:mod:`specmux.drafters.head`) draft
from them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from specmux.target import Target, check_num_last, common_prefix_length, prefix_to_keep

log = logging.getLogger(__name__)

__all__ = ["CachedLM", "as_target", "common_prefix_length"]


def cache_kwarg(model: PreTrainedModel) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.24), or
    ``past_key_values`` (older; deprecated in 5.24, removed in 5.40).  The cache object is
    updated in place, so callers keep their own reference instead of reading it back."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")


class CachedLM:
    """Logits for the last positions of a token sequence, reusing the KV cache.

    Counters ``num_forward_calls`` and ``num_tokens_fed`` make the cache's effect testable.
    The model may sit on any device (``model.to("cuda")``): token ids go to it, and the
    rows come back to the CPU, where verification and the learners run.
    """

    max_saved_rows = 64  # logit rows remembered for reuse ([V] float32 each)

    def __init__(self, model: PreTrainedModel, name: str = "model") -> None:
        self.model = model.eval()
        self.name = name
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._cache_kw = cache_kwarg(model)
        self.num_forward_calls = 0
        self.num_tokens_fed = 0
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._grabbed: torch.Tensor | None = None
        self.reset()

    def enable_hidden_states(self) -> None:
        """Keep the LM head's input rows of every call (see :meth:`hidden_states`)."""
        if self._hook is None:
            head = self.model.get_output_embeddings()
            self._hook = head.register_forward_pre_hook(self._grab)

    def _grab(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._grabbed = args[0]  # [1, rows kept, H]

    def hidden_states(self, num_last: int = 1, ids: Sequence[int] | None = None) -> torch.Tensor:
        """Final-layer hidden states [num_last, H] (float32) at the last ``num_last``
        positions of ``ids`` (default: the ids of the most recent :meth:`logits` call), taken
        from that call's rows: row ``j`` is the state the LM head read to predict the token
        after ``ids[: len(ids) - num_last + j + 1]``.  No forward pass; raises ``LookupError``
        when those rows were not computed (``ids`` must be a prefix of the cached sequence)."""
        if self._hook is None:
            raise LookupError("hidden states are off; call enable_hidden_states() first")
        ids = self.cached_ids[: self.last_len] if ids is None else ids
        n = len(ids)
        if not 1 <= num_last <= n or n > len(self.cached_ids):
            raise LookupError(f"no hidden states for {num_last} rows of a {n}-token sequence")
        wanted = range(n - num_last + 1, n + 1)
        if any(i not in self.hidden for i in wanted) or common_prefix_length(
            self.cached_ids[:n], ids
        ) < n:
            raise LookupError("those hidden states were not computed by the last passes")
        return torch.stack([self.hidden[i] for i in wanted])

    def reset(self) -> None:
        """Drop the KV cache."""
        self.cache = DynamicCache()
        self.cached_ids: list[int] = []
        self.rows: dict[int, torch.Tensor] = {}  # i -> logits [V] after cached_ids[:i]
        self.hidden: dict[int, torch.Tensor] = {}  # i -> LM-head input [H] after cached_ids[:i]
        self.last_len = 0  # len(ids) of the most recent logits() call

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        """Logits [num_last, V] (float32) at the last ``num_last`` positions of ``ids``.

        Row ``j`` is the next-token distribution after ``ids[: len(ids) - num_last + j + 1]``.
        """
        n = len(ids)
        check_num_last(num_last, n)
        common = common_prefix_length(self.cached_ids, ids)
        first = n - num_last + 1  # rows first..n are wanted; row i follows ids[:i]
        start = first
        while start <= n and start <= common and start in self.rows:
            start += 1  # already computed for this very prefix
        self.last_len = n
        if start > n:
            return torch.stack([self.rows[i] for i in range(first, n + 1)])
        keep = prefix_to_keep(self.cached_ids, ids, start)
        out = self.feed(ids, keep, logits_to_keep=n - start + 1)
        fresh = out.logits[0].float().cpu()  # [n - start + 1, V]
        self.rows = {i: r for i, r in self.rows.items() if i <= keep}
        self.rows.update({start + j: fresh[j] for j in range(fresh.shape[0])})
        out_rows = torch.stack([self.rows[i] for i in range(first, n + 1)])  # [num_last, V]
        if len(self.rows) > self.max_saved_rows:
            for i in sorted(self.rows)[: len(self.rows) - self.max_saved_rows]:
                del self.rows[i]
        if self._grabbed is not None:
            grabbed, self._grabbed = self._grabbed[0].float().cpu(), None  # [n - start + 1, H]
            self.hidden = {i: h for i, h in self.hidden.items() if i in self.rows}
            self.hidden.update({start + j: grabbed[j] for j in range(grabbed.shape[0])
                                if start + j in self.rows})
        return out_rows

    def feed(self, ids: Sequence[int], keep: int, **kwargs: Any) -> Any:
        """Crop the KV cache to its first ``keep`` positions, run the model on ``ids[keep:]``
        (``kwargs`` go to the model call) and return its output; the cache then holds
        ``ids``.  ``keep`` comes from :func:`specmux.target.prefix_to_keep`."""
        if keep == 0:
            self.cache = DynamicCache()
        elif keep < len(self.cached_ids):
            self.cache.crop(keep - len(self.cached_ids))  # negative: tokens to remove
        new = torch.tensor([list(ids[keep:])], dtype=torch.long,
                           device=self.model.device)  # [1, len(ids) - keep]
        out = self.model(input_ids=new, use_cache=True, **{self._cache_kw: self.cache},
                         **kwargs)  # the cache is updated in place
        self.cached_ids = list(ids)
        self.num_forward_calls += 1
        self.num_tokens_fed += int(new.shape[1])
        return out


def as_target(model: PreTrainedModel | Target, name: str = "target") -> Target:
    """``model`` itself when it is a :class:`~specmux.target.Target` already, else a
    :class:`CachedLM` around the transformers model."""
    return CachedLM(model, name=name) if isinstance(model, torch.nn.Module) else model

