"""BanditSpec's released rule: UCB over arms with the measured tokens per second as reward.

The official code (sail-sg/BanditSpec) differs from the paper's UCBSpec: it runs UCB over
the speculation length ``k`` and rewards each round with the tokens it produced divided by
the wall-clock seconds it took.  Here, with ``r_t = Y_t / s_t`` (``Y = accepted + 1``,
``s`` the round's seconds from ``feedback.seconds``) and ``R`` the largest ``r`` seen so far:

    a_t = argmax_i  mean_i(r) / R + c * sqrt(ln t / n_i)       (each arm played once first)

Dividing by ``R`` keeps the index on UCB's [0, 1] scale while the raw sums stay in tokens/s.
Note that ``mean_i(r)`` is a mean of per-round ratios, not the arm's throughput
``sum Y / sum s`` (a ratio of expectations): a known bias of this rule, kept as the
baseline it is.  Without ``seconds`` (e.g. a simulator without costs) a round counts as one
second, i.e. the reward is tokens per round.

Example:

>>> from specmux.types import Feedback
>>> policy = BanditSpecTime(2)
>>> for _ in range(100):  # arm 0: 3 tokens in 0.2 s; arm 1: 5 tokens in 0.5 s (fewer tokens/s)
...     arm = policy.select()
...     policy.update(Feedback(arm=arm, k=4, max_k=4, num_draft_tokens=4,
...                            num_accepted_tokens=2 + 2 * arm, seconds=0.2 + 0.3 * arm))
>>> policy.counts.tolist()
[96.0, 4.0]
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from specmux.policies.ucb import UCBSpec
from specmux.types import Feedback


class BanditSpecTime(UCBSpec):
    """UCB with a tokens-per-second reward (BanditSpec's official implementation)."""

    name: ClassVar[str] = "banditspec"
    _state_keys: ClassVar[tuple[str, ...]] = ("counts", "sums", "rate_max")

    def reset(self) -> None:
        super().reset()
        self.rate_max = 0.0  # largest tokens/s seen in one round

    def reward_of(self, feedback: Feedback) -> float:
        """Raw tokens per second of the round (not yet scaled)."""
        seconds = feedback.seconds if feedback.seconds and feedback.seconds > 0 else 1.0
        return feedback.tokens_per_round / seconds

    def peek(self) -> int:
        counts = self.counts
        if counts.min() <= 0.0:
            return int(np.argmin(counts))
        scale = self.rate_max if self.rate_max > 0 else 1.0
        index = self.sums / counts / scale + self.radius_scale() / np.sqrt(counts)
        return int(np.argmax(index))

    def update(self, feedback: Feedback) -> None:
        rate = self.reward_of(feedback)
        self.rate_max = max(self.rate_max, rate)
        self.t += 1
        self.counts[feedback.arm] += 1.0
        self.sums[feedback.arm] += rate
