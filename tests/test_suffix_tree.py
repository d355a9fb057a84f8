"""The SuffixDecoding-style drafter: matching, scoring, adaptive length, learning, eviction,
and losslessness through the engine (greedy equality and a chi-square sampling test)."""

from __future__ import annotations

import numpy as np
import pytest

from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter, TokenStore
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.errors import ConfigError
from specmux.policies import POLICIES
from specmux.types import SamplingParams

from conftest import VOCAB
from stats import assert_distribution, target_first_two

GREEDY = SamplingParams()


def draft(d: SuffixTreeDrafter, context: list[int], k: int = 8) -> list[int]:
    return d.propose(context, k, GREEDY).tokens.tolist()


def test_request_store_copies_the_longest_match() -> None:
    d = SuffixTreeDrafter(max_spec_factor=2.0)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5]
    d.start_query(prompt)
    assert draft(d, prompt, k=3) == [6, 7, 8]  # capped by k
    assert draft(d, prompt) == [6, 7, 8, 1, 2, 3, 4, 5]  # a variable-length run
    assert draft(d, [*prompt, 6, 7]) == [8, 1, 2, 3, 4, 5, 6, 7]  # the context was synced
    assert draft(d, [40, 41]) == []  # a new context: the store is rebuilt, nothing matches


def test_speculation_length_adapts_to_the_match_length() -> None:
    d = SuffixTreeDrafter(max_spec_factor=1.0)
    long_match = [9, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16, 0, 1, 2, 3, 4]
    d.start_query(long_match)
    assert len(draft(d, long_match)) == 4  # match length 4 x factor 1
    short = [9, 4, 10, 11, 12, 13, 14, 15, 16, 0, 4]
    d.start_query(short)
    assert draft(d, short) == [10]  # a one-token match drafts one token
    with pytest.raises(ConfigError):
        SuffixTreeDrafter(max_spec_factor=0)
    with pytest.raises(ConfigError):
        SuffixTreeDrafter(min_token_prob=1.5)


def test_frequency_scoring_and_min_probability() -> None:
    outputs = [[5, 6, 7, 1], [5, 6, 7, 2], [5, 6, 7, 1], [5, 6, 8, 3]]
    d = SuffixTreeDrafter(outputs, max_spec_factor=4.0, min_token_prob=0.3)
    ctx = [20, 5, 6]
    d.start_query(ctx)
    # After (5, 6): 7 in 3 of 4 (p = .75), then 1 in 2 of 3 (p = .5), then the end.
    assert draft(d, ctx) == [7, 1]
    strict = SuffixTreeDrafter(outputs, max_spec_factor=4.0, min_token_prob=0.6)
    strict.start_query(ctx)
    assert draft(strict, ctx) == [7]  # .75 kept, .5 pruned
    positions, length = d.corpus.match(np.array(ctx), 8)
    assert length == 2 and len(positions) == 4
    tokens, probs = d.corpus.follow(positions, 4, 0.0)
    assert tokens == [7, 1] and probs == pytest.approx([0.75, 0.5])


def test_learns_outputs_across_queries_and_distributions_agree() -> None:
    d = SuffixTreeDrafter()
    d.start_query([1, 2])
    d.observe([1, 2], [30, 31, 32])
    d.observe([1, 2, 30, 31, 32], [33, 34])
    d.start_query([3, 4, 30])  # the previous output moves into the global store
    assert d.learned.num_tokens == 5
    assert draft(d, [3, 4, 30], k=2) == [31]  # match length 1 -> one token
    assert draft(d, [3, 4, 30, 31], k=2) == [32, 33]
    dists = d.distributions([3, 4, 30], [31, 32, 33], GREEDY)
    firsts = [draft(d, [3, 4, 30, *[31, 32, 33][:j]], 1) for j in range(3)]
    assert dists.tokens.tolist() == [f[0] if f else -1 for f in firsts]
    off = SuffixTreeDrafter(learn_online=False)
    off.start_query([1])
    off.observe([1], [5, 6, 7])
    off.end_query()
    assert off.learned.num_tokens == 0


