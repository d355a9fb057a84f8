"""specmux inside vLLM: the learners as a vLLM ``custom_class`` proposer.

vLLM (0.32, its PR #39487) loads a third-party proposer named in the speculative config::

    LLM(model, speculative_config={"method": "custom_class",
                                   "model": "specmux.integrations.vllm.Proposer",
                                   "num_speculative_tokens": 8, "policy": "normalhedge"})

It calls ``Proposer(vllm_config)``, ``load_model(model)`` and, after every engine step,
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)``, which returns 0..K draft
tokens per batch row.  vLLM verifies them against the target (drafts without probabilities
are verified one-hot, exact for any drafter), so the output stays the target's.

For every row (one *round* of the request in that row) :class:`ProposerCore` runs
observe, select, propose:

1. *observe*: ``sampled_token_ids[i]`` are the ids the step committed (accepted draft + one),
   so ``accepted = len - 1``.  Every drafter is scored on them counterfactually:
   ``gamma_ij = w_ij = 1[guess_ij == x_j]``, drafter ``i``'s guess at position ``j`` given the
   committed prefix.  Greedy, that is :mod:`specmux.feedback`'s exact score; sampled, the
   committed ``x_j`` follows the target's law, so ``E[1[g == x_j]] = p_j(g)``, the one-hot
   acceptance probability: still an unbiased estimate of ``P(A >= d)``.  The
   :class:`~specmux.feedback.CounterfactualTracker` turns scores into (delayed) loss vectors
   over all arms, and the request's policy learns from them (bandits from the played arm).
2. *select*: the policy picks an arm ``(drafter, k)``, ``k`` one of the candidate lengths
   (each <= K) or the no-speculation arm ``k = 0``.  For its first ``warmup_rounds`` rounds a
   request follows a *shared* learner, the same policy fed every request's feedback, so a
   new request starts from what the workload taught rather than from uniform weights, and
   keeps to it until its own learner has seen as many rounds (32 by default, about 80
   tokens at the acceptance of docs/VLLM.md's runs).
   In contextual mode (the default) the round's *context* comes first: the surest
   drafter's signal (prompt lookup's match after the row's context: none, shorter than 3
   tokens, at least 3; the suffix drafter's) and whether its first guess last round was
   right, the key of the engine's contextual selector
   (:func:`specmux.selector.context_key`).  Each context has its own learner, shared by
   all requests and fed the loss vectors of the rounds played in it; it plays once it has
   seen ``CONTEXT_WARMUP`` of them.  Where the output copies the prompt a strong match
   after a right guess earns long drafts; where nothing matches, the no-speculation arm.
3. *propose*: the drafter drafts up to ``k`` tokens after the row's context.

**Loss (cost-aware).**  A step that verifies ``T`` tokens takes about ``a + b T`` seconds and
the engine commits ``rho`` tokens per second, so drafting ``k`` more tokens for one request
costs ``b k`` seconds and brings ``E[A]`` tokens: it pays iff ``E[A] > beta k`` with
``beta = rho b`` (Dinkelbach's ratio trick).  Arm ``(d, k)`` gets the loss

    loss = (beta k - E[A_dk] + K) / (K (1 + beta))  in [0, 1]

with ``E[A_dk] = sum_{t=1..k} prod_{j<t} w_dj gamma_dt`` (:func:`expected_accepted`).
``token_cost`` fixes ``beta``; ``"auto"`` estimates ``a, b, rho`` online from the steps
(:class:`StepCostModel`), floored at :data:`MIN_TOKEN_COST`.

**Rows and requests.**  Rows get reordered as requests come and go, and ``propose`` gets no
request ids, so the proposer reads the model runner's ``input_batch.req_ids`` (row order) and
``requests`` (live requests); it finds the runner that constructs it and checks in
``load_model`` that the runner holds it.  Per-request state (policy, tracker, last arm) is
bounded and freed once the request leaves the runner; at most ``max_requests`` are kept.

**Drafters.**  ``"ngram"``: prompt lookup over the request's own context (stateless);
``"suffix"``: the SuffixDecoding drafter of ``specmux bench``
(:class:`~specmux.drafters.suffix_tree.SuffixTreeDrafter`): each request gets its own view,
with a store of its prompt and output, while the store of earlier outputs (bounded by
``suffix_max_tokens``, FIFO) is shared: a finished request's output joins it; drafts have
variable length (capped by the match length, pruned at low estimated probability);
``"suffix_table"``: one n-gram table shared by all requests, learning from every committed
token (memory-bounded); ``"corpus:PATH"``: a fixed table built from a text corpus.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from specmux.drafters.base import Drafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix import SuffixDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.errors import ConfigError
from specmux.feedback import CounterfactualTracker, expected_accepted
from specmux.policies import POLICIES, Arm, Policy, make_policy
from specmux.selector import CONTEXT_WARMUP, context_key
from specmux.state import atomic_write_json
from specmux.types import Feedback, SamplingParams

log = logging.getLogger(__name__)

PROPOSER_PATH = "specmux.integrations.vllm.Proposer"
MIN_TOKEN_COST = 0.02  # beta floor for "auto": with no hits, no-speculation wins
GREEDY = SamplingParams()
NO_SPEC = "none"  # drafter name of the k = 0 arm


class VllmOptions(BaseModel):
    """specmux options for the vLLM proposer (keys of the speculative config)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # stats stay strict JSON

    # The SuffixDecoding drafter, not the n-gram table: on prompts it has not seen, at
    # concurrency 8, the pool with the table was slower than no speculation (docs/VLLM.md,
    # seventh and eighth runs).
    drafters: list[str] = Field(default_factory=lambda: ["ngram", "suffix"], min_length=1)
    policy: str = "normalhedge"
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)
    k: list[PositiveInt] | None = None  # candidate lengths (default 1, 2, 4, ... and K)
    no_spec: bool = True  # offer the k = 0 arm
    token_cost: NonNegativeFloat | Literal["auto"] = "auto"
    ngram_max: PositiveInt = 4
    ngram_min: PositiveInt = 1
    suffix_max_n: PositiveInt = 6
    suffix_max_memory_mb: PositiveFloat = 64.0
    suffix_max_tokens: PositiveInt = 1_000_000  # "suffix": its store of earlier outputs
    max_requests: PositiveInt = 4096
    # A new request's first rounds follow the shared learner (with 8, a 64-token request
    # spent most of its rounds on a learner of 8 rounds' evidence: docs/VLLM.md).
    warmup_rounds: NonNegativeInt = 32
    # One learner per context (prompt lookup's match strength x whether its last guess was
    # right), shared by all requests, as the engine's contextual selector (specmux.selector).
    contextual: bool = True
    seed: NonNegativeInt = 0
    stats_file: str | None = None  # JSON stats, rewritten every second or so
    record_history: bool = False  # keep every request's committed ids (tests)

    def lengths(self, num_speculative_tokens: int) -> list[int]:
        """The candidate draft lengths, each in [1, K]."""
        if self.k is not None:
            return sorted(set(self.k))
        ks = {num_speculative_tokens}
        k = 1
        while k < num_speculative_tokens:
            ks.add(k)
            k *= 2
        return sorted(ks)


