"""Simulated drafter pools and query streams for the regret simulator.

**Acceptance model.**  As in the real engine under greedy decoding, whether drafter ``i``
would have its token accepted at a position ``j`` of the generated sequence is a property
of the position (its guess given the true prefix), shared by every round that reaches it.
Per domain and drafter, the hit indicators along the sequence form a renewal process:
cycles of ``L`` hits followed by one miss, with

    P(hit | r consecutive hits just before) = hazard[domain, drafter, min(r, R - 1)]

so ``R = 1`` is i.i.d. per position with acceptance ``alpha``, and ``R > 1`` gives
per-position (depth) profiles: a drafter that starts a run well and then drops, or one
that starts badly and then runs long.  After a miss the drafter starts fresh (``r = 0``),
so the drafter *played* always starts its rounds fresh; drafters not played may be mid-run.

Two scoring modes, matching :func:`specmux.feedback.position_scores`:

* ``greedy``: ``gamma = w = hit`` (0/1);
* ``sampling``: ``w = hit`` (the realized ratio ``min(1, q(x)/p(x))`` of a deterministic
  drafter) and ``gamma`` the acceptance probability, drawn from
  ``Beta(h * kappa + w, (1 - h) * kappa + 1 - w)``, i.e. the posterior of a
  ``Beta(h * kappa, (1 - h) * kappa)`` probability given the hit, so
  ``E[w | gamma] = gamma`` and the tracker's estimator stays unbiased.

Everything is drawn in big vectorized blocks per domain (:class:`PositionBuffer`); the
round loop only indexes into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specmux.errors import ConfigError

STREAMS = ("stationary", "blocks", "alternating")
MODES = ("greedy", "sampling")


@dataclass(frozen=True)
class DrafterPool:
    """``hazard`` [D, N, R]: hit probability given the current run length (capped at R-1)."""

    hazard: np.ndarray  # [D, N, R]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        h = self.hazard
        if h.ndim != 3 or min(h.shape) < 1:
            raise ConfigError(f"hazard must be [domains, drafters, R], got shape {h.shape}")
        if not (np.all(h >= 0.0) and np.all(h < 1.0)):
            raise ConfigError("hit probabilities must lie in [0, 1)")
        if self.names and len(self.names) != h.shape[1]:
            raise ConfigError("one name per drafter")

    @property
    def num_domains(self) -> int:
        return int(self.hazard.shape[0])

    @property
    def num_drafters(self) -> int:
        return int(self.hazard.shape[1])

    def reach(self, depth: int) -> np.ndarray:
        """P(run of hits from a fresh start >= d) for d = 0..depth: [D, N, depth + 1]."""
        d_idx = np.minimum(np.arange(depth), self.hazard.shape[2] - 1)
        probs = self.hazard[:, :, d_idx]  # [D, N, depth]
        ones = np.ones(self.hazard.shape[:2] + (1,))
        return np.cumprod(np.concatenate([ones, probs], axis=2), axis=2)

    def expected_accepted(self, k: int) -> np.ndarray:
        """E[min(A, k)] from a fresh start (the played drafter's view): [D, N]."""
        return self.reach(k)[:, :, 1:].sum(axis=2)

    def tokens_per_round(self, k: int) -> np.ndarray:
        """Expected tokens per round (bonus included) of a drafter played every round: [D, N].

        Rounds start fresh after the drafter's own miss; after a full draft the bonus
        position may extend the run, so for ``R > 1`` this is the long-run average over
        the Markov chain of round-start states (exact; for ``R = 1`` it is
        ``1 + E[min(A, k)]``).
        """
        r = self.hazard.shape[2]
        if r == 1:
            return 1.0 + self.expected_accepted(k)
        d, n = self.hazard.shape[:2]
        out = np.empty((d, n))
        for di in range(d):
            for i in range(n):
                out[di, i] = _played_rate(self.hazard[di, i], k)
        return out

    def accepted_distribution(self, k: int) -> np.ndarray:
        """P(min(A, k) = a) for a = 0..k from a fresh start: [D, N, k + 1]."""
        reach = self.reach(k + 1)  # P(A >= a), a = 0..k+1
        dist = reach[:, :, :-1] - reach[:, :, 1:]
        dist[:, :, k] = reach[:, :, k]  # everything >= k counts as k
        return dist

    def marginal_acceptance(self) -> np.ndarray:
        """Long-run fraction of positions that are hits (the stationary rate): [D, N]."""
        # Cycles: L hits then one miss.  E[L] = sum_{l>=1} P(L >= l).
        mean_run = self.mean_run()
        return mean_run / (mean_run + 1.0)

    def mean_run(self) -> np.ndarray:
        """E[L], the mean length of a run of hits from a fresh start: [D, N]."""
        r = self.hazard.shape[2]
        reach = self.reach(r)  # P(L >= d), d = 0..R
        head = reach[:, :, 1:].sum(axis=2)  # d = 1..R
        tail_h = self.hazard[:, :, r - 1]
        # beyond R the hazard is constant: sum_{d > R} P(L >= R) h^(d-R)
        return head + reach[:, :, r] * tail_h / (1.0 - tail_h)


def _played_rate(hazard: np.ndarray, k: int) -> float:
    """Long-run tokens per round of one drafter played every round; ``hazard`` [R]."""
    r = hazard.shape[0]
    trans = np.zeros((r, r))  # round-start state -> next round-start state
    tokens = np.zeros(r)  # expected tokens of a round from each start state
    for state in range(r):
        surv = 1.0
        for j in range(k):
            h = hazard[min(state + j, r - 1)]
            tokens[state] += surv * (1.0 - h) * (j + 1)  # j hits then a miss
            trans[state, 0] += surv * (1.0 - h)
            surv *= h
        tokens[state] += surv * (k + 1)  # all k accepted + bonus
        h_bonus = hazard[min(state + k, r - 1)]
        trans[state, min(state + k + 1, r - 1)] += surv * h_bonus
        trans[state, 0] += surv * (1.0 - h_bonus)
    vals, vecs = np.linalg.eig(trans.T)
    pi = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
    pi = pi / pi.sum()
    return float(pi @ tokens)


def iid_pool(alpha: np.ndarray, names: tuple[str, ...] = ()) -> DrafterPool:
    """A pool with i.i.d. per-position acceptance ``alpha`` [D, N] (or [N]: one domain)."""
    a = np.asarray(alpha, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    return DrafterPool(a[:, :, None].copy(), names)


def expert_pool(
    num_drafters: int,
    num_domains: int,
    rng: np.random.Generator,
    home: tuple[float, float] = (0.75, 0.9),
    away: tuple[float, float] = (0.3, 0.5),
    generalist: float | None = 0.7,
) -> DrafterPool:
    """Domain experts: drafter ``i`` is good in domain ``(i - g) % D`` and poor elsewhere.

    With ``generalist`` set, drafter 0 has that acceptance everywhere (the best fixed arm
    on a uniform mixture of domains when ``generalist`` beats every expert's average);
    experts still beat it inside their own domain, so different drafters are best in
    different domains.  i.i.d. per position.
    """
    if num_drafters < 1 or num_domains < 1:
        raise ConfigError("need at least one drafter and one domain")
    alpha = rng.uniform(*away, size=(num_domains, num_drafters))
    offset = 0 if generalist is None else 1
    for i in range(offset, num_drafters):
        alpha[(i - offset) % num_domains, i] = rng.uniform(*home)
    names = [f"expert{i - offset}@d{(i - offset) % num_domains}" for i in range(num_drafters)]
    if generalist is not None:
        alpha[:, 0] = generalist
        names[0] = "generalist"
    return iid_pool(alpha, tuple(names))


@dataclass(frozen=True)
class Stream:
    """The domain of each query, in order, and the tokens each query asks for.

    With ``adaptive`` the runner ignores ``domains`` beyond their count and, at each query
    start, picks the domain in which the policy's currently favoured arm
    (``policy.peek()``) falls furthest behind that domain's best arm: an adaptive adversary.
    """

    domains: np.ndarray  # [Q] int
    query_tokens: int
    adaptive: bool = False  # the runner picks each domain against the policy (see below)

    @property
    def num_queries(self) -> int:
        return int(self.domains.shape[0])


def make_stream(
    kind: str,
    num_domains: int,
    num_queries: int,
    rng: np.random.Generator,
    query_tokens: int = 256,
    block: int = 20,
    period: int = 1,
    growth: float = 1.0,
    adaptive: bool | None = None,
) -> Stream:
    """A stream of query domains.

    * ``stationary``: each query's domain i.i.d. uniform;
    * ``blocks``: ``block`` queries in a row share a domain, then it switches to another
      (uniform among the others);
    * ``alternating``: domains 0 and 1 alternate in phases of ``period * growth**j``
      queries (phase ``j``; ``growth = 1``: plain alternation every ``period`` queries).
      With ``adaptive=True`` (the default for this kind) the alternation is adversarial
      instead: each query's domain is the one where the policy's favourite arm is worst
      off (see :class:`Stream`), which a deterministic index policy cannot escape.
    """
    if kind not in STREAMS:
        raise ConfigError(f"stream must be one of {STREAMS}, got {kind!r}")
    if num_queries < 1 or query_tokens < 1:
        raise ConfigError("need at least one query of at least one token")
    if kind == "stationary":
        domains = rng.integers(0, num_domains, size=num_queries)
    elif kind == "blocks":
        if block < 1:
            raise ConfigError(f"block must be >= 1, got {block}")
        num_blocks = -(-num_queries // block)
        labels = np.empty(num_blocks, dtype=int)
        labels[0] = rng.integers(num_domains)
        for b in range(1, num_blocks):
            step = rng.integers(1, num_domains) if num_domains > 1 else 0
            labels[b] = (labels[b - 1] + step) % num_domains
        domains = np.repeat(labels, block)[:num_queries]
    else:
        if period < 1 or growth < 1.0:
            raise ConfigError("alternating needs period >= 1 and growth >= 1")
        parts: list[np.ndarray] = []
        total, j = 0, 0
        while total < num_queries:
            length = max(1, int(round(period * growth**j)))
            parts.append(np.full(length, j % min(2, num_domains)))
            total += length
            j += 1
        domains = np.concatenate(parts)[:num_queries]
    if adaptive is None:
        adaptive = kind == "alternating"
    return Stream(domains.astype(int), query_tokens, adaptive=adaptive)


@dataclass
class PositionBuffer:
    """A block of pre-drawn positions of one domain: every drafter's scores along them.

    ``hits``: the hit indicators as bytes, drafter-major (``hits[i * size + j]`` is drafter
    ``i`` at position ``j``), so the accepted length of a drafter is one ``bytes.find``.
    ``gamma``/``weight`` [B, N] float64 as :func:`specmux.feedback.position_scores` would
    return them (``None`` when no full-information learner needs them).
    """

    size: int
    hits: bytes
    gamma: np.ndarray | None  # [B, N] float64
    weight: np.ndarray | None  # [B, N] float64
    marginal: np.ndarray  # [N] long-run hit rate (for positions off the realized path)
    cursor: int = 0

    def accepted(self, drafter: int, start: int, k: int) -> int:
        """Leading hits of ``drafter`` from ``start``, capped at ``k``."""
        base = drafter * self.size + start
        miss = self.hits.find(b"\x00", base, base + k)
        return k if miss < 0 else miss - base


@dataclass
class SimEnv:
    """Draws positions for a :class:`DrafterPool` lazily, in blocks, per domain.

    ``take(domain, n)`` reserves ``n`` fresh consecutive positions of that domain (plus a
    look-ahead of ``lookahead`` positions, so a round near the end still sees real draws).
    ``scores=False`` skips the float ``gamma``/``weight`` arrays (bandit learners only).
    """

    pool: DrafterPool
    rng: np.random.Generator
    mode: str = "greedy"
    kappa: float = 4.0
    scores: bool = True
    block_cells: int = 1 << 22
    lookahead: int = 64
    buffers: dict[int, PositionBuffer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.kappa > 0.0:
            raise ConfigError(f"kappa must be > 0, got {self.kappa}")
        self._marginal = self.pool.marginal_acceptance()  # [D, N]

    def take(self, domain: int, n: int) -> tuple[PositionBuffer, int]:
        """``n`` fresh positions of ``domain``: (buffer, start offset)."""
        buf = self.buffers.get(domain)
        need = n + self.lookahead
        if buf is None or buf.cursor + need > buf.size:
            size = max(need, self.block_cells // self.pool.num_drafters)
            buf = self.draw(domain, size)
            self.buffers[domain] = buf
        start = buf.cursor
        buf.cursor += n
        return buf, start

    def draw(self, domain: int, size: int) -> PositionBuffer:
        """``size`` positions of ``domain`` for all drafters (vectorized over drafters)."""
        hazard = self.pool.hazard[domain]  # [N, R]
        hits, prev = draw_hits(hazard, size, self.rng)  # [N, B] (drafter-major)
        gamma = weight = None
        if self.scores:
            weight = np.ascontiguousarray(hits.T, dtype=np.float64)  # [B, N]
            if self.mode == "greedy":
                gamma = weight
            else:
                if prev is None:
                    h = np.broadcast_to(hazard[:, 0], weight.shape)
                else:
                    h_idx = np.minimum(prev.T, hazard.shape[1] - 1)
                    h = np.take_along_axis(hazard.T, h_idx, axis=0)  # [B, N]
                gamma = self.rng.beta(h * self.kappa + weight,
                                      (1.0 - h) * self.kappa + 1.0 - weight)
        return PositionBuffer(size=size, hits=hits.tobytes(),
                              gamma=gamma, weight=weight, marginal=self._marginal[domain])


def draw_hits(
    hazard: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Hit indicators [N, size] bool (drafter-major) for every drafter; ``hazard`` [N, R].

    i.i.d. pools (``R = 1``) compare one uniform per cell.  Otherwise the hits are renewal
    cycles of ``L`` hits then one miss, the block starting fresh, and ``prev`` [N, size]
    int32 (consecutive hits just before each position: the run state that set its
    probability) comes back too (``None`` for ``R = 1``).
    """
    num, r = hazard.shape
    if r == 1:
        u = rng.random((num, size), dtype=np.float32)
        return u < hazard[:, 0].astype(np.float32)[:, None], None
    reach = np.cumprod(np.concatenate([np.ones((num, 1)), hazard], axis=1), axis=1)  # [N, R+1]
    # Cycles needed: size / (E[L] + 1) on average for the shortest-run drafter, with margin.
    mean_cycle = float(DrafterPool(hazard[None]).mean_run().min()) + 1.0
    cycles = int(size / mean_cycle * 1.1) + 64
    ends_parts: list[np.ndarray] = []
    covered = np.full(num, -1, dtype=np.int64)  # last miss position drawn per drafter
    while covered.min() < size - 1:
        lengths = _draw_run_lengths(hazard, reach, cycles, rng)  # [C, N]
        ends = covered[None, :] + np.cumsum(lengths + 1, axis=0)  # miss positions
        ends_parts.append(ends)
        covered = ends[-1]
    ends = np.concatenate(ends_parts, axis=0)  # [C, N], increasing down each column
    cols = np.broadcast_to(np.arange(num), ends.shape)
    inside = ends < size
    hits = np.ones((size, num), dtype=bool)
    hits[ends[inside], cols[inside]] = False
    last_miss = np.full((size, num), -1, dtype=np.int64)
    last_miss[ends[inside], cols[inside]] = ends[inside]
    pos = np.arange(size, dtype=np.int64)[:, None]
    # prev: hits just before j = j - (last miss strictly before j) - 1.
    last_before = np.empty_like(last_miss)
    last_before[0] = -1
    last_before[1:] = np.maximum.accumulate(last_miss, axis=0)[:-1]
    prev = (pos - last_before - 1).astype(np.int32)
    return np.ascontiguousarray(hits.T), np.ascontiguousarray(prev.T)


def _draw_run_lengths(
    hazard: np.ndarray, reach: np.ndarray, cycles: int, rng: np.random.Generator
) -> np.ndarray:
    """``cycles`` i.i.d. hit-run lengths L per drafter: P(L >= d) = prod_{j<d} h[min(j, R-1)]."""
    num, r = hazard.shape
    u = rng.random((cycles, num))
    # Head: L < R-1 where P(L >= d) falls below u; count d in 1..R-1 with reach[d] > u.
    head = (reach[None, :, 1:r] > u[:, :, None]).sum(axis=2) if r > 1 else np.zeros(
        (cycles, num), dtype=np.int64
    )
    # Tail: L >= R-1: L = (R-1) + G, G geometric with P(G >= g) = h^g.
    tail_h = hazard[:, r - 1]
    rescaled = u / reach[None, :, r - 1]  # u | (L >= R-1) is uniform on [0, reach[R-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_h = np.where(tail_h > 0, np.log(np.where(tail_h > 0, tail_h, 0.5)), -np.inf)
        g = np.floor(np.log(np.maximum(rescaled, 1e-300)) / log_h[None, :])
    g = np.where(np.isfinite(g), g, 0.0)
    in_tail = u < reach[None, :, r - 1]
    lengths = np.where(in_tail, (r - 1) + g, head)
    return np.minimum(lengths, 1 << 20).astype(np.int64)


def rounds_to_finish(pool: DrafterPool, k: int, tokens: int) -> np.ndarray:
    """Expected rounds for a fixed arm ``(i, k)`` to commit ``tokens`` tokens of one query.

    Fresh-start renewal (exact for i.i.d. pools), the last round cut to what is left, as the
    engine does (it drafts at most ``left - 1`` tokens).  Returns [D, N, tokens + 1]:
    entry ``[d, i, n]`` is for ``n`` tokens.
    """
    dist = pool.accepted_distribution(k)  # [D, N, k+1], P(min(A, k) = a)
    reach = pool.reach(k + 1)  # [D, N, k+2], P(A >= a)
    f = np.zeros(pool.hazard.shape[:2] + (tokens + 1,))
    for n in range(1, tokens + 1):
        kk = min(k, n - 1)
        if kk == k:
            probs = dist
        else:  # cut: A' = min(A, kk)
            probs = reach[:, :, : kk + 1] - reach[:, :, 1 : kk + 2]
            probs = probs.copy()
            probs[:, :, kk] = reach[:, :, kk]
        ys = np.arange(1, probs.shape[2] + 1)  # tokens committed = a + 1
        prev = f[:, :, np.maximum(n - ys, 0)]
        f[:, :, n] = 1.0 + (probs * prev).sum(axis=2)
    return f

