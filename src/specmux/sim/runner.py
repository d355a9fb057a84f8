"""Run a policy over a simulated stream of queries, and measure its regret.

The round loop mirrors :meth:`specmux.engine.SpeculativeDecoder.generate_steps`:

* the policy picks an arm ``(drafter, k)``; ``k`` is cut to ``left - 1`` near the end of
  a query (the engine drafts at most ``max_new_tokens - produced - 1``);
* the chosen drafter's accepted length is its leading hits from the round's first
  position; the round commits ``accepted + 1`` positions (the verified path);
* the policy is driven by the engine's own :class:`specmux.selector.Selector`: full-information
  policies get their loss vectors from its counterfactual tracker, fed with every drafter's
  ``gamma``/``w`` along the verified path and flushed by ``end_query`` at the end of each
  query, exactly as in the engine;
* MetaSD's block reward ``(1/k) sum_j (1 - TV)`` counts the drafted positions after the
  first rejection too; off the realized path they are fresh draws at the drafter's
  long-run acceptance rate.

The policies are the engine's own classes (:data:`specmux.policies.POLICIES`).

Regret (all in *rounds* or *tokens*, never in normalized losses):

* ``regret`` (pseudo, tokens): ``max_a sum_t mu[d_t, a] - sum_t mu[d_t, a_t]``, with
  ``mu[d, a]`` the expected tokens per round of arm ``a`` in domain ``d`` (fresh start):
  tokens lost against the best fixed arm in hindsight over the rounds played;
* ``segment_regret``: the same against the best arm of each segment (maximal run of
  rounds in one domain), i.e. a comparator that may switch when the domain does;
* ``stop_regret`` (BanditSpec's stopping-time regret, rounds): rounds the policy needed
  for ``T`` tokens minus the best fixed arm's expected rounds for the same ``T`` tokens
  of the same queries (exact renewal DP, :func:`specmux.sim.env.rounds_to_finish`);
* ``stop_regret_pseudo``: ``tau - min_i sum_{t <= tau} mu[d_t, a_t] / mu[d_t, i]``, the
  rounds arm ``i`` would need for the expected tokens the policy produced (Wald's
  identity); the same quantity in expectation with far less noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from specmux.errors import ConfigError
from specmux.policies import Arm, Policy
from specmux.selector import Outcome, Selector
from specmux.sim.env import DrafterPool, PositionBuffer, SimEnv, Stream, rounds_to_finish

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Trace:
    """What one run did, round by round."""

    policy: str
    arm: np.ndarray  # [T] int32, arm played
    domain: np.ndarray  # [T] int16, domain of the round's query
    tokens: np.ndarray  # [T] int16, tokens committed (accepted + 1, cut at query end)
    accepted: np.ndarray  # [T] int16
    seconds: float  # wall clock of the loop
    cpu_seconds: float  # process CPU time of the loop (robust to a busy machine)
    stream: Stream  # the queries actually served (adaptive streams: domains as chosen)
    selector: Selector | None = None  # the learner after the run (its stats: the losses)

    @property
    def num_rounds(self) -> int:
        return int(self.arm.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def rounds_per_second(self) -> float:
        return self.num_rounds / self.seconds if self.seconds > 0 else float("inf")

    @property
    def rounds_per_cpu_second(self) -> float:
        return self.num_rounds / self.cpu_seconds if self.cpu_seconds > 0 else float("inf")

    @property
    def mean_tokens_per_round(self) -> float:
        return self.num_tokens / max(self.num_rounds, 1)


def default_arms(num_drafters: int, ks: Sequence[int] = (4,)) -> list[tuple[int, int]]:
    """Arms ``(drafter, k)``: every drafter with every ``k`` (drafter-major, as the engine)."""
    if not ks or min(ks) < 1:
        raise ConfigError("every k must be >= 1")
    return [(i, int(k)) for i in range(num_drafters) for k in ks]


def arm_means(pool: DrafterPool, arms: Sequence[tuple[int, int]]) -> np.ndarray:
    """Expected tokens per round of each arm in each domain (fresh start): [D, A]."""
    out = np.empty((pool.num_domains, len(arms)))
    cache: dict[int, np.ndarray] = {}
    for a, (i, k) in enumerate(arms):
        if k not in cache:
            cache[k] = pool.tokens_per_round(k)
        out[:, a] = cache[k][:, i]
    return out


def sim_selector(
    policy: Policy,
    arms: Sequence[tuple[int, int]],
    num_drafters: int,
    *,
    loss: str = "length",
    delayed: bool = True,
    reset_per_query: bool = False,
) -> Selector:
    """The engine's :class:`Selector` over simulated arms ``(drafter index, k)``."""
    if len(arms) != policy.num_arms:
        raise ConfigError(f"policy has {policy.num_arms} arms, the simulation {len(arms)}")
    names = [str(i) for i in range(num_drafters)]
    return Selector([Arm(names[i], int(k)) for i, k in arms], policy, drafter_names=names,
                    loss=loss, delayed_feedback=delayed, reset_per_query=reset_per_query)


