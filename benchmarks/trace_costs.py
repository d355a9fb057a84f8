"""Cost-aware selection in a ``specmux bench`` trace: arms played, scoring overhead, cost model.

    python benchmarks/trace_costs.py bench-out/trace.jsonl

Per learner: the arms (drafter@k) it played most, the share of rounds in which an LM
drafter was run along the path without having drafted (counterfactual scoring), the mean
scoring milliseconds in rounds with and without such a run, and the learner's cost model
after its last query (verification seconds by scored positions, drafting seconds per
token, scoring seconds, throughput).  Reads the trace only; runs no model.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any


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
        if r.get("type") == "round" and kinds.get(r["method"]) == "policy":
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
        out[method] = {
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    summary = summarize(load(args.trace))
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
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
