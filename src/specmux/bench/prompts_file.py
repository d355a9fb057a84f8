"""``specmux bench --prompts FILE.jsonl``: the user's own workload, streamed from disk.

Each non-empty line is a JSON object with either ``"prompt"`` (a string, sent through the
chat template when the tokenizer has one) or ``"messages"`` (OpenAI-style
``[{"role": ..., "content": ...}, ...]``), and optionally ``"category"`` (a string; default
``"prompts"``) and ``"id"`` (a string or number; default ``line-N``).  Any other key is
ignored (so an OpenAI request body with ``model``, ``temperature`` ... works as a line).

:func:`scan` reads the file once to check every line (a malformed one raises
:class:`~specmux.errors.ConfigError` naming its line number) and keeps only counts;
:func:`iter_examples` reads it again lazily during the run, so a file of any length is
never held in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specmux.bench.datasets import Example
from specmux.errors import ConfigError

DEFAULT_CATEGORY = "prompts"
ROLES = ("system", "user", "assistant")


@dataclass
class PromptsFileInfo:
    """What a checking pass over the file found: counts only, no prompts."""

    path: Path
    num_prompts: int = 0
    categories: Counter[str] = field(default_factory=Counter)
    longest_line: int = 0  # line number of the longest prompt (by characters)


def parse_line(raw: str, line_no: int, path: Path | str = "prompts") -> Example:
    """One line -> :class:`Example`; ConfigError ``PATH:LINE: ...`` if malformed."""
    where = f"{path}:{line_no}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    category = obj.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category.strip():
        raise ConfigError(f"{where}: 'category' must be a non-empty string")
    qid = obj.get("id", f"line-{line_no}")
    if not isinstance(qid, str | int) or isinstance(qid, bool):
        raise ConfigError(f"{where}: 'id' must be a string or an integer")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ConfigError(f"{where}: give exactly one of 'prompt' and 'messages'")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        return Example(category.strip(), str(qid), prompt, None, chat=True)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    pairs: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and "
                              "a string content")
        pairs.append((m["role"], m["content"]))
    if pairs[-1][0] == "assistant":
        raise ConfigError(f"{where}: the last message must not be the assistant's")
    return Example(category.strip(), str(qid), pairs[-1][1], None, chat=True,
                   messages=tuple(pairs))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None


def scan(path: Path) -> PromptsFileInfo:
    """Check every line; return counts (raises ConfigError naming a bad line)."""
    info = PromptsFileInfo(path)
    longest = -1
    for n, line in _lines(path):
        ex = parse_line(line, n, path)
        info.num_prompts += 1
        info.categories[ex.domain] += 1
        size = sum(len(c) for _, c in ex.messages) if ex.messages else len(ex.prompt)
        if size > longest:
            longest, info.longest_line = size, n
    if not info.num_prompts:
        raise ConfigError(f"{path} holds no prompts")
    return info


def iter_examples(path: Path) -> Iterator[Example]:
    """The file's examples, one line at a time."""
    for n, line in _lines(path):
        yield parse_line(line, n, path)


def example_at(path: Path, line_no: int) -> Example:
    """The example on line ``line_no`` (for the warm-up's longest prompt)."""
    for n, line in _lines(path):
        if n == line_no:
            return parse_line(line, n, path)
    raise ConfigError(f"{path}: no line {line_no}")


def to_record(ex: Example) -> dict[str, Any]:
    """An example as a prompts-file line (for writing the built-in stream to a file)."""
    rec: dict[str, Any] = {"id": ex.id, "category": ex.domain}
    if ex.messages:
        rec["messages"] = [{"role": r, "content": c} for r, c in ex.messages]
    else:
        rec["prompt"] = ex.prompt
    return rec