OPTION_KEYS = frozenset(VllmOptions.model_fields)


def parse_options(raw: Mapping[str, Any] | None, num_speculative_tokens: int) -> VllmOptions:
    """Validate specmux's options for a proposer with K = ``num_speculative_tokens``.

    Raises :class:`ConfigError` with one line naming the bad key.

    >>> parse_options({"policy": "hedge", "k": [2, 4]}, 4).lengths(4)
    [2, 4]
    >>> parse_options({"polcy": "hedge"}, 4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    specmux.errors.ConfigError: specmux option 'polcy' is unknown; known: contextual, ...
    """
    raw = dict(raw or {})
    unknown = sorted(set(raw) - OPTION_KEYS)
    if unknown:
        raise ConfigError(
            f"specmux option {unknown[0]!r} is unknown; known: {', '.join(sorted(OPTION_KEYS))}"
        )
    try:
        opts = VllmOptions.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise ConfigError(f"specmux option {where!r}: {first['msg']}") from None
    if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
        raise ConfigError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    too_long = [k for k in opts.lengths(num_speculative_tokens) if k > num_speculative_tokens]
    if too_long:
        raise ConfigError(
            f"specmux option 'k': {too_long[0]} exceeds num_speculative_tokens "
            f"({num_speculative_tokens})"
        )
    if opts.ngram_min > opts.ngram_max:
        raise ConfigError("specmux option 'ngram_min' must be <= 'ngram_max'")
    if len(set(opts.drafters)) != len(opts.drafters):
        raise ConfigError(f"specmux option 'drafters' lists a drafter twice: {opts.drafters}")
    for spec in opts.drafters:
        if spec in ("ngram", "suffix", "suffix_table"):
            continue
        if spec.startswith("corpus:") and len(spec) > len("corpus:"):
            if not Path(spec[len("corpus:"):]).exists():
                raise ConfigError(f"specmux drafter {spec!r}: corpus not found")
            continue
        raise ConfigError(
            f"specmux drafter {spec!r} is unknown; use 'ngram', 'suffix', 'suffix_table' or "
            "'corpus:PATH'"
        )
    if opts.policy not in POLICIES:
        raise ConfigError(f"specmux option 'policy': unknown policy {opts.policy!r}; known: "
                          f"{', '.join(sorted(POLICIES))}")
    make_policy(opts.policy, num_arms(opts, num_speculative_tokens), **opts.policy_kwargs)
    return opts


