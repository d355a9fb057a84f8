"""Absolute tokens per second per category, two `specmux bench` traces side by side.

Used for docs/BENCHMARKS.md's transformers-vs-llama.cpp table::

    python benchmarks/backends_table.py TRACE_A TRACE_B \\
        --pair target-only=target-only --pair only:suffix@4=only:suffix ...

Each answer record of a trace carries its method, category, ``new_tokens`` and ``seconds``
(prefill included); a cell is total new tokens / total seconds of a method on a category
in each trace ("A / B").
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def totals(path: Path, categories: list[str]) -> dict[tuple[str, str], list[float]]:
    """(method, category or "all") -> [new tokens, seconds] over the trace's answers."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") != "answer" or record["category"] not in categories:
            continue
        for key in (record["category"], "all"):
            cell = out[(record["method"], key)]
            cell[0] += record["new_tokens"]
            cell[1] += record["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_a", type=Path)
    parser.add_argument("trace_b", type=Path)
    parser.add_argument("--pair", action="append", required=True,
                        help="METHOD_A=METHOD_B (one table row)")
    parser.add_argument("--categories", default="code,code_edit,multiturn,chat")
    args = parser.parse_args()
    categories = args.categories.split(",")
    try:
        a, b = totals(args.trace_a, categories), totals(args.trace_b, categories)
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"not a readable specmux bench trace: {err}")
    print("| method | " + " | ".join([*categories, "all"]) + " |")
    print("| --- |" + " ---: |" * (len(categories) + 1))
    for pair in args.pair:
        left, _, right = pair.partition("=")
        cells = []
        for cat in [*categories, "all"]:
            x, y = a.get((left, cat)), b.get((right or left, cat))
            cells.append(" / ".join(f"{v[0] / v[1]:.2f}" if v and v[1] else "–"
                                    for v in (x, y)))
        print(f"| {left} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
