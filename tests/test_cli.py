"""The CLI: documented options, a real run on a tiny local model, exit code 2 on bad input."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from specmux.cli import app

from conftest import tiny_lm
from helpers import save_tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[str, str, str]:
    root = tmp_path_factory.mktemp("models")
    target = save_tiny_model(root / "target", tiny_lm(0, hidden=48))
    drafter = save_tiny_model(root / "drafter", tiny_lm(1, hidden=32, layers=1))
    other = save_tiny_model(root / "other", tiny_lm(2, vocab=64))
    return str(target), str(drafter), str(other)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_generate_help_documents_every_option() -> None:
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = _plain(result.output)
    for option in ["--prompt", "--target", "--drafter", "--policy", "--max-new-tokens",
                   "--num-speculative-tokens", "--temperature", "--top-p", "--top-k", "--seed",
                   "--chat", "--speculative-config"]:
        assert option in text, option


def test_generate_runs_and_matches_target_only(model_dirs) -> None:
    target, drafter, _ = model_dirs
    args = ["generate", "--target", target, "--prompt", "def add(a, b):", "--max-new-tokens",
            "24"]
    spec = runner.invoke(app, [*args, "--drafter", drafter, "--drafter", "ngram",
                               "--policy", "hedge"])
    assert spec.exit_code == 0, spec.output
    assert "target calls" in spec.output and "MAT" in spec.output
    base = runner.invoke(app, [*args, "--drafter", "ngram", "--policy", "fixed"])
    assert base.exit_code == 0, base.output
    # Same generated text whatever the pool and learner (greedy is lossless).
    assert spec.output.splitlines()[0] == base.output.splitlines()[0]


def test_speculative_config_with_vllm_keys(model_dirs) -> None:
    target, _, _ = model_dirs
    cfg = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    result = runner.invoke(app, ["generate", "--target", target, "--prompt", "abcabc",
                                 "--max-new-tokens", "8", "--speculative-config", cfg])
    assert result.exit_code == 0, result.output
    assert "ngram 100%" in _plain(result.output)


def test_suffix_drafter_from_corpus(model_dirs, tmp_path) -> None:
    target, _, _ = model_dirs
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 5)
    result = runner.invoke(app, ["generate", "--target", target, "--prompt", "def add(a, b):",
                                 "--drafter", f"suffix:{corpus}", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "suffix:corpus" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "hi", "-k", "0"], "must be >= 1"),
        (["--prompt", "hi", "--policy", "bandit"], "unknown policy"),
        (["--prompt", "hi", "--drafter", "warp-drive"], "hub is not reachable"),
        (["--prompt", "hi", "--speculative-config", "{not json"], "not valid JSON"),
        (["--prompt", "hi", "--speculative-config", '{"num_speculative_tokens": -1}'],
         "num_speculative_tokens"),
        (["--prompt", "hi", "--speculative-config", '{"warp": 1}'], "warp"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--drafter", "suffix:/no/such/corpus"], "not found"),
        (["--prompt", "x" * 600], "context"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dirs, extra, message) -> None:
    target, _, _ = model_dirs
    result = runner.invoke(app, ["generate", "--target", target, "--drafter", "ngram", *extra])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in _plain(result.output).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_tokenizer_mismatch_is_reported(model_dirs) -> None:
    target, _, other = model_dirs
    result = runner.invoke(app, ["generate", "--target", target, "--drafter", other,
                                 "--prompt", "hi"])
    assert result.exit_code == 2
    assert "vocabulary" in result.output or "tokenizer" in result.output


def test_tokenizer_check_catches_same_size_different_vocab() -> None:
    from specmux.api import check_same_tokenizer
    from specmux.errors import TokenizerMismatchError

    a = tiny_tokenizer()
    b = tiny_tokenizer()
    b.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatchError):
        check_same_tokenizer(a, b, "b")
