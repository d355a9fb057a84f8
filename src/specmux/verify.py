"""Verification of a draft against the target: greedy matching and rejection sampling.

Terms (as in vLLM's rejection sampler):

* **accepted** tokens: the longest prefix of the draft that verification keeps;
* **recovered** token: after the first rejection, one token drawn from the target's
  residual distribution ``norm(max(0, p - q))`` (greedy: the target's argmax);
* **bonus** token: when every drafted token is accepted, one extra token drawn from the
  target's distribution after the last drafted token (greedy: its argmax), which the same
  verification pass already computed.

Every round therefore commits ``num_accepted_tokens + 1`` tokens.  Sampling verification
follows Leviathan et al. (2023) / Chen et al. (2023): draft token ``x_j ~ q_j`` is accepted
with probability ``min(1, p_j(x_j) / q_j(x_j))``.  The committed tokens are then distributed
exactly as if sampled from the target one by one, whatever ``q`` is, as long as ``q`` is the
distribution that actually produced the draft.  A deterministic drafter (n-gram lookup) is
the special case ``q = one_hot(x)``.

All functions here are pure, apart from drawing from the ``torch.Generator`` they are given.
"""

from __future__ import annotations

import torch

from specmux.types import Draft, SamplingParams, Verdict


def process_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Turn raw logits [n, V] into the sampling distributions [n, V] (float32).

    Applies temperature, then top-k, then top-p (the order HF ``generate`` uses).  With greedy
    sampling it returns the temperature-1 softmax: the argmax, all greedy decoding looks at,
    is unchanged, and learners get a smooth distribution to score.
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.softmax(logits, dim=-1)
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [n, V]
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [n, V]
        drop_sorted = mass_before >= sampling.top_p
        drop_sorted[..., 0] = False  # always keep the top token (also for a top_p ~ 1e-300)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a distribution [V]."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Greedy verification.

    ``draft_tokens`` [k]; ``target_logits`` [k+1, V], row j scored after ``draft[:j]``.
    Accept while the draft token equals the target's argmax; then append the argmax at the
    first mismatch (recovered) or after the last drafted token (bonus).
    """
    k = int(draft_tokens.shape[0])
    target_ids = target_logits.argmax(dim=-1)  # [k+1]
    mismatch = (draft_tokens != target_ids[:k]).nonzero()
    num_accepted = int(mismatch[0, 0]) if mismatch.numel() else k
    tokens = target_ids[: num_accepted + 1].clone()  # accepted == target argmax on the prefix
    return Verdict(tokens=tokens, num_accepted_tokens=num_accepted, bonus=num_accepted == k)


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Rejection-sampling verification.

    ``draft_tokens`` [k]; ``draft_probs`` [k, V] the processed q the draft was sampled from,
    or ``None`` for a deterministic draft (q = one-hot); ``target_probs`` [k+1, V] the
    processed target distributions p.
    """
    k = int(draft_tokens.shape[0])
    out: list[int] = []
    for j in range(k):
        x = int(draft_tokens[j])
        p_x = float(target_probs[j, x])
        q_x = 1.0 if draft_probs is None else float(draft_probs[j, x])
        u = float(torch.rand((), generator=generator))
        if u * q_x < p_x:  # accept with probability min(1, p/q)
            out.append(x)
            continue
        if draft_probs is None:  # residual of a one-hot q: p without x
            residual = target_probs[j].clone()
            residual[x] = 0.0
        else:
            residual = (target_probs[j] - draft_probs[j]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability 0
            residual = target_probs[j]
        out.append(sample(residual, generator))  # recovered token
        return Verdict(torch.tensor(out, dtype=torch.long), num_accepted_tokens=j, bonus=False)
    out.append(sample(target_probs[k], generator))  # bonus token
    return Verdict(torch.tensor(out, dtype=torch.long), num_accepted_tokens=k, bonus=True)


def verify(
    draft: Draft,
    target_logits: torch.Tensor,
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    probs: bool = True,
) -> tuple[Verdict, torch.Tensor | None]:
    """Verify ``draft`` against ``target_logits`` [k+1, V].

    Returns the verdict and the processed target distributions p [k+1, V], which the
    learners reuse for counterfactual scoring at no extra target cost.  Greedy decoding
    reads only the argmax: with ``probs=False`` it skips the softmax over the vocabulary
    (about 0.1 ms per row at 150k tokens) and returns ``None`` for p.
    """
    if sampling.greedy:
        verdict = verify_greedy(draft.tokens, target_logits)
        return verdict, process_logits(target_logits, sampling) if probs else None
    target_probs = process_logits(target_logits, sampling)
    return verify_sampling(draft.tokens, draft.probs, target_probs, generator), target_probs


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-position acceptance probability alpha = sum_x min(p, q) = 1 - TV(p, q).

    ``p``, ``q``: [n, V] -> [n].
    """
    return torch.minimum(p, q).sum(dim=-1)
