"""The policy protocol: an online learner that picks, each round, which arm drafts.

An *arm* is a ``(drafter, k)`` pair, so one learner can choose the drafter, the speculation
length, or both.  A policy sees only the past, so whatever it picks, the output stays
lossless.  The round loop is::

    arm = policy.select()          # before drafting
    ...draft, verify...
    policy.update(feedback)        # a specmux.types.Feedback

Bandit policies read the chosen arm's realized result (``feedback.reward``,
``feedback.divergence``); full-information policies (``full_information = True``) read
``feedback.losses``, loss vectors over all arms computed counterfactually by
:mod:`specmux.feedback`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from specmux.errors import ConfigError
from specmux.types import Feedback


@dataclass(frozen=True)
class Arm:
    """One choice a policy can make: which drafter drafts, and how many tokens."""

    drafter: str
    k: int

    def __str__(self) -> str:
        return f"{self.drafter}@k={self.k}"


class Policy(ABC):
    """Base class: ``select`` / ``update`` / ``reset`` plus JSON-able state.

    Subclasses keep all learned state in plain attributes listed in ``_state_keys`` (numpy
    arrays or numbers), which makes ``state_dict``/``load_state_dict`` generic.
    """

    name: ClassVar[str]
    full_information: ClassVar[bool] = False
    _state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_arms: int, *, seed: int = 0) -> None:
        if num_arms < 1:
            raise ConfigError(f"a policy needs at least one arm, got {num_arms}")
        self.num_arms = num_arms
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.t = 0  # rounds seen since the last reset
        self.reset()

    @abstractmethod
    def select(self) -> int:
        """Index of the arm to play this round (depends only on the past)."""

    @abstractmethod
    def update(self, feedback: Feedback) -> None:
        """Learn from one round's feedback."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything learned (used by per-query reset mode)."""

    def probabilities(self) -> np.ndarray:
        """The current selection distribution over arms [num_arms] (for metrics and plots).

        Deterministic policies return a one-hot on the arm they would pick next.
        """
        probs = np.zeros(self.num_arms)
        probs[self.peek()] = 1.0
        return probs

    def peek(self) -> int:
        """The arm ``select`` would most likely return, without side effects."""
        return int(np.argmax(self.probabilities()))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable learned state, including the rng state (so selections resume)."""
        state: dict[str, Any] = {"policy": self.name, "num_arms": self.num_arms, "t": self.t,
                                 "rng": self.rng.bit_generator.state}
        for key in self._state_keys:
            value = getattr(self, key)
            state[key] = value.tolist() if isinstance(value, np.ndarray) else value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; raises ConfigError if it does not fit."""
        if state.get("policy") != self.name or state.get("num_arms") != self.num_arms:
            raise ConfigError(
                f"state is for policy {state.get('policy')!r} with {state.get('num_arms')} arms,"
                f" not {self.name!r} with {self.num_arms}"
            )
        self.t = int(state["t"])
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        for key in self._state_keys:
            current = getattr(self, key)
            value = state[key]
            setattr(self, key, np.asarray(value, dtype=float) if isinstance(current, np.ndarray)
                    else type(current)(value))


def softmax_weights(cumulative_loss: np.ndarray, eta: float) -> np.ndarray:
    """Exponential weights p_i ∝ exp(-eta * L_i), computed stably."""
    z = -eta * (cumulative_loss - cumulative_loss.min())
    w = np.exp(z)
    return w / w.sum()


def anytime_eta(num_arms: int, t: int) -> float:
    """Hedge's learning rate sqrt(8 ln N / t) for the current round count (anytime version)."""
    return math.sqrt(8.0 * math.log(max(num_arms, 2)) / max(t, 1))