def num_arms(opts: VllmOptions, num_speculative_tokens: int) -> int:
    return len(opts.drafters) * len(opts.lengths(num_speculative_tokens)) + int(opts.no_spec)


def build_drafters(opts: VllmOptions, tokenizer: Callable[[], Any]) -> list[Drafter]:
    """The drafter pool; ``tokenizer()`` is called only for corpus drafters."""
    drafters: list[Drafter] = []
    for spec in opts.drafters:
        try:
            if spec == "ngram":
                drafters.append(NgramDrafter(opts.ngram_max, opts.ngram_min, name="ngram"))
            elif spec == "suffix":
                drafters.append(SuffixTreeDrafter(max_tokens=opts.suffix_max_tokens,
                                                  name="suffix"))
            elif spec == "suffix_table":
                drafters.append(SuffixDrafter(max_n=opts.suffix_max_n,
                                              max_memory_mb=opts.suffix_max_memory_mb,
                                              name="suffix_table"))
            else:
                path = spec[len("corpus:"):]
                drafters.append(SuffixDrafter.from_path(
                    path, tokenizer(), max_n=opts.suffix_max_n,
                    max_memory_mb=opts.suffix_max_memory_mb, learn_online=False, name=spec))
        except TypeError as err:  # a drafter whose constructor changed
            raise ConfigError(f"specmux drafter {spec!r}: {err}") from err
    return drafters


class StepCostModel:
    """``seconds ~ a + b * tokens`` per engine step, exponentially weighted least squares.

    ``beta() = rho * b``: the accepted tokens one more verified token must bring to pay
    (``rho`` = committed tokens per second over the same steps).

    >>> m = StepCostModel()
    >>> for t in [2, 4, 8, 16] * 10:
    ...     m.add(tokens=t, committed=t // 2, seconds=0.1 + 0.01 * t)
    >>> round(m.b, 4), round(m.beta(), 3)
    (0.01, 0.215)
    """

    def __init__(self, decay: float = 0.99) -> None:
        self.decay = decay
        self.sums = np.zeros(7)  # weight, T, y, T^2, T y, committed, seconds
        self.b = 0.0

    def add(self, tokens: int, committed: int, seconds: float) -> None:
        self.sums *= self.decay
        self.sums += (1.0, tokens, seconds, tokens * tokens, tokens * seconds, committed,
                      seconds)
        w, st, sy, stt, sty = self.sums[:5]
        var = stt / w - (st / w) ** 2
        if w >= 4.0 and var > 1e-6 * max(1.0, (st / w) ** 2):
            slope = (sty / w - st / w * sy / w) / var
            self.b = float(min(max(slope, 0.0), sy / st))  # 0 <= b <= mean seconds per token

    def beta(self) -> float:
        committed, seconds = self.sums[5], self.sums[6]
        if seconds <= 0.0:
            return MIN_TOKEN_COST
        return float(min(max(committed / seconds * self.b, MIN_TOKEN_COST), 1.0))


