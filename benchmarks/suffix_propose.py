"""Micro-benchmark: per-round proposal cost of the SuffixDecoding-style drafter.

Indexes ``--tokens`` tokens (default 1,000,000) into the global store, then times
``propose`` (and the counterfactual ``distributions`` call) on held-out contexts.
Token streams: ``--source zipf`` (seeded Zipf-distributed ids with repeated phrases, no
package needed) or ``--source sharegpt`` (ShareGPT replies tokenized with the embedded
target's tokenizer; needs the ``data`` extra and the installed models).

    python benchmarks/suffix_propose.py --tokens 1000000 --source zipf
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
import tracemalloc

import numpy as np

from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.types import SamplingParams


def zipf_docs(num_tokens: int, seed: int, doc_len: int = 300) -> list[list[int]]:
    """Documents mixing Zipf-distributed ids with recurring phrases (as real outputs do)."""
    rng = np.random.default_rng(seed)
    phrases = [rng.zipf(1.3, size=rng.integers(4, 20)).tolist() for _ in range(5000)]
    docs, total = [], 0
    while total < num_tokens:
        doc: list[int] = []
        while len(doc) < doc_len:
            if rng.random() < 0.5:
                doc += phrases[int(rng.zipf(1.5)) % len(phrases)]
            else:
                doc += (rng.zipf(1.2, size=8) % 150_000).tolist()
        docs.append(doc)
        total += len(doc)
    return docs


def sharegpt_docs(num_tokens: int) -> list[list[int]]:
    from specmux.bench.datasets import _sharegpt
    from specmux.models import load_tokenizer

    tok = load_tokenizer("embedded:qwen2.5-coder-1.5b")
    docs, total = [], 0
    for _, turns in _sharegpt():
        for who, text in turns:
            if who == "gpt" and text.strip():
                ids = tok(text, add_special_tokens=False)["input_ids"]
                docs.append(ids)
                total += len(ids)
                if total >= num_tokens:
                    return docs
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--source", choices=["zipf", "sharegpt"], default="zipf")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    docs = zipf_docs(args.tokens, args.seed) if args.source == "zipf" else sharegpt_docs(
        args.tokens)
    held_out = docs[-50:]
    docs = docs[:-50]
    drafter = SuffixTreeDrafter(max_tokens=2 * args.tokens)
    tracemalloc.start()
    t0 = time.perf_counter()
    for doc in docs:  # as the server learns: each finished output joins the global store
        drafter.learned.add(doc)
    build = time.perf_counter() - t0
    mem, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    rng = random.Random(args.seed)
    sampling = SamplingParams()
    propose_ms, dist_ms, lengths = [], [], []
    for _ in range(args.queries):
        doc = held_out[rng.randrange(len(held_out))] if rng.random() < 0.5 else docs[
            rng.randrange(len(docs))]
        cut = rng.randrange(8, len(doc) - 1)
        prompt = doc[:cut]
        drafter.start_query(prompt[:-1])
        drafter.request.sync(prompt)  # the per-request store is synced outside the timing
        t = time.perf_counter()
        draft = drafter.propose(prompt, args.k, sampling)
        propose_ms.append(1e3 * (time.perf_counter() - t))
        lengths.append(len(draft))
        path = doc[cut : cut + args.k + 1]
        t = time.perf_counter()
        drafter.distributions(prompt, path, sampling)
        dist_ms.append(1e3 * (time.perf_counter() - t))
    drafter._output = []

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]

    print(json.dumps({
        "indexed_tokens": drafter.num_indexed_tokens, "source": args.source,
        "index_keys": len(drafter.learned.index), "build_s": round(build, 1),
        "traced_mb": round(mem / 2**20), "k": args.k, "queries": args.queries,
        "propose_ms": {"mean": round(statistics.mean(propose_ms), 3),
                       "p50": round(q(propose_ms, 0.5), 3), "p99": round(q(propose_ms, 0.99), 3)},
        "distributions_ms": {"mean": round(statistics.mean(dist_ms), 3),
                             "p50": round(q(dist_ms, 0.5), 3)},
        "mean_draft_len": round(statistics.mean(lengths), 2),
        "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
    }, indent=1))


if __name__ == "__main__":
    main()
