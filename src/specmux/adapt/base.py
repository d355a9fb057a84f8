"""The online-optimizer protocol for adapter parameters.

(Named apart from the drafter-selection *learners* of :mod:`specmux.policies`.)  An
optimizer owns the update rule, not the parameters: ``step(params, grads)`` moves the
*played* point ``x_t`` (the tensors the drafter serves with) in place, given the gradient
``g_t = ∇f_t(x_t)`` of this round's loss at that point.  Optimizers may keep state (the lazy
iterate and hint of optimistic OGD); it survives across update chunks and is saved with
``state_dict``.

The feasible set is the product of Frobenius balls ``‖x_i‖ ≤ max_norm`` (one per tensor;
``None`` = unconstrained), and ``Π`` below is the Euclidean projection onto it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from specmux.errors import ConfigError


def project_(tensor: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """In place: ``x <- x * min(1, max_norm / ‖x‖)`` (projection onto the ball)."""
    if max_norm is not None:
        norm = float(tensor.norm())
        if norm > max_norm:
            tensor.mul_(max_norm / norm)
    return tensor


class OnlineOptimizer(ABC):
    """Updates a fixed list of tensors from their gradients, one round at a time."""

    name: str

    def __init__(self, lr: float, max_norm: float | None = None) -> None:
        if not lr >= 0:  # lr = 0: an optimizer that never moves (the frozen expert of an ensemble)
            raise ConfigError(f"learning rate must be >= 0, got {lr}")
        if max_norm is not None and not max_norm > 0:
            raise ConfigError(f"max_norm must be > 0 or None, got {max_norm}")
        self.lr = float(lr)
        self.max_norm = max_norm
        self.num_steps = 0

    @abstractmethod
    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Move ``params`` (the played point ``x_t``) in place given ``grads = ∇f_t(x_t)``."""

    def reset(self) -> None:
        """Forget the optimizer's state (not the parameters)."""
        self.num_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "max_norm": self.max_norm,
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"state is for learner {state.get('name')!r}, not {self.name!r}")
        self.lr = float(state["lr"])
        self.max_norm = state["max_norm"]
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr:g}, max_norm={self.max_norm})"