class CostAwareTracker(CounterfactualTracker):
    """The counterfactual tracker with the cost-aware loss of the module docstring."""

    def __init__(self, arms: Sequence[tuple[int, int]], token_cost: Callable[[], float]) -> None:
        super().__init__(arms, loss="length", delayed=True)
        self.token_cost = token_cost
        self._by_k = [(int(k), self.k_of_arm == k) for k in np.unique(self.k_of_arm)]

    def _losses(self, gamma: np.ndarray, weight: np.ndarray, meta: object = None) -> np.ndarray:
        # every drafter is scored every step here (model-free drafters): ``meta`` carries no
        # importance factors or modelled costs that this loss would need
        beta, big_k = self.token_cost(), self.max_k
        losses = np.empty(len(self.k_of_arm))
        for k, sel in self._by_k:
            mean = expected_accepted(gamma, weight, k)[self.drafter_of_arm[sel]] if k else 0.0
            losses[sel] = (beta * k - mean + big_k) / (big_k * (1.0 + beta))
        return losses


@dataclass
class RequestState:
    """One request's learner: its policy, tracker and the arm its last draft came from."""

    policy: Policy
    tracker: CostAwareTracker | None
    arm: int = -1  # arm of the draft now being verified (-1: none yet)
    key: int = -1  # context key of that round (-1: not contextual)
    hits: np.ndarray | None = None  # [N] each drafter's first guess last round right
    num_drafted: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    history: list[int] | None = None
    # drafter index -> this request's own view of a drafter with per-request state (the
    # suffix tree: its request store; the store of earlier outputs stays shared)
    local: dict[int, Drafter] = field(default_factory=dict)


@dataclass
class Stats:
    calls: int = 0
    row_steps: int = 0  # (request, step) pairs handled
    seconds: float = 0.0  # inside ProposerCore.step
    gc_seconds: float = 0.0  # garbage-collector pauses that fell inside ProposerCore.step
    first_call_seconds: float = 0.0
    # the latest calls' (seconds, rows): medians and tails show one-off stalls apart
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    drafted: int = 0
    accepted: int = 0
    requests_seen: int = 0
    requests_freed: int = 0
    max_live: int = 0
    arm_plays: dict[str, int] = field(default_factory=dict)


