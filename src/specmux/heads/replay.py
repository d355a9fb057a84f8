"""Greedy replays for draft heads: one real target-only run, then any head (frozen or
learning online) through the real engine against the recording, with no target pass.

Why it is exact up to rounding: greedy speculative decoding commits the target's greedy
continuation whatever the drafter does, and a head reads only the target's states along
that continuation (after ``c - 1`` tokens at each round's context ``c``; its online updates
read the states along the committed path).  :func:`record_greedy` runs target-only greedy
decoding and keeps, at no extra cost, the state each one-token pass fed the LM head.
:class:`HiddenReplayTarget` then serves, for the real :class:`~specmux.engine.SpeculativeDecoder`,
logits whose argmax is the recorded token on the continuation (zeros off it: greedy
verification reads no row past the first mismatch) and the recorded states; states before
the prompt's end are withheld, as in a real run whose first pass is the first verification.
The one difference from a real run: real rows come from ``(k + 1)``-token passes, recorded
ones from one-token passes, which round differently in bf16 (a near-tie can flip a head's
argmax).  Not valid with sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specmux.lm import CachedLM
from specmux.target import common_prefix_length


@dataclass
class HiddenRecording:
    """``ids`` = prompt + greedy output; ``hidden[j]`` [H] = the target's state after
    ``ids[: prompt_len + j]`` (j = 0 .. len(output) - 1); ``seconds``: target-only time."""

    ids: list[int]
    prompt_len: int
    hidden: torch.Tensor  # [len(ids) - prompt_len, H]
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # per pass; [0] has the prefill

    @property
    def output(self) -> list[int]:
        return self.ids[self.prompt_len:]


def record_greedy(lm: CachedLM, prompt: Sequence[int], max_new_tokens: int,
                  stop: Sequence[int] = ()) -> HiddenRecording:
    """Target-only greedy decoding (one pass per token, as the bench's baseline) recording
    the LM head's input at every step."""
    import time

    lm.enable_hidden_states()
    ids, rows, steps = list(prompt), [], []
    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        t = time.perf_counter()
        logits = lm.logits(ids, 1)  # [1, V]
        tok = int(logits[0].argmax())
        steps.append(time.perf_counter() - t)
        rows.append(lm.hidden_states(1)[0].to(torch.bfloat16))
        ids.append(tok)
        if tok in stop or len(ids) >= lm.max_context:
            break
    return HiddenRecording(ids, len(prompt), torch.stack(rows), time.perf_counter() - t0, steps)


class HiddenReplayTarget:
    """A :class:`~specmux.target.Target` that replays one :class:`HiddenRecording` at a time
    (:meth:`use`), with the optional ``hidden_states`` capability."""

    def __init__(self, vocab_size: int, max_context: int = 1 << 30, name: str = "replay"):
        self.name, self.vocab_size, self.max_context = name, vocab_size, max_context
        self.num_forward_calls = 0
        self.num_tokens_fed = 0
        self.rec: HiddenRecording | None = None
        self.last: list[int] = []

    def use(self, rec: HiddenRecording) -> None:
        self.rec, self.last = rec, []

    def reset(self) -> None:
        self.last = []

    def enable_hidden_states(self) -> None:
        pass  # always on

    def _on_path(self, ids: Sequence[int]) -> int:
        assert self.rec is not None, "call use(recording) first"
        return common_prefix_length(self.rec.ids, ids)

    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        rec, n = self.rec, len(ids)
        common = self._on_path(ids)
        out = torch.zeros(num_last, self.vocab_size)
        for j, i in enumerate(range(n - num_last + 1, n + 1)):  # row after ids[:i]
            if i <= common and i < len(rec.ids):
                out[j, rec.ids[i]] = 1.0
        self.num_forward_calls += 1
        self.last = list(ids)
        return out

    def hidden_states(self, num_last: int = 1, ids: Sequence[int] | None = None) -> torch.Tensor:
        rec = self.rec
        ids = self.last if ids is None else list(ids)
        n = len(ids)
        first = n - num_last + 1
        if (first < rec.prompt_len or n - rec.prompt_len >= len(rec.hidden)
                or self._on_path(ids) < n):
            raise LookupError("not on the recorded path")
        return rec.hidden[first - rec.prompt_len: n - rec.prompt_len + 1].float()
