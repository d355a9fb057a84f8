"""Cost-aware selection in a ``specmux bench`` trace: arms played, scoring overhead, cost model.

    python benchmarks/trace_costs.py bench-out/trace.jsonl

Per learner and single-drafter run: the arms (drafter@k) it played most, the share of
rounds in which an LM drafter was run along the path without having drafted
(counterfactual scoring), the mean
scoring milliseconds in rounds with and without such a run, and the learner's cost model
after its last query (verification seconds by scored positions, drafting seconds per
token, scoring seconds, throughput); per context key, the rounds and tokens per second of
each drafter it played; the seconds of its queries' first rounds (prefill included).  For
the whole trace: the median measured verification seconds by scored positions (rounds
past the first, LM drafts left out), and how often a model-free drafter's first guess was
right in strong-signal rounds after a right and after a wrong one (the context key's hit
bit).  Reads the trace only; runs no model.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def load(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        path = path / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict[str, Any]], lm: str = "lm") -> dict[str, Any]:
    meta = records[0]
    kinds = meta.get("method_kinds", {})
    rounds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    last_cost: dict[str, Any] = {}
    for r in records:
        if r.get("type") == "round" and kinds.get(r["method"]) in ("policy", "single"):
            rounds[r["method"]].append(r)
        if r.get("type") == "answer" and r.get("cost_model"):
            last_cost[r["method"]] = r["cost_model"]
    out: dict[str, Any] = {}
    for method, rs in rounds.items():
        arms = Counter(f"{r['drafter']}@{r['k']}" for r in rs)
        scored = [r for r in rs if lm in r.get("scored", []) and r["drafter"] != lm]
        rest = [r for r in rs if not (lm in r.get("scored", []) and r["drafter"] != lm)]

        def ms(group: list[dict[str, Any]]) -> float | None:
            if not group:
                return None
            return 1e3 * sum(r["learner_seconds"] - r["policy_seconds"] for r in group) / len(
                group)

        steady = [r for r in rs if r["round"] > 0] or rs
        by_context: dict[str, dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(lambda: [0, 0, 0.0]))
        for r in steady:
            cell = by_context[str(r.get("context"))][r["drafter"]]
            cell[0] += 1
            cell[1] += r["new_tokens"]
            cell[2] += r["seconds"]
        out[method] = {
            "contexts": {key: {d: {"rounds": n, "tok_s": tok / sec if sec else None}
                               for d, (n, tok, sec) in cells.items()}
                         for key, cells in sorted(by_context.items())},
            "first_round_seconds": sum(r["seconds"] for r in rs if r["round"] == 0),
            "rounds": len(rs),
            "top_arms": arms.most_common(5),
            "lm_scored_unplayed_share": len(scored) / len(rs),
            "scoring_ms_with_lm_run": ms(scored),
            "scoring_ms_without": ms(rest),
            "scoring_ms_mean": ms(rs),
            "policy_ms_mean": 1e3 * sum(r["policy_seconds"] for r in rs) / len(rs),
            "verify_ms_mean": 1e3 * sum(r["verify_seconds"] for r in steady) / len(steady),
            "cost_model": last_cost.get(method),
        }
    return out


def pass_costs(records: list[dict[str, Any]], lm: str = "lm") -> dict[int, float]:
    """Median verification seconds by scored positions (drafted + 1) over every method's
    rounds past the first (which prefill); LM rounds are left out (their drafts' pass
    sizes are the same, but their timing includes catch-up work in some backends)."""
    seconds: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.get("type") == "round" and r["round"] > 0 and r["drafter"] != lm:
            seconds[r["drafted"] + 1].append(r["verify_seconds"])
    return {n: float(np.median(v)) for n, v in sorted(seconds.items())}


def hit_rates(records: list[dict[str, Any]], keys: set[int],
              drafter: str = "suffix") -> dict[str, Any]:
    """In rounds played in context ``keys`` (e.g. the keys where ``drafter`` signals a
    strong match), the share where ``drafter``'s first guess was right, after a right / a
    wrong first guess in the query's previous round (the round records' ``gammas``)."""
    counts = {"after_hit": [0, 0], "after_miss": [0, 0]}
    previous: dict[tuple[str, int], float] = {}
    for r in records:
        g = (r.get("gammas") or {}).get(drafter) if r.get("type") == "round" else None
        if g is None:
            continue
        g = g[0] if isinstance(g, list) else g
        before = previous.get((r["method"], r["query_index"]))
        previous[(r["method"], r["query_index"])] = g
        if before is not None and r.get("context") in keys:
            cell = counts["after_hit" if before >= 0.5 else "after_miss"]
            cell[0] += int(g >= 0.5)
            cell[1] += 1
    return {k: {"right": right, "rounds": n, "share": right / n if n else None}
            for k, (right, n) in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--strong-keys", default="",
                        help="context keys of the suffix drafter's strong signal, comma-"
                        "separated (hit rates after a hit / a miss; pool order and key "
                        "scheme: specmux.selector.Selector.context_key)")
    args = parser.parse_args()
    records = load(args.trace)
    summary = summarize(records)
    for method, s in summary.items():
        over = (s["policy_ms_mean"] + s["scoring_ms_mean"]) / s["verify_ms_mean"]
        print(f"{method}: {s['rounds']} rounds; top arms {s['top_arms']}")
        print(f"  LM run along the path without drafting in {s['lm_scored_unplayed_share']:.0%}"
              f" of rounds; scoring ms/round {s['scoring_ms_mean']:.1f} (with such a run "
              f"{s['scoring_ms_with_lm_run'] or 0:.1f}, without {s['scoring_ms_without'] or 0:.1f})"
              f"; policy {s['policy_ms_mean']:.2f} ms; target step {s['verify_ms_mean']:.0f} ms;"
              f" learner + scoring = {over:.1%} of a step")
        cm = s["cost_model"]
        if cm:
            verify = {n: round(1e3 * v, 1) for n, v in cm["verify_seconds"].items()}
            draft = {d: round(1e3 * v, 1) for d, v in cm["draft_seconds_per_token"].items()}
            score = {d: round(1e3 * v, 1) for d, v in cm["score_seconds"].items()}
            print(f"  cost model: verify ms by positions {verify}; draft ms/token {draft}; "
                  f"scoring ms {score}; throughput {cm['throughput']:.2f} tok/s")
        print(f"  first rounds (prefill included): {s['first_round_seconds']:.1f} s")
        for key, cells in s["contexts"].items():
            rates = ", ".join(f"{d} {c['rounds']} rounds {c['tok_s'] or 0:.2f} tok/s"
                              for d, c in sorted(cells.items(), key=lambda x: -x[1]["rounds"]))
            print(f"  context {key}: {rates}")
    passes = {n: round(1e3 * v, 1) for n, v in pass_costs(records).items()}
    print(f"median verification ms by scored positions (all methods): {passes}")
    if args.strong_keys:
        keys = {int(k) for k in args.strong_keys.split(",")}
        print(f"suffix first guess right in contexts {sorted(keys)}: "
              f"{hit_rates(records, keys)}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