class GcClock:
    """Total seconds of the interpreter's garbage-collector passes (``gc.callbacks``): a
    pause inside a proposer call is time the proposer did not spend on its own work."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start:
            self.total += time.perf_counter() - self._start
            self._start = 0.0

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class ProposerCore:
    """The vLLM-independent part: per-request learners over a shared drafter pool."""

    STATS_EVERY_S = 1.0  # stats_file is rewritten at most this often

    def __init__(self, opts: VllmOptions, num_speculative_tokens: int, max_model_len: int,
                 drafters: Sequence[Drafter]) -> None:
        self.opts = opts
        self.max_k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.drafters = list(drafters)
        lengths = opts.lengths(num_speculative_tokens)
        self.arms = [Arm(d.name, k) for d in self.drafters for k in lengths]
        self.arm_drafter = [i for i in range(len(self.drafters)) for _ in lengths]
        if opts.no_spec:
            self.arms.append(Arm(NO_SPEC, 0))
            self.arm_drafter.append(0)
        self.full_information = POLICIES[opts.policy].full_information
        self.cost = StepCostModel()
        # Learns from every request's feedback; picks a new request's first arms.
        self.shared = make_policy(opts.policy, len(self.arms), seed=opts.seed + 2**32,
                                  **opts.policy_kwargs) if opts.warmup_rounds else None
        # Contextual mode: context key -> its learner (fed every request's rounds in it).
        self.contexts: dict[int, Policy] = {}
        self.context_counts: dict[int, int] = {}
        self.requests: dict[str, RequestState] = {}
        self.finished_history: dict[str, list[int]] = {}
        self.stats = Stats(arm_plays={str(a): 0 for a in self.arms})
        self._last_return: tuple[float, list[str | None], int] | None = None
        self._stats_written = 0.0
        self.gc_clock = GcClock()
        weakref.finalize(self, self.gc_clock.close)

    def token_cost(self) -> float:
        cost = self.opts.token_cost
        return self.cost.beta() if cost == "auto" else float(cost)

    # --- request lifecycle -------------------------------------------------------------
    def _new_request(self, prompt: Sequence[int]) -> RequestState:
        seed = self.opts.seed + self.stats.requests_seen
        self.stats.requests_seen += 1
        policy = make_policy(self.opts.policy, len(self.arms), seed=seed,
                             **self.opts.policy_kwargs)
        tracker = None
        if self.full_information:
            tracker = CostAwareTracker(
                [(self.arm_drafter[a], arm.k) for a, arm in enumerate(self.arms)],
                self.token_cost)
        while len(self.requests) >= self.opts.max_requests:  # the oldest goes first
            self.free(next(iter(self.requests)))
        state = RequestState(policy, tracker,
                             history=[] if self.opts.record_history else None)
        for d, drafter in enumerate(self.drafters):
            if isinstance(drafter, SuffixTreeDrafter):
                view = drafter.fork()  # same settings and corpus ...
                view.learned = drafter.learned  # ... and the one store of earlier outputs
                view.start_query(prompt)
                state.local[d] = view
        return state

    def _drafter(self, state: RequestState, d: int) -> Drafter:
        """Drafter ``d`` as the request sees it (its own view where it has one)."""
        return state.local.get(d, self.drafters[d])

    def free(self, req_id: str) -> None:
        """Drop a request's state (it finished or was aborted)."""
        state = self.requests.pop(req_id, None)
        if state is None:
            return
        self.stats.requests_freed += 1
        for view in state.local.values():
            view.end_query()  # its output joins the shared store of earlier outputs
        if state.history is not None:
            self.finished_history[req_id] = state.history
            while len(self.finished_history) > 1024:
                del self.finished_history[next(iter(self.finished_history))]

    # --- the step -----------------------------------------------------------------------
    def step(self, req_ids: Sequence[str | None], sampled: Sequence[Sequence[int]],
             num_tokens: np.ndarray, token_ids: np.ndarray,
             live: Container[str] | None = None) -> list[list[int]]:
        """Drafts for every row.  ``num_tokens`` [B] context lengths (committed ids
        included), ``token_ids`` [>=B, max_model_len] the rows' ids; ``live`` the requests
        still running (others are freed)."""
        t0 = time.perf_counter()
        gc0 = self.gc_clock.total
        self._observe_step_cost(t0, req_ids, sampled)
        drafts: list[list[int]] = []
        for i, committed in enumerate(sampled):
            rid = req_ids[i] if i < len(req_ids) else None
            if rid is None or not committed:  # prefill chunk or discarded row
                drafts.append([])
                continue
            drafts.append(self._row(rid, token_ids[i], int(num_tokens[i]), committed))
        if live is not None and len(self.requests) > len(sampled):
            for rid in [r for r in self.requests if r not in live]:
                self.free(rid)
        stats = self.stats
        stats.calls += 1
        stats.max_live = max(stats.max_live, len(self.requests))
        t1 = time.perf_counter()
        stats.seconds += t1 - t0
        stats.gc_seconds += self.gc_clock.total - gc0
        if stats.calls == 1:
            stats.first_call_seconds = t1 - t0
        stats.recent.append((t1 - t0, sum(1 for c in sampled if c)))
        self._last_return = (t1, list(req_ids[: len(sampled)]),
                             sum(len(d) + 1 for d, c in zip(drafts, sampled, strict=True) if c))
        if self.opts.stats_file and t1 - self._stats_written >= self.STATS_EVERY_S:
            self.write_stats()
            self._stats_written = t1
        return drafts

    def _observe_step_cost(self, now: float, req_ids: Sequence[str | None],
                           sampled: Sequence[Sequence[int]]) -> None:
        """Feed the cost model a pure decode step (same rows as the last call)."""
        last = self._last_return
        if last is None or list(req_ids[: len(sampled)]) != last[1] or not all(sampled):
            return
        seconds = now - last[0]
        if seconds < 5.0:  # longer: the engine was idle or busy elsewhere
            self.cost.add(last[2], sum(len(c) for c in sampled), seconds)

    def _row(self, rid: str, row: np.ndarray, n: int, committed: Sequence[int]) -> list[int]:
        """observe, select, propose for one request; ``row[:n]`` is its context."""
        state = self.requests.get(rid)
        committed = list(committed)
        ctx = row[: n - len(committed)].tolist()
        if state is None:  # its prefill committed the first token
            state = self.requests[rid] = self._new_request(ctx)
            for view in state.local.values():
                view.observe(ctx, committed)
            if state.history is not None:
                state.history.extend(row[:n].tolist())
        else:
            self._observe(state, row, n - len(committed), ctx, committed)
            if state.history is not None:
                state.history.extend(committed)
        self.stats.row_steps += 1
        # row[:n] as a list, for the drafters that take one (prompt lookup reads the row)
        context = ctx + committed if state.local else None
        lookups: dict[int, np.ndarray] = {}  # drafter -> prompt lookup's draft at max_k
        state.key = (self._context_key(state, row, n, context, lookups)
                     if self.opts.contextual else -1)
        a = self._learner(state).select()
        arm = self.arms[a]
        k = max(0, min(arm.k, self.max_model_len - n - 1))
        draft: list[int] = []
        if k:
            d = self.arm_drafter[a]
            drafter = self._drafter(state, d)
            if isinstance(drafter, NgramDrafter):
                if d not in lookups:
                    lookups[d] = fast_match(row, n, drafter.max_n, drafter.min_n, k)[0]
                draft = lookups[d][:k].tolist()
            else:
                context = ctx + committed if context is None else context
                draft = drafter.propose(context, k, GREEDY).tokens[:k].tolist()
        state.arm, state.num_drafted = a, len(draft)
        state.drafted += len(draft)
        self.stats.drafted += len(draft)
        self.stats.arm_plays[str(arm)] += 1
        return draft

    def _context_key(self, state: RequestState, row: np.ndarray, n: int,
                     context: list[int] | None, lookups: dict[int, np.ndarray]) -> int:
        """This round's context (:func:`specmux.selector.context_key`) from the drafters'
        signals -- prompt lookup's match strength (0 none, 1 shorter than
        ``STRONG_MATCH``, 2 at least that), the suffix tree's
        (:meth:`~specmux.drafters.suffix_tree.SuffixTreeDrafter.signal`) -- and whether the
        surest one's first guess last round was right; the lookups are kept for
        proposing (the tree keeps its own)."""
        signals: list[int | None] = []
        for d, drafter in enumerate(self.drafters):
            level = None
            if d in state.local:
                assert context is not None  # built whenever the request has views
                level = state.local[d].offer(context, self.max_k)[0]
            elif isinstance(drafter, NgramDrafter):
                lookups[d], matched = fast_match(row, n, drafter.max_n, drafter.min_n,
                                                 self.max_k)
                level = drafter.level(matched)
            signals.append(level)
        hits = state.hits if state.hits is not None else np.zeros(len(self.drafters), bool)
        return context_key(signals, hits)

    def _learner(self, state: RequestState) -> Policy:
        """Who plays this round: the context's learner once it has seen
        ``CONTEXT_WARMUP`` rounds, else the shared learner for a request's first
        ``warmup_rounds`` rounds, else the request's own."""
        if state.key >= 0 and self.context_counts.get(state.key, 0) >= CONTEXT_WARMUP:
            return self.contexts[state.key]
        if self.shared is not None and state.rounds < self.opts.warmup_rounds:
            return self.shared
        return state.policy

    def _observe(self, state: RequestState, row: np.ndarray, m: int, ctx: list[int],
                 committed: list[int]) -> None:
        """Learn from the ids committed after ``row[:m]`` (``ctx`` is that as a list)."""
        accepted = len(committed) - 1
        state.rounds += 1
        if state.arm >= 0:
            state.accepted += min(accepted, state.num_drafted)
            self.stats.accepted += min(accepted, state.num_drafted)
        released: list[tuple[int, np.ndarray]] = []
        if state.tracker is not None:
            path = committed[: self.max_k]
            hits = np.empty((len(path), len(self.drafters)))  # gamma = w = 1[guess == x]
            for i in range(len(self.drafters)):
                hits[:, i] = self._guesses(self._drafter(state, i), row, m, ctx, path) == path
            released = state.tracker.add_round_tagged(hits, hits, state.key)
            state.hits = hits[0] > 0.5
        elif state.arm >= 0 and state.num_drafted:  # bandits: the played drafter's
            if state.hits is None:
                state.hits = np.zeros(len(self.drafters), bool)
            state.hits[self.arm_drafter[state.arm]] = accepted > 0
        for i in range(len(self.drafters)):
            self._drafter(state, i).observe(ctx, committed)
        if state.arm >= 0:  # always, after the request's first step
            feedback = Feedback(
                arm=state.arm, k=self.arms[state.arm].k, max_k=self.max_k,
                num_draft_tokens=state.num_drafted,
                num_accepted_tokens=min(accepted, state.num_drafted),
                losses=tuple(losses for _, losses in released))
            state.policy.update(feedback)
            if self.shared is not None:
                self.shared.update(feedback)
            if self.opts.contextual:
                self._update_contexts(state.key, feedback, released)

    def _update_contexts(self, key: int, feedback: Feedback,
                         released: list[tuple[int, np.ndarray]]) -> None:
        """Each released loss vector to the learner of its round's context; bandits: the
        played arm's outcome to the context ``key`` it was played in."""
        if not self.full_information:
            if key >= 0:
                self._context(key).update(feedback)
                self.context_counts[key] += 1
            return
        groups: dict[int, list[np.ndarray]] = {}
        for tag, losses in released:
            if tag >= 0:
                groups.setdefault(tag, []).append(losses)
        for tag, losses in groups.items():
            self._context(tag).update(replace(feedback, losses=tuple(losses)))
            self.context_counts[tag] += len(losses)

    def _context(self, key: int) -> Policy:
        if key not in self.contexts:
            self.contexts[key] = make_policy(
                self.opts.policy, len(self.arms), seed=self.opts.seed + 2**33 + key,
                **self.opts.policy_kwargs)
            self.context_counts[key] = 0
        return self.contexts[key]

    @staticmethod
    def _guesses(drafter: Drafter, row: np.ndarray, m: int, ctx: list[int],
                 path: list[int]) -> np.ndarray:
        """The drafter's guess [len(path)] at each path position (-1: none)."""
        if isinstance(drafter, NgramDrafter):  # zero-copy on the row: row[m:] is the path
            out = np.full(len(path), -1)
            for j in range(len(path)):
                hit = fast_lookup(row, m + j, drafter.max_n, drafter.min_n, 1)
                if hit.size:
                    out[j] = hit[0]
            return out
        return drafter.distributions(ctx, path, GREEDY).tokens.numpy()

    # --- reporting ----------------------------------------------------------------------
    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        per_row = [sec / rows for sec, rows in s.recent if rows]
        per_call = [sec for sec, _ in s.recent]
        return {
            "calls": s.calls, "row_steps": s.row_steps, "seconds": s.seconds,
            "ms_per_row_step": 1e3 * s.seconds / max(s.row_steps, 1),
            # over the latest calls (at most 4096): a one-off stall moves the mean, not these
            "ms_per_row_step_median": 1e3 * float(np.median(per_row)) if per_row else None,
            "ms_per_call_p99": 1e3 * float(np.quantile(per_call, 0.99)) if per_call else None,
            "ms_per_call_max": 1e3 * max(per_call) if per_call else None,
            "first_call_ms": 1e3 * s.first_call_seconds,
            "gc_ms_in_calls": 1e3 * s.gc_seconds,
            "drafted": s.drafted, "accepted": s.accepted,
            "acceptance_rate": s.accepted / s.drafted if s.drafted else None,  # strict JSON
            "requests_seen": s.requests_seen, "requests_freed": s.requests_freed,
            "live_requests": len(self.requests), "max_live": s.max_live,
            "token_cost": self.token_cost(), "arm_plays": dict(s.arm_plays),
        }

    def write_stats(self) -> None:
        """Write :meth:`stats_dict` to ``stats_file`` atomically."""
        atomic_write_json(Path(str(self.opts.stats_file)), self.stats_dict())


