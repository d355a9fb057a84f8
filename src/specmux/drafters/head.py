"""A draft head on the target's own hidden states (Hydra / EAGLE family) as a pool member.

Where it reads from (no extra target pass): after a round commits ``a`` accepted tokens plus
one, the next context is ``c = ctx_prev + draft[:a] + [x]``.  The verification pass already
computed the target's final state after ``c[:-1] = ctx_prev + draft[:a]`` (it is row ``a`` of
that pass), and ``x`` is known, so the head drafts from ``(h(c[:-1]), e(x))``: EAGLE's
"feature one step behind + the token just sampled".  :class:`~specmux.lm.CachedLM` keeps
those rows (``enable_hidden_states``); the engine hands the drafter its target through
:meth:`HeadDrafter.bind_target`.

The first round of a query has no target pass yet: the head drafts nothing there (and its
counterfactual row is "no proposal", ``-1``), exactly as it would have drafted.

Drafting ``k`` tokens costs ``k`` MLP steps and ``k`` products with the ``[V_d, H]`` draft
rows of the LM head; the distributions along a path (counterfactual scoring) run the same
chain over the path's tokens.  The product dominates (a 32,768-row draft vocabulary over a
1,536-wide state is 200 MB of float32 read per step), so it runs in bfloat16 where the CPU
multiplies that in hardware (:func:`product_dtype`: 4.8 ms against 12.1 ms per drafted token,
5.8 against 35.2 ms for a 9-position scoring run on the 2-core AVX512-BF16 development box,
``benchmarks/head_product.py``).
In bfloat16 two candidates within a rounding step tie (argmax takes the lower index), and a
scoring run's batched product may round a near-tie differently from the one-row product of
drafting: the counterfactual row can then differ from what the head would have drafted
there.  Either way the output stays the target's; only acceptance can move.
Tokens outside the draft vocabulary get ``q = 0``; greedy and sampled verification stay exact
for any ``q`` (:mod:`specmux.verify`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from specmux.drafters.base import Drafter, check_confidence_threshold, unsure_rows
from specmux.errors import ConfigError
from specmux.heads.net import HeadNet
from specmux.heads.store import HeadFile
from specmux.types import Draft, PathDistributions, SamplingParams
from specmux.verify import process_logits, sample

_NONE = torch.zeros(0, dtype=torch.long)
log = logging.getLogger(__name__)
BF16_FROM = 1 << 20  # draft rows with at least this many entries may multiply in bfloat16
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags: bfloat16 products in hardware


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: one of :data:`BF16_FLAGS` among the
    flags of ``/proc/cpuinfo`` (``False`` where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in BF16_FLAGS)


def product_dtype(w: torch.Tensor) -> torch.dtype:
    """``torch.bfloat16`` for draft rows ``w`` [V_d, H] of at least :data:`BF16_FROM` entries
    on a CPU that multiplies bfloat16 in hardware (:func:`native_bfloat16`), else
    ``torch.float32``.  bfloat16 halves the bytes read; without the hardware it can be
    slower.  Decided by the CPU, not by timing both at load as before: on a busy machine
    the timing picked float32 for some heads and bfloat16 for others, the two round a
    near-tie differently, and so a head's drafts (never the output) and every MAT built on
    them changed from one process to the next (issue 16's runs 28 and 33, UCBSpec's rounds).
    Small matrices (the tests' heads) stay float32."""
    if w.numel() < BF16_FROM or not native_bfloat16():
        return torch.float32
    return torch.bfloat16


class HeadDrafter(Drafter):
    """Drafts with a :class:`~specmux.heads.net.HeadNet` through the target's frozen LM head.

    ``model``: the target (its input embedding and LM head are read, not copied, apart from
    the ``[V_d, H]`` float32 draft rows, and their bfloat16 copy where :func:`product_dtype`
    picks it; the online learner, :class:`~specmux.heads.online.OnlineHeadDrafter`, trains
    against the float32 rows).  ``draft_vocab_size`` keeps only the first (most
    frequent) ids of the head's draft vocabulary.  ``target``: the
    :class:`~specmux.lm.CachedLM` the engine verifies with (else bound by the engine).
    ``confidence_threshold``: the draft ends before a token the head gives less probability
    (over its draft vocabulary), as an LM drafter's does
    (:class:`~specmux.drafters.hf.HFDrafter`; 0: never).
    """

    def __init__(
        self,
        head: HeadFile,
        model: PreTrainedModel,
        *,
        name: str | None = None,
        draft_vocab_size: int | None = None,
        target: object | None = None,
        confidence_threshold: float = 0.0,
    ) -> None:
        self.confidence_threshold = check_confidence_threshold(confidence_threshold)
        out = model.get_output_embeddings().weight  # [V, H]
        vocab, hidden = int(out.shape[0]), int(out.shape[1])
        if head.net.hidden_size != hidden:
            raise ConfigError(f"head {head.name!r} has hidden size {head.net.hidden_size}, the "
                              f"target {hidden}: it was trained for another model")
        if int(head.draft_vocab.max()) >= vocab:
            raise ConfigError(f"head {head.name!r} drafts token ids beyond the target's "
                              f"vocabulary ({vocab})")
        self.name = name or head.name
        self.vocab_size = vocab
        self.net: HeadNet = head.net
        self.meta = head.meta
        self.draft_vocab = head.draft_vocab[:draft_vocab_size].clone()  # [V_d]
        self.w_draft = out.detach()[self.draft_vocab].float().contiguous()  # [V_d, H]
        self.product_dtype = product_dtype(self.w_draft)
        log.info("head %s: %d draft rows, product in %s", self.name, len(self.draft_vocab),
                 str(self.product_dtype).removeprefix("torch."))
        self._w_run = (self.w_draft if self.product_dtype == torch.float32  # [V_d, H]
                       else self.w_draft.to(self.product_dtype))
        self.embedding = model.get_input_embeddings().weight.detach()  # [V, H]
        self.target = None
        self._drafted: tuple[list[int], list[int], torch.Tensor] | None = None  # last propose
        if target is not None:
            self.bind_target(target)

    def bind_target(self, target: object) -> None:
        """Read hidden states from ``target`` (anything with ``enable_hidden_states`` and
        ``hidden_states(num_last, ids=...)``)."""
        if not hasattr(target, "hidden_states") or not hasattr(target, "enable_hidden_states"):
            raise ConfigError(f"drafter {self.name!r} needs a target that exposes its hidden "
                              f"states; {type(target).__name__} does not")
        target.enable_hidden_states()
        self.target = target

    def state_before(self, context: Sequence[int]) -> torch.Tensor | None:
        """The target's state [H] after ``context[:-1]`` if a pass computed it, else None."""
        if self.target is None or len(context) < 2:
            return None
        try:
            return self.target.hidden_states(1, ids=list(context[:-1]))[0]
        except LookupError:
            return None

    def offer(self, context: Sequence[int], k: int) -> tuple[int | None, int | None]:
        """``(None, 0)`` where no pass computed the state the head drafts from (a query's
        first round): it drafts nothing there, and a cost-aware selector prices its arms
        so; else ``(None, None)`` (it drafts ``k``)."""
        return None, (0 if k >= 1 and self.state_before(context) is None else None)

    def embed(self, tokens: Sequence[int]) -> torch.Tensor:
        return self.embedding[torch.as_tensor(list(tokens), dtype=torch.long)].float()  # [n, H]

    @torch.inference_mode()
    def chain(self, h: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """Features [len(tokens), H]: step j reads the previous feature and ``tokens[j]``."""
        e = self.embed(tokens)
        f, out = h[None], []
        for j in range(len(tokens)):
            f = self.net(f, e[j:j + 1])
            out.append(f)
        return torch.cat(out)

    def draft_rows(self, feats: torch.Tensor) -> torch.Tensor:
        """[n, H] features -> [n, V_d] draft logits, in :attr:`product_dtype`."""
        return feats.to(self.product_dtype) @ self._w_run.T

    def full_logits(self, logits_d: torch.Tensor) -> torch.Tensor:
        """[n, V_d] draft logits -> [n, V] with -inf outside the draft vocabulary."""
        full = torch.full((logits_d.shape[0], self.vocab_size), float("-inf"))
        full[:, self.draft_vocab] = logits_d.float()
        return full

    @torch.inference_mode()
    def propose(
        self,
        context: Sequence[int],
        k: int,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Draft:
        h = self.state_before(context)
        if h is None or k < 1:
            return Draft(tokens=_NONE)
        f, tok = h[None], int(context[-1])
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            f = self.net(f, self.embed([tok]))  # [1, H]
            z = self.draft_rows(f)  # [1, V_d]
            rows.append(z)  # a stop row too: scoring the path reads it back
            if sampling.greedy:
                unsure = self._unsure(z)
                if unsure is not None and unsure[0]:
                    break  # the draft ends here
                tok = int(self.draft_vocab[int(z.argmax())])
            else:
                q = process_logits(self.full_logits(z), sampling)[0]  # [V]
                if self.confidence_threshold and float(q.max()) < self.confidence_threshold:
                    break
                tok = sample(q, generator)
                probs.append(q)
            tokens.append(tok)
        ended = len(tokens) + 1 if len(tokens) < k else None  # the step that found it unsure
        self._drafted = (list(context), tokens, torch.cat(rows))  # [len(tokens) (+ 1), V_d]
        if not tokens:
            return Draft(tokens=_NONE, steps=ended)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long),
                     probs=torch.stack(probs) if probs else None, steps=ended)

    def _drafted_rows(self, context: Sequence[int], path: Sequence[int]) -> torch.Tensor | None:
        """The logit rows [L, V_d] this head computed while drafting, when they cover
        ``path`` (row j is reusable while ``path[:j]`` equals what it drafted; the row that
        ended a draft early is kept too): when it was the chosen drafter, scoring its path
        costs nothing, and its stop is read from the very row that made it."""
        if self._drafted is None or not path:
            return None
        ctx, tokens, rows = self._drafted
        n = len(path)
        if (n > rows.shape[0] or list(path[: n - 1]) != tokens[: n - 1]
                or ctx != list(context)):
            return None
        return rows[:n]

    @torch.inference_mode()
    def distributions(
        self, context: Sequence[int], path: Sequence[int], sampling: SamplingParams
    ) -> PathDistributions:
        z = self._drafted_rows(context, path)
        if z is None:
            h = self.state_before(context)
            if h is None or not path:
                return PathDistributions(tokens=torch.full((len(path),), -1, dtype=torch.long))
            feats = self.chain(h, [context[-1], *path[:-1]])  # [L, H]
            z = self.draft_rows(feats)  # [L, V_d]
        if sampling.greedy:
            return PathDistributions(tokens=self.draft_vocab[z.argmax(-1)],
                                     stops=self._unsure(z))
        probs = process_logits(self.full_logits(z), sampling)  # [L, V]
        return PathDistributions(tokens=probs.argmax(-1), probs=probs,
                                 stops=unsure_rows(probs, self.confidence_threshold))

    def _unsure(self, z: torch.Tensor) -> torch.Tensor | None:
        """[n] bool: rows of draft logits ``z`` [n, V_d] whose top probability (the greedy
        softmax, over the draft vocabulary) is below :attr:`confidence_threshold`; ``None``
        when it is 0 (:func:`~specmux.drafters.base.unsure_rows`)."""
        if not self.confidence_threshold:
            return None
        return unsure_rows(torch.softmax(z.float(), dim=-1), self.confidence_threshold)
