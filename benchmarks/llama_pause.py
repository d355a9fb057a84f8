"""Does a llama.cpp step get slower after the learner's pause between steps?

A speculative round runs the learner (about 1 ms of Python and numpy on this CPU) between
two target passes; target-only decoding does not.  If llama.cpp's worker threads went to
sleep in that pause, or the pause evicted the model's working set from the caches, the next
pass would cost more, and a learner that plays plain steps would lose more than its own
time.  This times one-token steps of the target at a fixed context (the KV cache rolled
back to the same prefix each time) after each kind of pause, interleaved so that the
machine's drift hits every kind alike.

    python benchmarks/llama_pause.py --out pause.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from specmux.backends.llamacpp import LlamaCppLM


def busy(ms: float) -> Callable[[], None]:
    """Python and numpy work on small arrays for ``ms`` milliseconds (the learner's kind)."""
    def pause() -> None:
        t0, a = time.perf_counter(), np.zeros(64)
        while time.perf_counter() - t0 < ms / 1e3:
            a += 1.0
            a.sum()
    return pause


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=200, help="tokens before each step")
    ap.add_argument("--steps", type=int, default=60, help="steps per kind of pause")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.context < 1 or args.steps < 1 or args.threads < 1:
        ap.error("--context, --steps and --threads must be >= 1")
    lm = LlamaCppLM.load(args.model, threads=args.threads)
    rng = np.random.default_rng(0)
    prefix = rng.integers(100, 20_000, args.context).tolist()
    lm.logits(prefix, 1)  # prefill once; every step below rolls back to it
    buf = np.zeros(1 << 20)  # 8 MB

    def walk() -> None:
        buf[:] += 1.0  # touches 8 MB: evicts much of the caches

    pauses: dict[str, Callable[[], None]] = {
        "none": lambda: None, "busy 0.3 ms": busy(0.3), "busy 1 ms": busy(1.0),
        "busy 3 ms": busy(3.0), "sleep 1 ms": lambda: time.sleep(1e-3), "walk 8 MB": walk,
    }
    times: dict[str, list[float]] = {name: [] for name in pauses}
    for _ in range(args.steps):
        for name, pause in pauses.items():
            pause()
            token = int(rng.integers(100, 20_000))
            t0 = time.perf_counter()
            lm.logits([*prefix, token], 1)  # one new position after the fixed prefix
            times[name].append(time.perf_counter() - t0)
    result = {name: {"median_ms": 1e3 * statistics.median(v), "mean_ms": 1e3 * statistics.mean(v)}
              for name, v in times.items()}
    for name, r in result.items():
        print(f"after {name:12s} step median {r['median_ms']:.2f} ms, mean {r['mean_ms']:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]),
                       "machine": f"{platform.machine()}, {args.threads} llama.cpp threads",
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "python": platform.python_version(), "results": result}, f, indent=1)


if __name__ == "__main__":
    main()
