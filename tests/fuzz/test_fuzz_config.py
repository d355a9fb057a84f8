"""Fuzz (b): ``--speculative-config`` JSON and the CLI option values.

The config goes through the one schema and on to a real decoder over tiny models; the CLI
runs ``specmux generate`` end to end on a tiny in-memory pipeline (context 64, so any
accepted ``--max-new-tokens`` stays short).  Either it works, or it ends with exit code 2 and
ONE ``error:`` line: never a traceback, never another exception.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from specmux import cli_options
from specmux.api import Pipeline
from specmux.cli import app
from specmux.config import SpeculativeConfig, parse_speculative_config
from specmux.engine import SpeculativeDecoder
from specmux.errors import ConfigError, SpecmuxError

from conftest import tiny_lm
from helpers import tiny_tokenizer

runner = CliRunner()
TARGET = tiny_lm(0, hidden=32, layers=1, max_positions=64)
DRAFTER = tiny_lm(1, hidden=16, layers=1, max_positions=64)

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
KEYS: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from(["ngram", "draft_model", "suffix", "pool", "eagle", None]),
    "model": st.sampled_from(["tiny", "", "ngram"]) | st.none(),
    "num_speculative_tokens": (st.integers(-2, 70) | st.lists(st.integers(-1, 9), max_size=3)
                               | st.sampled_from([10**9, "4", True, 2.0])),
    "prompt_lookup_max": st.integers(-1, 70) | st.sampled_from(["3", 2.5]),
    "prompt_lookup_min": st.integers(-1, 6),
    "drafters": st.lists(st.sampled_from(["ngram", "tiny", "", "suffix:"]), max_size=3)
    | st.none(),
    "policy": st.sampled_from(["fixed", "ucb", "exp3", "metasd", "hedge", "normalhedge",
                               "bandit", "", "HEDGE"]),
    "loss": st.sampled_from(["length", "acceptance", "other"]),
    "delayed_feedback": st.booleans() | st.sampled_from([0, 1, "true"]),
    "reset_per_query": st.booleans() | st.sampled_from([0, "yes"]),
    "seed": st.integers(-(2**64), 2**65) | st.sampled_from([-1, 2**64 - 1, 1.5, "7"]),
}


@st.composite
def config_text(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 19).map(lambda i: "raw" if i == 7 else "json" if i == 11
                                       else "keys"))
    if kind == "raw":
        return draw(st.text(max_size=40))
    if kind == "json":
        return json.dumps(draw(json_values))
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), unique=True, max_size=5))
    obj = {k: draw(KEYS[k] | json_values if draw(st.integers(0, 9)) == 5 else KEYS[k])
           for k in keys}
    if draw(st.integers(0, 9)) == 5:
        obj[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(obj)


def decoder_for(cfg: SpeculativeConfig) -> SpeculativeDecoder:
    """The engine with ``cfg`` over the tiny models ("tiny" stands for the LM drafter)."""
    specs = cfg.drafter_specs() or ["ngram"]
    pipe = Pipeline(TARGET, [DRAFTER if s == "tiny" else s for s in specs],
                    config=cfg.model_copy(update={"drafters": None}),
                    tokenizer=tiny_tokenizer())
    return pipe.decoder


@fuzz_settings(1000)
@given(text=config_text())
def test_fuzz_speculative_config(text: str) -> None:
    try:
        cfg = parse_speculative_config(text)
    except ConfigError as e:
        event("config refused")
        assert "\n" not in str(e) and str(e).startswith("--speculative-config")
        return
    try:
        decoder = decoder_for(cfg)
    except SpecmuxError as e:
        event("engine refused")
        assert "\n" not in str(e)
        return
    event("built")
    assert decoder.config.ks == cfg.ks and decoder.selector.name == cfg.policy
    assert decoder.selector.max_k < TARGET.config.max_position_embeddings


# -- the CLI --------------------------------------------------------------------------------


def float_text() -> st.SearchStrategy[str]:
    return (st.floats().map(repr) | st.sampled_from(["inf", "-inf", "nan", "1e-300", "0",
                                                     "abc", ""]))


OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--temperature": float_text(), "--top-p": float_text(),
    "--top-k": st.integers(-5, 100).map(str) | st.sampled_from(["x", str(2**70)]),
    "--seed": st.integers(-(2**64), 2**65).map(str) | st.sampled_from(["-1", "1.5"]),
    "-k": st.integers(-2, 80).map(str) | st.sampled_from([str(10**9), "2.0"]),
    "--max-new-tokens": st.integers(-2, 70).map(str) | st.sampled_from([str(10**12)]),
    "--policy": st.sampled_from(["hedge", "ucb", "exp3", "fixed", "bandit", ""]),
    "--drafter": st.sampled_from(["ngram", "tiny", "suffix:", "suffix:/no/such/file", ""]),
    "--speculative-config": config_text(),
    "--prompt": st.text(max_size=16),
}


@pytest.fixture(scope="module", autouse=True)
def in_memory_pipeline():
    """``specmux generate`` builds its pipeline from the tiny in-memory models."""
    original = cli_options.pipeline_from_config

    def build(cfg: SpeculativeConfig, target: str, *, install: bool,
              threads: int | None = None) -> Pipeline:
        specs = [DRAFTER if s == "tiny" else s for s in (cfg.drafter_specs() or ["ngram"])]
        return Pipeline(TARGET, specs, config=cfg.model_copy(update={"drafters": None}),
                        tokenizer=tiny_tokenizer())

    import specmux.cli as cli_module

    cli_module.pipeline_from_config = build
    yield
    cli_module.pipeline_from_config = original


@fuzz_settings(500)  # with the 1,000 config cases above: 1,500 for (b)
@given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=5)
       .flatmap(lambda d: st.fixed_dictionaries({k: OPTIONS[k] for k in d})))
def test_fuzz_cli_option_values(options: dict[str, str]) -> None:
    args = ["generate", "--target", "tiny", "--no-install"]
    options.setdefault("--prompt", "def f(x):")
    options.setdefault("--max-new-tokens", "4")
    for flag, value in options.items():
        args += [flag, value]
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args, result.output, result.exception)
    assert "Traceback" not in result.output, (args, result.output)
    event(f"exit {result.exit_code}")
    if result.exit_code == 0:
        assert "target calls" in result.output
        return
    assert result.exit_code == 2, (args, result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(("error:", "Usage:", "Try", "╰")) or "Invalid value" in \
        result.output, (args, result.output)
    if lines[0].startswith("error:"):
        assert len(lines) == 1, (args, result.output)


def test_nan_and_inf_are_refused_everywhere() -> None:
    for text in ('{"seed": NaN}', '{"num_speculative_tokens": Infinity}'):
        with pytest.raises(ConfigError):
            parse_speculative_config(text)
    assert not math.isfinite(float("inf"))
