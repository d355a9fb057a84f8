"""Online evolution of a draft head (OnlineSpec on its real setting: heads on the target's
hidden states), fed by the verification pass at no extra target cost.

Per round, :meth:`OnlineHeadDrafter.observe_target` turns the committed path into a segment:
the target's states ``H_0..H_L`` after ``c-1 .. c-1+L`` tokens (``c = len(context)``, ``L =
len(path)``; the verification passes computed them) and the tokens fed between them.  Each
transition ``(H_j, x) -> H_{j+1}`` is a distillation sample: the head should map it to
``softmax(W_d H_{j+1})``, the target's own distribution over the draft vocabulary (plus the
feature regression of offline training, :func:`specmux.heads.train.unroll_loss`).

Every ``stride`` rounds, one update chunk on the new segments plus replayed ones:

- ``ogd``: plain online distillation, ``x <- x - η g`` (OSD);
- ``opt``: optimistic OGD, the last gradient as the hint of the next one;
- ``ens``: one copy per learning rate (``0`` = the frozen head), exponential weights on
  each copy's prequential loss on the new segments; the copy with the largest weight drafts.

The **net-gain rule** (DESIGN.md) gates the updates.  With the prequential greedy agreement
``α₁`` of the served head and ``α₀`` of the frozen one on the same new positions, ``τ(α) =
(1 - α^{k+1}) / (1 - α)``, the updates continue while

    τ(α₁) / τ(α₀) > 1 + C_update / (S · C_round)

(``C_update``: measured seconds per update chunk, ``S·C_round``: measured wall clock of the
``S`` rounds between updates, or ``S`` times a given ``round_seconds`` in replays, where the
target's time is not spent).  After ``patience`` failed checks in a row the learner pauses
for ``pause_rounds`` rounds (still serving its current head), then probes again.

Losslessness: parameters change only inside ``observe_target``, i.e. between a round's
verification and the next proposal; a draft and its probabilities always come from one head.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from specmux.adapt.base import OnlineOptimizer
from specmux.adapt.checkpoint import atomic_torch_save, torch_load
from specmux.adapt.ensemble import ExpWeights
from specmux.adapt.ogd import OGD
from specmux.adapt.optimistic import OptimisticOGD
from specmux.drafters.head import HeadDrafter
from specmux.errors import ConfigError
from specmux.heads.extract import Shard
from specmux.heads.net import HeadNet
from specmux.heads.store import HeadFile
from specmux.heads.train import _Data, unroll_loss

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, type[OnlineOptimizer]] = {"ogd": OGD, "opt": OptimisticOGD}
KINDS: tuple[str, ...] = ("ogd", "opt", "ens")
DEFAULT_LR = 0.1
DEFAULT_LRS: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3)
STATE_VERSION = 1


def expected_length(alpha: float, k: int) -> float:
    """``(1 - α^{k+1}) / (1 - α)``: tokens per round for i.i.d. acceptance ``α``, ``k`` drafted."""
    alpha = min(max(alpha, 0.0), 1.0)
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class UpdateRecord:
    round: int
    positions: int  # new positions in this chunk
    served_agree: float  # prequential greedy agreement of the served head (before the update)
    frozen_agree: float  # same positions, the frozen head
    loss: float  # prequential loss of the served head
    seconds: float
    weights: tuple[float, ...] = ()
    worth: bool | None = None  # net-gain verdict after this update (None: not checked yet)


class OnlineHeadDrafter(HeadDrafter):
    """A :class:`HeadDrafter` whose head keeps learning from every committed path."""

    def __init__(
        self,
        head: HeadFile,
        model: PreTrainedModel,
        *,
        kind: str = "ogd",
        lr: float = DEFAULT_LR,
        lrs: Sequence[float] = DEFAULT_LRS,
        member: str = "ogd",
        stride: int = 4,
        replay_segments: int = 16,
        buffer_segments: int = 512,
        reg_weight: float = 0.1,
        gate: bool = True,
        gate_k: int = 4,
        min_updates: int = 5,
        patience: int = 3,
        pause_rounds: int = 200,
        temperature: float = 1.2,
        discount: float = 0.9,
        round_seconds: float | None = None,
        name: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown online head learner {kind!r}; known: {', '.join(KINDS)}")
        if member not in OPTIMIZERS:
            raise ConfigError(f"unknown learner {member!r}; known: {', '.join(OPTIMIZERS)}")
        if stride < 1 or replay_segments < 0 or buffer_segments < 1:
            raise ConfigError("stride and buffer_segments must be >= 1, replay_segments >= 0")
        super().__init__(head, model, name=name or f"{head.name}+{kind}", **kwargs)
        self.kind = kind
        self.frozen = head.net
        rates = list(lrs) if kind == "ens" else [lr]
        if not rates:
            raise ConfigError("an ensemble needs at least one learning rate")
        optimizer = OPTIMIZERS[member if kind == "ens" else kind]
        self.copies: list[HeadNet] = [copy.deepcopy(head.net) for _ in rates]
        for c in self.copies:
            c.requires_grad_(True)
        self.optimizers: list[OnlineOptimizer] = [optimizer(r) for r in rates]
        self.weights = ExpWeights(len(rates), temperature, discount)
        self.net = self.copies[self._served()]
        self.stride, self.replay_segments, self.reg_weight = stride, replay_segments, reg_weight
        self.buffer: deque[Shard] = deque(maxlen=buffer_segments)
        self.fresh: list[Shard] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.gate, self.gate_k, self.min_updates = gate, gate_k, min_updates
        self.patience, self.pause_rounds = patience, pause_rounds
        self.round_seconds = round_seconds  # C_round charged instead of measured (replays)
        self.num_rounds = 0
        self.paused_until = 0
        self.failed_checks = 0
        self.update_seconds = 0.0  # everything adaptation adds (segments + updates)
        self.history: list[UpdateRecord] = []
        self._last_update_end: float | None = None

    def _served(self) -> int:
        return int(np.argmax(self.weights.weights))

    # ------------------------------------------------------------------ data

    def _segment(self, context: Sequence[int], path: Sequence[int]) -> Shard | None:
        """States after ``c-1 .. c-1+L`` tokens and the tokens read between them, or None."""
        c, n = len(context), len(path)
        if self.target is None or c < 2 or n < 1:
            return None
        seq = [*context, *path]
        try:
            hidden = self.target.hidden_states(n + 1, ids=seq[: c - 1 + n])  # [L+1, H]
        except LookupError:
            return None
        ids = torch.tensor(seq[c - 2: c - 1 + n], dtype=torch.long)  # token read by each row
        nxt = torch.tensor(seq[c - 1: c + n], dtype=torch.long)  # the committed next tokens
        return Shard(ids, hidden.to(torch.bfloat16), nxt)

    def observe_target(
        self, context: Sequence[int], path: Sequence[int], target_logits: torch.Tensor
    ) -> None:
        t0 = time.perf_counter()
        seg = self._segment(context, path)
        if seg is not None:
            self.fresh.append(seg)
        self.num_rounds += 1
        self.update_seconds += time.perf_counter() - t0
        if self.num_rounds % self.stride == 0 and self.fresh:
            if self.num_rounds >= self.paused_until:
                self.update()
            else:
                self.buffer.extend(self.fresh)
                self.fresh = []

    # ------------------------------------------------------------------ learning

    def _loss(self, net: HeadNet, data: _Data) -> tuple[torch.Tensor, float]:
        loss, agree = unroll_loss(net, data, data.starts, 1, self.embedding, self.w_draft,
                                  self.draft_vocab, self.reg_weight)
        return loss, agree[0]

    def update(self) -> UpdateRecord:
        """One chunk: score every copy on the new segments, then a learner step each."""
        t0 = time.perf_counter()
        new = _Data(self.fresh, 1)
        served = self._served()
        with torch.no_grad():
            scored = [self._loss(c, new) for c in self.copies]
            _, frozen_agree = self._loss(self.frozen, new)
        replay: list[Shard] = []
        if self.buffer and self.replay_segments:
            pick = torch.randint(len(self.buffer), (self.replay_segments,),
                                 generator=self.generator).tolist()
            replay = [self.buffer[i] for i in pick]
        batch = _Data([*self.fresh, *replay], 1)
        for net, optimizer in zip(self.copies, self.optimizers, strict=True):
            if optimizer.lr == 0:
                continue
            params = list(net.parameters())
            loss, _ = self._loss(net, batch)
            grads = torch.autograd.grad(loss, params)
            if all(bool(torch.isfinite(g).all()) for g in grads):  # a diverged step is skipped
                optimizer.step([p.data for p in params], grads)
        self.weights.update([float(loss) for loss, _ in scored])
        self.net = self.copies[self._served()]
        self.buffer.extend(self.fresh)
        positions = int(len(new.starts))
        self.fresh = []
        now = time.perf_counter()
        seconds = now - t0
        self.update_seconds += seconds
        rec = UpdateRecord(self.num_rounds, positions, scored[served][1], frozen_agree,
                           float(scored[served][0]), seconds,
                           tuple(float(w) for w in self.weights.weights))
        self.history.append(rec)
        between = (self.stride * self.round_seconds if self.round_seconds is not None
                   else now - (self._last_update_end or t0) - seconds)
        rec.worth = self._net_gain(between)
        self._last_update_end = now
        return rec

    def _net_gain(self, between_s: float) -> bool | None:
        """The net-gain rule over the recent updates; with ``gate``, pauses learning after
        ``patience`` failures in a row (without, it only records the verdict)."""
        recent = self.history[-self.min_updates:]
        if len(self.history) < self.min_updates or between_s <= 0:
            return None
        pos = sum(r.positions for r in recent)
        a1 = sum(r.served_agree * r.positions for r in recent) / max(pos, 1)
        a0 = sum(r.frozen_agree * r.positions for r in recent) / max(pos, 1)
        cost = float(np.mean([r.seconds for r in recent]))
        ratio = expected_length(a1, self.gate_k) / max(expected_length(a0, self.gate_k), 1e-9)
        worth = ratio > 1 + cost / between_s
        self.failed_checks = 0 if worth else self.failed_checks + 1
        if self.gate and self.failed_checks >= self.patience:
            self.paused_until = self.num_rounds + self.pause_rounds
            self.failed_checks = 0
            log.info("%s: net gain %.3f below 1 + %.3f; pausing updates for %d rounds",
                     self.name, ratio, cost / between_s, self.pause_rounds)
        return worth

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "kind": self.kind, "head_sha256": self.meta.get("sha256"),
            "copies": [{k: v.detach().clone() for k, v in c.state_dict().items()}
                       for c in self.copies],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "weights": self.weights.state_dict(), "num_rounds": self.num_rounds,
            "paused_until": self.paused_until, "failed_checks": self.failed_checks,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise ConfigError(f"online head state is for {state.get('kind')!r} (version "
                              f"{state.get('version')!r}), not {self.kind!r}")
        if state.get("head_sha256") != self.meta.get("sha256"):
            raise ConfigError("online head state was learned from another head file")
        if len(state["copies"]) != len(self.copies):
            raise ConfigError("online head state has a different number of copies")
        for c, s in zip(self.copies, state["copies"], strict=True):
            c.load_state_dict(s)
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        self.weights.load_state_dict(state["weights"])
        self.num_rounds = int(state["num_rounds"])
        self.paused_until = int(state["paused_until"])
        self.failed_checks = int(state["failed_checks"])
        self.generator.set_state(state["generator"])
        self.net = self.copies[self._served()]

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` atomically (the replay buffer is not saved)."""
        atomic_torch_save(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch_load(path))
