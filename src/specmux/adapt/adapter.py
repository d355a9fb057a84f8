"""A low-rank additive correction of an LM head, and the distillation losses it learns from.

The drafter's logits become ``z = W h + B (A ĥ) + b`` with ``W h`` the frozen head's logits,
``h`` [H] the final hidden state (after the last norm), ``ĥ = h / rms(h)`` the same direction
at unit RMS (so one learning rate suits any model's hidden scale), ``A`` [r, H], ``B`` [V, r]
and ``b`` [V].  ``B`` and ``b`` start at zero: an untrained adapter *is* the frozen drafter,
bit for bit (``z + 0``).

By default ``A`` is a fixed random projection (entries N(0, 1/H), so ``A ĥ`` has unit-variance
entries) and only ``(B, b)`` learn.  The logits are then linear in the trained parameters and
the distillation losses below are convex in them: the online-convex-optimization guarantees of
the learners (:mod:`specmux.adapt.ogd`, :mod:`specmux.adapt.optimistic`,
:mod:`specmux.adapt.ensemble`) apply literally.  ``train_a=True`` trains ``A`` too (a LoRA of
the head; non-convex, and ``A`` only gets a gradient once ``B`` is non-zero).

Only the head changes, never the layers below it, so the drafter's hidden states and its KV
cache stay valid across updates.

Training cost.  The exact loss needs ``W h`` over the whole vocabulary for every replayed
position (136 M multiply-adds per position for Qwen2.5-0.5B: ~0.5 s for a batch of 64 on two
busy cores).  Training uses a *candidate-set* softmax instead (:func:`candidate_kl`): per
position the union ``C`` of the target's top-K and the frozen drafter's top-M tokens, their
frozen logits, the frozen log-mass of all other tokens and a few ids sampled from it (to
estimate how the adapter moves that mass), all captured when the position is verified (the
frozen logits there were computed for drafting anyway).  An update then costs
``N·(|C| + T)·r`` multiply-adds: milliseconds.  (Without the tail samples the loss cannot see
a logit raised for a token where it is not a candidate; on the chat benchmark the
candidate-only loss kept improving while the exact KL got worse.)  Serving always uses the
exact full-vocabulary logits, so the approximation can only affect how well the adapter
learns, never losslessness.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from specmux.errors import ConfigError


class LowRankHeadAdapter(nn.Module):
    """``Δz(h) = B (A ĥ) + b``: a rank-``rank`` correction of the logits (plus a bias).

    ``hidden`` [n, H] -> ``delta`` [n, V].
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        rank: int = 16,
        *,
        bias: bool = True,
        train_a: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if rank < 1 or hidden_size < 1 or vocab_size < 1:
            raise ConfigError(f"rank, hidden_size, vocab_size must be >= 1, got {rank}, "
                              f"{hidden_size}, {vocab_size}")
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(rank, hidden_size, generator=gen) / hidden_size**0.5
        self.hidden_size, self.vocab_size, self.rank = hidden_size, vocab_size, rank
        self.train_a = train_a
        self.A = nn.Parameter(a, requires_grad=train_a)
        self.B = nn.Parameter(torch.zeros(vocab_size, rank))
        self.b = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the learner updates, in a fixed order."""
        params = [self.B] + ([self.b] if self.b is not None else [])
        return [self.A, *params] if self.train_a else params

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """``A ĥ`` [n, r] with ``ĥ = h / rms(h)``."""
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h @ self.A.t()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.features(hidden) @ self.B.t()  # [n, V]
        return delta if self.b is None else delta + self.b

    def delta_at(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``Δz`` at the token ids ``idx`` [n, C] only: [n, C] (``n·C·r`` multiply-adds)."""
        u = self.features(hidden)  # [n, r]
        delta = (self.B[idx] @ u.unsqueeze(-1)).squeeze(-1)  # [n, C]
        return delta if self.b is None else delta + self.b[idx]

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, vocab={self.vocab_size}, rank={self.rank}, "
                f"bias={self.b is not None}, train_a={self.train_a}")


def _plogp(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))


def distill_loss(
    logits: torch.Tensor, target_idx: torch.Tensor, target_prob: torch.Tensor
) -> torch.Tensor:
    """Mean over rows of ``KL(p̃ ‖ q)``, ``q = softmax(logits)`` over the full vocabulary.

    The target ``p̃`` is sparse: ``target_prob`` [n, K] on the ids ``target_idx`` [n, K] (the
    target's top-K, renormalized; K = 64 keeps nearly all the mass of a peaked LM
    distribution).  ``KL(p̃ ‖ q) = Σ_k p̃_k (log p̃_k − log q_{idx_k})``; its gradient with
    respect to the logits is ``q − p̃``.  ``logits`` [n, V] -> scalar.
    """
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_idx)  # [n, K]
    p = target_prob.float()
    return (_plogp(p) - p * logq).sum(-1).mean()


def candidate_logprobs(
    logits_c: torch.Tensor, tail: torch.Tensor, tail_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """``log q̃_c = z_c − log(Σ_{c'∈C} e^{z_c'} + e^{tail'})`` [n, C] (see :func:`candidate_kl`).

    ``tail_delta`` [n, T]: the adapter's ``Δz`` at T ids drawn from the frozen tail
    distribution ``e^{z0_v − tail}`` (v ∉ C).  The adapted tail weight is then estimated by
    importance sampling, ``e^{tail'} = e^{tail} · mean_s e^{Δz_s}`` (unbiased), so raising a
    token's logit everywhere is charged where it is not a candidate too.  Without it the
    tail keeps its frozen weight.
    """
    tail = tail.float()
    if tail_delta is not None:
        n_samples = tail_delta.shape[-1]
        tail = tail + torch.logsumexp(tail_delta.float(), -1) - math.log(n_samples)
    lse = torch.logsumexp(torch.cat([logits_c.float(), tail.unsqueeze(-1)], -1), -1)
    return logits_c.float() - lse.unsqueeze(-1)


def kl_from_logprobs(logq: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``Σ_c p_c (log p_c − log q_c)`` ([n, C] each; terms with p = 0 drop)."""
    p = prob.float()
    logq = torch.where(p > 0, logq, torch.zeros_like(logq))  # avoid 0 * -inf
    return (_plogp(p) - p * logq).sum(-1).mean()


def candidate_kl(
    logits_c: torch.Tensor, tail: torch.Tensor, prob_c: torch.Tensor
) -> torch.Tensor:
    """Mean over rows of ``KL(p̃ ‖ q̃)`` on candidate sets.

    ``logits_c`` [n, C]: the (adapted) drafter logits of each row's candidates (``-inf`` for
    padding); ``tail`` [n]: ``log Σ_{v ∉ C} e^{z0_v}``, the frozen weight of all other tokens;
    ``prob_c`` [n, C]: the target's ``p̃`` on the candidates (it is supported on them).
    ``q̃_c = e^{z_c} / (Σ_{c'∈C} e^{z_c'} + e^{tail})``, which equals the full softmax while the
    adapter leaves the non-candidates alone (training passes the sampled tail correction of
    :func:`candidate_logprobs`).
    """
    return kl_from_logprobs(candidate_logprobs(logits_c, tail), prob_c)
