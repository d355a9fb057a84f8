"""A Hugging Face causal LM whose KV cache follows the caller's token sequence.

Speculative decoding feeds a model tokens that may later be rejected.  :class:`CachedLM`
keeps the token ids its KV cache holds; each call finds the longest common prefix between
them and the requested sequence, crops the cache back to it (rolling back rejected draft
positions) and feeds only the new tokens.  A long generation therefore never re-encodes its
context: per round the target is fed the drafted tokens plus the one committed last round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

log = logging.getLogger(__name__)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CachedLM:
    """Logits for the last positions of a token sequence, reusing the KV cache.

    Counters ``num_forward_calls`` and ``num_tokens_fed`` make the cache's effect testable.
    """

    def __init__(self, model: PreTrainedModel, name: str = "model") -> None:
        self.model = model.eval()
        self.name = name
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.num_forward_calls = 0
        self.num_tokens_fed = 0
        self.reset()

    def reset(self) -> None:
        """Drop the KV cache."""
        self.cache = DynamicCache()
        self.cached_ids: list[int] = []

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        """Logits [num_last, V] (float32) at the last ``num_last`` positions of ``ids``.

        Row ``j`` is the next-token distribution after ``ids[: len(ids) - num_last + j + 1]``.
        """
        if not 1 <= num_last <= len(ids):
            raise ValueError(f"num_last={num_last} must be in [1, len(ids)={len(ids)}]")
        keep = min(common_prefix_length(self.cached_ids, ids), len(ids) - num_last)
        if keep == 0:
            self.cache = DynamicCache()
        elif keep < len(self.cached_ids):
            self.cache.crop(keep - len(self.cached_ids))  # negative: tokens to remove
        new = torch.tensor([list(ids[keep:])], dtype=torch.long)  # [1, n_new]
        out = self.model(
            input_ids=new, past_key_values=self.cache, use_cache=True, logits_to_keep=num_last
        )
        self.cache = out.past_key_values
        self.cached_ids = list(ids)
        self.num_forward_calls += 1
        self.num_tokens_fed += int(new.shape[1])
        return out.logits[0, -num_last:].float()