def fast_lookup(tokens: np.ndarray, end: int, max_n: int, min_n: int, k: int) -> np.ndarray:
    """:func:`specmux.drafters.ngram.lookup` in one pass over the context (see
    :func:`fast_match`).

    >>> from specmux.drafters.ngram import lookup
    >>> t = np.array([5, 6, 7, 8, 5, 6])
    >>> fast_lookup(t, 6, 3, 1, 2).tolist(), lookup(t, 6, 3, 1, 2).tolist()
    ([7, 8], [7, 8])
    """
    return fast_match(tokens, end, max_n, min_n, k)[0]


def fast_match(tokens: np.ndarray, end: int, max_n: int, min_n: int,
               k: int) -> tuple[np.ndarray, int]:
    """Prompt lookup's draft (up to ``k`` tokens) after ``tokens[:end]`` and the length of
    the n-gram it matched (0: no draft).

    Candidates are the earlier positions ``e <= end - 2`` holding the last token; each is
    extended backwards to its match length (up to ``max_n``); the latest candidate matching
    ``n`` tokens, for the largest ``n``, gives the continuation ``tokens[e + 1:]``.

    >>> t = np.array([5, 6, 7, 8, 5, 6])
    >>> draft, n = fast_match(t, 6, 3, 1, 4)
    >>> draft.tolist(), n
    ([7, 8, 5, 6], 2)
    """
    if end < 2:
        return tokens[:0], 0
    cand = np.flatnonzero(tokens[: end - 1] == tokens[end - 1])  # [C] match ends
    if cand.size == 0:
        return tokens[:0], 0
    length = np.ones(cand.size, dtype=np.int64)  # [C] match length at each candidate
    alive = np.ones(cand.size, dtype=bool)
    for i in range(1, max_n):
        alive &= cand >= i
        if not alive.any():
            break
        idx = np.flatnonzero(alive)
        same = tokens[cand[idx] - i] == tokens[end - 1 - i]
        alive[idx[~same]] = False
        length[idx[same]] += 1
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        hits = np.flatnonzero(length >= n)
        if hits.size:
            start = int(cand[hits[-1]]) + 1
            return tokens[start : min(start + k, end)], n
    return tokens[:0], 0


