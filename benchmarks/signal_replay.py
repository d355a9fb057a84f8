"""How often a *strong* suffix-drafter candidate is right, by the length of its match.

    python benchmarks/signal_replay.py bench-out/trace.jsonl \
        --categories code,code_edit,math,chat,multiturn,summarize,rag --prompts-per-domain 2

Replays the SuffixDecoding-style drafter (a fresh one per query, no global store) over
the target-only outputs of a ``specmux bench`` trace: at every output position it looks up
the best candidate after the true prefix, and where the candidate's path probabilities
sum to at least ``STRONG_SCORE`` (the score part of the strong signal) it records the
length of the match the candidate continues and whether its first two tokens are the
target's next two (a two-token draft fully accepted).  Output: per match length (8 and
more together), chat and the other categories apart, the positions and the share fully
accepted.  The prompts are rebuilt from the bench's datasets as in
``benchmarks/replay_drafters.py``; no model runs, only the tokenizer loads.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from replay_drafters import traced_queries  # this directory (run as a script)

from specmux.drafters.suffix_tree import STRONG_SCORE, SuffixTreeDrafter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--categories", required=True)
    parser.add_argument("--prompts-per-domain", type=int, required=True)
    parser.add_argument("--target", default="embedded:qwen2.5-coder-1.5b")
    args = parser.parse_args()
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # [n, both right]
    queries = traced_queries(args.trace, args.categories, args.prompts_per_domain, args.target)
    for category, prompt, output in queries.values():
        group = "chat" if category == "chat" else "other categories"
        drafter = SuffixTreeDrafter()
        drafter.start_query(prompt)
        context = list(prompt)
        for i in range(len(output) - 2):
            tokens, probs = [], []
            found = drafter._context_candidates(context, 8)
            best, n = drafter._pick(found, 8)
            if best is not None:
                tokens, probs = best.tokens[:n], best.probs[:n]
            if tokens and sum(probs) >= STRONG_SCORE:
                length = str(best.length) if best.length < 8 else "8+"
                entry = counts[(group, length)]
                entry[0] += 1
                entry[1] += tokens[:2] == output[i : i + 2]
            context.append(output[i])
    for (group, length), (n, right) in sorted(counts.items(),
                                              key=lambda kv: (kv[0][0], len(kv[0][1]), kv[0][1])):
        print(f"{group:16s} match {length:>2s} tokens: {n:4d} strong positions, "
              f"both next tokens right {right / n:.2f}")


if __name__ == "__main__":
    main()