def test_fifo_eviction_bounds_the_global_store() -> None:
    s = TokenStore(max_tokens=10, eviction="fifo")
    for i in range(20):
        s.add([100 + i, 200 + i, 300 + i, 400 + i])
    assert s.num_tokens <= 10 and len(s.docs) == 2
    assert s.match(np.array([100]), 4)[1] == 0  # the first documents are gone
    assert s.match(np.array([119, 219]), 4)[1] == 2
    s.add(list(range(500, 600)))  # longer than the budget: its tail is kept
    assert s.num_tokens == 10
    s2 = TokenStore(max_tokens=4000, eviction="fifo")
    for i in range(3000):  # the index is swept: dead positions do not pile up
        s2.add([i % 50, 1000 + i, 2000 + i])
    assert len(s2.index) < 3 * 4000 and sum(len(v) for v in s2.index.values()) < 3 * 2 * 4000
    with pytest.raises(ConfigError):
        TokenStore(eviction="random")


def test_lru_keeps_a_document_that_drafts() -> None:
    def run(eviction: str) -> int:
        d = SuffixTreeDrafter(max_tokens=12, eviction=eviction)
        d.learned.add([1, 2, 3, 4])  # the useful one, oldest
        for i in range(2):
            d.learned.add([50 + i, 60 + i, 70 + i, 80 + i])
            d.start_query([9, 1, 2])
            draft(d, [9, 1, 2])  # drafts from the first document: a hit
        d.learned.add([90, 91, 92, 93])
        d.start_query([9, 1, 2])
        return len(draft(d, [9, 1, 2]))

    assert run("lru") == 2  # recycled on eviction
    assert run("fifo") == 0  # evicted


def test_fork_shares_the_corpus_not_what_it_learns() -> None:
    base = SuffixTreeDrafter([[1, 2, 3, 4]], name="corpus")
    a, b = base.fork(), base.fork()
    assert a.corpus is base.corpus and a.name == "corpus"
    a.start_query([7])
    a.observe([7], [8, 9, 10])
    a.start_query([8])
    assert draft(a, [8]) == [9] and draft(b, [8]) == []
    assert draft(b, [5, 2]) == [3]  # match length 1: one token from the shared corpus


def pool(drafter_models) -> list:
    small, good = drafter_models
    return [HFDrafter(small, name="small"), HFDrafter(good, name="good"),
            NgramDrafter(prompt_lookup_max=3),
            SuffixTreeDrafter([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 7, 6]], name="suffix")]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def references(target_model) -> dict:
    return {tuple(p): autoregressive_generate(target_model, p, 40) for p in PROMPTS}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_greedy_is_identical_to_target(policy, target_model, drafter_models, references) -> None:
    decoder = SpeculativeDecoder(target_model, pool(drafter_models), policy,
                                 num_speculative_tokens=5, score_all=True, seed=1)
    for prompt in PROMPTS * 2:  # the second pass drafts from the learned outputs
        assert decoder.generate(prompt, 40).token_ids == references[tuple(prompt)]


def test_suffix_alone_is_lossless_and_learns(target_model, references) -> None:
    drafter = SuffixTreeDrafter(name="suffix")
    decoder = SpeculativeDecoder(target_model, [drafter], "fixed", num_speculative_tokens=6)
    first = [decoder.generate(p, 40) for p in PROMPTS]
    again = [decoder.generate(p, 40) for p in PROMPTS]
    for out, p in zip(first + again, PROMPTS * 2, strict=True):
        assert out.token_ids == references[tuple(p)]
    # Repeated requests: the global store holds the earlier outputs, so drafts are long.
    assert sum(len(o.steps) for o in again) < sum(len(o.steps) for o in first)
    assert sum(len(o.steps) for o in again) <= 3 * 40 / 3


def test_sampling_matches_target_distribution(target_model) -> None:
    """Over 10k seeded generations with a drafter that learns every query (its drafts are
    the earlier sampled outputs), the first two tokens follow the target's joint law."""
    sampling = SamplingParams(temperature=1.0)
    prompt = [3, 1, 4, 1, 5]
    drafter = SuffixTreeDrafter(index_prompts=True, max_spec_factor=1.0, min_token_prob=0.0)
    decoder = SpeculativeDecoder(target_model, [drafter], "fixed", num_speculative_tokens=2)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(10_000):
        s = SamplingParams(sampling.temperature, seed=seed)
        out = decoder.generate(prompt, max_new_tokens=2, sampling=s)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_accepted_tokens > 500  # drafts were really accepted
    joint = target_first_two(target_model, prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)


