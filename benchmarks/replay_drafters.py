"""Model-free drafters replayed on the target-only outputs of a ``specmux bench`` trace.

    python benchmarks/replay_drafters.py bench-out/trace.jsonl --categories code_edit,multiturn \
        --prompts-per-domain 4 -k 8

Greedy verification accepts a draft's longest prefix that equals the target's own output,
so a drafter's mean accepted tokens per target call (MAT) on a query follows from the
target-only tokens alone: each round the drafter proposes up to ``k`` tokens after the
prompt plus the output so far, the matching prefix and one target token are committed.
This replays prompt lookup (``ngram``) and the SuffixDecoding-style ``suffix`` drafter at
several ``max_spec_factor`` / ``min_token_prob`` settings, a fresh drafter per query (no
global store).  The prompts are rebuilt from the bench's datasets (same categories,
prompts per domain and seed as the traced run); no model runs, only the tokenizer loads.
MAT is total output tokens / total rounds per category, as the bench reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from specmux.bench.datasets import load_domains
from specmux.bench.runner import to_query
from specmux.drafters.base import Drafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.models import load_tokenizer
from specmux.types import SamplingParams

GREEDY = SamplingParams()
VARIANTS: dict[str, Callable[[], Drafter]] = {
    "ngram": NgramDrafter,
    "suffix (factor 1, prob 0.1: defaults)": SuffixTreeDrafter,
    "suffix (factor 2)": lambda: SuffixTreeDrafter(max_spec_factor=2.0),
    "suffix (factor 4)": lambda: SuffixTreeDrafter(max_spec_factor=4.0),
    "suffix (factor 4, prob 0)": lambda: SuffixTreeDrafter(max_spec_factor=4.0,
                                                           min_token_prob=0.0),
}


def replay(drafter: Drafter, prompt: list[int], output: list[int], k: int) -> int:
    """Rounds (target calls) ``drafter`` needs to produce ``output`` after ``prompt``."""
    start = getattr(drafter, "start_query", None)
    if start is not None:
        start(prompt)
    context, done, rounds = list(prompt), 0, 0
    while done < len(output):
        room = min(k, len(output) - done - 1)
        draft = drafter.propose(context, room, GREEDY).tokens.tolist()[:room] if room else []
        accepted = 0
        while accepted < len(draft) and draft[accepted] == output[done + accepted]:
            accepted += 1
        committed = output[done : done + accepted + 1]
        drafter.observe(context, committed)
        context += committed
        done += len(committed)
        rounds += 1
    return rounds


def traced_queries(trace: Path, categories: str, prompts_per_domain: int,
                   target: str) -> dict[str, tuple[str, list[int], list[int]]]:
    """Per traced query id: its category, its prompt ids (rebuilt from the bench's datasets
    with the same categories, prompts per domain and seed) and target-only's output ids."""
    if not trace.is_file():
        print(f"error: no trace at {trace} (specmux bench --out DIR writes DIR/trace.jsonl)",
              file=sys.stderr)
        sys.exit(2)
    tokenizer = load_tokenizer(target)
    splits = load_domains(categories.split(","), num_eval=prompts_per_domain, seed=0)
    prompts = {ex.id: list(to_query(0, ex, tokenizer).prompt_ids)
               for split in splits.values() for ex in split.eval}
    out = {}
    for line in trace.read_text().splitlines():
        rec = json.loads(line)
        if (rec.get("type") == "answer" and rec.get("method") == "target-only"
                and rec["question_id"] in prompts):
            out[rec["question_id"]] = (rec["category"], prompts[rec["question_id"]],
                                       rec["token_ids"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--categories", required=True)
    parser.add_argument("--prompts-per-domain", type=int, required=True)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--target", default="embedded:qwen2.5-coder-1.5b")
    args = parser.parse_args()
    queries = traced_queries(args.trace, args.categories, args.prompts_per_domain, args.target)
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rounds: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for qid, (category, prompt, output) in queries.items():
        row = []
        for name, make in VARIANTS.items():
            n = replay(make(), prompt, output, args.k)
            tokens[category][name] += len(output)
            rounds[category][name] += n
            row.append(f"{name} {len(output) / n:.2f}")
        print(f"{category} {qid}: " + "; ".join(row))
    print(f"\nMAT at k = {args.k} (total tokens / total target calls):")
    for category in tokens:
        print(f"  {category}: " + "; ".join(
            f"{name} {tokens[category][name] / rounds[category][name]:.2f}"
            for name in VARIANTS))


if __name__ == "__main__":
    main()
