"""The vLLM proposer's own time per (request, step), without vLLM: a simulated batch.

    python benchmarks/vllm_overhead.py --batch 8 --steps 100

``--batch`` requests (half copy-heavy, half never repeating) with ``--context`` token
prompts; each step commits the accepted draft prefix plus one true token, as vLLM's greedy
verification would, and calls :meth:`ProposerCore.step` on the whole batch.  Prints the time
inside ``step`` per (request, step) for each policy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from specmux.integrations.vllm import ProposerCore, build_drafters, parse_options


def run(policy: str, batch: int, steps: int, context: int, k: int) -> dict:
    rng = np.random.default_rng(0)
    loop = list(rng.integers(2, 50_000, size=40))
    length = context + steps * (k + 1) + 1
    head = context // 2  # copy-heavy prompts end with the loop they then continue
    truths = [list(rng.integers(2, 50_000, size=head)) + (loop * length)[: length - head]
              if i % 2 == 0 else list(rng.integers(2, 50_000, size=length))
              for i in range(batch)]
    opts = parse_options({"policy": policy}, k)
    core = ProposerCore(opts, k, 2 * length, build_drafters(opts, lambda: None))
    ids = [f"r{i}" for i in range(batch)]
    rows = np.zeros((batch, 2 * length), dtype=np.int32)
    for i, truth in enumerate(truths):
        rows[i, : len(truth)] = truth
    num = np.full(batch, context, dtype=np.int32)
    drafts: list[list[int] | None] = [None] * batch
    for _ in range(steps):
        sampled = []
        for i, truth in enumerate(truths):
            n, draft, ok = int(num[i]), drafts[i] or [], 0
            while ok < len(draft) and draft[ok] == truth[n + ok]:
                ok += 1
            sampled.append(truth[n: n + ok + 1])
            num[i] = n + ok + 1
        drafts = core.step(ids, sampled, num, rows, live=set(ids))
    return core.stats_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--policies", default="normalhedge,hedge,ucb")
    args = ap.parse_args()
    out = {}
    for policy in args.policies.split(","):
        stats = run(policy, args.batch, args.steps, args.context, args.k)
        out[policy] = {key: stats[key] for key in ("ms_per_row_step", "row_steps", "drafted",
                                                   "accepted")}
    print(json.dumps({"settings": vars(args), "results": out}, indent=1))


if __name__ == "__main__":
    main()
