"""Hedge (HedgeSpec): exponential weights on full-information (counterfactual) losses.

    w_i ∝ exp(-eta * L_i),   L_i = sum of every loss vector received so far, entry i
    eta = sqrt(8 ln N / n)   (anytime; n = loss vectors seen), or a fixed ``eta``

``feedback.losses`` holds 0..n loss vectors [num_arms] per update (delayed feedback from
:class:`specmux.feedback.CounterfactualTracker`); each is added.  Until the first one
arrives the weights are uniform.  ``selection="sample"`` draws the arm from ``w`` with
``self.rng``; ``"argmax"`` plays the most likely arm (lowest index on ties).

Example:

>>> import numpy as np
>>> from specmux.types import Feedback
>>> policy = Hedge(3, seed=0)
>>> policy.probabilities().tolist()
[0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
>>> policy.update(Feedback(arm=0, k=4, max_k=4, num_draft_tokens=4, num_accepted_tokens=1,
...                        losses=(np.array([0.6, 0.2, 0.8]), np.array([0.6, 0.0, 1.0]))))
>>> policy.probabilities().round(3).tolist()
[0.106, 0.864, 0.03]
>>> Hedge(3, selection="argmax").select()
0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from specmux.errors import ConfigError
from specmux.policies.base import Policy, anytime_eta, softmax_weights
from specmux.types import Feedback

SELECTIONS = ("sample", "argmax")


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn from ``probs`` [N] with a single uniform (inverse CDF)."""
    cdf = np.cumsum(probs)
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


class FullInformationPolicy(Policy):
    """Shared by Hedge-style learners: ``probabilities()`` plus the ``selection`` rule."""

    full_information: ClassVar[bool] = True

    def __init__(self, num_arms: int, *, selection: str = "sample", seed: int = 0) -> None:
        if selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        super().__init__(num_arms, seed=seed)

    def select(self, allowed: np.ndarray | None = None) -> int:
        """The arm to play; with ``allowed`` [num_arms] (bool) only among those (the
        selector's cost hint, :meth:`specmux.selector.Selector.worth_starting`): their
        probabilities renormalized, or, where none has any (NormalHedge), the allowed arm
        of best :meth:`preference`."""
        probs = self.probabilities()
        if allowed is not None:
            probs = probs * allowed
            if not probs.sum() > 0.0:
                return int(np.argmax(np.where(allowed, self.preference(), -np.inf)))
        return int(np.argmax(probs)) if self.selection == "argmax" else draw(probs, self.rng)

    def preference(self) -> np.ndarray:
        """What the weights rank the arms by [num_arms], higher is better."""
        return self.probabilities()

    def ahead(self, losses: Sequence[np.ndarray]) -> FullInformationPolicy:
        """A copy of this learner that has also received ``losses`` (loss vectors
        [num_arms]): how it would rank and select were the provisional losses of rounds
        still on their way in (:meth:`specmux.feedback.CounterfactualTracker.provisional`;
        :meth:`specmux.selector.Selector.select` selects on it).  Its learned state is
        its own; its random stream is this one's (a draw from either moves both).  (A
        shallow copy with the state copied: a deep copy, random generator included, took
        80 µs, a tenth of the learner's time per round on llama.cpp.)"""
        ahead = copy.copy(self)
        for key in self._state_keys:  # what update() may change in place
            setattr(ahead, key, copy.copy(getattr(self, key)))
        ahead.update(Feedback(arm=0, k=0, max_k=1, num_draft_tokens=0, num_accepted_tokens=0,
                              losses=tuple(losses)))
        return ahead


class Hedge(FullInformationPolicy):
    """Exponential weights over counterfactual loss vectors (HedgeSpec's learner)."""

    name: ClassVar[str] = "hedge"
    _state_keys: ClassVar[tuple[str, ...]] = ("cumulative_loss", "num_losses")

    def __init__(self, num_arms: int, *, eta: float | None = None, selection: str = "sample",
                 seed: int = 0) -> None:
        if eta is not None and not (math.isfinite(eta) and eta > 0.0):
            raise ConfigError(f"hedge learning rate eta must be finite and > 0, got {eta}")
        self.eta = eta
        super().__init__(num_arms, selection=selection, seed=seed)

    def reset(self) -> None:
        self.t = 0
        self.cumulative_loss = np.zeros(self.num_arms)  # [num_arms]
        self.num_losses = 0  # loss vectors received

    def learning_rate(self) -> float:
        return self.eta if self.eta is not None else anytime_eta(self.num_arms, self.num_losses)

    def preference(self) -> np.ndarray:
        return -self.cumulative_loss

    def probabilities(self) -> np.ndarray:
        if self.num_losses == 0:
            return np.full(self.num_arms, 1.0 / self.num_arms)
        return softmax_weights(self.cumulative_loss, self.learning_rate())

    def update(self, feedback: Feedback) -> None:
        self.t += 1
        if feedback.losses:
            self.cumulative_loss += np.sum(feedback.losses, axis=0)
            self.num_losses += len(feedback.losses)
