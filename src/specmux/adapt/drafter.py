"""An LM drafter that adapts its head online, distilling the target's verification logits.

Data flow per round (OnlineSpec's "draft commits, feedback provides, draft adapts"):

1. the engine verifies a draft; the target's raw logits along the committed path come for
   free (``Drafter.observe_target(context, path, target_logits)``, rows [len(path), V]);
2. :class:`AdaptiveHFDrafter` pairs row ``j`` with its own final hidden state after
   ``context + path[:j]``, which :class:`AdaptiveLM` kept from the forward passes it already
   ran (drafting or counterfactual scoring; a short catch-up pass otherwise), and stores the
   pair in a :class:`~specmux.adapt.buffer.ReplayBuffer`;
3. every ``stride`` rounds it runs ``steps_per_update`` optimizer steps on a batch of the new
   positions plus replayed old ones, minimizing ``KL(p_target ‖ q_drafter)``
   (:mod:`specmux.adapt.head`), within ``update_budget_s`` seconds.

Distillation target: the *raw* (temperature 1, untruncated apart from the top-K kept by the
buffer) target distribution, whatever the request's sampling parameters.  The adapter
learns to match the target's logits; temperature, top-k and top-p are then applied to the
adapted drafter's logits by the verification code exactly as before, so a request at any
temperature benefits and nothing request-specific leaks into the shared adapter.

Losslessness: the adapter only changes between rounds, never between drafting a token and
verifying it; the probabilities a draft carries are the ones that produced it, so
verification stays exact (greedy: bit-identical output).  Only the head changes, so the
hidden states and the KV cache stay valid across updates.

The base model's weights are shared: a frozen :class:`~specmux.drafters.hf.HFDrafter` and
any number of adaptive drafters may wrap the same ``PreTrainedModel`` (each has its own KV
cache and its own adapter, a few MB).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from specmux.adapt.adapter import LowRankHeadAdapter, distill_loss
from specmux.adapt.base import OnlineOptimizer
from specmux.adapt.buffer import ReplayBuffer
from specmux.adapt.checkpoint import atomic_torch_save, torch_load
from specmux.adapt.ensemble import EnsembleHead
from specmux.adapt.head import AdaptedHead, AdaptiveHead
from specmux.adapt.ogd import OGD
from specmux.adapt.optimistic import OptimisticOGD
from specmux.drafters.hf import HFDrafter
from specmux.errors import ConfigError
from specmux.lm import CachedLM
from specmux.target import check_num_last, common_prefix_length, prefix_to_keep

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, type[OnlineOptimizer]] = {"ogd": OGD, "opt": OptimisticOGD}
HEAD_KINDS: tuple[str, ...] = ("ogd", "opt", "ens")
DEFAULT_LR = 0.1
DEFAULT_ENSEMBLE_LRS: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3)
STATE_VERSION = 1
BUFFER_FIELDS = ("hidden", "idx", "z0", "tail", "prob", "tail_idx")


class HeadAdaptedLM(ABC):
    """A :class:`~specmux.target.Target` whose logits are ``head.logits(W h, h)`` (``W h``
    when ``head`` is None): the frozen LM head ``W`` (``lm_head``) applied to the final
    hidden states ``h``, adapted by an :class:`AdaptiveHead`.

    Subclasses provide the hidden states and frozen logits (:meth:`forward`,
    :meth:`states_at`) and keep ``hidden`` [len(cached_ids), H] and ``z0_rows`` (L -> frozen
    logits after ``cached_ids[:L]``) up to date: :class:`AdaptiveLM` from real forward
    passes, :class:`specmux.adapt.replay.ReplayLM` from a recording.
    """

    name: str
    vocab_size: int
    max_context: int
    num_forward_calls: int
    num_tokens_fed: int
    lm_head: torch.nn.Module
    hidden_size: int
    head: AdaptiveHead | None
    head_seconds: float  # spent applying the adaptive head (serving overhead)
    hidden: torch.Tensor  # [len(cached_ids), H]
    z0_rows: dict[int, torch.Tensor]

    max_memo_rows = 32  # frozen logit rows kept for observe_target ([V] float32 each)

    @abstractmethod
    def reset(self) -> None:
        """Drop the cache (and the hidden states and memo that follow it)."""

    @abstractmethod
    def forward(self, ids: Sequence[int], num_last: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen logits [num_last, V] and final hidden states [num_last, H] at the last
        ``num_last`` positions of ``ids``."""

    @abstractmethod
    def states_at(
        self, ids: Sequence[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [stop - start, H] and frozen logits [stop - start, V] after
        ``ids[: i + 1]`` for i in [start, stop)."""

    def logits(self, ids: Sequence[int], num_last: int = 1) -> torch.Tensor:
        z0, hidden = self.forward(ids, num_last)
        if self.head is None:
            return z0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.head.logits(z0, hidden)
        self.head_seconds += time.perf_counter() - t0
        return out

    def hidden_at(self, ids: Sequence[int], start: int, stop: int) -> torch.Tensor:
        """The hidden states of :meth:`states_at`."""
        return self.states_at(ids, start, stop)[0]

    @torch.no_grad()
    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen head ``W h``: [n, H] -> [n, V] (float32)."""
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    def _frozen_rows(self, first: int, hidden: torch.Tensor) -> torch.Tensor:
        """Frozen logits after ``cached_ids[:first + j]`` for the rows of ``hidden``: from the
        memo of recent forward passes, else ``W h``."""
        n = int(hidden.shape[0])
        if all(first + j in self.z0_rows for j in range(n)):
            return torch.stack([self.z0_rows[first + j] for j in range(n)])
        return self.base_logits(hidden)


class AdaptiveLM(HeadAdaptedLM, CachedLM):
    """A :class:`CachedLM` that also keeps the final hidden state of every cached position
    (``hidden`` [len(cached_ids), H]) and returns ``head.logits(W h, h)`` (``W h`` when
    ``head`` is None).  Requires the model's logits to be ``lm_head(final hidden state)``;
    this is checked on the first forward pass."""

    def __init__(self, model: PreTrainedModel, head: AdaptiveHead | None, name: str) -> None:
        self.lm_head = model.get_output_embeddings()
        self.hidden_size = int(self.lm_head.weight.shape[1])
        super().__init__(model, name=name)  # CachedLM's
        self.head = head
        self.head_seconds = 0.0
        self._checked = False

    def reset(self) -> None:
        CachedLM.reset(self)
        self.hidden = torch.zeros(0, self.hidden_size)
        self.z0_rows = {}

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], num_last: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen logits [num_last, V] and final hidden states [num_last, H] at the last
        ``num_last`` positions of ``ids``.  The KV cache is synced and fed by
        :meth:`CachedLM.feed`, as in :meth:`CachedLM.logits`; when every position is cached
        already (scoring the path just drafted), no forward pass runs: the logits are ``W h``
        from the kept hidden states."""
        n = len(ids)
        check_num_last(num_last, n)
        common = common_prefix_length(self.cached_ids, ids)
        if common == n and self._checked:  # all cached (e.g. scoring the path just drafted)
            hidden = self.hidden[n - num_last : n]
            return self._frozen_rows(n - num_last + 1, hidden), hidden
        keep = prefix_to_keep(self.cached_ids, ids, n - num_last + 1)
        out = self.feed(ids, keep, logits_to_keep=num_last, output_hidden_states=True)
        self.hidden = torch.cat([self.hidden[:keep], out.hidden_states[-1][0].float()])
        logits = out.logits[0, -num_last:].float()
        hidden = self.hidden[-num_last:]
        self.z0_rows = {i: r for i, r in self.z0_rows.items() if i <= keep}
        first = n - num_last + 1
        self.z0_rows.update({first + j: logits[j] for j in range(num_last)})
        if len(self.z0_rows) > self.max_memo_rows:
            for i in sorted(self.z0_rows)[: len(self.z0_rows) - self.max_memo_rows]:
                del self.z0_rows[i]
        if not self._checked:
            ref = self.lm_head(hidden[-1:].to(self.lm_head.weight.dtype)).float()
            if not torch.allclose(ref, logits[-1:], atol=1e-3, rtol=1e-3):
                raise ConfigError(f"{type(self.model).__name__}: logits are not lm_head(final "
                                  "hidden state); a head adapter cannot be applied")
            self._checked = True
        return logits, hidden

    def states_at(
        self, ids: Sequence[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [stop - start, H] and frozen logits [stop - start, V] after
        ``ids[: i + 1]`` for i in [start, stop): from the cache (and the memo of recent
        logits, which drafting or scoring that path filled) when it holds ``ids[:stop]``,
        else after a catch-up forward pass."""
        if not 0 <= start <= stop <= len(ids):
            raise ValueError(f"need 0 <= start <= stop <= {len(ids)}, got {start}, {stop}")
        if common_prefix_length(self.cached_ids, ids[:stop]) < stop:
            self.forward(ids[:stop], 1)
        hidden = self.hidden[start:stop].clone()
        return hidden, self._frozen_rows(start + 1, hidden)


@dataclass(frozen=True)
class UpdateRecord:
    """One update chunk: when, on how much, the loss before/after, and its wall clock."""

    round: int
    num_new: int  # positions added since the previous update
    batch: int  # positions in the batch (new + replayed)
    steps: int
    loss_new: float  # candidate-set KL on the new positions before the chunk (prequential)
    loss_before: float  # the same on the whole batch (new + replayed)
    loss_after: float  # the whole batch after the chunk
    seconds: float


@dataclass(frozen=True)
class KLRecord:
    """Prequential evaluation of one round's new positions (``track_kl=True``)."""

    round: int
    positions: int
    frozen_kl: float  # mean KL(p_target top-K || q_frozen) over the positions
    adapted_kl: float  # the same for the adapted drafter, before it trains on them
    frozen_agree: float  # fraction where argmax q_frozen == argmax p_target
    adapted_agree: float


class AdaptiveHFDrafter(HFDrafter):
    """:class:`HFDrafter` + a trainable head fed by ``observe_target`` (module docstring).

    ``stride``: rounds between updates (S).  ``batch_size``: positions per update (the new
    ones first, then replayed ones).  ``steps_per_update``: optimizer steps per update chunk,
    stopped early once ``update_budget_s`` is spent.  ``learn=False`` freezes the adapter.
    ``update_seconds`` accumulates the wall clock of everything adaptation adds (buffering and
    updates); the engine counts it too, inside ``Step.learner_seconds``.  ``lm`` replaces the
    model wrapper (:class:`~specmux.adapt.replay.ReplayLM` for replays).  ``track_kl``
    records a prequential :class:`KLRecord` per round (``kl_trace``; its time goes to
    ``eval_seconds``, not ``update_seconds``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        head: AdaptiveHead,
        *,
        name: str = "lm+adapt",
        stride: int = 4,
        batch_size: int = 64,
        steps_per_update: int = 1,
        buffer_size: int = 4096,
        target_top_k: int = 64,
        update_budget_s: float | None = None,
        learn: bool = True,
        track_kl: bool = False,
        seed: int = 0,
        lm: HeadAdaptedLM | None = None,
    ) -> None:
        if stride < 1 or batch_size < 1 or steps_per_update < 1:
            raise ConfigError(f"stride, batch_size, steps_per_update must be >= 1, got "
                              f"{stride}, {batch_size}, {steps_per_update}")
        adapted = AdaptiveLM(model, head, name) if lm is None else lm
        super().__init__(adapted, name=name)
        self.lm: HeadAdaptedLM = adapted
        self.lm.head = head
        self.head = head
        self.stride, self.batch_size, self.steps_per_update = stride, batch_size, steps_per_update
        self.update_budget_s = update_budget_s
        self.learn = learn
        self.buffer = ReplayBuffer(buffer_size, self.lm.hidden_size, target_top_k)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_rounds = 0
        self.update_seconds = 0.0
        self.history: list[UpdateRecord] = []
        self._trained_upto = 0  # buffer.num_added at the last update
        self.track_kl = track_kl
        self.kl_trace: list[KLRecord] = []
        self.eval_seconds = 0.0  # spent on track_kl, not counted in update_seconds

    def observe_target(
        self, context: Sequence[int], path: Sequence[int], target_logits: torch.Tensor
    ) -> None:
        if not self.learn or not path or not context:
            return
        t0 = time.perf_counter()
        n, c = len(path), len(context)
        hidden, base = self.lm.states_at([*context, *path[:-1]], c - 1, c - 1 + n)
        self.buffer.add(hidden, base, target_logits[:n])
        self.num_rounds += 1
        self.update_seconds += time.perf_counter() - t0
        if self.track_kl:
            self._track(hidden, base, target_logits[:n])
        if self.num_rounds % self.stride == 0:
            self.update()

    @torch.no_grad()
    def _track(self, hidden: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> None:
        """Prequential evaluation of positions not trained on yet: the exact KL to the
        target's top-K distribution, frozen and adapted, and greedy agreement."""
        t0 = time.perf_counter()
        values, idx = target.float().topk(min(self.buffer.top_k, int(target.shape[-1])), dim=-1)
        prob = torch.softmax(values, -1)
        adapted = self.head.logits(base, hidden)
        self.kl_trace.append(KLRecord(
            round=self.num_rounds, positions=int(hidden.shape[0]),
            frozen_kl=float(distill_loss(base, idx, prob)),
            adapted_kl=float(distill_loss(adapted, idx, prob)),
            frozen_agree=float((base.argmax(-1) == idx[:, 0]).float().mean()),
            adapted_agree=float((adapted.argmax(-1) == idx[:, 0]).float().mean()),
        ))
        self.eval_seconds += time.perf_counter() - t0

    def update(self) -> UpdateRecord | None:
        """One update chunk on the positions buffered since the last one (plus replay)."""
        num_new = self.buffer.num_added - self._trained_upto
        if num_new <= 0:
            return None
        t0 = time.perf_counter()
        batch = self.buffer.batch(self._trained_upto, self.batch_size, self.generator)
        fresh = self.head.loss(batch.rows(batch.num_new))  # prequential: not trained on yet
        before = self.head.update(batch)
        steps = 1
        while steps < self.steps_per_update and (
            self.update_budget_s is None or time.perf_counter() - t0 < self.update_budget_s
        ):
            self.head.update(batch)
            steps += 1
        after = self.head.loss(batch)
        self._trained_upto = self.buffer.num_added
        seconds = time.perf_counter() - t0
        self.update_seconds += seconds
        rec = UpdateRecord(self.num_rounds, num_new, len(batch), steps, fresh, before, after,
                           seconds)
        self.history.append(rec)
        log.debug("%s update %d: KL %.4f -> %.4f on %d rows (%d new) in %.3fs", self.name,
                  len(self.history), before, after, rec.batch, num_new, seconds)
        return rec

    def state_dict(self, include_buffer: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION, "name": self.name, "head": self.head.state_dict(),
            "num_rounds": self.num_rounds, "trained_upto": self._trained_upto,
            "generator": self.generator.get_state(),
        }
        if include_buffer:
            b = self.buffer
            state["buffer"] = {name: getattr(b, name).clone() for name in BUFFER_FIELDS}
            state["buffer"]["num_added"] = b.num_added
            state["buffer"]["generator"] = b.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"unknown adapter state version {state.get('version')!r}")
        self.head.load_state_dict(state["head"])
        self.num_rounds = int(state["num_rounds"])
        self.generator.set_state(state["generator"])
        if "buffer" in state:
            b, s = self.buffer, state["buffer"]
            if any(s[k].shape != getattr(b, k).shape for k in BUFFER_FIELDS):
                raise ConfigError("saved replay buffer does not match this drafter's buffer")
            for k in BUFFER_FIELDS:
                getattr(b, k).copy_(s[k])
            b.num_added = int(s["num_added"])
            b.generator.set_state(s["generator"])
            self._trained_upto = int(state["trained_upto"])
        else:  # without the buffer, nothing is pending
            self._trained_upto = self.buffer.num_added

    def save(self, path: str, include_buffer: bool = False) -> None:
        """Write :meth:`state_dict` atomically (temp file + fsync + ``os.replace``)."""
        atomic_torch_save(self.state_dict(include_buffer), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch_load(path))


