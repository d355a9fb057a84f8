"""Speculative-decoding counters with vLLM's names, and the formulas derived from them.

Counters (as vLLM's ``SpecDecodingStats``):

* ``num_drafts``: verification rounds (target forward passes), one per round, also when the
  drafter had nothing to propose, so that every target call is counted;
* ``num_draft_tokens``: drafted tokens sent to verification;
* ``num_accepted_tokens``: drafted tokens accepted;
* ``num_accepted_tokens_per_pos[j]``: rounds whose draft token at position ``j`` was accepted.

Derived:

* ``acceptance_rate = num_accepted_tokens / num_draft_tokens``;
* ``mean_acceptance_length = 1 + num_accepted_tokens / num_drafts``: tokens per target call,
  bonus/recovered token included (HedgeSpec's MAT).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specmux.types import Step


@dataclass
class SpecStats:
    """Running counters over one or many queries."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    drafter_selections: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    learner_seconds: float = 0.0
    # Counterfactual losses per arm (full-information runs): regret vs best fixed arm.
    arm_loss_sum: np.ndarray | None = None  # [num_arms]
    chosen_loss_sum: float = 0.0
    played_loss_sum: np.ndarray | None = None  # [num_arms]: loss[a] over rounds a played
    num_scored_rounds: int = 0

    def record(self, step: Step) -> None:
        """Add one round."""
        self.num_drafts += 1
        self.num_draft_tokens += step.num_draft_tokens
        self.num_accepted_tokens += step.num_accepted_tokens
        if len(self.num_accepted_tokens_per_pos) < step.num_draft_tokens:
            pad = step.num_draft_tokens - len(self.num_accepted_tokens_per_pos)
            self.num_accepted_tokens_per_pos.extend([0] * pad)
        for j in range(step.num_accepted_tokens):
            self.num_accepted_tokens_per_pos[j] += 1
        self.num_output_tokens += len(step.tokens)
        self.drafter_selections[step.drafter] += 1
        self.seconds += step.seconds
        self.draft_seconds += step.draft_seconds
        self.verify_seconds += step.verify_seconds
        self.learner_seconds += step.learner_seconds

    def record_losses(self, arm: int, losses: np.ndarray) -> None:
        """Add one round's counterfactual loss vector, ``arm`` being the arm played then."""
        if self.arm_loss_sum is None:
            self.arm_loss_sum = np.zeros(len(losses))
            self.played_loss_sum = np.zeros(len(losses))
        self.arm_loss_sum += losses
        self.chosen_loss_sum += float(losses[arm])
        self.played_loss_sum[arm] += losses[arm]  # type: ignore[index]
        self.num_scored_rounds += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_output_tokens / self.seconds if self.seconds else 0.0

    @property
    def regret(self) -> float:
        """Counterfactual regret vs the best fixed arm in hindsight, in loss units."""
        if self.arm_loss_sum is None:
            return 0.0
        return self.chosen_loss_sum - float(self.arm_loss_sum.min())

    @property
    def oracle_arm(self) -> int | None:
        """The best fixed arm in hindsight (lowest counterfactual loss), if scored."""
        return None if self.arm_loss_sum is None else int(np.argmin(self.arm_loss_sum))

    def selection_share(self) -> dict[str, float]:
        total = sum(self.drafter_selections.values())
        return {k: v / total for k, v in sorted(self.drafter_selections.items())} if total else {}

    def summary(self) -> dict[str, Any]:
        """Plain-dict view (JSON-able) with counters and derived metrics."""
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
            "num_output_tokens": self.num_output_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "learner_seconds": self.learner_seconds,
            "drafter_share": self.selection_share(),
            "regret": self.regret,
            "oracle_arm": self.oracle_arm,
        }
