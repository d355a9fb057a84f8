"""MetaSD's UCB drafter selection, with the block-divergence reward and non-stationary variants.

    a_t = argmax_i  mean_i + beta * sqrt(2 ln n / n_i)      (each arm played once first)

``reward="divergence"`` (default) learns from ``r = (1/N_max) sum_j (1 - TV(p_j, q_ij))``
over all drafted positions (``feedback.divergence``; ``feedback.reward`` when it is None),
a denser signal than ``reward="efficiency"``: ``r = accepted / k``.  Variants for changing
workloads (at most one):

* ``discount=g`` (discounted UCB): ``n_i <- g n_i + 1[i = a_t]``, ``s_i <- g s_i + r 1[i = a_t]``;
* ``window=W`` (sliding-window UCB): ``n_i``, ``s_i`` over the last ``W`` rounds only;

and ``n = sum_i n_i`` (the plain round count without a variant).

Example:

>>> from specmux.types import Feedback
>>> policy = MetaSDUCB(2, beta=0.5, window=8)
>>> for t in range(40):                      # arm 0 is better for 20 rounds, then arm 1
...     arm = policy.select()
...     good = (arm == 0) == (t < 20)
...     policy.update(Feedback(arm=arm, k=4, max_k=4, num_draft_tokens=4,
...                            num_accepted_tokens=0, divergence=0.9 if good else 0.1))
>>> policy.select(), float(policy.counts.sum())
(1, 8.0)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from specmux.errors import ConfigError
from specmux.policies.ucb import UCBSpec
from specmux.types import Feedback

REWARDS = ("divergence", "efficiency")


class MetaSDUCB(UCBSpec):
    """UCB with MetaSD's reward; optional discounting or a sliding window."""

    name: ClassVar[str] = "metasd"
    _state_keys: ClassVar[tuple[str, ...]] = ("counts", "sums", "window_arms",
                                              "window_rewards", "window_pos")

    def __init__(self, num_arms: int, *, beta: float = 0.25, reward: str = "divergence",
                 discount: float | None = None, window: int | None = None,
                 seed: int = 0) -> None:
        if not (math.isfinite(beta) and beta >= 0.0):
            raise ConfigError(f"metasd beta must be finite and >= 0, got {beta}")
        if reward not in REWARDS:
            raise ConfigError(f"metasd reward must be one of {REWARDS}, got {reward!r}")
        if discount is not None and window is not None:
            raise ConfigError("metasd takes discount or window, not both")
        if discount is not None and not 0.0 < discount <= 1.0:
            raise ConfigError(f"metasd discount must be in (0, 1], got {discount}")
        if window is not None and window < 1:
            raise ConfigError(f"metasd window must be >= 1, got {window}")
        self.beta, self.reward, self.discount, self.window = beta, reward, discount, window
        super().__init__(num_arms, c=beta * math.sqrt(2.0), seed=seed)

    def reset(self) -> None:
        super().reset()
        size = self.window or 0
        self.window_arms = np.full(size, -1.0)  # [W] arm per slot of the ring, -1 = empty
        self.window_rewards = np.zeros(size)  # [W]
        self.window_pos = 0  # next slot to overwrite

    def check_state(self, values: dict[str, Any]) -> None:
        super().check_state(values)
        arms, size = values["window_arms"], self.window or 0
        if np.any((arms != np.floor(arms)) | (arms < -1) | (arms >= self.num_arms)):
            raise ConfigError("metasd state 'window_arms' must hold arm indices or -1")
        if not 0 <= values["window_pos"] < max(size, 1):
            raise ConfigError(f"metasd state 'window_pos' must be in [0, {max(size, 1)})")

    @property
    def reads_divergence(self) -> bool:
        return self.reward == "divergence"

    def reward_of(self, feedback: Feedback) -> float:
        if self.reward == "efficiency":
            return feedback.num_accepted_tokens / feedback.k if feedback.k > 0 else 0.0
        return feedback.reward if feedback.divergence is None else float(feedback.divergence)

    def update(self, feedback: Feedback) -> None:
        r = self.reward_of(feedback)
        arm = feedback.arm
        self.t += 1
        if self.discount is not None:
            self.counts *= self.discount
            self.sums *= self.discount
        elif self.window is not None:
            old = int(self.window_arms[self.window_pos])
            if old >= 0:  # evict the oldest round
                self.counts[old] -= 1.0
                self.sums[old] -= self.window_rewards[self.window_pos]
                if self.counts[old] <= 0.0:
                    self.counts[old] = self.sums[old] = 0.0  # no float drift when emptied
            self.window_arms[self.window_pos] = arm
            self.window_rewards[self.window_pos] = r
            self.window_pos = (self.window_pos + 1) % self.window
        self.counts[arm] += 1.0
        self.sums[arm] += r
