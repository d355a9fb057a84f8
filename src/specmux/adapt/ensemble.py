"""Online ensemble (OnlineSpec's "Ens-"): several adapter copies, one learning rate each,
combined by exponential weights on their recent distillation loss.

No single step size is right for a drifting workload (dynamic regret: a large ``η`` tracks
drift, a small one averages noise), so ``m`` copies run in parallel with step sizes
``η_1 < … < η_m`` (a geometric grid) and a meta-learner weighs them:

    L_i <- γ L_i + ℓ_{t,i}                      ℓ_{t,i}: copy i's loss on the chunk's new positions
    w_i = exp(−L_i / τ) / Σ_j exp(−L_j / τ)      τ = 1.2 (OnlineSpec's temperature)

``L_i`` is copy i's *discounted* cumulative loss (``γ = 0.9``: about the last 10 update
chunks count, so the weights can move back when the workload changes).  The losses are
prequential: each copy is scored, before the update, on the chunk's *new* positions only
(replayed positions were trained on already and would reward the copies that overfit
them).  A copy with learning rate 0 is the frozen drafter itself: with it in the grid the
ensemble competes with "do not adapt", up to the meta-learner's regret.  The served drafter is
either the weighted mixture ``q = Σ_i w_i softmax(z_i)`` (``mode="mixture"``) or the copy
with the largest weight (``mode="best"``).  All copies share the frozen ``W h``; only their
low-rank parts differ, so ``m`` copies cost ``m`` small matmuls, not ``m`` drafters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from specmux.adapt.adapter import kl_from_logprobs
from specmux.adapt.buffer import DistillBatch
from specmux.adapt.head import AdaptedHead, AdaptiveHead
from specmux.errors import ConfigError


class ExpWeights:
    """Exponential weights over ``n`` experts on discounted cumulative losses.

    >>> w = ExpWeights(2, temperature=1.0, discount=1.0)
    >>> w.update([0.0, 1.0]); [round(float(x), 3) for x in w.weights]
    [0.731, 0.269]
    """

    def __init__(self, n: int, temperature: float = 1.2, discount: float = 0.9) -> None:
        if n < 1:
            raise ConfigError(f"need at least one expert, got {n}")
        if not temperature > 0 or not 0 < discount <= 1:
            raise ConfigError(f"need temperature > 0 and 0 < discount <= 1, got "
                              f"{temperature}, {discount}")
        self.temperature, self.discount = float(temperature), float(discount)
        self.cum_loss = np.zeros(n)

    def update(self, losses: Sequence[float]) -> None:
        """Add one round's losses; a non-finite loss (a diverged expert) counts as +inf."""
        ell = np.nan_to_num(np.asarray(losses, dtype=float), nan=np.inf, posinf=np.inf)
        self.cum_loss = self.discount * self.cum_loss + ell

    @property
    def weights(self) -> np.ndarray:
        finite = np.isfinite(self.cum_loss)
        if not finite.any():
            return np.full(len(self.cum_loss), 1 / len(self.cum_loss))
        z = np.where(finite, -(self.cum_loss - self.cum_loss[finite].min()) / self.temperature,
                     -np.inf)
        w = np.exp(z)
        return w / w.sum()

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "discount": self.discount,
                "cum_loss": self.cum_loss.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature, self.discount = float(state["temperature"]), float(state["discount"])
        self.cum_loss = np.asarray(state["cum_loss"], dtype=float)


class EnsembleHead(AdaptiveHead):
    """Copies of an adapted head (different learning rates) under exponential weights."""

    def __init__(
        self,
        members: Sequence[AdaptedHead],
        *,
        temperature: float = 1.2,
        discount: float = 0.9,
        mode: str = "mixture",
    ) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        if mode not in ("mixture", "best"):
            raise ConfigError(f"mode must be 'mixture' or 'best', got {mode!r}")
        self.members = list(members)
        self.meta = ExpWeights(len(self.members), temperature, discount)
        self.mode = mode
        self.name = "ens"

    @property
    def weights(self) -> np.ndarray:
        return self.meta.weights

    def _best(self) -> AdaptedHead | None:
        if self.mode == "best" or len(self.members) == 1:
            return self.members[int(np.argmax(self.weights))]
        return None

    def logits(self, base_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        best = self._best()
        if best is not None:
            return best.logits(base_logits, hidden)
        # log sum_i w_i softmax(z_i), computed stably in log space.
        logs = [
            torch.log_softmax(m.logits(base_logits, hidden), dim=-1) + float(np.log(wi))
            for m, wi in zip(self.members, self.weights, strict=True) if wi > 0
        ]
        return torch.logsumexp(torch.stack(logs), dim=0)

    def batch_logprobs(self, batch: DistillBatch) -> torch.Tensor:
        best = self._best()
        if best is not None:
            return best.batch_logprobs(batch)
        logs = [m.batch_logprobs(batch) + float(np.log(wi))
                for m, wi in zip(self.members, self.weights, strict=True) if wi > 0]
        return torch.logsumexp(torch.stack(logs), 0)  # log sum_i w_i q_i

    def update(self, batch: DistillBatch) -> float:
        # The weights must see out-of-sample losses: score every copy on the rows that none
        # has trained on yet (replayed rows would favour the copies that overfit them).
        fresh = batch.rows(batch.num_new) if batch.num_new else batch
        with torch.no_grad():
            before = float(kl_from_logprobs(self.batch_logprobs(batch), batch.prob))
            scores = [m.loss(fresh) for m in self.members]
        for m in self.members:
            m.update(batch)
        self.meta.update(scores)
        return before

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "ensemble", "mode": self.mode, "meta": self.meta.state_dict(),
                "members": [m.state_dict() for m in self.members]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "ensemble" or len(state["members"]) != len(self.members):
            raise ConfigError("state does not match this ensemble (kind or number of members)")
        self.mode = state["mode"]
        self.meta.load_state_dict(state["meta"])
        for m, s in zip(self.members, state["members"], strict=True):
            m.load_state_dict(s)
