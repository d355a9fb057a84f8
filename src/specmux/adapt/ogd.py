"""Online gradient descent (Zinkevich 2003): the plain optimizer and OSD's choice.

    x_{t+1} = Π(x_t − η g_t),   g_t = ∇f_t(x_t)

For convex losses with gradients bounded by G on a set of diameter D, the regret against any
fixed point is at most D²/(2η) + (η/2) Σ_t ‖g_t‖²  (≤ D G √T with η = D / (G √T)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specmux.adapt.base import OnlineOptimizer, project_


class OGD(OnlineOptimizer):
    """``x <- Π(x − η g)``; stateless apart from the step counter."""

    name = "ogd"

    @torch.no_grad()
    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        for x, g in zip(params, grads, strict=True):
            project_(x.sub_(g, alpha=self.lr), self.max_norm)
        self.num_steps += 1
