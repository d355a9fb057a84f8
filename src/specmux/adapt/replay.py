"""Replays of recorded model outputs: exact, cheap what-if runs of *greedy* speculative
decoding, used to compare adaptive drafters on the embedded models within a CPU budget.

Why it is exact.  Greedy speculative decoding commits the target's greedy continuation of
the prompt whatever the drafter proposes.  A round's verdict reads the target rows up to the
first mismatch only, and all of them are conditioned on a prefix of that continuation; the
drafter's first token in a round, and every token it drafts while it still agrees, is
likewise conditioned on such a prefix.  So one real run (:class:`RecordingDrafter`, any
drafter) records, along the continuation,

* the target's logits (top-K; the rest never matter to greedy verification or to the
  top-K distillation targets), and
* the drafter's final hidden states (a head-only adapter never changes them),

and afterwards any head-adapted version of that drafter runs through the real
:class:`~specmux.engine.SpeculativeDecoder` round loop against :class:`ReplayTarget` and
:class:`ReplayLM`: same verdicts, accepted lengths and ``observe_target`` rows as a real run,
with the adapter, its updates and the engine all running for real, but with no forward pass
of either model.  Rows conditioned on a prefix that left the continuation (after a
mismatch) are served as zeros: greedy decoding never uses them.  So are rows after the last
recorded token (a query that ended on a stop token: drafts past it are cut off by the engine;
only ``num_accepted_tokens`` of that last round can differ from the real run's, the
committed tokens cannot).  The model time a real run
would have spent is charged from the recording (``seconds`` counts the time spent inside the
stand-ins, so a benchmark can subtract it).  Not valid with sampling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from specmux.adapt.drafter import AdaptiveLM, HeadAdaptedLM
from specmux.adapt.head import AdaptiveHead
from specmux.drafters.hf import HFDrafter
from specmux.errors import ConfigError
from specmux.target import check_num_last, common_prefix_length


class ReplayMissError(ConfigError):
    """An on-path row was requested that the recording does not hold."""


@dataclass
class Recording:
    """One query of a real run.

    ``ids``: prompt + committed tokens; ``prompt_len``.  ``target_rows[L] = (values [K],
    indices [K])``: the target's top-K logits after ``ids[:L]``.  ``hidden`` [len(ids) -
    prompt_len, H]: the drafter's final hidden state after ``ids[:L]`` for L = prompt_len ..
    len(ids) - 1 (row ``L - prompt_len``).
    """

    ids: list[int]
    prompt_len: int
    target_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hidden: torch.Tensor | None = None


class RecordingDrafter(HFDrafter):
    """A frozen LM drafter (logits unchanged) that records a :class:`Recording` per query.

    Call :meth:`finish_query` after each query (outside any timed region): it completes the
    drafter's hidden states along the committed sequence.
    """

    def __init__(self, model: nn.Module, *, name: str = "lm", top_k: int = 64) -> None:
        super().__init__(AdaptiveLM(model, None, name), name=name)  # type: ignore[arg-type]
        self.lm: AdaptiveLM
        self.top_k = top_k
        self.recordings: list[Recording] = []
        self.seconds = 0.0  # spent recording (bookkeeping a real run would not do)

    def start_query(self, prompt: Sequence[int]) -> None:
        self.recordings.append(Recording(ids=list(prompt), prompt_len=len(prompt)))

    def observe_target(
        self, context: Sequence[int], path: Sequence[int], target_logits: torch.Tensor
    ) -> None:
        t0 = time.perf_counter()
        rec = self.recordings[-1]
        k = min(self.top_k, int(target_logits.shape[-1]))
        values, indices = target_logits[: len(path)].float().topk(k, dim=-1)
        for j in range(len(path)):
            rec.target_rows[len(context) + j] = (values[j].clone(), indices[j].clone())
        rec.ids = [*context, *path]
        self.seconds += time.perf_counter() - t0

    def finish_query(self) -> Recording:
        rec = self.recordings[-1]
        rec.hidden = self.lm.hidden_at(rec.ids, rec.prompt_len - 1, len(rec.ids) - 1)
        return rec


class ReplayTarget:
    """A :class:`~specmux.target.Target` serving a recording's target logits; :meth:`select`
    the query about to run."""

    def __init__(self, vocab_size: int, max_context: int = 1 << 30, name: str = "replay") -> None:
        self.name = name
        self.vocab_size = int(vocab_size)
        self.max_context = int(max_context)
        self.num_forward_calls = 0
        self.num_tokens_fed = 0
        self.seconds = 0.0
        self.recording: Recording | None = None
        self.reset()

    def reset(self) -> None:
        self.cached_ids: list[int] = []

    def select(self, recording: Recording) -> None:
        self.recording = recording
        self.reset()

    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        t0 = time.perf_counter()
        rec = self.recording
        if rec is None:
            raise ConfigError("ReplayTarget: select() a recording first")
        check_num_last(num_last, len(ids))
        on_path = common_prefix_length(rec.ids, ids)
        out = torch.zeros(num_last, self.vocab_size)
        first = len(ids) - num_last + 1  # prefix length conditioning row 0
        for j in range(num_last):
            length = first + j
            if length > on_path or length >= len(rec.ids):  # off the path, or past its stop
                if j == 0:
                    raise ReplayMissError(f"the context (length {length}) left the recording")
                break
            if length not in rec.target_rows:
                raise ReplayMissError(f"no recorded target row after {length} tokens")
            values, indices = rec.target_rows[length]
            out[j].fill_(float("-inf"))
            out[j, indices] = values.float()
        self.num_forward_calls += 1
        self.num_tokens_fed += len(ids) - common_prefix_length(self.cached_ids, ids)
        self.cached_ids = list(ids)
        self.seconds += time.perf_counter() - t0
        return out


class ReplayLM(HeadAdaptedLM):
    """Stands in for a drafter's :class:`AdaptiveLM`: hidden states and frozen logits come
    from a recording (the frozen logits ``W h`` are computed at :meth:`select`, untimed),
    the adaptive ``head`` runs for real.  ``lm_head`` is the drafter's own (for updates)."""

    def __init__(self, lm_head: nn.Module, vocab_size: int, head: AdaptiveHead | None,
                 name: str = "replay-drafter") -> None:
        self.lm_head = lm_head
        self.hidden_size = int(lm_head.weight.shape[1])
        self.vocab_size = int(vocab_size)
        self.max_context = 1 << 30
        self.head = head
        self.head_seconds = 0.0
        self.name = name
        self.num_forward_calls = 0
        self.num_tokens_fed = 0
        self.seconds = 0.0
        self.recording: Recording | None = None
        self._z0 = torch.zeros(0, self.vocab_size)
        self.reset()

    def reset(self) -> None:
        self.cached_ids: list[int] = []
        self.hidden = torch.zeros(0, self.hidden_size)
        self.z0_rows = {}

    def select(self, recording: Recording) -> None:
        if recording.hidden is None:
            raise ConfigError("the recording has no drafter hidden states (finish_query)")
        self.recording = recording
        self._z0 = self.base_logits(recording.hidden)  # [L, V]
        self.reset()

    def forward(self, ids: Sequence[int], num_last: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        rec = self.recording
        if rec is None or rec.hidden is None:
            raise ConfigError("ReplayLM: select() a recording first")
        n = len(ids)
        on_path = common_prefix_length(rec.ids, ids)
        z0 = torch.zeros(num_last, self.vocab_size)
        hidden = torch.zeros(num_last, self.hidden_size)
        for j in range(num_last):
            length = n - num_last + j + 1
            row = length - rec.prompt_len
            if length > on_path or length >= len(rec.ids):  # off the path, or past its stop
                continue
            if not 0 <= row < rec.hidden.shape[0]:
                raise ReplayMissError(f"no recorded drafter state after {length} tokens")
            z0[j], hidden[j] = self._z0[row], rec.hidden[row]
        self.num_forward_calls += 1
        self.num_tokens_fed += n - common_prefix_length(self.cached_ids, ids)
        self.cached_ids = list(ids)
        self.seconds += time.perf_counter() - t0
        return z0, hidden

    def states_at(
        self, ids: Sequence[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.recording
        if rec is None or rec.hidden is None:
            raise ConfigError("ReplayLM: select() a recording first")
        if common_prefix_length(rec.ids, ids[:stop]) < stop or start < rec.prompt_len - 1:
            raise ReplayMissError(f"hidden states [{start}, {stop}) are not on the recording")
        lo = start - (rec.prompt_len - 1)
        return rec.hidden[lo : lo + stop - start].clone(), self._z0[lo : lo + stop - start]
