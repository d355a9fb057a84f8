"""The speculative decoding round loop.

One round, top to bottom (Leviathan et al. 2023, with an online learner in front):

1. the **policy** picks an arm, i.e. a drafter and a speculation length ``k``;
2. the drafter **proposes** up to ``k`` tokens (and the distributions it drew them from);
3. the target **scores** context + draft in ONE forward pass: ``k + 1`` distributions;
4. **verification** keeps the accepted prefix plus one recovered/bonus token;
5. full-information learners get every drafter's **counterfactual** score along the
   verified path (:mod:`specmux.feedback`); bandit learners get the chosen arm's result;
6. drafters **observe** the committed tokens (online learning), and a :class:`Step` is
   streamed.

Whatever the policy picks, the output is the target's: bit-identical to target-only greedy
decoding, or distributed exactly as target sampling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from specmux.config import SpeculativeConfig, seed_entropy
from specmux.drafters.base import Drafter
from specmux.errors import ConfigError, PromptError, TokenizerMismatchError
from specmux.feedback import CounterfactualTracker, position_scores
from specmux.lm import CachedLM
from specmux.metrics import SpecStats
from specmux.policies import Arm, Policy, make_policy
from specmux.types import Draft, Feedback, SamplingParams, Step
from specmux.verify import process_logits, sample, verify

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """Everything one query produced."""

    token_ids: list[int]
    steps: list[Step]
    stats: SpecStats
    finish_reason: str  # "stop" (a stop token) or "length"
    text: str | None = None
    prompt_ids: list[int] = field(default_factory=list)


def block_divergence(draft: Draft, target_probs: torch.Tensor, k: int) -> float | None:
    """MetaSD's block reward ``(1/k) * sum_j (1 - TV(p_j, q_j))`` over all drafted positions.

    Positions after the first rejection count too: the verification pass scored them anyway.
    ``target_probs`` [>= len(draft), V].  ``None`` when no draft was possible (``k == 0``).
    """
    if k == 0:
        return None
    n = len(draft)
    if n == 0:
        return 0.0
    p = target_probs[:n]  # [n, V]
    if draft.probs is None:  # one-hot q: 1 - TV = p(x)
        overlap = p[torch.arange(n), draft.tokens]
    else:
        overlap = torch.minimum(p, draft.probs).sum(-1)
    return float(overlap.sum()) / k


def _as_cached_lm(target: PreTrainedModel | CachedLM) -> CachedLM:
    return target if isinstance(target, CachedLM) else CachedLM(target, name="target")


def _generator(sampling: SamplingParams) -> torch.Generator:
    """The random stream of one query.

    A user seed (any 64-bit integer, taken modulo 2**64: :func:`~specmux.config.seed_entropy`)
    is first mixed by numpy's SeedSequence: torch's CPU generator seeded with consecutive
    small integers (0, 1, 2, ...) gives measurably correlated first draws, which a chi-square
    test over 10k seeded generations detects.
    """
    gen = torch.Generator()
    if sampling.seed is None:
        gen.seed()
    else:
        entropy = seed_entropy(sampling.seed)
        mixed = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        gen.manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def _check_prompt(prompt_ids: Sequence[int], max_context: int, max_new_tokens: int) -> None:
    if len(prompt_ids) == 0:
        raise PromptError("the prompt is empty")
    if len(prompt_ids) >= max_context:
        raise PromptError(
            f"the prompt has {len(prompt_ids)} tokens, but the model context is {max_context}"
        )
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


class SpeculativeDecoder:
    """A target model accelerated by a pool of drafters chosen by an online learner.

    ``num_speculative_tokens`` may be one ``k`` or several; arms are all (drafter, k) pairs.
    ``score_all`` (default: the policy is full-information) runs every drafter along each
    verified path for counterfactual losses.  ``reset_per_query`` makes the learner start
    afresh on every query; otherwise it keeps learning across queries.
    """

    config: SpeculativeConfig | None = None  # set by from_config (the one validated config)

    def __init__(
        self,
        target: PreTrainedModel | CachedLM,
        drafters: Sequence[Drafter],
        policy: Policy | str = "hedge",
        *,
        num_speculative_tokens: int | Sequence[int] = 4,
        loss: str = "length",
        delayed_feedback: bool = True,
        reset_per_query: bool = False,
        score_all: bool | None = None,
        eos_token_ids: Iterable[int] = (),
        policy_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.target = _as_cached_lm(target)
        if not drafters:
            raise ConfigError("at least one drafter is needed")
        names = [d.name for d in drafters]
        if len(set(names)) != len(names):
            raise ConfigError(f"drafter names must be unique, got {names}")
        for d in drafters:
            if d.vocab_size is not None and d.vocab_size != self.target.vocab_size:
                raise TokenizerMismatchError(
                    f"drafter {d.name!r} has vocabulary size {d.vocab_size}, the target "
                    f"{self.target.vocab_size}: a drafter must share the target's tokenizer"
                )
        ks = [num_speculative_tokens] if isinstance(num_speculative_tokens, int) else list(
            num_speculative_tokens
        )
        if not ks or any(int(k) < 1 for k in ks):
            raise ConfigError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if max(ks) >= self.target.max_context:  # a round scores context + k + 1 positions
            raise ConfigError(f"num_speculative_tokens {max(ks)} does not fit the target's "
                              f"context of {self.target.max_context} tokens; use at most "
                              f"{self.target.max_context - 2}")
        self.drafters = list(drafters)
        self.arms = [Arm(d.name, int(k)) for d in self.drafters for k in ks]
        self.arm_drafter = [i for i in range(len(self.drafters)) for _ in ks]
        self.max_k = max(int(k) for k in ks)
        if isinstance(policy, str):
            policy = make_policy(policy, len(self.arms), seed=seed, **(policy_kwargs or {}))
        if policy.num_arms != len(self.arms):
            raise ConfigError(f"policy has {policy.num_arms} arms, the pool {len(self.arms)}")
        self.policy = policy
        self.tracker = CounterfactualTracker(
            [(self.arm_drafter[a], arm.k) for a, arm in enumerate(self.arms)], loss,
            delayed_feedback,
        )
        self.score_all = policy.full_information if score_all is None else score_all
        if policy.full_information and not self.score_all:
            raise ConfigError(f"policy {policy.name!r} needs score_all=True")
        self.reset_per_query = reset_per_query
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stats = SpecStats()

    @classmethod
    def from_config(cls, target: PreTrainedModel | CachedLM, drafters: Sequence[Drafter],
                    policy: Policy | str, config: SpeculativeConfig,
                    **kwargs: Any) -> SpeculativeDecoder:
        """A decoder with the options of ``config`` (kept unchanged as ``self.config``)."""
        decoder = cls(target, drafters, policy, num_speculative_tokens=config.ks,
                      loss=config.loss, delayed_feedback=config.delayed_feedback,
                      reset_per_query=config.reset_per_query, seed=config.seed, **kwargs)
        decoder.config = config
        return decoder

    def generate_steps(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop_token_ids: Iterable[int] | None = None,
    ) -> Iterator[Step]:
        """Generate after ``prompt_ids``, yielding one :class:`Step` per round."""
        sampling = sampling or SamplingParams()
        _check_prompt(prompt_ids, self.target.max_context, max_new_tokens)
        stop = self.eos_token_ids if stop_token_ids is None else frozenset(stop_token_ids)
        generator = _generator(sampling)
        if self.reset_per_query:  # a fresh learner: its random stream restarts too
            self.policy.restart()
        self.tracker.reset()
        for d in self.drafters:
            d.start_query(prompt_ids)
        context = list(prompt_ids)
        produced = 0
        finished = False
        try:
            for round_index in range(max_new_tokens):  # each round commits >= 1 token
                step = self._round(round_index, context, max_new_tokens - produced, sampling,
                                   generator, stop)
                produced += len(step.tokens)
                finished = step.finished
                yield step
                if finished:
                    self.last_finish_reason = step.finish_reason
                    return
        finally:
            if not finished and self.score_all:  # closed early: deliver the delayed feedback
                resolved = self.tracker.flush_tagged()
                for tag, losses in resolved:
                    self.stats.record_losses(tag, losses)
                if resolved and self.policy.full_information:
                    self.policy.update(Feedback(
                        arm=resolved[-1][0], k=0, max_k=self.max_k, num_draft_tokens=0,
                        num_accepted_tokens=0, losses=tuple(loss for _, loss in resolved),
                    ))

    def _round(
        self,
        round_index: int,
        context: list[int],
        remaining: int,
        sampling: SamplingParams,
        generator: torch.Generator,
        stop: frozenset[int],
    ) -> Step:
        """One round: select, propose, score, verify, learn; extends ``context`` in place."""
        t0 = time.perf_counter()
        a = self.policy.select()
        arm, drafter = self.arms[a], self.drafters[self.arm_drafter[a]]
        room = self.target.max_context - len(context) - 1
        k = max(0, min(arm.k, remaining - 1, room))
        t1 = time.perf_counter()
        draft = drafter.propose(context, k, sampling, generator) if k else _EMPTY
        if len(draft) > k:
            draft = Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
        t2 = time.perf_counter()
        # One target pass over context + draft: [k+1, V] logits.
        logits = self.target.logits(context + draft.tokens.tolist(), len(draft) + 1)
        verdict, target_probs = verify(draft, logits, sampling, generator)
        t3 = time.perf_counter()

        committed = verdict.tokens.tolist()
        finish_reason = None
        for i, tok in enumerate(committed):
            if tok in stop:
                committed, finish_reason = committed[: i + 1], "stop"
                break
        committed = committed[:remaining]
        if finish_reason is None and (
            len(committed) >= remaining
            or len(context) + len(committed) >= self.target.max_context
        ):
            finish_reason = "length"

        gammas, losses = self._counterfactual(
            a, context, committed, target_probs, sampling, finished=finish_reason is not None
        )
        self.policy.update(
            Feedback(
                arm=a, k=arm.k, max_k=self.max_k, num_draft_tokens=len(draft),
                num_accepted_tokens=verdict.num_accepted_tokens,
                divergence=block_divergence(draft, target_probs, k), losses=losses,
            )
        )
        for d in self.drafters:
            d.observe_target(context, committed, logits[: len(committed)])
            d.observe(context, committed)
        context.extend(committed)
        t4 = time.perf_counter()
        step = Step(
            round=round_index, drafter=drafter.name, arm=a, k=k,
            num_draft_tokens=len(draft), num_accepted_tokens=verdict.num_accepted_tokens,
            tokens=tuple(committed), seconds=t4 - t0, draft_seconds=t2 - t1,
            verify_seconds=t3 - t2, learner_seconds=(t1 - t0) + (t4 - t3),
            finished=finish_reason is not None, finish_reason=finish_reason, gammas=gammas,
        )
        self.stats.record(step)
        return step

    def _counterfactual(
        self,
        arm: int,
        context: list[int],
        path: list[int],
        target_probs: torch.Tensor,
        sampling: SamplingParams,
        finished: bool,
    ) -> tuple[dict[str, tuple[float, ...]], tuple[np.ndarray, ...]]:
        """Score every drafter along the verified ``path`` (no target call): gammas + losses.

        With the ``"length"`` loss only the first ``max_k`` positions are scored.  A longer
        path (a fully accepted ``max_k`` draft plus its bonus token) ends at a position no
        arm's counterfactual reaches: every pending round started at or before this one and
        looks ``max_k`` positions ahead.  Skipping it saves each LM drafter a forward pass
        in most rounds of a good drafter.
        """
        if not self.score_all:
            return {}, ()
        scored = path if self.tracker.loss == "acceptance" else path[: self.max_k]
        dists = [d.distributions(context, scored, sampling) for d in self.drafters]
        gamma, weight = position_scores(
            torch.tensor(scored, dtype=torch.long), target_probs[: len(scored)], dists,
            sampling.greedy,
        )
        resolved = self.tracker.add_round_tagged(gamma, weight, arm)
        if finished:
            resolved += self.tracker.flush_tagged()
        for tag, losses in resolved:
            self.stats.record_losses(tag, losses)
        gammas = {d.name: tuple(float(g) for g in gamma[:, i]) for i, d in enumerate(self.drafters)}
        return gammas, tuple(losses for _, losses in resolved)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop_token_ids: Iterable[int] | None = None,
    ) -> GenerationResult:
        """Run :meth:`generate_steps` to the end and collect the result."""
        steps = list(self.generate_steps(prompt_ids, max_new_tokens, sampling, stop_token_ids))
        query = SpecStats()
        for step in steps:
            query.record(step)
        tokens = [t for s in steps for t in s.tokens]
        return GenerationResult(
            token_ids=tokens, steps=steps, stats=query,
            finish_reason=steps[-1].finish_reason or "length", prompt_ids=list(prompt_ids),
        )


_EMPTY = Draft(tokens=torch.zeros(0, dtype=torch.long))


def autoregressive_generate(
    target: PreTrainedModel | CachedLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
) -> list[int]:
    """Target-only decoding, one token per forward pass (the baseline and the reference)."""
    sampling = sampling or SamplingParams()
    lm = _as_cached_lm(target)
    _check_prompt(prompt_ids, lm.max_context, max_new_tokens)
    stop = frozenset(stop_token_ids)
    generator = _generator(sampling)
    context = list(prompt_ids)
    out: list[int] = []
    while len(out) < max_new_tokens and len(context) < lm.max_context:
        logits = lm.logits(context, 1)  # [1, V]
        if sampling.greedy:
            tok = int(logits[0].argmax())
        else:
            tok = sample(process_logits(logits, sampling)[0], generator)
        out.append(tok)
        context.append(tok)
        if tok in stop:
            break
    return out
