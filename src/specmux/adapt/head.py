"""Adaptive heads: what an :class:`~specmux.adapt.drafter.AdaptiveLM` adds to the frozen
logits, and how it learns from the target's distributions.

One online round ``t`` (an update chunk) is a batch of verified positions
(:class:`~specmux.adapt.buffer.DistillBatch`), each with the drafter's hidden state ``h_i``,
its frozen logits on a candidate set and the target's (sparse) distribution ``p̃_i``; the
loss is ``f_t(θ) = mean_i KL(p̃_i ‖ q̃_θ(·|h_i))`` with ``q̃`` the adapted drafter's softmax on
the candidate set (:func:`~specmux.adapt.adapter.candidate_kl`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from specmux.adapt.adapter import (
    LowRankHeadAdapter,
    candidate_logprobs,
    distill_loss,
    kl_from_logprobs,
)
from specmux.adapt.base import OnlineOptimizer
from specmux.adapt.buffer import DistillBatch
from specmux.errors import ConfigError


class AdaptiveHead(ABC):
    """The learnable part of an adaptive drafter's head."""

    name: str

    @abstractmethod
    def logits(self, base_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Adapted logits [n, V] from the frozen logits [n, V] and hidden states [n, H]."""

    @abstractmethod
    def update(self, batch: DistillBatch) -> float:
        """One online round on a batch; returns the loss *before* the update (prequential)."""

    @abstractmethod
    def batch_logprobs(self, batch: DistillBatch) -> torch.Tensor:
        """The adapted drafter's log-probabilities ``log q̃`` on the batch's candidates
        [n, C] (normalized over the candidates plus the frozen tail)."""

    @torch.no_grad()
    def loss(self, batch: DistillBatch) -> float:
        """The current candidate-set distillation loss on a batch (no update)."""
        return float(kl_from_logprobs(self.batch_logprobs(batch), batch.prob))

    @torch.no_grad()
    def dense_loss(self, base_logits: torch.Tensor, hidden: torch.Tensor,
                   target_idx: torch.Tensor, target_prob: torch.Tensor) -> float:
        """The exact full-vocabulary ``KL(p̃ ‖ q)`` (for evaluation)."""
        return float(distill_loss(self.logits(base_logits, hidden), target_idx, target_prob))

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdaptedHead(AdaptiveHead):
    """One adapter trained by one optimizer: ``z = W h + Δz_θ(h)``,
    ``θ <- optimizer(θ, ∇f_t(θ))``."""

    def __init__(self, adapter: LowRankHeadAdapter, optimizer: OnlineOptimizer) -> None:
        self.adapter = adapter
        self.optimizer = optimizer
        self.name = optimizer.name
        self.num_skipped = 0  # steps skipped for a non-finite gradient

    def logits(self, base_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return base_logits.float() + self.adapter(hidden)

    def batch_logprobs(self, batch: DistillBatch) -> torch.Tensor:
        logits = batch.z0 + self.adapter.delta_at(batch.hidden, batch.idx)
        tail_delta = (None if batch.tail_idx is None
                      else self.adapter.delta_at(batch.hidden, batch.tail_idx))
        return candidate_logprobs(logits, batch.tail, tail_delta)

    def update(self, batch: DistillBatch) -> float:
        if self.optimizer.lr == 0:  # a frozen member: score only
            return self.loss(batch)
        params = self.adapter.trainable()
        with torch.inference_mode(False), torch.enable_grad():
            loss = kl_from_logprobs(self.batch_logprobs(batch), batch.prob)
            grads = torch.autograd.grad(loss, params)
        if all(bool(torch.isfinite(g).all()) for g in grads):
            self.optimizer.step(params, grads)
        else:  # never step into NaN/inf: the drafter must keep serving proper distributions
            self.num_skipped += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "single",
            "adapter": {k: v.detach().clone() for k, v in self.adapter.state_dict().items()},
            "learner": self.optimizer.state_dict(),  # key kept: saved states load
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "single":
            raise ConfigError(f"not a single-adapter state: kind={state.get('kind')!r}")
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["learner"])
