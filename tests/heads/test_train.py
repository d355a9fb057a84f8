"""Training: extraction cache (resumable), atomic save/load with sha256, the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from specmux.cli import app
from specmux.errors import ModelLoadError
from specmux.heads.extract import chunk_text, corpus_chunks, extract, load_shards
from specmux.heads.store import find_heads, load_head, save_head
from specmux.heads.train import TrainConfig, choose_draft_vocab, train_head

from conftest import tiny_lm
from helpers import save_tiny_model, tiny_tokenizer

TEXTS = ["def add(x, y):\n    return x + y\n", "print(1 + 2)\n" * 4, "ab",
         "for i in range(3): x = i\n"]


def test_extraction_is_cached_and_resumes(tmp_path, target_model) -> None:
    calls = {"n": 0}
    hook = target_model.base_model.register_forward_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        tok = tiny_tokenizer()
        first = extract(target_model, tok, TEXTS[:2], tmp_path / "x", max_tokens=20)
        assert calls["n"] == 2 and len(first) == 2
        more = extract(target_model, tok, TEXTS, tmp_path / "x", max_tokens=20)
        assert calls["n"] == 3  # "ab" is too short; the first two come from disk
        assert more[:2] == first and len(more) == 3
    finally:
        hook.remove()
    shard = load_shards(more)[0]
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"][:20]
    assert shard.ids.tolist() == ids and shard.hidden.shape == (len(ids), 48)
    full = target_model(torch.tensor([ids])).logits[0]
    assert torch.equal(shard.argmax, full.argmax(-1))


def test_head_round_trip_with_sha256(tmp_path, target_model, tiny_head) -> None:
    path = save_head(tiny_head, tmp_path, "head-tiny")
    assert find_heads(tmp_path) == {"head-tiny": path}
    meta = json.loads(path.read_text())
    assert len(meta["sha256"]) == 64 and meta["domain"] == "tiny" and meta["net"]["inner"] == 64
    again = load_head(path)
    for (k, a), (_, b) in zip(tiny_head.net.state_dict().items(),
                              again.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(again.draft_vocab, tiny_head.draft_vocab)
    assert not list(tmp_path.glob(".*tmp"))  # no stray temp files
    weights = tmp_path / "head-tiny.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_head(path)
    weights.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_head(path)
    path.write_text("{}")
    with pytest.raises(ModelLoadError, match="not a specmux head"):
        load_head(path)


def test_training_lowers_the_loss_and_reports(target_model) -> None:
    gen = torch.Generator().manual_seed(1)
    from specmux.heads.extract import extract_one

    shards = [extract_one(target_model, torch.randint(2, 48, (40,), generator=gen).tolist())
              for _ in range(10)]
    cfg = TrainConfig(inner=32, draft_vocab=30, epochs=1, batch_size=32, holdout=0.2)
    short = train_head(target_model, shards, cfg)
    longer = train_head(target_model, shards, TrainConfig(inner=32, draft_vocab=30, epochs=6,
                                                          batch_size=32, holdout=0.2))
    assert longer.meta["train_loss_ema"] < short.meta["train_loss_ema"]
    assert len(longer.meta["holdout_agreement"]) == cfg.depth
    assert longer.draft_vocab.numel() == 30
    vocab = choose_draft_vocab(shards, 48, 10)
    assert len(set(vocab.tolist())) == 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "target", tiny_lm(0, hidden=48)))


def test_cli_trains_and_lists_a_head(tmp_path, model_dir, monkeypatch) -> None:
    monkeypatch.setenv("SPECMUX_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    args = ["heads", "train", "--target", model_dir, "--dtype", "float32", "--max-texts", "3",
            "--self-distill", "0", "--max-tokens", "24", "--epochs", "1", "--inner", "16",
            "--draft-vocab", "20", "--num-eval", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out agreement" in result.output
    head = load_head(tmp_path / "cache" / "heads" / "head-code.json")
    assert head.meta["corpus_texts"] == 3 and head.meta["domain"] == "code"
    listed = runner.invoke(app, ["heads", "list"])
    assert "head-code" in listed.output and "domain=code" in listed.output


def test_cli_trains_on_an_extra_corpus_directory(tmp_path, model_dir, monkeypatch) -> None:
    """--corpus adds a directory's sources, cut into pieces, after the domain's corpus (binary
    files skipped); --max-texts caps the total."""
    monkeypatch.setenv("SPECMUX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n"
                                      for i in range(40)))
    (src / "a.pyc").write_bytes(b"\x00\x01binary")
    args = ["heads", "train", "--target", model_dir, "--dtype", "float32", "--max-tokens", "24",
            "--self-distill", "0", "--epochs", "1", "--inner", "16", "--draft-vocab", "20",
            "--num-eval", "2", "--corpus", str(src), "--extract-only"]
    few = CliRunner().invoke(app, [*args, "--max-texts", "3"])
    more = CliRunner().invoke(app, [*args, "--max-texts", "100000"])
    assert few.exit_code == 0 and more.exit_code == 0, more.output
    n_few, n_more = (int(re.search(r"code: (\d+) texts extracted", r.output)[1])
                     for r in (few, more))
    chunks = corpus_chunks([src], 24)
    assert n_few == 3 and n_more >= len(chunks) > 10  # the domain's texts + every piece
    assert all("\x00" not in c for c in chunks)
    missing = CliRunner().invoke(app, [*args, "--corpus", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_chunk_text_keeps_every_line() -> None:
    text = "".join(f"line {i}\n" + ("\n" if i % 7 == 0 else "") for i in range(200))
    pieces = chunk_text(text, 100)
    assert "".join(pieces) == text.replace("\n\n", "\n\n")  # nothing lost or reordered
    assert all(len(p) <= 100 + 10 for p in pieces) and len(pieces) > 10


@pytest.mark.parametrize("bad", [["--dtype", "int8"], ["--max-texts", "-1"], ["--domain", "x"],
                                 ["--depth", "0"], ["--self-distill", "-1"],
                                 ["--domain", "code_edit", "--self-distill", "5"],
                                 ["--distill-generator", "vllm"]])
def test_cli_bad_input_exits_2(bad, model_dir) -> None:
    result = CliRunner().invoke(app, ["heads", "train", "--target", model_dir, *bad])
    assert result.exit_code == 2
    assert "error:" in result.output
