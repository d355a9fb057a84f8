"""Online drafter adaptation (OnlineSpec): drafters that distill the target's verification
logits while serving, without touching losslessness.

- :mod:`~specmux.adapt.adapter`: the low-rank head correction and the KL loss;
- :mod:`~specmux.adapt.ogd`, :mod:`~specmux.adapt.optimistic`: one optimizer per file;
- :mod:`~specmux.adapt.ensemble`: copies at several learning rates under exponential weights;
- :mod:`~specmux.adapt.drafter`: :class:`AdaptiveHFDrafter`, fed by ``observe_target``;
- :mod:`~specmux.adapt.replay`: a target that replays recorded logits (cheap what-if runs).
"""

from specmux.adapt.adapter import LowRankHeadAdapter, candidate_kl, distill_loss
from specmux.adapt.base import OnlineOptimizer
from specmux.adapt.buffer import DistillBatch, ReplayBuffer
from specmux.adapt.checkpoint import atomic_torch_save, torch_load
from specmux.adapt.drafter import (
    AdaptiveHFDrafter,
    AdaptiveLM,
    HeadAdaptedLM,
    KLRecord,
    UpdateRecord,
    adaptive_drafter,
    make_head,
)
from specmux.adapt.ensemble import EnsembleHead, ExpWeights
from specmux.adapt.head import AdaptedHead, AdaptiveHead
from specmux.adapt.ogd import OGD
from specmux.adapt.optimistic import OptimisticOGD

__all__ = [
    "OGD",
    "AdaptedHead",
    "AdaptiveHFDrafter",
    "AdaptiveHead",
    "AdaptiveLM",
    "DistillBatch",
    "EnsembleHead",
    "ExpWeights",
    "HeadAdaptedLM",
    "KLRecord",
    "OnlineOptimizer",
    "LowRankHeadAdapter",
    "OptimisticOGD",
    "ReplayBuffer",
    "UpdateRecord",
    "adaptive_drafter",
    "atomic_torch_save",
    "candidate_kl",
    "distill_loss",
    "make_head",
    "torch_load",
]