def _find_runner(proposer: object) -> Any:
    """vLLM's model runner constructing ``proposer`` (walks the caller frames)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if isinstance(obj, GPUModelRunner):
            return obj
        frame = frame.f_back
    raise ConfigError(
        f"{PROPOSER_PATH} must be created by vLLM's model runner "
        "(speculative_config method 'custom_class')"
    )


class Proposer:
    """vLLM ``custom_class`` proposer: specmux's model-free drafters + a learner per request.

    Options come from ``vllm_config.additional_config["specmux"]``; with specmux installed,
    its vLLM plugin moves them there from the speculative config (see
    :mod:`specmux.integrations.vllm_plugin`).
    """

    instances: ClassVar[weakref.WeakSet[Proposer]] = weakref.WeakSet()

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        extra = vllm_config.additional_config
        raw = extra.get("specmux") if isinstance(extra, dict) else None
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError("additional_config['specmux'] must be a JSON object")
        opts = parse_options(raw, int(spec.num_speculative_tokens))
        self.runner = _find_runner(self)
        model_config = vllm_config.model_config

        def tokenizer() -> Any:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(
                model_config.tokenizer, trust_remote_code=model_config.trust_remote_code)

        self.core = ProposerCore(opts, int(spec.num_speculative_tokens),
                                 int(model_config.max_model_len),
                                 build_drafters(opts, tokenizer))
        Proposer.instances.add(self)
        log.info("specmux proposer: %d arms %s, policy %s", len(self.core.arms),
                 [str(a) for a in self.core.arms], opts.policy)

    def load_model(self, model: Any) -> None:
        """Nothing to load (model-free drafters); checks that the runner holds us."""
        if getattr(self.runner, "drafter", None) is not self:
            raise ConfigError(f"{PROPOSER_PATH}: the model runner does not hold this proposer")

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """0..K draft ids per batch row (row order = the runner's ``input_batch``)."""
        batch = self.runner.input_batch
        req_ids = batch.req_ids
        if len(req_ids) < len(sampled_token_ids):
            raise RuntimeError(f"vLLM batch has {len(sampled_token_ids)} rows but "
                               f"{len(req_ids)} request ids")
        return self.core.step(req_ids, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                              live=self.runner.requests)