def simulate(
    policy: Policy,
    env: SimEnv,
    stream: Stream,
    arms: Sequence[tuple[int, int]],
    *,
    rounds: int | None = None,
    tokens: int | None = None,
    loss: str = "length",
    delayed: bool = True,
    reset_per_query: bool = False,
    progress: ProgressFn | None = None,
    progress_every: int = 8192,
) -> Trace:
    """Play ``policy`` over ``stream`` until ``rounds`` rounds or ``tokens`` tokens are done.

    ``loss``/``delayed`` configure the counterfactual tracker (full-information policies
    only).  ``progress(rounds_done)`` is called every ``progress_every`` rounds.

    (Longer than the usual 80 lines on purpose: the round loop is the simulator's hot path,
    millions of rounds per experiment, so its per-round work stays inline.)
    """
    if rounds is None and tokens is None:
        raise ConfigError("give rounds or tokens")
    selector = sim_selector(policy, arms, env.pool.num_drafters, loss=loss, delayed=delayed,
                            reset_per_query=reset_per_query)
    if selector.needs_scores and not env.scores:
        raise ConfigError("a full-information policy needs an env with scores=True")
    divergence = _divergence_fn(policy, env)
    max_rounds = rounds if rounds is not None else int(tokens)  # each round commits >= 1
    max_tokens = tokens if tokens is not None else np.iinfo(np.int64).max
    arm_drafter = selector.arm_drafter
    arm_k = [arm.k for arm in selector.arms]
    scored = selector.needs_scores
    out_arm: list[int] = []
    out_dom: list[int] = []
    out_tok: list[int] = []
    out_acc: list[int] = []
    select, observe = selector.select, selector.observe
    served: list[int] = []
    qtokens = stream.query_tokens
    queries = _queries(env, stream, arms, policy)
    left, s, t, produced = 0, 0, 0, 0
    hits = b""
    size = 0
    buf: PositionBuffer | None = None
    dom = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while t < max_rounds and produced < max_tokens:
        if left == 0:
            query = next(queries, None)
            if query is None:
                log.warning("stream ended after %d queries (%d rounds)", len(served), t)
                break
            dom, buf, s = query
            served.append(dom)
            hits, size = buf.hits, buf.size
            left = qtokens
            selector.start_query()
        a = select()
        i = arm_drafter[a]
        kk = arm_k[a] if arm_k[a] < left else left - 1
        base = i * size + s
        miss = hits.find(b"\x00", base, base + kk)
        acc = kk if miss < 0 else miss - base
        n = acc + 1
        assert buf is not None
        scores = (buf.gamma[s : s + n], buf.weight[s : s + n]) if scored else None  # type: ignore[index]
        div = divergence(buf, i, s, kk, acc) if divergence is not None and kk > 0 else None
        observe(Outcome(a, kk, acc, div, finished=n == left), scores)
        if n == left:
            selector.end_query()
        out_arm.append(a)
        out_dom.append(dom)
        out_tok.append(n)
        out_acc.append(acc)
        s += n
        left -= n
        produced += n
        t += 1
        if progress is not None and t % progress_every == 0:
            progress(t)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    if progress is not None:
        progress(t)
    return Trace(
        policy=policy.name,
        arm=np.asarray(out_arm, dtype=np.int32),
        domain=np.asarray(out_dom, dtype=np.int16),
        tokens=np.asarray(out_tok, dtype=np.int16),
        accepted=np.asarray(out_acc, dtype=np.int16),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        stream=Stream(np.asarray(served, dtype=int), qtokens),
        selector=selector,
    )


def _queries(
    env: SimEnv, stream: Stream, arms: Sequence[tuple[int, int]], policy: Policy
) -> Iterator[tuple[int, PositionBuffer, int]]:
    """Each query of ``stream`` in turn: its domain (an adaptive stream picks it against the
    policy's favoured arm), the position buffer and the query's first position."""
    adversary = _Adversary(arm_means(env.pool, arms)) if stream.adaptive else None
    dom = 0
    for planned in stream.domains.tolist():
        dom = planned if adversary is None else adversary.pick(policy.peek(), dom)
        buf, s = env.take(dom, stream.query_tokens)
        yield dom, buf, s


DivergenceFn = Callable[[PositionBuffer, int, int, int, int], float]


def _divergence_fn(policy: Policy, env: SimEnv) -> DivergenceFn | None:
    """MetaSD's block reward ``(1/k) sum_j (1 - TV)`` of a round (``None`` if not wanted).

    Arguments: the buffer, the drafter, the round's first position, ``k > 0`` drafted and
    the accepted length.  On the verified path it is the hits (greedy) or ``gamma``
    (sampling); the drafted positions after the first rejection are fresh draws at the
    drafter's long-run acceptance rate (binomial hits, or Beta(m kappa, (1 - m) kappa)).
    """
    if not policy.reads_divergence:
        return None
    greedy = env.mode == "greedy"
    if not greedy and not env.scores:
        raise ConfigError("sampling-mode divergence needs an env with scores=True")
    rng, kappa = env.rng, env.kappa

    def divergence(buf: PositionBuffer, i: int, s: int, kk: int, acc: int) -> float:
        n = acc + 1
        off = kk - n  # drafted positions after the first rejection
        m = float(buf.marginal[i])
        if greedy:
            total = float(acc)
            if off > 0:
                total += float(rng.binomial(off, m))
        else:
            total = float(buf.gamma[s : s + min(n, kk), i].sum())  # type: ignore[index]
            if off > 0:
                total += float(rng.beta(m * kappa, (1.0 - m) * kappa, size=off).sum())
        return total / kk

    return divergence


