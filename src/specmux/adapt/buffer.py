"""Replay buffer of verified positions for distillation.

Per position it keeps what the candidate-set loss (:func:`~specmux.adapt.adapter.candidate_kl`)
needs, never a full-vocabulary row (600 KB each for a 152k vocabulary):

* ``hidden`` [H]: the drafter's final hidden state there;
* ``idx`` [C]: candidates = the target's top-K ids, then the frozen drafter's top-M ids
  (duplicates of target ids are masked: their ``z0`` is ``-inf``), C = K + M;
* ``z0`` [C]: the frozen drafter logits of the candidates; ``tail``: ``log Σ_{v ∉ C} e^{z0_v}``;
* ``tail_idx`` [T]: T = 16 ids drawn from the frozen drafter's distribution restricted to the
  non-candidates, so the loss can estimate how the adapter moves the tail mass
  (:func:`~specmux.adapt.adapter.candidate_logprobs`);
* ``prob`` [C]: the target's distribution truncated to its top-K and renormalized (``softmax``
  of its top-K logits), zero on the drafter-only candidates.

Memory per position: ``4 H + 16 C + 8 T + 4`` bytes (5.7 KB for Qwen2.5-0.5B, H = 896,
K = M = 64, T = 16), so the default 4096 positions take ~24 MB.  When full, the oldest
positions are overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmux.errors import ConfigError


@dataclass(frozen=True)
class DistillBatch:
    """Rows of the buffer (shapes: n rows, C candidates, H hidden)."""

    hidden: torch.Tensor  # [n, H]
    idx: torch.Tensor  # [n, C] long
    z0: torch.Tensor  # [n, C]
    tail: torch.Tensor  # [n]
    prob: torch.Tensor  # [n, C]
    tail_idx: torch.Tensor | None = None  # [n, T] long, samples of the frozen tail
    num_new: int = 0  # the first num_new rows have not been trained on yet

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def rows(self, stop: int) -> DistillBatch:
        """The first ``stop`` rows."""
        tail_idx = None if self.tail_idx is None else self.tail_idx[:stop]
        return DistillBatch(self.hidden[:stop], self.idx[:stop], self.z0[:stop],
                            self.tail[:stop], self.prob[:stop], tail_idx,
                            min(self.num_new, stop))


class ReplayBuffer:
    """A ring buffer of verified positions (see the module docstring)."""

    def __init__(self, capacity: int, hidden_size: int, top_k: int = 64,
                 drafter_top_m: int = 64, tail_samples: int = 16, seed: int = 0) -> None:
        if capacity < 1 or top_k < 1 or drafter_top_m < 0 or tail_samples < 1:
            raise ConfigError(f"need capacity, top_k, tail_samples >= 1 and drafter_top_m >= 0,"
                              f" got {capacity}, {top_k}, {tail_samples}, {drafter_top_m}")
        self.capacity, self.top_k, self.top_m = capacity, top_k, drafter_top_m
        self.tail_samples = tail_samples
        self.generator = torch.Generator().manual_seed(seed)
        c = top_k + drafter_top_m
        self.hidden = torch.zeros(capacity, hidden_size)
        self.idx = torch.zeros(capacity, c, dtype=torch.long)
        self.z0 = torch.full((capacity, c), float("-inf"))
        self.tail = torch.full((capacity,), float("-inf"))
        self.prob = torch.zeros(capacity, c)
        self.tail_idx = torch.zeros(capacity, tail_samples, dtype=torch.long)
        self.num_added = 0  # all time; row of the n-th addition = n % capacity

    def __len__(self) -> int:
        return min(self.num_added, self.capacity)

    @property
    def nbytes(self) -> int:
        ts = (self.hidden, self.idx, self.z0, self.tail, self.prob, self.tail_idx)
        return sum(t.numel() * t.element_size() for t in ts)

    @torch.no_grad()
    def add(self, hidden: torch.Tensor, base_logits: torch.Tensor,
            target_logits: torch.Tensor) -> None:
        """Append positions: drafter ``hidden`` [n, H] and frozen logits ``base_logits``
        [n, V], raw target logits ``target_logits`` [n, V]."""
        n = int(hidden.shape[0])
        if n == 0:
            return
        z0 = base_logits.float()
        vocab = int(z0.shape[-1])
        k, m = min(self.top_k, vocab), min(self.top_m, vocab)
        t_val, t_idx = target_logits.float().topk(k, dim=-1)  # [n, k]
        d_idx = z0.topk(m, dim=-1).indices  # [n, m]
        idx = torch.cat([t_idx, d_idx], -1)  # [n, k + m]
        cz0 = z0.gather(-1, idx)
        dup = (d_idx.unsqueeze(-1) == t_idx.unsqueeze(-2)).any(-1)  # [n, m]
        cz0[:, k:] = cz0[:, k:].masked_fill(dup, float("-inf"))
        lse = torch.logsumexp(z0, -1)  # [n]
        mass = torch.exp(torch.logsumexp(cz0, -1) - lse).clamp(max=1 - 1e-7)
        tail = lse + torch.log1p(-mass)
        prob = torch.cat([torch.softmax(t_val, -1), torch.zeros(n, m)], -1)
        weights = torch.softmax(z0, -1).scatter(-1, idx, 0.0)  # the frozen tail distribution
        empty = weights.sum(-1) <= 0
        weights[empty] = 1.0  # no tail left (tiny vocabularies): any ids, tail is -inf anyway
        tail_idx = torch.multinomial(weights, self.tail_samples, replacement=True,
                                     generator=self.generator)
        rows = torch.arange(self.num_added, self.num_added + n) % self.capacity
        self.hidden[rows] = hidden.detach().float()
        self.idx[rows] = 0
        self.z0[rows] = float("-inf")
        self.prob[rows] = 0.0
        self.idx[rows, : k + m] = idx
        self.z0[rows, : k + m] = cz0
        self.tail[rows] = tail
        self.prob[rows, : k + m] = prob
        self.tail_idx[rows] = tail_idx
        self.num_added += n

    def rows_since(self, count: int) -> torch.Tensor:
        """Row indices of the positions added after the first ``count`` additions (newest
        ``capacity`` at most)."""
        start = max(count, self.num_added - self.capacity)
        return torch.arange(start, self.num_added) % self.capacity

    def batch(
        self, new_since: int, size: int, generator: torch.Generator | None = None
    ) -> DistillBatch:
        """Up to ``size`` rows: the newest (added after ``new_since`` additions) first, the
        rest drawn uniformly without replacement from the older ones."""
        rows = self.rows_since(new_since)[-size:]
        num_new = int(rows.shape[0])
        room = size - num_new
        old_count = len(self) - int(rows.shape[0])
        if room > 0 and old_count > 0:
            old_start = self.num_added - len(self)
            pick = torch.randperm(old_count, generator=generator)[:room]
            rows = torch.cat([rows, (old_start + pick) % self.capacity])
        return DistillBatch(self.hidden[rows], self.idx[rows], self.z0[rows], self.tail[rows],
                            self.prob[rows], self.tail_idx[rows], num_new)
