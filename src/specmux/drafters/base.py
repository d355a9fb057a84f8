"""The drafter protocol: propose k tokens; score a given path; learn from verified output."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from specmux.errors import ConfigError
from specmux.types import Draft, PathDistributions, SamplingParams


def check_confidence_threshold(threshold: float) -> float:
    """``threshold`` when it is a draft confidence threshold, in [0, 1) (0: drafts never end
    early), else :class:`~specmux.errors.ConfigError`."""
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"confidence_threshold must be in [0, 1), got {threshold}")
    return threshold


def unsure_rows(probs: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """[n] bool: the rows of a drafter's distributions ``probs`` [n, V] whose top
    probability is below ``threshold`` (a draft ends before such a row's token:
    :attr:`PathDistributions.stops`); ``None`` when the threshold is 0."""
    return probs.max(dim=-1).values < threshold if threshold else None


class Drafter(ABC):
    """A source of draft tokens.

    ``name`` identifies the drafter in metrics and traces.  ``vocab_size`` is set by drafters
    that produce distributions over a vocabulary (LM drafters): the engine checks it against
    the target's.  Model-free drafters are deterministic (``Draft.probs is None``).
    """

    name: str
    vocab_size: int | None = None
    # Drafts with a model's forward passes (costs a pass per drafted token): the engine
    # times it once before its first query (``SpeculativeDecoder`` cost calibration).
    model_based: bool = False

    @abstractmethod
    def propose(
        self,
        context: Sequence[int],
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        """Draft up to ``k`` tokens after ``context`` (fewer, even 0, if it has no guess)."""

    @abstractmethod
    def distributions(
        self, context: Sequence[int], path: Sequence[int], sampling: SamplingParams
    ) -> PathDistributions:
        """This drafter's next-token guesses at each position of ``path`` after ``context``.

        Row ``j`` is conditioned on ``context + path[:j]`` (used for counterfactual scoring).
        """

    def signal(self, context: Sequence[int], k: int) -> int | None:
        """How sure a cheap drafter is of its next draft of up to ``k`` tokens after
        ``context``: ``0`` no guess, ``1`` a weak one, ``2`` a strong one; ``None`` (the
        default) for drafters that give no signal.  A contextual selector
        (:mod:`specmux.selector`) keeps one learner per signal, so it must cost about as
        little as a proposal of a model-free drafter (well under a millisecond)."""
        return None

    def offer(self, context: Sequence[int], k: int) -> tuple[int | None, int | None]:
        """``(signal, length)``: :meth:`signal`, and how many tokens a proposal of up to
        ``k`` would have now (``None``: not known without drafting, as for an LM).  A
        cost-aware selector prices the drafter's arms by that length.  Model-free drafters
        answer both from one lookup."""
        return self.signal(context, k), None

    def backlog(self, context: Sequence[int]) -> int:
        """How many tokens of ``context`` this drafter must feed its model before it can
        draft after it: its prefill of a new prompt, or its catch-up after rounds it did
        not run (0, the default, for model-free drafters).  Must cost microseconds."""
        return 0

    def catch_up(self, context: Sequence[int]) -> None:  # noqa: B027
        """Feed :meth:`backlog` now, all but ``context``'s last token, so that the next
        proposal costs what any proposal costs (the engine times the two apart)."""

    def observe(self, context: Sequence[int], committed: Sequence[int]) -> None:  # noqa: B027
        """Called after every round with the tokens just committed after ``context``."""

    def observe_target(  # noqa: B027
        self, context: Sequence[int], path: Sequence[int], target_logits: torch.Tensor
    ) -> None:
        """Called after verification with the target's raw logits [len(path), V] along the
        committed ``path`` (row j conditioned on ``context + path[:j]``): a free training
        signal for drafters that adapt online (OnlineSpec)."""

    def start_query(self, prompt: Sequence[int]) -> None:  # noqa: B027
        """Called when a new query starts."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
