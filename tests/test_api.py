"""The Python API: Pipeline over tiny models with a real (tiny) tokenizer."""

from __future__ import annotations

import pytest

from specmux import Pipeline, SamplingParams, autoregressive_generate
from specmux.config import parse_speculative_config
from specmux.errors import ConfigError, PromptError, SpecmuxError

from conftest import tiny_lm
from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def pipe(target_model, drafter_models) -> Pipeline:
    return Pipeline(target_model, [drafter_models[1], "ngram"], "hedge",
                    tokenizer=tiny_tokenizer(), num_speculative_tokens=3)


def test_generate_text_equals_target_only(pipe, target_model) -> None:
    out = pipe.generate("def add(a, b):", max_new_tokens=20)
    ids = pipe.encode("def add(a, b):")
    eos = [pipe.tokenizer.eos_token_id]
    ref = autoregressive_generate(target_model, ids, 20, stop_token_ids=eos)
    assert out.token_ids == ref
    assert out.text == pipe.decode(ref)
    assert out.stats.num_output_tokens == len(ref)


def test_chat_template_and_stream(pipe) -> None:
    ids = pipe.encode("hello", chat=True)
    assert ids[: len(pipe.encode("user: hello"))] == pipe.encode("user: hello")
    steps = list(pipe.stream("hello", chat=True, max_new_tokens=12))
    assert sum(len(s.tokens) for s in steps) <= 12 and steps[-1].finished
    assert pipe.encode_chat([{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi"}])


def test_sampling_runs_and_is_seeded(pipe) -> None:
    a = pipe.generate("abc", max_new_tokens=10, sampling=SamplingParams(0.8, seed=3))
    assert 1 <= len(a.token_ids) <= 10


def test_api_errors(pipe) -> None:
    with pytest.raises(PromptError):
        pipe.generate("", max_new_tokens=5)
    with pytest.raises(SpecmuxError, match="local HF directory"):  # unknown: tried as a hub id
        Pipeline(tiny_lm(0), ["no-such-kind-of-drafter"], tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="policy"):
        parse_speculative_config('{"policy": 3}')
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        parse_speculative_config('{"prompt_lookup_min": 5, "prompt_lookup_max": 2}')


def test_suffix_and_contextual_config_keys_reach_the_pool(target_model) -> None:
    pipe = Pipeline(target_model, ["suffix", "ngram"], "hedge", tokenizer=tiny_tokenizer(),
                    num_speculative_tokens=[0, 2, 4], contextual=True,
                    suffix_decoding_max_spec_factor=2.5, suffix_decoding_eviction="lru",
                    suffix_decoding_max_tree_depth=8)
    suffix = pipe.decoder.drafters[0]
    assert (suffix.max_spec_factor, suffix.learned.eviction, suffix.max_match) == (2.5, "lru", 8)
    assert pipe.decoder.selector.contextual
    out = pipe.generate("def add(a, b): return a + b\ndef add(a, b):", max_new_tokens=12)
    ids = pipe.encode("def add(a, b): return a + b\ndef add(a, b):")
    eos = [pipe.tokenizer.eos_token_id]
    assert out.token_ids == autoregressive_generate(target_model, ids, 12, stop_token_ids=eos)
    for bad in ({"suffix_decoding_eviction": "random"}, {"suffix_decoding_min_token_prob": 2.0},
                {"suffix_decoding_max_tree_depth": 0}):
        with pytest.raises(ConfigError, match="suffix_decoding"):
            Pipeline(target_model, ["suffix"], tokenizer=tiny_tokenizer(), **bad)
