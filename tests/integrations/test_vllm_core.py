"""The vLLM proposer's engine-independent core, driven by a simulated continuous batch."""

from __future__ import annotations

import doctest
import gc
import json

import numpy as np
import pytest

import specmux.integrations.vllm as vllm_integration
import specmux.integrations.vllm_plugin as vllm_plugin
from specmux.drafters.ngram import lookup
from specmux.drafters.ngram import match as ngram_match
from specmux.errors import ConfigError
from specmux.integrations.vllm import (
    ProposerCore,
    StepCostModel,
    build_drafters,
    fast_lookup,
    fast_match,
    parse_options,
)

K = 4
MAX_LEN = 512


def core(**options) -> ProposerCore:
    opts = parse_options(options, K)
    return ProposerCore(opts, K, MAX_LEN, build_drafters(opts, tokenizer=lambda: None))


class FakeBatch:
    """vLLM's side: each request follows a fixed true sequence; a step commits the accepted
    draft prefix plus one true token, as vLLM's greedy verification would."""

    def __init__(self, truths: dict[str, list[int]], prompt_lens: dict[str, int]) -> None:
        self.truths = truths
        self.lens = dict(prompt_lens)
        self.drafts: dict[str, list[int]] = {}

    def step(self, proposer: ProposerCore, order: list[str], live: set[str]) -> None:
        rows = np.zeros((len(order), MAX_LEN), dtype=np.int32)
        num_tokens = np.zeros(len(order), dtype=np.int32)
        sampled = []
        for i, rid in enumerate(order):
            truth, n = self.truths[rid], self.lens[rid]
            if rid not in self.drafts:  # prefill: commits the first token
                committed = [truth[n]]
            else:
                draft, ok = self.drafts[rid], 0
                while ok < len(draft) and n + ok + 1 < len(truth) and draft[ok] == truth[n + ok]:
                    ok += 1
                committed = truth[n: n + ok + 1]
            n += len(committed)
            self.lens[rid] = n
            rows[i, :n] = truth[:n]
            num_tokens[i] = n
            sampled.append(committed)
        drafts = proposer.step(order, sampled, num_tokens, rows, live=live)
        for rid, draft in zip(order, drafts, strict=True):
            assert len(draft) <= K
            self.drafts[rid] = draft


def truths(seed: int = 0) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    loop = list(rng.integers(2, 50, size=7))
    return {
        "copy": (loop * 60)[:400],  # repeats itself: prompt lookup pays
        "free": list(rng.integers(2, 5000, size=400)),  # never repeats
        "mixed": list(rng.integers(2, 5000, size=30)) + (loop * 60)[:370],
    }


def test_stats_file_is_strict_json_before_any_draft(tmp_path) -> None:
    """The first step (prefills only, nothing drafted yet) writes the stats file: strict
    JSON, the acceptance rate ``null`` (a NaN there crashed vLLM's worker)."""
    import json

    path = tmp_path / "stats.json"
    proposer = core(stats_file=str(path))
    batch = FakeBatch(truths(), {"copy": 20, "free": 20})
    batch.step(proposer, ["copy", "free"], {"copy", "free"})
    stats = json.loads(path.read_text())
    assert stats["drafted"] == 0 and stats["acceptance_rate"] is None
    for _ in range(5):
        batch.step(proposer, ["copy", "free"], {"copy", "free"})
    proposer.write_stats()
    stats = json.loads(path.read_text())
    assert stats["drafted"] > 0 and 0.0 <= stats["acceptance_rate"] <= 1.0


def test_interleaved_requests_learn_as_if_alone() -> None:
    """Per-request state isolation: shuffled rows, staggered starts and ends give every
    request the drafts it gets when served alone (deterministic learner and drafter)."""
    options = {"drafters": ["ngram"], "policy": "hedge",
               "policy_kwargs": {"selection": "argmax"}, "token_cost": 0.1,
               "record_history": True, "warmup_rounds": 0,  # no shared learner
               "contextual": False}  # no context learners (shared by all requests)
    alone: dict[str, list[list[int]]] = {}
    for rid, truth in truths().items():
        proposer, batch = core(**options), FakeBatch({rid: truth}, {rid: 12})
        seen = []
        for _ in range(60):
            batch.step(proposer, [rid], {rid})
            seen.append(batch.drafts[rid])
        alone[rid] = seen

    proposer = core(**options)
    batch = FakeBatch(truths(), dict.fromkeys(truths(), 12))
    seen = {rid: [] for rid in truths()}
    rng = np.random.default_rng(1)
    starts, ends = {"copy": 0, "free": 5, "mixed": 11}, {"copy": 60, "free": 65, "mixed": 71}
    for t in range(71):
        live = {rid for rid in truths() if starts[rid] <= t < ends[rid]}
        order = sorted(live)
        rng.shuffle(order)
        batch.step(proposer, order, live)
        for rid in order:
            seen[rid].append(batch.drafts[rid])
    assert seen == alone
    assert proposer.stats.requests_freed == 2 and set(proposer.requests) == {"mixed"}
    copy_history = proposer.finished_history["copy"]
    assert copy_history == truths()["copy"][: len(copy_history)]


