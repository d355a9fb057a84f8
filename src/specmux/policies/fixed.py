"""FixedPolicy: always the same arm (the no-learning baseline).

    a_t = arm   for every round t

Example:

>>> from specmux.types import Feedback
>>> policy = FixedPolicy(3, arm=2)
>>> policy.select()
2
>>> policy.update(Feedback(arm=2, k=4, max_k=4, num_draft_tokens=4, num_accepted_tokens=1))
>>> policy.select(), policy.t, policy.probabilities().tolist()
(2, 1, [0.0, 0.0, 1.0])
"""

from __future__ import annotations

from typing import ClassVar

from specmux.errors import ConfigError
from specmux.policies.base import Policy
from specmux.types import Feedback


class FixedPolicy(Policy):
    """Always plays ``arm`` (default 0); learns nothing but counts rounds."""

    name: ClassVar[str] = "fixed"

    def __init__(self, num_arms: int, *, arm: int = 0, seed: int = 0) -> None:
        if not 0 <= arm < num_arms:
            raise ConfigError(f"fixed arm must be in [0, {num_arms}), got {arm}")
        self.arm = int(arm)
        super().__init__(num_arms, seed=seed)

    def select(self) -> int:
        return self.arm

    def peek(self) -> int:
        return self.arm

    def update(self, feedback: Feedback) -> None:
        self.t += 1

    def reset(self) -> None:
        self.t = 0
