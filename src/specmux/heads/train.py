"""Offline training of a draft head on cached target hidden states (EAGLE-style).

Each sample is a corpus position ``t``: starting from the target's state ``h_t`` the head is
unrolled ``depth`` steps, fed the true next tokens and its own predicted features (as it runs
at draft time), and at each step ``d`` pays

    CE(softmax(W_d h_{t+d}), softmax(W_d f_{t+d})) + reg_weight · SmoothL1(f_{t+d}, h_{t+d})

(distillation of the target's distribution over the draft vocabulary, plus EAGLE's feature
regression).  AdamW, cosine decay, a wall-clock budget.  The held-out texts (``holdout``)
give the greedy agreement with the target per depth, the figure that predicts acceptance.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from specmux.errors import ConfigError
from specmux.heads.extract import Shard
from specmux.heads.net import HeadNet, draft_logits
from specmux.heads.store import HeadFile


@dataclass
class TrainConfig:
    inner: int = 1024  # MLP width
    num_blocks: int = 1
    draft_vocab: int = 32768  # EAGLE-3's reduced vocabulary size (0 = the full vocabulary)
    depth: int = 2  # unrolled drafting steps per sample
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    reg_weight: float = 0.1
    max_seconds: float | None = 360.0  # training wall clock (extraction not included)
    holdout: float = 0.1  # fraction of the texts held out for the agreement figures
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inner < 1 or self.num_blocks < 1 or self.depth < 1 or self.epochs < 1:
            raise ConfigError("inner, num_blocks, depth and epochs must be >= 1")
        if self.batch_size < 1 or not self.lr > 0 or self.draft_vocab < 0:
            raise ConfigError("batch_size >= 1, lr > 0 and draft_vocab >= 0 are required")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")


def choose_draft_vocab(shards: Sequence[Shard], vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens of the corpus and of the target's greedy choices on it,
    then the lowest ids (BPE ids roughly follow merge frequency) -> [size] int64."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in shards:
        counts.index_add_(0, s.ids, torch.ones(len(s.ids), dtype=torch.float64))
        counts.index_add_(0, s.argmax, torch.ones(len(s.argmax), dtype=torch.float64))
    counts += 1e-9 * (vocab_size - torch.arange(vocab_size, dtype=torch.float64))  # tie: low ids
    return counts.argsort(descending=True)[:size].clone()


class _Data:
    """All shards flattened: starts are positions with ``depth`` tokens after them."""

    def __init__(self, shards: Sequence[Shard], depth: int) -> None:
        self.ids = torch.cat([s.ids for s in shards])  # [N]
        self.hidden = torch.cat([s.hidden for s in shards])  # [N, H] bf16
        self.argmax = torch.cat([s.argmax for s in shards])  # [N]
        starts, offset = [], 0
        for s in shards:
            n = len(s.ids)
            starts.append(torch.arange(offset, offset + max(0, n - depth)))
            offset += n
        self.starts = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)


def unroll_loss(
    net: HeadNet, data: _Data, t: torch.Tensor, depth: int, emb: torch.Tensor,
    w_draft: torch.Tensor, vocab: torch.Tensor, reg_weight: float,
) -> tuple[torch.Tensor, list[float]]:
    """Mean loss over ``depth`` unrolled steps from positions ``t`` [B]; agreement per depth."""
    f = data.hidden[t].float()  # [B, H]
    loss = torch.zeros(())
    agree = []
    for d in range(1, depth + 1):
        e = emb[data.ids[t + d]].float()  # [B, H]
        f = net(f, e)
        true_h = data.hidden[t + d].float()
        with torch.no_grad():
            teacher = torch.softmax(draft_logits(true_h, w_draft), -1)  # [B, V_d]
        student = draft_logits(f, w_draft)  # [B, V_d]
        ce = -(teacher * torch.log_softmax(student, -1)).sum(-1).mean()
        reg = torch.nn.functional.smooth_l1_loss(f, true_h)
        loss = loss + ce + reg_weight * reg
        agree.append(float((vocab[student.argmax(-1)] == data.argmax[t + d]).float().mean()))
    return loss / depth, agree


def _split(shards: Sequence[Shard], holdout: float, seed: int) -> tuple[list[Shard], list[Shard]]:
    order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = int(round(holdout * len(shards))) if len(shards) > 1 else 0
    held = {i for i in order[:n_hold]}
    return ([s for i, s in enumerate(shards) if i not in held],
            [s for i, s in enumerate(shards) if i in held])


@torch.no_grad()
def evaluate(net: HeadNet, data: _Data, cfg: TrainConfig, emb: torch.Tensor,
             w_draft: torch.Tensor, vocab: torch.Tensor, max_positions: int = 4096) -> list[float]:
    """Greedy agreement with the target per unrolled depth on (up to) ``max_positions``."""
    t = data.starts[:max_positions]
    if len(t) == 0:
        return []
    _, agree = unroll_loss(net, data, t, cfg.depth, emb, w_draft, vocab, cfg.reg_weight)
    return agree


def train_head(
    model: PreTrainedModel,
    shards: Sequence[Shard],
    cfg: TrainConfig,
    *,
    meta: dict[str, Any] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> HeadFile:
    """Train a head for ``model`` on ``shards``; ``on_step(step, total, loss)`` reports."""
    if not shards:
        raise ConfigError("no training text (every text is shorter than 3 tokens)")
    torch.manual_seed(cfg.seed)
    emb = model.get_input_embeddings().weight.detach()  # [V, H] frozen
    head_w = model.get_output_embeddings().weight.detach()  # [V, H] frozen
    train, held = _split(shards, cfg.holdout, cfg.seed)
    vocab = choose_draft_vocab(train, int(head_w.shape[0]), cfg.draft_vocab)
    w_draft = head_w[vocab].float().contiguous()  # [V_d, H]
    data = _Data(train, cfg.depth)
    if len(data.starts) == 0:
        raise ConfigError(f"the corpus is too short for depth {cfg.depth}")
    net = HeadNet(int(head_w.shape[1]), cfg.inner, cfg.num_blocks)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data.starts) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, step, loss_ema, stopped = time.perf_counter(), 0, float("nan"), False
    for _epoch in range(cfg.epochs):
        perm = data.starts[torch.randperm(len(data.starts), generator=gen)]
        for i in range(0, len(perm), cfg.batch_size):
            loss, _ = unroll_loss(net, data, perm[i:i + cfg.batch_size], cfg.depth, emb,
                                  w_draft, vocab, cfg.reg_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            v = float(loss.detach())
            loss_ema = v if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * v
            if on_step is not None:
                on_step(step, total, loss_ema)
            if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
                stopped = True
                break
        if stopped:
            break
    seconds = time.perf_counter() - t0
    net.eval().requires_grad_(False)
    held_data = _Data(held, cfg.depth) if held else None
    info = {
        **(meta or {}), "train": asdict(cfg), "steps": step, "steps_planned": total,
        "stopped_by_time": stopped, "train_seconds": round(seconds, 1),
        "train_positions": int(len(data.starts)), "train_loss_ema": round(loss_ema, 4),
        "train_agreement": [round(a, 4) for a in evaluate(net, data, cfg, emb, w_draft, vocab)],
        "holdout_texts": len(held),
        "holdout_agreement": [round(a, 4) for a in evaluate(net, held_data, cfg, emb, w_draft,
                                                             vocab)] if held_data else [],
        "params": sum(p.numel() for p in net.parameters()),
        "hidden_size": int(head_w.shape[1]), "vocab_size": int(head_w.shape[0]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
    }
    return HeadFile(net, vocab, info)
