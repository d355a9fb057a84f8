"""EXP3Spec (BanditSpec): exponential weights on importance-weighted loss estimates.

With ``Y = accepted + 1`` tokens per round (``Y`` in [1, L + 1], ``L = max_k``) and ``p_t`` the
distribution the arm was drawn from, only the played arm ``a_t`` gets a loss estimate:

    Z_i  = 1[i = a_t] * (L + 1 - Y) / (L * p_t,i)
    eta_t = sqrt(ln K / (t K))              (t = 1, 2, ... the round being played)
    p_t,i ∝ exp(-eta_t * sum_{s<t} Z_s,i)

Normalization: ``(L + 1 - Y) / L = 1 - accepted / L`` is the loss scaled to [0, 1] (0 when
every one of ``L`` drafted tokens is accepted, 1 when none is), and dividing by ``p_t,i``
makes ``Z`` unbiased for that loss for every arm.  ``eta`` overrides ``eta_t`` with a
constant.  Arms are drawn with ``self.rng``.

Example:

>>> from specmux.types import Feedback
>>> policy = EXP3Spec(2, seed=0)
>>> policy.probabilities().tolist()
[0.5, 0.5]
>>> for _ in range(200):                     # arm 1 always gets all 4 tokens accepted
...     arm = policy.select()
...     policy.update(Feedback(arm=arm, k=4, max_k=4, num_draft_tokens=4,
...                            num_accepted_tokens=4 * arm))
>>> bool(policy.probabilities()[1] > 0.9)
True
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from specmux.errors import ConfigError
from specmux.policies.base import Policy, softmax_weights
from specmux.types import Feedback


class EXP3Spec(Policy):
    """EXP3 with BanditSpec's normalized loss and anytime learning rate."""

    name: ClassVar[str] = "exp3"
    _state_keys: ClassVar[tuple[str, ...]] = ("cumulative_loss",)

    def __init__(self, num_arms: int, *, eta: float | None = None, seed: int = 0) -> None:
        if eta is not None and not (math.isfinite(eta) and eta > 0.0):
            raise ConfigError(f"exp3 learning rate eta must be finite and > 0, got {eta}")
        self.eta = eta
        super().__init__(num_arms, seed=seed)

    def reset(self) -> None:
        self.t = 0
        self.cumulative_loss = np.zeros(self.num_arms)  # [num_arms] sum of Z estimates

    def learning_rate(self) -> float:
        """``eta`` if given, else ``sqrt(ln K / (t K))`` for the round about to be played."""
        if self.eta is not None:
            return self.eta
        k = self.num_arms
        return math.sqrt(math.log(k) / ((self.t + 1) * k))

    def probabilities(self) -> np.ndarray:
        return softmax_weights(self.cumulative_loss, self.learning_rate())

    def select(self) -> int:
        probs = self.probabilities()
        # Inverse-CDF draw: one uniform from self.rng, no per-arm Python loop.
        cdf = np.cumsum(probs)
        return int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))

    def update(self, feedback: Feedback) -> None:
        # select() changes no state, so this is the distribution the arm was drawn from.
        p = float(self.probabilities()[feedback.arm])
        max_k = max(feedback.max_k, 1)
        loss = (max_k + 1 - feedback.tokens_per_round) / max_k
        self.cumulative_loss[feedback.arm] += loss / max(p, 1e-300)
        self.t += 1
