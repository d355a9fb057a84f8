"""Hot-path records: frozen dataclasses passed between drafters, verification, engine and learners.

Shapes are given in comments; ``V`` is the (target) vocabulary size, ``k`` the number of
drafted tokens in a round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from specmux.config import check_seed
from specmux.errors import ConfigError

SAMPLING_EPS = 1e-5  # temperatures below this decode greedily


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` (or below 1e-5) means greedy decoding.

    Temperature, top-k and top-p are applied to the target's and to every drafter's logits
    identically, before verification, exactly as plain sampling from the target would.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        check_seed(self.seed)  # any 64-bit integer (taken modulo 2**64)

    @property
    def greedy(self) -> bool:
        """``temperature < SAMPLING_EPS`` (as vLLM): smaller temperatures would overflow the
        float32 logits / temperature; they select the argmax anyway."""
        return self.temperature < SAMPLING_EPS


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for one round.

    ``tokens``: [k] int64 drafted token ids (k may be 0: the drafter had nothing to say).
    ``probs``: [k, V] float32, the *processed* distributions the tokens were drawn from,
    or ``None`` for a deterministic drafter (treated as one-hot on ``tokens``).
    ``steps``: the drafting steps it took where that is not ``k`` (a model drafter that
    ended its draft early paid one step more than it drafted); ``None``: ``k``.
    """

    tokens: torch.Tensor  # [k]
    probs: torch.Tensor | None = None  # [k, V] or None
    steps: int | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class PathDistributions:
    """A drafter's next-token distributions along a given path (for counterfactual scoring).

    Row ``j`` is the drafter's distribution given ``context + path[:j]``.  Either ``probs``
    [L, V] is set, or only ``tokens`` [L] (a deterministic guess per position; ``-1`` means
    the drafter would not propose anything there, i.e. q = 0).  ``stops`` [L] (bool), for a
    drafter that ends its draft early: ``True`` where it would stop before drafting row
    ``j``'s token (an LM drafter below its confidence threshold), so a draft reaching that
    row accepts nothing there or after it.
    """

    tokens: torch.Tensor  # [L] argmax / deterministic guess, -1 = no proposal
    probs: torch.Tensor | None = None  # [L, V] or None (one-hot on tokens)
    stops: torch.Tensor | None = None  # [L] bool or None (never stops early)


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one draft (see :mod:`specmux.verify` for the terms).

    ``tokens`` [num_accepted_tokens + 1]: the accepted draft prefix followed by one token
    from the target, the *recovered* token after a rejection or the *bonus* token when the
    whole draft was accepted.
    """

    tokens: torch.Tensor  # [num_accepted_tokens + 1]
    num_accepted_tokens: int
    bonus: bool  # True when every drafted token was accepted


@dataclass(frozen=True)
class Feedback:
    """What a policy learns from one round.

    Bandit learners read the realized fields of the chosen ``arm``.  Full-information
    learners (Hedge) read ``losses``: loss vectors over *all* arms, each in [0, 1], for
    rounds whose counterfactual outcome has become fully known.  Because the verified path
    is only as long as the chosen drafter's accepted prefix plus one, a round's losses may
    arrive a few rounds later (delayed feedback), so ``losses`` may hold zero, one or several
    vectors.
    """

    arm: int
    k: int  # drafted length asked for this round
    max_k: int  # largest k over all arms (rewards are normalized by max_k + 1)
    num_draft_tokens: int  # tokens actually drafted (<= k)
    num_accepted_tokens: int
    divergence: float | None = None  # MetaSD block reward: (1/k) sum_j (1 - TV(p_j, q_j))
    losses: tuple[np.ndarray, ...] = ()  # each [num_arms]
    seconds: float | None = None  # wall clock of the round: select, draft, verify

    @property
    def tokens_per_round(self) -> int:
        """BanditSpec's reward Y: tokens produced by the round, bonus included, in [1, k+1]."""
        return self.num_accepted_tokens + 1

    @property
    def reward(self) -> float:
        """Tokens per round scaled to [0, 1]: ``(num_accepted_tokens + 1) / (max_k + 1)``."""
        return self.tokens_per_round / (self.max_k + 1)


@dataclass(frozen=True)
class Step:
    """One round of speculative decoding: the streamed item and the benchmark trace row."""

    round: int
    drafter: str
    arm: int
    k: int
    num_draft_tokens: int
    num_accepted_tokens: int
    tokens: tuple[int, ...]  # committed this round (after EOS / length truncation)
    seconds: float  # wall clock of the whole round
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    learner_seconds: float = 0.0  # policy select+update and counterfactual scoring
    finished: bool = False
    finish_reason: str | None = None  # on the last step: "stop" (stop token) or "length"
    # Counterfactual acceptance per drafter name along this round's verified path:
    # gamma[name][j] = sum_x min(p_j(x), q_j(x)) (greedy: the argmax indicator).
    gammas: dict[str, tuple[float, ...]] = field(default_factory=dict)
    context: int | None = None  # the round's context key (contextual selection), else None
    chosen_by: str = "learner"  # "prior": the cold start chose the arm (Selector.prior_arm)
    ruled_out: tuple[str, ...] = ()  # arms not allowed: worth_starting's prefill hint, or
    # drafting's nothing-to-draft rule (Selector.round_choice)
