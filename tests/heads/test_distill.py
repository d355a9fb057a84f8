"""Self-distillation: the target's own answers to corpus prompts, cached; the corpus prompts
are disjoint from the eval prompts; the CLI trains on them."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from specmux.bench.datasets import load_domain, synthetic_splits
from specmux.cli import app
from specmux.errors import ConfigError
from specmux.heads.distill import (
    distill_sequences,
    make_generator,
    stop_tokens,
    transformers_generator,
)
from specmux.heads.extract import extract, load_shards, shard_name
from specmux.heads.store import load_head

from conftest import tiny_lm
from helpers import save_tiny_model, tiny_tokenizer


def test_answers_are_cached_per_prompt_and_a_damaged_file_is_made_again(tmp_path) -> None:
    calls: list[list[int]] = []

    def generate(prompt, n):
        calls.append(list(prompt))
        return [p + 1 for p in prompt][:n]

    prompts = [[5, 6, 7], [9, 9]]
    first = distill_sequences(prompts, generate, tmp_path, max_new_tokens=2, generator="g")
    assert first == [[5, 6, 7, 6, 7], [9, 9, 10, 10]] and calls == prompts
    again = distill_sequences(prompts, generate, tmp_path, max_new_tokens=2, generator="g")
    assert again == first and len(calls) == 2  # both read back from disk
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2 and not list(tmp_path.glob(".*tmp"))
    files[0].write_text("{not json")
    distill_sequences(prompts, generate, tmp_path, max_new_tokens=2, generator="g")
    assert len(calls) == 3  # the damaged one only
    other = distill_sequences(prompts, generate, tmp_path, max_new_tokens=1, generator="g")
    assert other == [[5, 6, 7, 6], [9, 9, 10]] and len(calls) == 5  # another budget: new files


def test_transformers_answers_are_the_greedy_continuation(target_model) -> None:
    prompt = [3, 17, 8, 30]
    answer = transformers_generator(target_model, frozenset())(prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(target_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert answer == ids[len(prompt):]
    first = answer.index(answer[2])  # the answer ends at the first stop token, kept
    assert transformers_generator(target_model, frozenset({answer[2]}))(prompt, 6) == answer[
        :first + 1]


def test_generator_choice(target_model, tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown generator"):
        make_generator("vllm", "x", target_model, frozenset())
    name, _ = make_generator("auto", str(tmp_path), target_model, frozenset())
    assert name == "transformers"  # an HF directory is not a GGUF
    tok = tiny_tokenizer()
    assert stop_tokens(target_model, tok) >= ({tok.eos_token_id} - {None})


def test_token_sequences_keep_their_last_tokens(tmp_path, target_model) -> None:
    seq = list(range(2, 40))
    [path] = extract(target_model, tiny_tokenizer(), [seq], tmp_path, max_tokens=10)
    assert path.name == shard_name(seq) != shard_name(str(seq))
    assert load_shards([path])[0].ids.tolist() == seq[-10:]  # the answer end is kept


def test_corpus_prompts_are_disjoint_from_eval() -> None:
    for domain, split in synthetic_splits(num_eval=4, corpus_size=6).items():
        assert len(split.prompts) == len(split.corpus) == 6, domain
        assert not {ex.id for ex in split.eval} & {ex.id for ex in split.prompts}
        assert all(text.startswith(ex.prompt) for text, ex in zip(split.corpus, split.prompts,
                                                                  strict=True))
    for domain, num_eval in (("code", 40), ("math", 200), ("chat", 40)):
        split = load_domain(domain, num_eval=num_eval, seed=0)
        assert len(split.prompts) >= 80, domain
        assert not {ex.prompt for ex in split.eval} & {ex.prompt for ex in split.prompts}
        assert not {ex.id for ex in split.eval} & {ex.id for ex in split.prompts}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "target", tiny_lm(0, hidden=48)))


def test_cli_trains_on_the_targets_answers(tmp_path, model_dir, monkeypatch) -> None:
    monkeypatch.setenv("SPECMUX_CACHE", str(tmp_path / "cache"))
    args = ["heads", "train", "--target", model_dir, "--dtype", "float32", "--max-texts", "0",
            "--self-distill", "3", "--distill-tokens", "5", "--max-tokens", "400", "--epochs",
            "1", "--inner", "16", "--draft-vocab", "20", "--num-eval", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = load_head(tmp_path / "cache" / "heads" / "head-code.json").meta
    assert meta["distill_prompts"] == 3 and meta["distill_generator"] == "transformers"
    assert meta["corpus_texts"] == 0 and 0 < meta["distill_answer_tokens"] <= 15
    assert len(list((tmp_path / "cache" / "distill" / "code").glob("*.json"))) == 3
    capped = CliRunner().invoke(app, [*args[:-2], "--num-eval", "80", "--self-distill", "99"])
    assert capped.exit_code == 0, capped.output  # the 4 prompts its corpus has (those that fit)
    meta = load_head(tmp_path / "cache" / "heads" / "head-code.json").meta
    assert 0 < meta["distill_prompts"] <= 4
    none = CliRunner().invoke(app, [*args[:8], "--self-distill", "0"])
    assert none.exit_code == 2 and "nothing to train on" in none.output


def test_llamacpp_answers_are_its_greedy_decoding(tmp_path, target_model) -> None:
    """``auto`` picks llama.cpp for a GGUF; its answer is the GGUF target-only greedy path."""
    pytest.importorskip("llama_cpp")
    from specmux.backends.llamacpp import LlamaCppLM
    from specmux.engine import autoregressive_generate

    from gguf_helpers import write_gguf

    path = write_gguf(target_model, tmp_path / "t.gguf")
    name, generate = make_generator("auto", str(path), target_model, frozenset(), threads=1)
    prompt = [3, 17, 8, 30, 4]
    reference = autoregressive_generate(LlamaCppLM.load(path, threads=1, context=512), prompt, 12)
    assert name == "llama.cpp" and generate(prompt, 12) == reference
    assert generate(prompt, 12) == reference  # the cache was reset in between
