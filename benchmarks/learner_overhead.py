"""Where the learner's time per round goes, and why a CPU pays more for it than its code needs.

The engine runs a bench learner over model-free drafters on a *fake* target with the
embedded models' vocabulary (151,936 ids): its logits cost next to nothing, and its greedy
path copies pieces of the prompt half of the time (``--copy-rate``; chat-like text: 0.1), so
the drafters draft often.  Between rounds the fake target can do ``--compute-ms`` of the
work a real forward pass does (float32 matrix products on ``--threads`` threads), which
evicts the learner's code and data from the core's caches as a target pass does.  It
reports the learner's seconds per round (``Step.learner_seconds``: offers, select, scoring,
learning; verification excluded), of which the policy's (``Selector.policy_seconds``:
select and update, the results page's ``policy ms/round``), split by the round's parts,
and one part timed twice in a row: the first call after the
pass against the same call at once (``plan_scoring``, which with model-free drafters only
reads the learner's state).  Without work between rounds the fake target's passes are so
fast that the model-free drafters' scoring counts as expensive and is sampled, so the
comparison is made inside one run instead.

    python benchmarks/learner_overhead.py --compute-ms 40 --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from specmux.bench.runner import parse_policy_spec
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.engine import SpeculativeDecoder
from specmux.errors import ConfigError

VOCAB = 151_936


class FakeTarget:
    """Logits whose argmax follows ``path``; ``burn`` runs between passes (a target's work)."""

    vocab_size = VOCAB
    max_context = 1 << 20

    def __init__(self, path: list[int], burn: Any) -> None:
        self.rows = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0))
        self.path, self.burn = path, burn

    def logits(self, ids: list[int], num_last: int = 1) -> torch.Tensor:
        start = len(ids) - num_last
        out = self.rows[[(start + j) % 64 for j in range(num_last)]].clone()  # [n, V]
        for j in range(num_last):
            out[j, self.path[(start + j) % len(self.path)]] = 100.0
        self.burn()
        return out


def make_burn(ms: float, threads: int) -> Any:
    """A callable doing about ``ms`` milliseconds of matrix products (0: nothing)."""
    if ms <= 0:
        return lambda: None
    torch.set_num_threads(threads)
    w = torch.randn(1024, 1024)
    t0 = time.perf_counter()
    for _ in range(5):
        w @ w
    each = (time.perf_counter() - t0) / 5
    reps = max(1, round(ms / 1e3 / each))

    def burn() -> None:
        for _ in range(reps):
            w @ w
    return burn


def workload(seed: int, prompt_tokens: int, length: int,
             copy_rate: float = 0.5) -> tuple[list[int], list[int]]:
    """A prompt and a target path after it that copies pieces of the prompt a
    ``copy_rate`` share of the time (chat-like text: low; an edit: high)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, prompt_tokens).tolist()
    out: list[int] = []
    while len(out) < length:
        n = int(rng.integers(3, 15))
        if rng.random() < copy_rate:
            s = int(rng.integers(0, prompt_tokens - n))
            out += prompt[s : s + n]
        else:
            out += rng.integers(0, VOCAB, n).tolist()
    return prompt, prompt + out


def run(args: argparse.Namespace, compute_ms: float) -> dict[str, Any]:
    prompt, path = workload(args.seed, args.prompt_tokens, args.queries * args.max_new_tokens,
                            args.copy_rate)
    target = FakeTarget(path, make_burn(compute_ms, args.threads))
    spec = parse_policy_spec(args.policy)
    decoder = SpeculativeDecoder(
        target, [SuffixTreeDrafter(name="suffix"), NgramDrafter()], spec.name,
        num_speculative_tokens=args.k, loss=spec.loss or "time", seed=args.seed,
        contextual=bool(spec.contextual), score_rate=args.score_rate,
        policy_kwargs={"selection": spec.selection} if spec.selection else None)
    parts: dict[str, list[float]] = defaultdict(list)

    def timed(obj: Any, name: str, label: str) -> None:
        f = getattr(obj, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = f(*a, **kw)
            parts[label].append(time.perf_counter() - t0)
            return out
        setattr(obj, name, wrapper)

    for d in decoder.drafters:
        timed(d, "offer", "offers")
        timed(d, "distributions", "drafters along the path")
    timed(decoder.selector, "select", "select")
    timed(decoder.selector, "observe", "learn (tracker, losses, policy)")
    plan = decoder.selector.plan_scoring

    def plan_twice(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        plan(*a, **kw)
        t1 = time.perf_counter()
        out = plan(*a, **kw)
        parts["plan_scoring, first call"].append(t1 - t0)
        parts["plan_scoring, at once again"].append(time.perf_counter() - t1)
        return out
    decoder.selector.plan_scoring = plan_twice
    decoder.warmup(prompt)
    parts.clear()
    policy_before = decoder.selector.policy_seconds
    steps = []
    for q in range(args.queries):
        context = path[: args.prompt_tokens + q * args.max_new_tokens]
        steps += list(decoder.generate_steps(context, max_new_tokens=args.max_new_tokens))
    n = len(steps)
    return {
        "compute_ms": compute_ms, "rounds": n,
        "tokens_per_round": sum(len(s.tokens) for s in steps) / n,
        "learner_ms_per_round": 1e3 * sum(s.learner_seconds for s in steps) / n,
        "verify_ms_per_round": 1e3 * sum(s.verify_seconds for s in steps) / n,
        "policy_ms_per_round": 1e3 * (decoder.selector.policy_seconds - policy_before) / n,
        "parts_ms_per_round": {k: 1e3 * sum(v) / n for k, v in parts.items()},
        "parts_ms_median_call": {k: 1e3 * statistics.median(v) for k, v in parts.items()},
        "drafter_share": {name: sum(s.drafter == name for s in steps) / n
                          for name in sorted({s.drafter for s in steps})},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="hedge:time:ctx:argmax", help="a bench learner spec")
    ap.add_argument("-k", type=int, nargs="+", default=[0, 2, 4, 8], help="the k set")
    ap.add_argument("--score-rate", type=float, default=0.05)
    ap.add_argument("--compute-ms", type=float, default=40.0,
                    help="work between rounds (a target pass's kind)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-rate", type=float, default=0.5,
                    help="share of the path's pieces copied from the prompt (chat: 0.1)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    try:
        parse_policy_spec(args.policy)
    except ConfigError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    runs = [run(args, args.compute_ms)]
    for r in runs:
        print(f"compute between rounds {r['compute_ms']:.0f} ms: {r['rounds']} rounds, "
              f"learner {r['learner_ms_per_round']:.3f} ms/round, of which the policy "
              f"(select and update, the results page's `policy ms/round`) "
              f"{r['policy_ms_per_round']:.3f}")
        for part, ms in sorted(r["parts_ms_per_round"].items(), key=lambda kv: -kv[1]):
            print(f"  {part:34s} {ms:.3f} ms/round, "
                  f"median call {r['parts_ms_median_call'][part]:.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
