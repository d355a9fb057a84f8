"""``specmux bench --prompts FILE.jsonl``: parsing, line-numbered errors, streaming."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specmux.bench.prompts_file import iter_examples, parse_line, scan, to_record
from specmux.bench.runner import TARGET_ONLY, BenchConfig, BenchModels, BenchRunner, write_trace
from specmux.cli import app
from specmux.errors import ConfigError

from conftest import tiny_lm
from helpers import save_tiny_model, tiny_tokenizer

cli = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_parse_prompt_and_messages() -> None:
    ex = parse_line('{"prompt": "hi", "category": "mine", "id": 7}', 1)
    assert (ex.domain, ex.id, ex.prompt, ex.chat, ex.messages) == ("mine", "7", "hi", True, None)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ex = parse_line(json.dumps({"messages": msgs, "model": "x", "temperature": 0}), 4)
    assert ex.domain == "prompts" and ex.id == "line-4" and ex.prompt == "c"
    assert ex.messages == (("system", "be brief"), ("user", "a"), ("assistant", "b"),
                           ("user", "c"))
    assert parse_line(json.dumps(to_record(ex)), 4).messages == ex.messages


@pytest.mark.parametrize("line,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"id": 1}', "exactly one of 'prompt' and 'messages'"),
    ('{"prompt": "a", "messages": []}', "exactly one"),
    ('{"prompt": "  "}', "non-empty string"),
    ('{"prompt": 3}', "non-empty string"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0]"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "must not be the assistant"),
    ('{"prompt": "a", "category": ""}', "'category'"),
    ('{"prompt": "a", "id": [1]}', "'id'"),
])
def test_malformed_lines_name_the_line(line: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"^f\.jsonl:12: ") as e:
        parse_line(line, 12, "f.jsonl")
    assert needle in str(e.value)


def test_scan_counts_and_streams(tmp_path: Path) -> None:
    lines = [{"prompt": f"p{i}", "category": "a" if i % 3 else "b"} for i in range(1000)]
    path = _write(tmp_path / "w.jsonl", [*lines[:500], "", *lines[500:]])  # a blank line
    info = scan(path)
    assert info.num_prompts == 1000 and info.categories == {"a": 666, "b": 334}
    # Streamed: a broken last line is only met when the stream gets there.
    bad = _write(tmp_path / "bad.jsonl", [*lines[:999], "{oops"])
    stream = iter_examples(bad)
    assert inspect.isgenerator(stream)
    assert [next(stream).prompt for _ in range(3)] == ["p0", "p1", "p2"]
    with pytest.raises(ConfigError, match="bad.jsonl:1000: not valid JSON"):
        scan(bad)
    with pytest.raises(ConfigError, match="holds no prompts"):
        scan(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ConfigError, match="not found"):
        scan(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def models() -> BenchModels:
    target = tiny_lm(0, hidden=48, max_positions=2048)
    drafter = tiny_lm(0, hidden=48, max_positions=2048)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return BenchModels(target, tiny_tokenizer(), drafter, "tiny-target", "tiny-drafter")


def test_runner_streams_a_1000_line_file(models: BenchModels, tmp_path: Path) -> None:
    lines = [{"prompt": f"item {i % 37} costs {i % 11}", "category": ["x", "y"][i % 2]}
             for i in range(999)]
    lines.append({"messages": [{"role": "user", "content": "a b a b"},
                               {"role": "assistant", "content": "a b"},
                               {"role": "user", "content": "again a b"}], "id": "conv"})
    path = _write(tmp_path / "w.jsonl", lines)
    cfg = BenchConfig(target="t", drafter_model="d", max_new_tokens=2, policies=("hedge",),
                      drafters=("suffix", "ngram"), hf_baseline=False, dtype="float32",
                      prompts_file=str(path), single_drafters=False)
    runner = BenchRunner(cfg, models, {}, prompts=scan(path))
    assert runner.queries is None and runner.num_queries == 1000  # nothing held up front
    records = write_trace(runner.run(), tmp_path / "trace.jsonl")
    meta = records[0]
    assert meta["queries"] == [] and meta["categories"] == {"x": 500, "y": 499, "prompts": 1}
    answers = [r for r in records if r["type"] == "answer"]
    assert len(answers) == 2 * 1000 and not runner.reference  # references freed per query
    assert all(a["lossless"] for a in answers if a["method"] != TARGET_ONLY)
    assert answers[-1]["question_id"] == "conv" and answers[-1]["category"] == "prompts"


def test_prompts_shorter_than_k_warm_up_and_decode(models: BenchModels, tmp_path: Path) -> None:
    """Warm-up passes of k + 1 positions on prompts of 1-3 tokens (a user's "hi"), with k
    up to 16: each prompt is followed by its own tokens, cycled, however short it is."""
    path = _write(tmp_path / "short.jsonl", [{"prompt": "hi"}, {"prompt": "a"}])
    cfg = BenchConfig(target="t", drafter_model="d", max_new_tokens=6, policies=("hedge",),
                      drafters=("suffix", "ngram"), hf_baseline=False, dtype="float32",
                      prompts_file=str(path), num_speculative_tokens=16,
                      single_drafters=False)
    runner = BenchRunner(cfg, models, {}, prompts=scan(path))
    answers = [r for r in write_trace(runner.run(), tmp_path / "trace.jsonl")
               if r["type"] == "answer"]
    assert len(answers) == 4 and all(a["lossless"] for a in answers
                                     if a["method"] != TARGET_ONLY)


def test_cli_prompts_file_end_to_end(tmp_path: Path) -> None:
    target = save_tiny_model(tmp_path / "target", tiny_lm(0, hidden=48, max_positions=4096))
    drafter = save_tiny_model(tmp_path / "drafter", tiny_lm(1, hidden=32, layers=1,
                                                            max_positions=4096))
    path = _write(tmp_path / "mine.jsonl", [
        {"prompt": "def add(a, b): return a + b", "category": "code"},
        {"messages": [{"role": "user", "content": "hello"}], "category": "chat"},
        {"prompt": "summarize: the cat sat on the mat", "category": "code"},
    ])
    out = tmp_path / "out"
    base = ["bench", "--target", str(target), "--drafter-model", str(drafter), "--policies",
            "hedge", "--max-new-tokens", "6", "--dtype", "float32", "--threads", "1",
            "--no-hf-baseline", "--out", str(out)]
    r = cli.invoke(app, [*base, "--prompts", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = _plain(r.output)
    assert "3 prompts (2 code, 1 chat)" in text and "speedup over target-only" in text
    assert "code ×" in (out / "results.md").read_text()
    _write(path, [{"prompt": "ok"}, {"prompt": "ok"}, '{"messages": "nope"}'])
    r = cli.invoke(app, [*base, "--prompts", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 2
    errors = [ln for ln in _plain(r.output).splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("error:") and "mine.jsonl:3:" in errors[0]
    assert "Traceback" not in r.output
