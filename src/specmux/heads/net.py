"""The draft head: a small network on the target's own final hidden states (Hydra/EAGLE).

One drafting step (EAGLE's feature-level autoregression, Hydra's MLP):

    f_{t+1} = h_t + MLP([norm(h_t); norm(e(x_{t+1}))])        h_t: [H] target state at t
    q(x_{t+2}) = softmax(W_d f_{t+1})                          W_d: [V_d, H] frozen LM-head rows

``h_t`` is the target's final-layer state (the LM head's input) after ``x_{≤t}``, ``e`` the
target's frozen input embedding.  The next step feeds the *predicted* feature back:
``f_{t+2} = f_{t+1} + MLP([norm(f_{t+1}); norm(e(x_{t+2}))])``.  ``W_d`` holds the LM-head
rows of a reduced draft vocabulary (EAGLE-3: the most frequent tokens), so a step costs
``V_d · H`` multiply-adds instead of ``V · H``; tokens outside it get draft probability 0,
which verification handles like any other ``q``.

Only the MLP is trained (a few M parameters); the target's embedding and LM head stay frozen
and are not stored with the head.
"""

from __future__ import annotations

import torch
from torch import nn


class HeadNet(nn.Module):
    """``f' = f + W_out silu(W_in [norm(f); norm(e)])`` with ``num_blocks`` residual MLP blocks.

    ``hidden_size`` H (the target's), ``inner`` the MLP width.  The output projection starts
    at zero, so an untrained head predicts ``f' = f``.
    """

    def __init__(self, hidden_size: int, inner: int = 1024, num_blocks: int = 1) -> None:
        super().__init__()
        self.hidden_size, self.inner, self.num_blocks = hidden_size, inner, num_blocks
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-6)
        self.norm_e = nn.RMSNorm(hidden_size, eps=1e-6)
        self.fc_in = nn.Linear(2 * hidden_size, inner)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(inner, inner)) for _ in range(num_blocks - 1)
        )
        self.fc_out = nn.Linear(inner, hidden_size)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, f: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``f`` [B, H] feature (target state or the previous prediction), ``e`` [B, H] the
        next token's embedding -> [B, H] predicted next feature."""
        z = self.fc_in(torch.cat([self.norm_f(f), self.norm_e(e)], dim=-1))  # [B, inner]
        for block in self.blocks:
            z = z + block(z)
        return f + self.fc_out(nn.functional.silu(z))

    def config(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "inner": self.inner,
                "num_blocks": self.num_blocks}


def draft_logits(feature: torch.Tensor, w_draft: torch.Tensor) -> torch.Tensor:
    """[B, H] features -> [B, V_d] logits over the draft vocabulary."""
    return feature @ w_draft.T
