"""Optimistic online gradient descent (Chiang et al. 2012; Rakhlin & Sridharan 2013).

It keeps a *lazy* iterate ``y`` next to the played point ``x`` and plays one step ahead
along a hint ``M`` of the next gradient:

    y_{t+1} = Π(y_t − η g_t)                 g_t = ∇f_t(x_t), the gradient at the played point
    x_{t+1} = Π(y_{t+1} − η M_{t+1})         M_{t+1} = g_t  (the last gradient as the hint)

with ``y_1 = x_1`` and ``M_1 = 0``.  Unconstrained, this is ``x_{t+1} = x_t − 2η g_t + η g_{t−1}``
= a gradient step plus the extrapolation ``−η (g_t − g_{t−1})``.  Regret ≤ D²/(2η) +
η Σ_t ‖g_t − M_t‖²: it replaces OGD's ``Σ ‖g_t‖²`` by the hint errors, so slowly varying
gradients (a stable domain stream) allow a larger step for the same regret, and perfect hints
make the regret independent of T.

OnlineSpec's released code realizes "Opt-" as SGD with momentum 0.9, the momentum buffer
kept across update chunks.  Heavy-ball momentum (``x_{t+1} = x_t − η g_t + β (x_t − x_{t−1})``)
also reuses past gradients, but it is a different rule; this module implements the optimistic
update itself, with ``y`` kept across update chunks (and in ``state_dict``; ``M`` needs no
storage: it is ``(y − x)/η``).
``step(..., hint=...)`` overrides ``M_{t+1}`` (e.g. an oracle hint in tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specmux.adapt.base import OnlineOptimizer, project_


class OptimisticOGD(OnlineOptimizer):
    """Optimistic OGD with the last gradient as the hint (see the module docstring)."""

    name = "opt"

    def __init__(self, lr: float, max_norm: float | None = None) -> None:
        super().__init__(lr, max_norm)
        self.y: list[torch.Tensor] | None = None  # lazy iterate (x_t = y_t − η M_t)

    @torch.no_grad()
    def step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        hint: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if self.y is None:  # y_1 = x_1
            self.y = [x.detach().clone() for x in params]
        next_hint = grads if hint is None else hint
        for x, y, g, m in zip(params, self.y, grads, next_hint, strict=True):
            project_(y.sub_(g, alpha=self.lr), self.max_norm)  # y_{t+1}
            project_(x.copy_(y).sub_(m, alpha=self.lr), self.max_norm)  # x_{t+1}
        self.num_steps += 1

    def reset(self) -> None:
        super().reset()
        self.y = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["y"] = None if self.y is None else [t.clone() for t in self.y]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.y = None if state["y"] is None else [t.clone() for t in state["y"]]
