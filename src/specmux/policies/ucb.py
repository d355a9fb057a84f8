"""UCBSpec (BanditSpec): optimism in the face of uncertainty over speculative configurations.

Each arm is played once; afterwards the round-``t`` arm is

    a_t = argmax_i  mean_i + c * sqrt(ln t / n_i)

with ``mean_i`` the average reward of arm ``i`` over its ``n_i`` plays and ``t`` the total
number of plays.  The reward is ``feedback.reward = Y / (L + 1)``, tokens per round
``Y = accepted + 1`` scaled to [0, 1] by the largest ``k`` (``L = max_k``).  The paper's
radius ``L * sqrt(ln t / n_i)`` in raw token units is ``L / (L + 1) * sqrt(ln t / n_i)`` on
this scale, so ``c = 1`` matches it up to a factor ``< 1.25`` for ``L >= 4``.  Ties go to the
lowest index, which makes the policy deterministic.

Example:

>>> from specmux.types import Feedback
>>> policy = UCBSpec(2)
>>> for _ in range(20):         # arm 1 gets all 4 tokens accepted, arm 0 none
...     arm = policy.select()
...     policy.update(Feedback(arm=arm, k=4, max_k=4, num_draft_tokens=4,
...                            num_accepted_tokens=4 * arm))
>>> policy.select(), policy.counts.tolist()
(1, [1.0, 19.0])
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from specmux.errors import ConfigError
from specmux.policies.base import Policy
from specmux.types import Feedback


class UCBSpec(Policy):
    """UCB over arms with the normalized tokens-per-round reward (BanditSpec's UCBSpec).

    ``counts``/``sums`` hold per-arm plays and reward totals; subclasses change the reward
    (:meth:`reward_of`), the radius scale (:meth:`radius_scale`) or the bookkeeping.
    """

    name: ClassVar[str] = "ucb"
    _state_keys: ClassVar[tuple[str, ...]] = ("counts", "sums")

    def __init__(self, num_arms: int, *, c: float = 0.35, seed: int = 0) -> None:
        if not (math.isfinite(c) and c >= 0.0):
            raise ConfigError(f"ucb exploration scale c must be finite and >= 0, got {c}")
        self.c = float(c)
        super().__init__(num_arms, seed=seed)

    def reset(self) -> None:
        self.t = 0
        self.counts = np.zeros(self.num_arms)  # [num_arms] plays (possibly discounted)
        self.sums = np.zeros(self.num_arms)  # [num_arms] reward totals

    def check_state(self, values: dict[str, Any]) -> None:
        if np.any(values["counts"] < 0):
            raise ConfigError("ucb state 'counts' must be >= 0")

    def reward_of(self, feedback: Feedback) -> float:
        """The reward in [0, 1] this policy learns from."""
        return feedback.reward

    def radius_scale(self) -> float:
        """The radius is ``radius_scale() / sqrt(n_i)``: here ``c * sqrt(ln t)``."""
        return self.c * math.sqrt(math.log(max(float(self.counts.sum()), 1.0)))

    def peek(self) -> int:
        counts = self.counts
        if counts.min() <= 0.0:  # play every arm once, lowest index first
            return int(np.argmin(counts))
        index = self.sums / counts + self.radius_scale() / np.sqrt(counts)
        return int(np.argmax(index))

    def select(self) -> int:
        return self.peek()

    def update(self, feedback: Feedback) -> None:
        self.t += 1
        self.counts[feedback.arm] += 1.0
        self.sums[feedback.arm] += self.reward_of(feedback)