def make_head(
    kind: str,
    hidden_size: int,
    vocab_size: int,
    *,
    rank: int = 16,
    lr: float = DEFAULT_LR,
    lrs: Sequence[float] = DEFAULT_ENSEMBLE_LRS,
    member: str = "ogd",
    bias: bool = True,
    train_a: bool = False,
    max_norm: float | None = None,
    temperature: float = 1.2,
    discount: float = 0.9,
    mode: str = "mixture",
    seed: int = 0,
) -> AdaptiveHead:
    """``kind``: ``"ogd"`` | ``"opt"`` (one adapter, learning rate ``lr``) or ``"ens"`` (one
    copy per learning rate in ``lrs``, each trained by ``member`` = ogd | opt)."""

    def single(optimizer: str, rate: float) -> AdaptedHead:
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        adapter = LowRankHeadAdapter(hidden_size, vocab_size, rank, bias=bias, train_a=train_a,
                                     seed=seed)
        return AdaptedHead(adapter, OPTIMIZERS[optimizer](rate, max_norm))

    if kind in OPTIMIZERS:
        return single(kind, lr)
    if kind == "ens":
        if not lrs:
            raise ConfigError("an ensemble needs at least one learning rate")
        return EnsembleHead([single(member, r) for r in lrs], temperature=temperature,
                            discount=discount, mode=mode)
    raise ConfigError(f"unknown adaptive head {kind!r}; known: {', '.join(HEAD_KINDS)}")


def adaptive_drafter(
    model: PreTrainedModel,
    kind: str = "ogd",
    *,
    base_name: str = "lm",
    head_kwargs: dict[str, Any] | None = None,
    **drafter_kwargs: Any,
) -> AdaptiveHFDrafter:
    """An :class:`AdaptiveHFDrafter` named ``f"{base_name}+{kind}"`` (e.g. ``qwen0.5b+ogd``),
    wrapping ``model`` without copying its weights."""
    emb = model.get_output_embeddings()
    vocab, hidden = int(emb.weight.shape[0]), int(emb.weight.shape[1])
    head = make_head(kind, hidden, vocab, **(head_kwargs or {}))
    drafter_kwargs.setdefault("name", f"{base_name}+{kind}")
    return AdaptiveHFDrafter(model, head, **drafter_kwargs)
