"""How a learner opened each query of a ``specmux bench`` trace, against the fixed arms.

    python benchmarks/trace_decisions.py bench-out/trace.jsonl --method hedge:time:ctx:argmax

Per query of ``--method``: its category and prompt length; its rounds; how many of them the
cold-start prior chose (``chosen_by``, :meth:`specmux.selector.Selector.prior_arm`) and in
how many the prefill hint ruled out some arm of ``--drafter`` (``ruled_out``,
:meth:`~specmux.selector.Selector.worth_starting`); the first round that drafter played
(``-``: never); the query's seconds, and, where the trace has the single-drafter runs, the
fastest of them on that query (the per-query time oracle) and the learner's time over it.
The last line sums the seconds.  ``--query Q`` lists that query's rounds instead (arm,
drafted and accepted tokens, seconds, who chose).  Reads the trace only; runs no model.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from specmux.bench.runner import read_trace
from specmux.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--method", default="hedge:time:ctx:argmax")
    p.add_argument("--drafter", default="lm")
    p.add_argument("--query", type=int, default=None, help="list this query's rounds")
    args = p.parse_args(argv)
    try:
        rows = read_trace(args.trace)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
    seconds: dict[tuple[str, int], float] = {}
    info: dict[int, tuple[str, int]] = {}
    for r in rows:
        if r.get("type") == "round" and r["method"] == args.method:
            rounds[r["query_index"]].append(r)
        elif r.get("type") == "answer":
            seconds[(r["method"], r["query_index"])] = sum(r["choices"][0]["wall_time"])
            info[r["query_index"]] = (r["category"], r["prompt_tokens"])
    if not rounds:
        print(f"error: no rounds of method {args.method!r} in {args.trace}", file=sys.stderr)
        return 2
    if args.query is not None:
        return _list_rounds(rounds, args.query, args.method)
    print(f"{'query':>5} {'category':10} {'prompt':>6} {'rounds':>6} {'prior':>5} "
          f"{'ruled out':>9} {'first ' + args.drafter:>9} {'seconds':>7} {'oracle':>7} "
          f"{'ratio':>6}  fastest fixed arm")
    total = oracle_total = 0.0
    for q in sorted(rounds):
        rs = rounds[q]
        prior = sum(r.get("chosen_by") == "prior" for r in rs)
        ruled = sum(any(a.startswith(args.drafter + "@") for a in r.get("ruled_out", ()))
                    for r in rs)
        first = next((str(r["round"]) for r in rs if r["drafter"] == args.drafter), "-")
        mine = seconds[(args.method, q)]
        singles = {m: s for (m, i), s in seconds.items() if i == q and m.startswith("only:")}
        best = min(singles, key=singles.get) if singles else None
        total += mine
        cells = ["", "", ""]
        if best is not None:
            oracle_total += singles[best]
            cells = [f"{singles[best]:7.2f}", f"{mine / singles[best]:6.2f}", best]
        category, prompt = info[q]
        print(f"{q:>5} {category:10} {prompt:>6} {len(rs):>6} {prior:>5} {ruled:>9} "
              f"{first:>9} {mine:7.2f} {cells[0]:>7} {cells[1]:>6}  {cells[2]}")
    line = f"total seconds {total:.2f}"
    if oracle_total:
        line += f", per-query oracle {oracle_total:.2f} (ratio {total / oracle_total:.3f})"
    print(line)
    return 0


def _list_rounds(rounds: dict[int, list[dict[str, Any]]], query: int, method: str) -> int:
    if query not in rounds:
        print(f"error: no query {query} of method {method!r} in the trace", file=sys.stderr)
        return 2
    print(f"{'round':>5} {'arm':16} {'drafted':>7} {'accepted':>8} {'seconds':>7}  chosen by")
    for r in rounds[query]:
        arm = f"{r['drafter']}@{r['k']}"
        print(f"{r['round']:>5} {arm:16} {r['drafted']:>7} {r['accepted']:>8} "
              f"{r['seconds']:7.3f}  {r.get('chosen_by', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
