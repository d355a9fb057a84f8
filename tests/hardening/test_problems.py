"""Issue 15, problems 1-12 (non-server part): each reproduced as a test, then fixed.

Every test names the problem number of the issue it reproduces.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specmux.api import Pipeline, make_drafter
from specmux.cli import app
from specmux.config import SpeculativeConfig, parse_speculative_config, seed_entropy
from specmux.errors import ConfigError, PromptError, SpecmuxError
from specmux.policies import make_policy
from specmux.server.worker import LearnerStore
from specmux.state import load_json_or_quarantine
from specmux.types import SamplingParams

from conftest import tiny_lm
from helpers import save_tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("models")
    target = save_tiny_model(root / "target", tiny_lm(0, hidden=48))
    drafter = save_tiny_model(root / "drafter", tiny_lm(1, hidden=32, layers=1))
    return str(target), str(drafter)


def tiny_pipeline(**kwargs) -> Pipeline:
    return Pipeline(tiny_lm(0, hidden=48), kwargs.pop("drafters", [tiny_lm(1, hidden=32,
                    layers=1), "ngram"]), tokenizer=tiny_tokenizer(), **kwargs)


def one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


def generate(model_dirs, *args: str):
    target, drafter = model_dirs
    return runner.invoke(app, ["generate", "--target", target, "--drafter", drafter,
                               "--drafter", "ngram", "--prompt", "def add(a, b):",
                               "--max-new-tokens", "8", "--no-install", *args])


# -- 1. seeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(-(2**63)), str(2**64 - 1)])
def test_1_any_64_bit_seed_is_accepted_on_the_cli(model_dirs, seed: str) -> None:
    result = generate(model_dirs, "--temperature", "0.7", "--seed", seed)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_1_seed_outside_64_bits_is_exit_2(model_dirs, seed: str) -> None:
    result = generate(model_dirs, "--temperature", "0.7", "--seed", seed)
    assert result.exit_code == 2
    assert "64-bit" in one_error_line(result.output)


def test_1_seed_mapping_is_modulo_2_64() -> None:
    outs = [tiny_pipeline().generate("abc", max_new_tokens=12, sampling=SamplingParams(
                temperature=1.0, seed=s)).token_ids for s in (-1, 2**64 - 1, 5)]
    assert outs[0] == outs[1] != outs[2]
    assert seed_entropy(-(2**63)) == 2**63
    make_policy("exp3", 3, seed=-5).select()  # the learner takes the same seeds


# -- 2. sizes ---------------------------------------------------------------------------------


def test_2_huge_k_is_refused_with_the_context(model_dirs) -> None:
    result = generate(model_dirs, "-k", "1000000000")
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "context" in line and "512" in line


@pytest.mark.parametrize("args", [["--rounds", str(10**12)], ["--k", str(10**9)]])
def test_2_simulate_sizes_that_cannot_fit_are_refused(tmp_path: Path, args) -> None:
    result = runner.invoke(app, ["simulate", "-e", "run", "--quick", "--out",
                                 str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert "GiB" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # refused before any work


def test_2_simulate_out_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    result = runner.invoke(app, ["simulate", "-e", "run", "--quick", "--out", str(out)])
    assert result.exit_code == 2 and "is a file" in result.output, result.output
    assert out.read_text() == "keep me"


def test_2_generate_beyond_the_context_is_refused_with_numbers(model_dirs) -> None:
    pipe = tiny_pipeline()
    with pytest.raises(PromptError, match=r"512 tokens.*3 prompt tokens \+ 600"):
        pipe.check_fits(pipe.encode("abc"), 600)
    result = generate(model_dirs, "--max-new-tokens", "600")
    assert result.exit_code == 2 and "context is 512" in one_error_line(result.output)


# -- 4. state file (the server side is in tests/server/test_hardening_server.py) --------------


@pytest.mark.parametrize("bad", [
    {"cumulative_loss": [0.0]},                       # too few entries
    {"cumulative_loss": [float("nan")] * 4},          # NaN
    {"cumulative_loss": [1e308, 0.0, 0.0, 0.0]},      # not from a real run
    {"cumulative_loss": ["1", "2", "3", "4"]},        # strings
    {"cumulative_loss": [True, False, True, False]},  # booleans
    {"num_losses": -3},
    {"t": 1.5},
    {"rng": {"bit_generator": "PCG64", "state": "x"}},
])
def test_4_policy_state_is_checked_before_loading(bad: dict) -> None:
    policy = make_policy("hedge", 4)
    state = {**policy.state_dict(), **bad}
    before = json.dumps(policy.state_dict())
    with pytest.raises(ConfigError):
        policy.load_state_dict(json.loads(json.dumps(state, allow_nan=True)))
    assert json.dumps(policy.state_dict()) == before  # unchanged


def test_4_deep_json_is_quarantined_not_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "learner_state.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    assert load_json_or_quarantine(path) is None
    assert not path.exists() and list(tmp_path.glob("*.corrupt-*"))


def test_4_learner_store_quarantines_short_and_nan_state(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    store = LearnerStore(tmp_path, pipe)
    good = store.snapshot()
    arms = len(pipe.selector.arms)
    for loss in ([0.0] * (arms - 1), [float("nan")] * arms):
        bad = {**good, "policy": {**good["policy"], "cumulative_loss": loss}}
        store.path.write_text(json.dumps(bad, allow_nan=True))
        assert not store.restore()
        assert not store.path.exists()
        store.save()  # a good, finite state replaces it
        assert json.loads(store.path.read_text())["policy"]["cumulative_loss"] == [0.0] * arms
        store.path.unlink()


# -- 5, 6. suffix drafter paths -----------------------------------------------------------


def test_5_empty_suffix_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a corpus path"):
        make_drafter("suffix:", tiny_tokenizer())


def test_6_same_corpus_file_name_in_two_folders(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "corpus.txt").write_text(f"def {d}(x): return x + 1\n" * 3)
    specs = [f"suffix:{tmp_path / 'a' / 'corpus.txt'}", f"suffix:{tmp_path / 'b' / 'corpus.txt'}"]
    pipe = tiny_pipeline(drafters=specs)
    assert [d.name for d in pipe.decoder.drafters] == ["suffix:a/corpus", "suffix:b/corpus"]


# -- 7. one strict config -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "match"), [
    ('{"num_speculative_tokens": "4"}', "num_speculative_tokens"),
    ('{"num_speculative_tokens": true}', "num_speculative_tokens"),
    ('{"method": "draft_model"}', "needs 'model'"),
    ('{"prompt_lookup_max": 2.0}', "prompt_lookup_max"),
    ('{"policy": "bandit"}', "unknown policy"),
    ('{"unknown": 1}', "unknown key"),
    ('{"seed": 18446744073709551616}', "seed"),
])
def test_7_speculative_config_is_strict(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_speculative_config(text)


def test_7_suffix_method_takes_the_corpus_as_model() -> None:
    cfg = parse_speculative_config('{"method": "suffix", "model": "c.txt"}')
    assert cfg.drafter_specs() == ["suffix:c.txt"]
    # without a corpus: SuffixDecoding over the request and earlier outputs (as in vLLM)
    assert parse_speculative_config('{"method": "suffix"}').drafter_specs() == ["suffix"]


def test_7_the_same_config_reaches_the_engine() -> None:
    cfg = SpeculativeConfig(num_speculative_tokens=[2, 3], policy="ucb", seed=7,
                            drafters=["ngram"])
    pipe = Pipeline.from_config(tiny_lm(0, hidden=48), cfg, tokenizer=tiny_tokenizer())
    assert pipe.config == cfg and pipe.decoder.config is pipe.config
    assert pipe.selector.name == "ucb" and {a.k for a in pipe.selector.arms} == {2, 3}


def test_7_cli_rejects_what_the_server_rejects(model_dirs) -> None:
    result = generate(model_dirs, "--speculative-config", '{"num_speculative_tokens": "4"}')
    assert result.exit_code == 2 and "num_speculative_tokens" in one_error_line(result.output)


# -- 8. temperature ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_8_temperature_must_be_finite(model_dirs, value: str) -> None:
    result = generate(model_dirs, "--temperature", value)
    assert result.exit_code == 2 and "temperature" in one_error_line(result.output)


# -- 9. per-query reset repeats seeded requests ----------------------------------------------


@pytest.mark.parametrize("policy", ["hedge", "exp3"])
def test_9_reset_per_query_seeded_request_repeats(policy: str) -> None:
    pipe = tiny_pipeline(policy=policy, reset_per_query=True)
    runs = [pipe.generate("def add(a, b):", max_new_tokens=24,
                          sampling=SamplingParams(temperature=0.8, seed=11)) for _ in range(3)]
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids
    picks = [[s.drafter for s in r.steps] for r in runs]
    assert picks[0] == picks[1] == picks[2]


# -- 12. noise ---------------------------------------------------------------------------------


def test_12_no_future_warning_from_our_model_calls() -> None:
    pipe = tiny_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("abc", max_new_tokens=6)


def test_errors_are_specmux_errors() -> None:
    for exc in (ConfigError, PromptError):
        assert issubclass(exc, SpecmuxError)
    assert re.match(r"^seed", str(pytest.raises(ConfigError, SamplingParams, seed=2**64).value))
