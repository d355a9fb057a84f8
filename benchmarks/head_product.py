"""Micro-benchmark: a draft head's product with its draft-vocabulary rows, float32 vs bfloat16.

A head drafts a token by ``[1, H] @ [H, V_d]`` and scores a path by ``[L, H] @ [H, V_d]``
(:mod:`specmux.drafters.head`); with the embedded target (H = 1,536) and a 32,768-row draft
vocabulary that product is most of a head's cost.  Random weights (the cost does not depend
on them); prints the median of ``--reps`` timed products per dtype and row count, and what
:func:`specmux.drafters.head.product_dtype` picks here.

    python benchmarks/head_product.py --hidden 1536 --vocab 32768 --rows 1 9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from specmux.drafters.head import product_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 9])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = torch.randn(args.vocab, args.hidden, generator=torch.Generator().manual_seed(0))
    out: dict[str, object] = {"machine": platform.processor() or platform.machine(),
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "hidden": args.hidden, "vocab": args.vocab, "ms": {}}
    for dtype in (torch.float32, torch.bfloat16):
        m = w.to(dtype)
        for n in args.rows:
            x = torch.randn(n, args.hidden).to(dtype)
            x @ m.T  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                x @ m.T
                times.append(time.perf_counter() - t0)
            out["ms"][f"{str(dtype).removeprefix('torch.')}[{n}]"] = round(  # type: ignore[index]
                1e3 * statistics.median(times), 2)
    out["product_dtype"] = str(product_dtype(w)).removeprefix("torch.")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