class _Adversary:
    """Picks the domain where the favoured arm trails that domain's best arm the most."""

    def __init__(self, mu: np.ndarray) -> None:
        self.shortfall = (mu.max(axis=1, keepdims=True) - mu).T.tolist()  # [A][D]

    def pick(self, favourite: int, last: int) -> int:
        gaps = self.shortfall[favourite]
        worst = max(gaps)
        ties = [d for d, g in enumerate(gaps) if g >= worst - 1e-12]
        if last in ties:  # break ties by moving on from the last domain
            return ties[(ties.index(last) + 1) % len(ties)]
        return ties[0]


def checkpoints(total: int, num: int = 60) -> np.ndarray:
    """About ``num`` log-spaced integers in [1, total] (always including ``total``)."""
    if total < 1:
        return np.zeros(0, dtype=np.int64)
    pts = np.unique(np.geomspace(1, total, num=num).round().astype(np.int64))
    return pts


def regret_curve(trace: Trace, mu: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Pseudo-regret (tokens) vs the best fixed arm in hindsight of the first ``t`` rounds.

    ``mu`` [D, A] expected tokens per round; ``at`` rounds to evaluate at.  Returns [len(at)].
    """
    got = np.cumsum(mu[trace.domain, trace.arm])  # [T]
    onehot = np.zeros((trace.num_rounds, mu.shape[0]))
    onehot[np.arange(trace.num_rounds), trace.domain] = 1.0
    dom_counts = np.cumsum(onehot, axis=0)[at - 1]  # [len(at), D]
    best = (dom_counts @ mu).max(axis=1)  # [len(at)]
    return best - got[at - 1]


def segment_regret(trace: Trace, mu: np.ndarray) -> float:
    """Pseudo-regret (tokens) vs the best arm of each domain segment."""
    best = mu.max(axis=1)[trace.domain]  # [T]
    return float((best - mu[trace.domain, trace.arm]).sum())


def token_checkpoints(trace: Trace, budgets: np.ndarray) -> np.ndarray:
    """Stopping times: rounds needed to reach each token budget (-1 when not reached)."""
    cum = np.cumsum(trace.tokens.astype(np.int64))
    idx = np.searchsorted(cum, budgets, side="left")
    return np.where(idx < cum.shape[0], idx + 1, -1)


def stop_regret(
    trace: Trace,
    pool: DrafterPool,
    arms: Sequence[tuple[int, int]],
    budgets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Stopping-time regret (rounds) at each token budget: (realized, pseudo).

    Realized: ``tau(T) - min_a E[rounds of arm a for T tokens of the same queries]`` (the
    queries the run served, ``trace.stream``).
    Pseudo: ``tau(T) - min_a sum_{t <= tau} mu[d_t, a_t] / mu[d_t, a]``.
    """
    mu = arm_means(pool, arms)  # [D, A]
    stream = trace.stream
    tau = token_checkpoints(trace, budgets)
    realized = np.full(budgets.shape[0], np.nan)
    pseudo = np.full(budgets.shape[0], np.nan)
    # Expected rounds per query for each k (renewal DP), then per arm.
    tables = {k: rounds_to_finish(pool, k, stream.query_tokens) for k in {k for _, k in arms}}
    per_query = np.stack([tables[k][:, i, :] for i, k in arms], axis=1)  # [D, A, Q+1]
    full_query = per_query[stream.domains, :, stream.query_tokens]  # [num_queries, A]
    cum_full = np.vstack([np.zeros((1, len(arms))), np.cumsum(full_query, axis=0)])
    # Expected tokens the policy produced, split by domain, cumulated over rounds.
    gained = np.zeros((trace.num_rounds, mu.shape[0]))
    gained[np.arange(trace.num_rounds), trace.domain] = mu[trace.domain, trace.arm]
    cum_gained = np.cumsum(gained, axis=0)  # [T, D]
    for j, (budget, tj) in enumerate(zip(budgets.tolist(), tau.tolist(), strict=True)):
        if tj < 0:
            continue
        full, rest = divmod(int(budget), stream.query_tokens)
        expect = cum_full[full].copy()
        if rest:
            expect += per_query[stream.domains[full], :, rest]
        realized[j] = tj - float(expect.min())
        pseudo[j] = tj - float((cum_gained[tj - 1] @ (1.0 / mu)).min())
    return realized, pseudo