def test_drafts_where_they_pay_and_not_elsewhere() -> None:
    proposer = core(drafters=["ngram", "suffix"], token_cost=0.2)
    batch = FakeBatch(truths(), dict.fromkeys(truths(), 12))
    for _ in range(60):
        batch.step(proposer, list(truths()), set(truths()))
    plays = {rid: proposer.requests[rid].policy.probabilities() for rid in truths()}
    none_arm = len(proposer.arms) - 1
    assert str(proposer.arms[none_arm]) == "none@k=0"
    assert plays["free"][none_arm] > 0.9  # nothing repeats: no speculation
    assert plays["copy"][none_arm] < 0.1  # copying: draft
    stats = proposer.stats_dict()
    assert stats["accepted"] > 0.5 * stats["drafted"]
    assert stats["live_requests"] == 3 and stats["ms_per_row_step"] > 0
    assert 0 < stats["ms_per_row_step_median"] <= stats["ms_per_call_max"]
    assert stats["first_call_ms"] > 0 and stats["gc_ms_in_calls"] >= 0
    json.dumps(stats, allow_nan=False)  # the stats file is strict JSON


def test_gc_pauses_inside_proposer_calls_are_counted() -> None:
    proposer = core(drafters=["ngram"], token_cost=0.2)
    batch = FakeBatch(truths(), dict.fromkeys(truths(), 12))
    batch.step(proposer, list(truths()), set(truths()))
    before = proposer.stats.gc_seconds
    clock = proposer.gc_clock
    gc.collect()  # outside a call: the clock moves, the stats do not
    assert clock.total > 0 and proposer.stats.gc_seconds == before
    proposer._observe_step_cost = lambda *a: gc.collect()  # a pause inside the call
    batch.step(proposer, list(truths()), set(truths()))
    assert proposer.stats.gc_seconds > before


def test_bandit_policies_run_without_counterfactual_scoring() -> None:
    for policy in ("ucb", "exp3", "metasd", "fixed"):
        proposer = core(policy=policy, drafters=["ngram"])
        assert proposer.full_information is False
        batch = FakeBatch({"copy": truths()["copy"]}, {"copy": 12})
        for _ in range(20):
            batch.step(proposer, ["copy"], {"copy"})
        assert proposer.requests["copy"].tracker is None
        assert proposer.requests["copy"].policy.t == 19


def test_new_requests_start_from_the_shared_learner() -> None:
    proposer = core(drafters=["ngram"], token_cost=0.2, policy_kwargs={"selection": "argmax"})
    first = FakeBatch({"copy": truths()["copy"]}, {"copy": 12})
    for _ in range(40):
        first.step(proposer, ["copy"], {"copy"})
    assert proposer.arms[proposer.shared.select()].k == K  # copying: the longest drafts
    second = FakeBatch({"again": truths()["copy"]}, {"again": 100})
    second.step(proposer, ["again"], {"copy", "again"})
    assert len(second.drafts["again"]) == K  # its very first draft is the shared choice


def test_contexts_learn_where_drafting_pays() -> None:
    """Requests that open with free text and then copy a loop: the no-match context learns
    not to speculate, the strong-match-after-a-hit context to draft K tokens, and once
    warmed up those learners play in every request (they are shared)."""
    proposer = core(drafters=["ngram"], token_cost=0.2, warmup_rounds=0,
                    policy_kwargs={"selection": "argmax"})
    rng = np.random.default_rng(3)
    for r in range(6):
        loop = list(rng.integers(2, 50, size=7))
        truth = list(rng.integers(100, 5000, size=40)) + (loop * 60)[:300]
        batch = FakeBatch({f"r{r}": truth}, {f"r{r}": 12})
        for _ in range(60):
            batch.step(proposer, [f"r{r}"], {f"r{r}"})
    none_arm = len(proposer.arms) - 1
    strong_hit, nothing = 1 + 2 + 1, 0  # context_key: drafter 0, level 2, hit
    assert proposer.context_counts[nothing] >= vllm_integration.CONTEXT_WARMUP
    assert proposer.contexts[nothing].select() == none_arm
    assert str(proposer.arms[proposer.contexts[strong_hit].select()]) == f"ngram@k={K}"
    state = proposer.requests["r5"]
    assert state.key == strong_hit and proposer._learner(state) is proposer.contexts[state.key]


