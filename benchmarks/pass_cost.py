"""What a pass scoring n positions costs on this machine, per backend: the economics of
speculation (a round of k drafted tokens verifies k + 1 positions in one pass).

    python benchmarks/pass_cost.py --out docs/img/bench/pass-cost.json

For the target (default: the embedded Qwen2.5-Coder-1.5B) on transformers (bf16, the fast
path and exact mode, as ``specmux bench`` runs it) and on llama.cpp (its GGUF, as specmux
loads it), and for the 0.5B LM drafter on llama.cpp: the median seconds of a pass of
n = 1, 2, 3, 5, 9, 17 new positions after a ``--context``-token prefix, each n ``--reps``
times, and each as a multiple of the one-position step.  Where llama.cpp's AMX kernels run
(Intel Xeon since Sapphire Rapids), specmux loads GGUFs without llama.cpp's extra buffer
types (``specmux.backends.llamacpp.new_llama``); a child process then times the one-token
step with them on, and tries a 2-token pass with them on, to record whether it still
crashes (llama.cpp #20824).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from specmux.backends.llamacpp import LlamaCppLM, amx_kernels, llama_cpp_module
from specmux.exact import set_exact
from specmux.lm import CachedLM
from specmux.models import load_model
from specmux.versions import cpu_name, package_versions

SIZES = (1, 2, 3, 5, 9, 17)
AMX_ON = """
import sys, time, statistics, llama_cpp
from specmux.backends.llamacpp import resolve_gguf
path, n = str(resolve_gguf(sys.argv[1])), int(sys.argv[2])
llama = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=int(sys.argv[3]),
                        n_threads_batch=int(sys.argv[3]), verbose=False)
llama.eval([1000 + i for i in range(n)])  # a 2-token batch crashes here on #20824
steps = []
for i in range(12):
    t = time.perf_counter(); llama.eval([2000 + i]); steps.append(time.perf_counter() - t)
print(statistics.median(steps[2:]))
"""


def sweep(logits: Callable[[list[int], int], object], context: int, reps: int) -> dict:
    """Median seconds of a pass of n new positions after ``context`` tokens, per n."""
    prefix = [1000 + i % 5000 for i in range(context)]
    logits(prefix, 1)
    out = {}
    for n in SIZES:
        times = []
        for r in range(reps):
            ids = prefix + [7000 + 50 * r + j for j in range(n)]
            t = time.perf_counter()
            logits(ids, n)
            times.append(time.perf_counter() - t)
        out[n] = statistics.median(times)
    return {"seconds": out, "ratio": {n: out[n] / out[1] for n in SIZES}}


def amx_on(spec: str, threads: int) -> dict:
    """The one-token step with llama.cpp's extra buffer types on (n = 1, then n = 2)."""
    row = {}
    for n in (1, 2):
        run = subprocess.run([sys.executable, "-c", AMX_ON, spec, str(n), str(threads)],
                             capture_output=True, text=True, timeout=600)
        row[f"prompt_{n}_exit"] = run.returncode
        if run.returncode == 0 and n == 1:
            row["step_seconds"] = float(run.stdout.split()[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="embedded:qwen2.5-coder-1.5b")
    parser.add_argument("--drafter", default="embedded:qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"machine": cpu_name(), "threads": args.threads, "context": args.context,
                    "versions": package_versions(),
                    "date": time.strftime("%F %T UTC", time.gmtime())}
    model, _ = load_model(args.target, dtype=torch.bfloat16)
    target = CachedLM(model, name="target")
    result["transformers bf16"] = sweep(target.logits, args.context, args.reps)
    start = time.perf_counter()
    set_exact(model, True)  # calibrates exact mode's piece size per linear shape
    result["exact mode setup seconds"] = time.perf_counter() - start
    result["transformers bf16 exact"] = sweep(target.logits, args.context, args.reps)
    del target, model
    lc = llama_cpp_module()
    result["amx"] = amx_kernels(lc)
    for name, spec in (("llama.cpp target", args.target), ("llama.cpp drafter", args.drafter)):
        lm = LlamaCppLM.load(spec, threads=args.threads, context=1024)
        result[name] = sweep(lm.logits, args.context, args.reps)
        lm.close()
        if result["amx"]:
            result[name]["extra buffers on"] = amx_on(spec, args.threads)
    print(f"exact mode setup (calibration) {result['exact mode setup seconds']:.1f} s")
    for key, row in result.items():
        if isinstance(row, dict) and "ratio" in row:
            cells = "  ".join(f"{n}: {1000 * row['seconds'][n]:6.1f} ms ({row['ratio'][n]:.2f}x)"
                              for n in SIZES)
            print(f"{key:26s} {cells}")
            if "extra buffers on" in row:
                print(f"{'':26s} extra buffers on: {row['extra buffers on']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
