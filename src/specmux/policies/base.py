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

from specmux.config import seed_entropy
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
        self.rng = np.random.default_rng(seed_entropy(seed))  # any 64-bit seed
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

    @property
    def reads_divergence(self) -> bool:
        """Whether :meth:`update` reads ``feedback.divergence`` (MetaSD's block reward), which
        a caller then computes; under greedy decoding it is the one use of the target's
        softmax."""
        return False

    def restart(self) -> None:
        """:meth:`reset`, and the random stream back to its seed: a fresh learner (per-query
        reset mode), so that a seeded query repeats exactly."""
        self.reset()
        if hasattr(self, "seed"):  # wrappers that skip __init__ have no stream of their own
            self.rng = np.random.default_rng(seed_entropy(self.seed))

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
        """Restore what ``state_dict`` returned; raises ConfigError if it does not fit.

        Everything is checked before anything changes: the policy name and arm count, each
        learned array's shape (that of this pool) and finiteness (``|x| <= MAX_STATE_VALUE``),
        integer counters, the rng state, and the policy's own invariants
        (:meth:`check_state`).  A rejected state leaves the policy as it was.
        """
        if not isinstance(state, dict):
            raise ConfigError(f"policy state must be a JSON object, got {type(state).__name__}")
        if state.get("policy") != self.name or state.get("num_arms") != self.num_arms:
            raise ConfigError(
                f"state is for policy {state.get('policy')!r} with {state.get('num_arms')} arms,"
                f" not {self.name!r} with {self.num_arms}"
            )
        values = {"t": _state_int(state.get("t"), "t")}
        for key in self._state_keys:
            if key not in state:
                raise ConfigError(f"policy state lacks {key!r}")
            values[key] = _state_value(getattr(self, key), state[key], key)
        rng = None
        if "rng" in state:
            rng = np.random.default_rng()
            try:
                rng.bit_generator.state = state["rng"]
            except Exception as e:  # noqa: BLE001 - numpy raises several types
                raise ConfigError(f"policy state has a bad rng state: {e}") from None
        self.check_state(values)
        for key, value in values.items():
            setattr(self, key, value)
        if rng is not None:
            self.rng = rng

    def check_state(self, values: dict[str, Any]) -> None:
        """Policy-specific checks of a state about to be loaded (ConfigError if unusable)."""
        _ = values  # the generic checks of load_state_dict are enough here


MAX_STATE_VALUE = 1e15  # learned sums and counts beyond this are not from a real run


def _state_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise ConfigError(f"policy state {key!r} must be an integer in [0, 2**53], "
                          f"got {str(value)[:40]}")
    return value


def _state_value(current: Any, value: Any, key: str) -> Any:
    """``value`` checked against the shape and type of the attribute it replaces."""
    if not isinstance(current, np.ndarray):
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"policy state {key!r} must be true or false")
            return value
        if isinstance(current, int):
            return _state_int(value, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value) or abs(value) > MAX_STATE_VALUE:
            raise ConfigError(f"policy state {key!r} must be a finite number")
        return type(current)(value)
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"policy state {key!r} must be a list of numbers") from None
    if arr.shape != current.shape:
        raise ConfigError(f"policy state {key!r} has shape {list(arr.shape)}, this pool needs "
                          f"{list(current.shape)}")
    flat = value if isinstance(value, list) else [value]
    if (any(isinstance(v, bool) or not isinstance(v, int | float) for v in flat)
            or not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > MAX_STATE_VALUE)):
        raise ConfigError(f"policy state {key!r} must hold finite numbers")
    return arr


def softmax_weights(cumulative_loss: np.ndarray, eta: float) -> np.ndarray:
    """Exponential weights p_i ∝ exp(-eta * L_i), computed stably."""
    z = -eta * (cumulative_loss - cumulative_loss.min())
    w = np.exp(z)
    return w / w.sum()


def anytime_eta(num_arms: int, t: int) -> float:
    """Hedge's learning rate sqrt(8 ln N / t) for the current round count (anytime version)."""
    return math.sqrt(8.0 * math.log(max(num_arms, 2)) / max(t, 1))