def test_suffix_views_are_per_request_and_outputs_are_shared() -> None:
    """The SuffixDecoding drafter: each live request's view holds exactly its own context;
    a finished request's output joins the shared store, so a later request that produces
    the same text is drafted from it at once."""
    proposer = core(drafters=["suffix"], token_cost=0.05, warmup_rounds=0,
                    policy_kwargs={"selection": "argmax"}, record_history=True)
    d = proposer.drafters.index(next(x for x in proposer.drafters if x.name == "suffix"))
    rng = np.random.default_rng(5)
    answer = list(rng.integers(100, 5000, size=120))  # never repeats within itself
    first = {"a": [7, 8, 9] + answer, "b": list(rng.integers(5000, 9000, size=123))}
    batch = FakeBatch(first, {"a": 3, "b": 3})
    for _ in range(30):
        batch.step(proposer, ["a", "b"], {"a", "b"})
    for rid in ("a", "b"):
        view = proposer.requests[rid].local[d]
        assert view.request.tokens == first[rid][: batch.lens[rid]]
        assert view.learned is proposer.drafters[d].learned
    assert proposer.drafters[d].learned.num_tokens == 0  # nothing finished yet
    while batch.lens["a"] < len(first["a"]) - 1:
        batch.step(proposer, ["a"], {"a"})  # "b" leaves: its output joins the store
    batch.step(proposer, [], set())  # "a" leaves too
    assert not proposer.requests
    assert proposer.drafters[d].learned.num_tokens >= len(answer) - 1

    again = FakeBatch({"c": [1, 2, 3] + answer}, {"c": 3})
    steps = 0
    while again.lens["c"] < len(answer) - 1:
        again.step(proposer, ["c"], {"c"})
        steps += 1
    assert steps < len(answer) / 2  # long drafts from the earlier output


def test_state_is_bounded() -> None:
    proposer = core(max_requests=2, drafters=["ngram"])
    batch = FakeBatch(truths(), dict.fromkeys(truths(), 12))
    batch.step(proposer, list(truths()), live=set(truths()))
    assert len(proposer.requests) == 2 and proposer.stats.requests_freed == 1


@pytest.mark.parametrize("seed", range(20))
def test_fast_lookup_is_prompt_lookup(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1 + seed % 5, size=int(rng.integers(1, 60))).astype(np.int32)
    for end in range(len(tokens) + 1):
        for max_n, min_n in ((4, 1), (3, 2), (1, 1), (5, 5)):
            assert fast_lookup(tokens, end, max_n, min_n, 3).tolist() == lookup(
                tokens, end, max_n, min_n, 3).tolist(), (end, max_n, min_n)
            draft, n = fast_match(tokens, end, max_n, min_n, 3)
            want, want_n = ngram_match(tokens, end, max_n, min_n, 3)
            assert (draft.tolist(), n) == (want.tolist(), want_n), (end, max_n, min_n)


def test_ngram_guesses_match_the_drafter_along_the_path() -> None:
    proposer = core(drafters=["ngram", "suffix"])
    ngram = proposer.drafters[0]
    row = np.array(truths()["mixed"], dtype=np.int32)
    path = row[100:104].tolist()
    fast = proposer._guesses(ngram, row, 100, row[:100].tolist(), path)
    slow = ngram.distributions(row[:100].tolist(), path, vllm_integration.GREEDY).tokens
    assert fast.tolist() == slow.tolist()
    assert lookup(row, 100, 4, 1, 3).tolist() == ngram.propose(
        row[:100].tolist(), 3, vllm_integration.GREEDY).tokens.tolist()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"polcy": "hedge"}, "'polcy' is unknown"),
        ({"policy": "nope"}, "unknown policy"),
        ({"k": [5]}, "exceeds num_speculative_tokens"),
        ({"k": [0]}, "'k.0'"),
        ({"drafters": []}, "'drafters'"),
        ({"drafters": ["ngram", "ngram"]}, "twice"),
        ({"drafters": ["corpus:/no/such"]}, "corpus not found"),
        ({"ngram_min": 3, "ngram_max": 2}, "ngram_min"),
        ({"token_cost": "cheap"}, "token_cost"),
        ({"policy": "ucb", "policy_kwargs": {"nope": 1}}, "bad options for policy"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_options(options, K)


def test_default_lengths_and_cost_model() -> None:
    assert parse_options({}, 8).lengths(8) == [1, 2, 4, 8]
    assert parse_options({}, 5).lengths(5) == [1, 2, 4, 5]
    model = StepCostModel()
    assert model.beta() == vllm_integration.MIN_TOKEN_COST
    for t in [1, 5] * 20:  # 1 s per step whatever its size: extra tokens are free
        model.add(tokens=t, committed=1, seconds=1.0)
    assert model.b == 0.0


def test_doctests() -> None:
    for module in (vllm_integration, vllm_plugin):
        assert doctest.testmod(module).failed == 0
