"""The speculative decoding round loop.

One round, top to bottom (Leviathan et al. 2023, with an online learner in front):

1. the **selector** (:mod:`specmux.selector`) picks an arm, i.e. a drafter and a
   speculation length ``k``;
2. the drafter **proposes** up to ``k`` tokens (and the distributions it drew them from);
3. the target **scores** context + draft in ONE forward pass: ``k + 1`` distributions;
4. **verification** keeps the accepted prefix plus one recovered/bonus token;
5. the verified tokens are **committed** (cut at a stop token or the length limit);
6. the selector **observes** the round: the chosen arm's result, and for full-information
   learners every drafter's **counterfactual** score along the verified path
   (:mod:`specmux.feedback`); drafters observe the committed tokens (online learning), and
   a :class:`Step` is streamed.

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
from specmux.costmodel import PREFILL_TOKENS, CostModel
from specmux.drafters.base import Drafter
from specmux.errors import ConfigError, PromptError, TokenizerMismatchError
from specmux.feedback import position_scores
from specmux.lm import as_target
from specmux.metrics import SpecStats
from specmux.policies import Policy
from specmux.selector import NO_DRAFT, Outcome, Scores, Selector, make_arms
from specmux.target import Target
from specmux.types import Draft, PathDistributions, SamplingParams, Step
from specmux.verify import acceptance_probability, process_logits, sample, verify

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


def block_divergence(draft: Draft, target_probs: torch.Tensor | None, k: int) -> float | None:
    """MetaSD's block reward ``(1/k) * sum_j (1 - TV(p_j, q_j))`` over all drafted positions.

    Positions after the first rejection count too: the verification pass scored them anyway.
    ``target_probs`` [>= len(draft), V].  ``None`` when no draft was possible (``k == 0``)
    or no learner reads it (``target_probs`` not computed, greedy).
    """
    if k == 0 or target_probs is None:
        return None
    n = len(draft)
    if n == 0:
        return 0.0
    p = target_probs[:n]  # [n, V]
    if draft.probs is None:  # one-hot q: 1 - TV = p(x)
        overlap = p[torch.arange(n), draft.tokens]
    else:
        overlap = acceptance_probability(p, draft.probs)  # [n]
    return float(overlap.sum()) / k


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

    The learner is a :class:`~specmux.selector.Selector` (``selector``): arms are all
    (drafter, ``k``) pairs, ``num_speculative_tokens`` one ``k`` or several.  ``score_all``
    (default: the policy is full-information) runs every drafter along each verified path
    for counterfactual losses.  ``reset_per_query`` makes the learner start afresh on every
    query; otherwise it keeps learning across queries.

    A ``0`` in a list of ``num_speculative_tokens`` adds the no-speculation arm
    (``none@k=0``: one target step, one token).  The engine feeds the selector's
    :class:`~specmux.costmodel.CostModel` with measured drafting, verification, scoring and
    round times; ``loss="time"`` makes full-information learners optimize tokens per
    second with it, and ``score_rate < 1`` runs expensive drafters along the path on that
    share of rounds only (:mod:`specmux.scoring`).
    """

    config: SpeculativeConfig | None = None  # set by from_config (the one validated config)

    def __init__(
        self,
        target: PreTrainedModel | Target,
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
        cost_model: CostModel | None = None,
        score_rate: float = 1.0,
        contextual: bool = False,
    ) -> None:
        self.target: Target = as_target(target)
        self.drafters = _check_drafters(drafters, self.target.vocab_size)
        for d in self.drafters:  # draft heads read the target's hidden states
            bind = getattr(d, "bind_target", None)
            if bind is not None:
                bind(self.target)
        names = [d.name for d in self.drafters]
        self.selector = Selector(
            make_arms(names, num_speculative_tokens), policy, drafter_names=names, loss=loss,
            delayed_feedback=delayed_feedback, reset_per_query=reset_per_query,
            score_all=score_all, policy_kwargs=policy_kwargs, seed=seed,
            cost_model=cost_model, score_rate=score_rate, contextual=contextual,
        )
        k_max = self.selector.max_k
        if k_max >= self.target.max_context:  # a round scores context + k + 1 positions
            raise ConfigError(f"num_speculative_tokens {k_max} does not fit the target's "
                              f"context of {self.target.max_context} tokens; use at most "
                              f"{self.target.max_context - 2}")
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._prefill_seconds = 0.0  # drafters' catch-ups in the current round

    @property
    def cost_model(self) -> CostModel:
        """The selector's online cost model (measured timings)."""
        return self.selector.cost_model

    @property
    def stats(self) -> SpecStats:
        """Counters over every query served (the selector's: rounds, selections, regret)."""
        return self.selector.stats

    @classmethod
    def from_config(cls, target: PreTrainedModel | Target, drafters: Sequence[Drafter],
                    policy: Policy | str, config: SpeculativeConfig,
                    **kwargs: Any) -> SpeculativeDecoder:
        """A decoder with the options of ``config`` (kept unchanged as ``self.config``)."""
        decoder = cls(target, drafters, policy, num_speculative_tokens=config.ks,
                      loss=config.loss, delayed_feedback=config.delayed_feedback,
                      reset_per_query=config.reset_per_query, seed=config.seed,
                      score_rate=config.score_rate, contextual=config.contextual, **kwargs)
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
        self._log = _RowLog(list(prompt_ids), sampling)
        self.selector.span_scorer = self._score_span
        self.warmup(prompt_ids)  # calibrates here only if nobody did at start-up
        for d in self.drafters:
            d.start_query(prompt_ids)
        self.selector.start_query(len(prompt_ids), self._backlogs(prompt_ids),
                                  max_new_tokens)
        context = list(prompt_ids)
        produced = 0
        ended = False
        try:
            for round_index in range(max_new_tokens):  # each round commits >= 1 token
                step = self._round(round_index, context, max_new_tokens - produced, sampling,
                                   generator, stop)
                produced += len(step.tokens)
                if step.finished:
                    ended = True
                    self.selector.end_query()
                yield step
                if step.finished:
                    return
        finally:
            if not ended:  # closed early: the selector still gets the delayed feedback
                self.selector.end_query()

    def warmup(self, prompt_ids: Sequence[int] | None = None) -> float:
        """Measure what the cost model needs before a first round (:meth:`_calibrate`),
        if the selector needs it and nothing has been timed yet; the seconds it took (0.0
        when nothing was needed).  A server or a benchmark calls it at start-up, as serving
        engines profile before they take requests; otherwise the first query pays it
        (:meth:`generate_steps` calibrates on its prompt).  ``prompt_ids``: the tokens to
        time on (default: a fixed sequence of :data:`CALIBRATION_TOKENS` ids).

        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from specmux.drafters.ngram import NgramDrafter
        >>> torch.manual_seed(0) and None
        >>> tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
        >>> decoder = SpeculativeDecoder(tiny, [NgramDrafter()], "hedge",
        ...                              num_speculative_tokens=[0, 2], loss="time")
        >>> decoder.warmup() > 0.0, decoder.warmup()  # measured once
        (True, 0.0)
        """
        if prompt_ids is not None:
            _check_prompt(prompt_ids, self.target.max_context, 1)
        if not self._wants_calibration():
            return 0.0
        vocab = self.target.vocab_size
        ids = (list(prompt_ids) if prompt_ids is not None
               else [(7919 * i + 1) % vocab for i in range(CALIBRATION_TOKENS)])
        t0 = time.perf_counter()
        self._calibrate(ids)
        return time.perf_counter() - t0

    def _wants_calibration(self) -> bool:
        """Whether the selector prices arms or plans its scoring by the cost model (time
        loss, or counterfactual scoring of a sample of rounds) and the model has not timed
        a plain target step yet."""
        selector = self.selector
        return (selector.needs_scores
                and (selector.tracker.loss == "time" or selector.scoring.rate < 1.0)
                and np.isnan(selector.cost_model.verify_seconds(1, 0)))

    def _calibrate(self, prompt_ids: Sequence[int]) -> None:
        """Time a plain target step, a pass of ``max_k + 1`` positions, each model drafter's
        prefill of :data:`CALIBRATION_PREFILL` and of :data:`CALIBRATION_TOKENS` tokens and
        its one- and two-token proposals on the first :data:`CALIBRATION_TOKENS`
        of ``prompt_ids``: at start-up (:meth:`warmup`), else before the first query, on its
        prompt.  Without it, the stream's first round scores
        every drafter (nothing counts as expensive yet; an LM drafter's prefill of the
        prompt included) and an untimed LM drafter drafts "for free" in the cost model
        until the learner has tried it: 1.2 s of a 2.6 s first query on llama.cpp (docs/
        BENCHMARKS.md, issue 14's fourth run).  On a first query's prompt the passes run
        on its prefix, so its prefill reuses their KV cache; they count in its time."""
        ctx = list(prompt_ids[:CALIBRATION_TOKENS])
        if len(ctx) < 2:
            return
        model, vocab = self.selector.cost_model, self.target.vocab_size
        self.target.logits(ctx, 1)  # prefill, untimed
        for n in (1, self.selector.max_k + 1):  # each pass's tokens differ: no cached row
            extra = [(ctx[0] + n + i) % vocab for i in range(n)]
            t0 = time.perf_counter()
            self.target.logits(ctx + extra, n)
            model.observe_verify(n, len(ctx), time.perf_counter() - t0)
        greedy = SamplingParams()
        generator = _generator(greedy)
        for d in self.drafters:
            if not d.model_based:
                continue
            # Prefill at two lengths (the line's slope and intercept); the long one shares
            # no prefix with ctx.  Then ctx's last token, untimed: the cache is ready.
            longer = min(CALIBRATION_PREFILL, self.target.max_context // 2)
            for seq in ([(ctx[0] + 3 + j) % vocab for j in range(longer)], ctx):
                self._catch_up(d, seq, minimum=1)
            _propose(d, ctx, 1, greedy, generator)
            threshold = getattr(d, "confidence_threshold", None)  # timed at k steps: no
            if threshold is not None:  # draft ends early here
                d.confidence_threshold = 0.0  # type: ignore[attr-defined]
            try:
                for k in (1, 2):  # 1 and 2 forward passes after its prefill
                    seq = ctx + [(ctx[0] + j + 1) % vocab for j in range(k)]
                    t0 = time.perf_counter()
                    _propose(d, seq, k, greedy, generator)
                    model.observe_draft(d.name, k, time.perf_counter() - t0)
            finally:
                if threshold is not None:
                    d.confidence_threshold = threshold  # type: ignore[attr-defined]

    def _round(
        self,
        round_index: int,
        context: list[int],
        remaining: int,
        sampling: SamplingParams,
        generator: torch.Generator,
        stop: frozenset[int],
    ) -> Step:
        """One round: select, propose, score, verify, commit, observe; extends ``context``."""
        t0 = time.perf_counter()
        self._prefill_seconds = 0.0  # drafters' catch-ups this round (timed apart)
        offers = ([d.offer(context, self.selector.max_k) for d in self.drafters]
                  if self.selector.wants_signals else None)  # (signal, proposal length)
        backlogs = self._backlogs(context)  # [N] or None
        a = self.selector.select(offers and [o[0] for o in offers],
                                 offers and [o[1] for o in offers], backlogs, remaining,
                                 len(context))
        arm = self.selector.arms[a]
        drafter = self.drafters[self.selector.arm_drafter[a]] if arm.k else None
        room = self.target.max_context - len(context) - 1
        k = max(0, min(arm.k, remaining - 1, room))
        t1 = time.perf_counter()
        caught_up = (self._catch_up(drafter, context, backlog=backlogs and
                                    backlogs[self.selector.arm_drafter[a]])
                     if drafter and k else 0.0)
        draft = _propose(drafter, context, k, sampling, generator) if drafter else _EMPTY
        t2 = time.perf_counter()
        # One target pass over context + draft: [k+1, V] logits.
        logits = self.target.logits(context + draft.tokens.tolist(), len(draft) + 1)
        verdict, target_probs = verify(draft, logits, sampling, generator,
                                       probs=not sampling.greedy
                                       or self.selector.needs_divergence)
        t3 = time.perf_counter()
        model = self.selector.cost_model
        timed = round_index > 0  # a query's first passes also prefill its prompt
        steps = len(draft) if draft.steps is None else draft.steps  # drafting steps paid
        if drafter is not None and k == arm.k:
            model.observe_proposal(drafter.name, k, len(draft), draft.steps)
        if timed and drafter is not None and steps:
            model.observe_draft(drafter.name, steps, t2 - t1 - caught_up)
        if timed:
            model.observe_verify(len(draft) + 1, len(context), t3 - t2)
        committed, finish_reason = self._commit(verdict.tokens.tolist(), context, remaining,
                                                stop)
        scores, factors, deferred = self._scores(a, context, committed, target_probs,
                                                 sampling, timed, len(draft))
        self._log.tokens.extend(committed)  # a deferred scoring run may read them now
        self.selector.observe(Outcome(
            a, len(draft), verdict.num_accepted_tokens, block_divergence(draft, target_probs, k),
            finished=finish_reason is not None, seconds=t3 - t0, context=len(context),
        ), scores, factors, deferred)
        self._log.prune(self.selector.tracker.first_row)
        for d in self.drafters:
            d.observe_target(context, committed, logits[: len(committed)])
            d.observe(context, committed)
        context.extend(committed)
        t4 = time.perf_counter()
        if timed:  # prefills are no round's cost: rho would sag at each query
            model.observe_round(len(committed), t4 - t0 - self._prefill_seconds)
        chosen_by, ruled_out = self.selector.round_choice
        step = Step(
            round=round_index, drafter=drafter.name if drafter else NO_DRAFT, arm=a, k=k,
            num_draft_tokens=len(draft), num_accepted_tokens=verdict.num_accepted_tokens,
            tokens=tuple(committed), seconds=t4 - t0, draft_seconds=t2 - t1,
            verify_seconds=t3 - t2, learner_seconds=(t1 - t0) + (t4 - t3),
            finished=finish_reason is not None, finish_reason=finish_reason,
            gammas=self._gammas(scores), context=self.selector.round_context,
            chosen_by=chosen_by, ruled_out=ruled_out,
        )
        self.stats.record(step)
        return step

    def _backlogs(self, context: Sequence[int]) -> list[int] | None:
        """Each drafter's :meth:`~specmux.drafters.base.Drafter.backlog` after ``context``
        [N], when the selector prices them (:attr:`Selector.prices_backlog`), else None."""
        if not self.selector.prices_backlog:
            return None
        return [d.backlog(context) for d in self.drafters]

    def _catch_up(self, d: Drafter, context: Sequence[int], minimum: int | None = None,
                  backlog: int | None = None) -> float:
        """Feed drafter ``d`` its backlog when it lacks more than ``minimum`` tokens of
        ``context`` (default :data:`~specmux.costmodel.PREFILL_TOKENS`; less is fed within
        its next proposal or scoring run, in the same pass): its prefill of a new prompt,
        or many rounds it did not run.  Timed apart, into the cost model's prefill line, so
        that neither the draft line nor a scoring run carries it; the seconds it took.
        ``backlog``: ``d.backlog(context)`` when the caller has it already."""
        if backlog is None:
            backlog = d.backlog(context)
        if backlog <= (PREFILL_TOKENS if minimum is None else minimum):
            return 0.0
        t0 = time.perf_counter()
        d.catch_up(context)
        seconds = time.perf_counter() - t0
        self.selector.cost_model.observe_prefill(d.name, backlog - 1, seconds)
        self._prefill_seconds += seconds
        return seconds

    def _commit(
        self, tokens: list[int], context: list[int], remaining: int, stop: frozenset[int]
    ) -> tuple[list[int], str | None]:
        """The verified tokens cut at the first stop token and at the length limits, and
        the finish reason (``None`` while the query goes on)."""
        for i, tok in enumerate(tokens):
            if tok in stop:
                return tokens[: i + 1][:remaining], "stop"
        committed = tokens[:remaining]
        if (len(committed) >= remaining
                or len(context) + len(committed) >= self.target.max_context):
            return committed, "length"
        return committed, None

    def _scores(
        self, arm: int, context: list[int], path: list[int], target_probs: torch.Tensor | None,
        sampling: SamplingParams, timed: bool = True, drafted: int = 0,
    ) -> tuple[Scores | None, np.ndarray | None, list[int | tuple[int, int, int]]]:
        """Every drafter's ``(gamma, w)`` [n, N] along the verified ``path`` (no target
        call), when the selector needs them, and the drafters' importance factors: a
        drafter the selector's plan skips this round has ``nan`` columns.  Each drafter's
        scoring run is timed into the cost model (the played one's rows are reused; not in
        a query's first round, ``timed=False``, where an LM drafter also prefills the
        prompt).

        With the ``"length"`` loss only the first ``max_k`` positions are scored.  A longer
        path (a fully accepted ``max_k`` draft plus its bonus token) ends at a position no
        arm's counterfactual reaches: every pending round started at or before this one and
        looks ``max_k`` positions ahead.  Skipping it saves each LM drafter a forward pass
        in most rounds of a good drafter.

        The played drafter's rows come from its draft (``drafted`` tokens), except after a
        fully accepted draft: the bonus position's row needs one more pass of an LM
        drafter, which its next proposal makes anyway (it feeds the last drafted token and
        the bonus token together).  When the selector can defer, an expensive played
        drafter's rows past its draft are requested for later
        (:mod:`specmux.scoring`) instead of paying that pass now.
        """
        selector = self.selector
        if not selector.needs_scores:
            return None, None, []
        scored = path if selector.tracker.loss == "acceptance" else path[: selector.max_k]
        run, factors, deferred = selector.plan_scoring(arm, len(context))
        target = None if target_probs is None else target_probs[: len(scored)]  # [n, V]
        self._log.add(selector.tracker.next_row, len(context), len(scored),
                      None if sampling.greedy else target)  # greedy scores never read p
        played = selector.arm_drafter[arm] if selector.arms[arm].k else None
        late = (played is not None and len(scored) > drafted > 0 and selector.defers
                and selector.scoring.expensive(selector.cost_model, len(context))[played])
        dists: list[PathDistributions | None] = []
        for i, d in enumerate(self.drafters):
            if not run[i] or (late and i == played):
                dists.append(None)
                continue
            if i != played:
                self._catch_up(d, context)
            t0 = time.perf_counter()
            dists.append(d.distributions(context, scored, sampling))
            if i != played and timed:  # the played drafter's rows come from its draft
                selector.cost_model.observe_score(d.name, time.perf_counter() - t0)
        path_ids = torch.tensor(scored, dtype=torch.long)  # [n]
        scores = position_scores(path_ids, target, dists, sampling.greedy)
        if late and played is not None:  # rows of the draft now, the rest when due
            mine = self.drafters[played].distributions(context, scored[:drafted], sampling)
            gamma, weight = position_scores(path_ids[:drafted],
                                            None if target is None else target[:drafted],
                                            [mine], sampling.greedy)
            scores[0][:drafted, played] = gamma[:, 0]
            scores[1][:drafted, played] = weight[:, 0]
            deferred = [*deferred, (played, drafted, len(scored))]
            if len(scored) < selector.max_k:  # due in a later round: its next proposal may
                row0 = selector.tracker.next_row  # feed them (this round's first row)
                self._log.optional.update((played, row0 + j)
                                          for j in range(drafted, len(scored)))
        return scores, factors, deferred

    def _score_span(self, drafter: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Deferred scoring (:mod:`specmux.scoring`): ``drafter``'s ``(gamma, w)`` [hi - lo]
        over log rows ``lo..hi`` of this query, from ONE run of the drafter over the
        tokens they span (which also catches an LM drafter's KV cache up).

        Rows asked for only as a played drafter's rows past its fully accepted draft come
        free from its next proposal, which feeds the tokens they follow; where it was not
        played again (its cache lacks them), they are left unknown (``nan``, as positions
        a drafter was not run on) rather than paid with a forward pass of their own (22 ms
        of the 0.5B drafter on llama.cpp here: 0.6% of the target's step on issue 11's
        stream)."""
        log_ = self._log
        positions = [log_.position[r] for r in range(lo, hi)]  # token index of each row
        first, last = positions[0], positions[-1]
        d = self.drafters[drafter]
        if (all((drafter, r) in log_.optional for r in range(lo, hi))
                and d.backlog(log_.tokens[: last]) > 0):
            unknown = np.full(hi - lo, np.nan)
            return unknown, unknown.copy()
        self._catch_up(d, log_.tokens[:first])
        t0 = time.perf_counter()
        dist = d.distributions(log_.tokens[:first], log_.tokens[first : last + 1],
                               log_.sampling)  # [last - first + 1] rows
        self.selector.cost_model.observe_score(d.name, time.perf_counter() - t0)
        index = torch.tensor([p - first for p in positions], dtype=torch.long)
        picked = PathDistributions(tokens=dist.tokens[index],
                                   probs=None if dist.probs is None else dist.probs[index],
                                   stops=None if dist.stops is None else dist.stops[index])
        path = torch.tensor([log_.tokens[p] for p in positions], dtype=torch.long)  # [n]
        target = (torch.stack([log_.target[r] for r in range(lo, hi)])  # [n, V]
                  if log_.target else None)  # greedy: not kept (not read)
        gamma, weight = position_scores(path, target, [picked], log_.sampling.greedy)
        return gamma[:, 0], weight[:, 0]

    def _gammas(self, scores: Scores | None) -> dict[str, tuple[float, ...]]:
        """Per drafter run this round, its gamma along the path (skipped ones left out; a
        played drafter's deferred bonus row is not known yet: its rows before it)."""
        if scores is None:
            return {}
        gamma = scores[0]
        out = {}
        for i, d in enumerate(self.drafters):
            known = gamma[:, i]
            if np.isnan(known).any():  # deferred rows (a played LM's bonus row): the prefix
                known = known[: int(np.argmax(np.isnan(known)))]
            if len(known) or not len(gamma):
                out[d.name] = tuple(float(g) for g in known)
        return out

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


class _RowLog:
    """A query's tokens, and per counterfactual-log row its token index and the target's
    distribution there (what a deferred scoring run needs, under sampling; rows before the
    tracker's :attr:`~specmux.feedback.CounterfactualTracker.first_row` are dropped)."""

    def __init__(self, prompt: list[int], sampling: SamplingParams) -> None:
        self.tokens = prompt  # prompt + committed tokens
        self.sampling = sampling
        self.position: dict[int, int] = {}  # row -> token index
        self.target: dict[int, torch.Tensor] = {}  # row -> target probs [V]
        self.optional: set[tuple[int, int]] = set()  # (drafter, row): a played one's bonus row

    def add(self, row: int, context: int, n: int, target_probs: torch.Tensor | None) -> None:
        """Rows ``row .. row + n - 1`` are the tokens after ``context``; ``target_probs``
        [n, V] the target's distributions there (``None`` under greedy decoding)."""
        for j in range(n):
            self.position[row + j] = context + j
            if target_probs is not None:
                self.target[row + j] = target_probs[j]

    def prune(self, first_row: int) -> None:
        for row in [r for r in self.position if r < first_row]:
            del self.position[row]
            self.target.pop(row, None)
        self.optional = {(d, r) for d, r in self.optional if r >= first_row}


def _check_drafters(drafters: Sequence[Drafter], vocab_size: int) -> list[Drafter]:
    if not drafters:
        raise ConfigError("at least one drafter is needed")
    names = [d.name for d in drafters]
    if len(set(names)) != len(names):
        raise ConfigError(f"drafter names must be unique, got {names}")
    for d in drafters:
        if d.vocab_size is not None and d.vocab_size != vocab_size:
            raise TokenizerMismatchError(
                f"drafter {d.name!r} has vocabulary size {d.vocab_size}, the target "
                f"{vocab_size}: a drafter must share the target's tokenizer"
            )
    return list(drafters)


def _propose(
    drafter: Drafter, context: list[int], k: int, sampling: SamplingParams,
    generator: torch.Generator,
) -> Draft:
    """The drafter's proposal of at most ``k`` tokens (none asked when ``k == 0``)."""
    draft = drafter.propose(context, k, sampling, generator) if k else _EMPTY
    if len(draft) > k:
        draft = Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k],
                      draft.steps)
    return draft


_EMPTY = Draft(tokens=torch.zeros(0, dtype=torch.long))
CALIBRATION_TOKENS = 16  # prompt tokens the first query's cost calibration runs on
CALIBRATION_PREFILL = 128  # tokens of the longer of the two timed drafter prefills


def autoregressive_generate(
    target: PreTrainedModel | Target,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
) -> list[int]:
    """Target-only decoding, one token per forward pass (the baseline and the reference)."""
    sampling = sampling or SamplingParams()
    lm = as_target(target)
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