def test_pipeline_suffix_learns_across_requests(target_model) -> None:
    """A long-lived Pipeline (as the server holds one) keeps the suffix drafter's global
    store across requests: a repeated request is drafted from its earlier output."""
    from specmux import Pipeline
    from specmux.config import parse_speculative_config

    from helpers import tiny_tokenizer

    assert parse_speculative_config('{"method": "suffix"}').drafter_specs() == ["suffix"]
    pipe = Pipeline(target_model, ["suffix"], "fixed", tokenizer=tiny_tokenizer(),
                    num_speculative_tokens=6)
    first = pipe.generate("abc def", max_new_tokens=30)
    pipe.generate("other words", max_new_tokens=30)
    again = pipe.generate("abc def", max_new_tokens=30)
    assert again.token_ids == first.token_ids
    assert len(again.steps) < len(first.steps)
    assert again.stats.num_accepted_tokens > first.stats.num_accepted_tokens


def _match_one_token_at_a_time(store: TokenStore, tail: np.ndarray, max_match: int):
    """The reference: extend the anchor's match backwards one token per pass."""
    for n in store.anchors:
        if n > len(tail):
            continue
        positions = store.index.get(tuple(tail[-n:].tolist()))
        if not positions:
            continue
        pos = np.frombuffer(positions, dtype=np.int64)[-store.max_positions :]
        pos = pos[pos >= store.alive]
        if not pos.size:
            continue
        local, length = pos - store.start, n
        for d in range(n + 1, min(max_match, len(tail)) + 1):
            before = local - d
            keep = (before >= 0) & (store.buf[np.maximum(before, 0)] == tail[-d])
            if not keep.any():
                break
            local, length = local[keep], d
        return local + store.start, length
    return np.empty(0, dtype=np.int64), 0


@pytest.mark.parametrize("max_tokens", [None, 30])
def test_match_equals_the_one_token_at_a_time_extension(max_tokens) -> None:
    """2,000 seeded cases: the tail is a piece of a stored document, so long matches are
    common; a three-token alphabet makes ties and matches across documents common (a
    tenth of the cases keep positions of different lengths after the first comparison);
    a bounded store also evicts, so dead positions are filtered too."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        docs = [rng.integers(0, 3, rng.integers(2, 40)).tolist()
                for _ in range(rng.integers(1, 6))]
        store = TokenStore((1, 2, 3), max_tokens, 8)
        for doc in docs:
            store.add(doc)
        doc = docs[rng.integers(len(docs))]
        tail = np.asarray(doc[: rng.integers(0, 40)][-rng.integers(1, 30):] or [0])
        max_match = int(rng.integers(1, 12))
        got = store.match(tail, max_match)
        want = _match_one_token_at_a_time(store, tail, max_match)
        assert (got[0].tolist(), got[1]) == (want[0].tolist(), want[1])


def test_a_proposal_after_an_offer_equals_a_fresh_one() -> None:
    """The engine offers ``max_k`` and then proposes ``k <= max_k`` after the same context,
    and scores the drafter along the verified path: the proposal and the path's first
    guess reuse the offer's lookup (each store's draft cut to ``k``), and must be what a
    lookup of their own finds, from every store, for every ``k``."""
    rng = np.random.default_rng(1)
    corpus = [rng.integers(0, 4, 30).tolist() for _ in range(3)]

    def drafter() -> SuffixTreeDrafter:
        d = SuffixTreeDrafter(corpus, max_spec_factor=0.5, min_token_prob=0.2)
        d.start_query(corpus[0][:10])
        d.observe([], rng_outputs)
        d.start_query([0, 1])  # the first query's output goes to the learned store
        return d

    rng_outputs = rng.integers(0, 4, 40).tolist()
    reused, fresh = drafter(), drafter()
    sampling = SamplingParams()
    for _ in range(300):
        context = rng.integers(0, 4, int(rng.integers(2, 50))).tolist()
        k = int(rng.integers(1, 9))
        for d in (reused, fresh):  # a new query each time (within one, contexts only grow)
            d.start_query(context)
        reused.offer(context, 8)
        got = reused.propose(context, k, sampling).tokens.tolist()
        assert got == fresh.propose(context, k, sampling).tokens.tolist()
        path = rng.integers(0, 4, int(rng.integers(0, 6))).tolist()
        seq = np.asarray(context + path, dtype=np.int64)
        want = [(fresh._candidate(seq[: len(context) + j], 1)[0] or [-1])[0]
                for j in range(len(path))]  # a lookup of its own at every position
        assert reused.distributions(context, path, sampling).tokens.tolist() == want
