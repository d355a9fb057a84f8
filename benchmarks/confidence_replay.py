"""What ending LM drafts at a confidence threshold would do, replayed on a bench trace.

    python benchmarks/confidence_replay.py bench-out/trace.jsonl \
        --categories code,code_edit,math,chat,multiturn,summarize,rag --prompts-per-domain 2

Under greedy verification a fixed ``lm@k`` arm's rounds follow from the target-only output
alone: the LM's draft matches the output while its argmax after each true prefix does, so
one LM pass over prompt + output per query gives every round's accepted tokens, and the
LM's top probability after each prefix says where a draft with threshold ``tau`` would
have ended (before the first token below ``tau``: :class:`specmux.drafters.hf.HFDrafter`).
Each round is priced by the cost model the traced run fitted (its last ``cost_model``
snapshot: verification seconds by positions, LM drafting seconds per token; a stopped
draft pays the LM step that found the unsure token).  Prefill, catch-up and the learner
are left out, so the speedups are higher than a real run's: read the columns against each
other (``tau = 0`` is today's ``lm@k``).  The LM runs on llama.cpp (the embedded GGUF);
prompts are rebuilt from the bench's datasets as in ``benchmarks/replay_drafters.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from replay_drafters import traced_queries  # this directory (run as a script)

from specmux.backends.llamacpp import LlamaCppLM


def last_cost_model(trace: Path) -> dict:
    model = None
    for line in trace.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "answer" and rec.get("cost_model"):
            model = rec["cost_model"]
    if model is None or "lm" not in model.get("draft_seconds_per_token", {}):
        print(f"error: {trace} has no cost model with LM drafting times (run a learner "
              "with the lm drafter)", file=sys.stderr)
        sys.exit(2)
    return model


def replay(data: dict, model: dict, k: int, tau: float) -> tuple[float, dict[str, float]]:
    """Tokens per modelled second of ``lm@k`` with threshold ``tau``: overall, by category."""
    verify = {int(n): s for n, s in model["verify_seconds"].items()}
    per_token = model["draft_seconds_per_token"]["lm"]
    fixed = model["draft_seconds_fixed"]["lm"]
    tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for category, out, guess, conf in data.values():
        t, secs = 0, 0.0
        while t < len(out):
            n = 0
            while n < k and t + n < len(out) and conf[t + n] >= tau:
                n += 1
            steps = n + (n < k and t + n < len(out))  # the step that found the unsure token
            accepted = 0
            while accepted < n and guess[t + accepted] == out[t + accepted]:
                accepted += 1
            secs += (fixed + per_token * steps if steps else 0.0) + verify[min(n + 1, max(verify))]
            t += accepted + 1
        tokens[category] = tokens.get(category, 0) + len(out)
        seconds[category] = seconds.get(category, 0.0) + secs
    rate = sum(tokens.values()) / sum(seconds.values())
    return rate, {c: tokens[c] / seconds[c] for c in tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--categories", required=True)
    ap.add_argument("--prompts-per-domain", type=int, required=True)
    ap.add_argument("-k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--drafter", default="embedded:qwen2.5-coder-0.5b")
    ap.add_argument("--target", default="embedded:qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    args = ap.parse_args()
    if any(k < 1 for k in args.k) or any(not 0.0 <= t < 1.0 for t in args.tau):
        ap.error("-k must be >= 1 and --tau in [0, 1)")
    model = last_cost_model(args.trace)
    queries = traced_queries(args.trace, args.categories, args.prompts_per_domain, args.target)
    lm = LlamaCppLM.load(args.drafter, threads=args.threads)
    data = {}
    for qid, (category, prompt, out) in queries.items():
        lm.reset()
        rows = lm.logits(prompt + out, len(out) + 1)[:-1]  # [L, V]: row j after prompt+out[:j]
        conf, guess = torch.softmax(rows.float(), dim=-1).max(dim=-1)
        data[qid] = (category, np.array(out), guess.numpy(), conf.numpy())
    plain = 1.0 / model["verify_seconds"]["1"]
    results = []
    categories = sorted({c for c, *_ in data.values()})
    print("k  tau   overall  " + "  ".join(f"{c:>9}" for c in categories))
    for k in args.k:
        for tau in args.tau:
            rate, by = replay(data, model, k, tau)
            results.append({"k": k, "tau": tau, "speedup": rate / plain,
                            "by_category": {c: by[c] / plain for c in categories}})
            print(f"{k:<2} {tau:<4}  {rate / plain:6.3f}x  "
                  + "  ".join(f"{by[c] / plain:8.2f}x" for c in categories))
    if args.out:
        args.out.write_text(json.dumps({"trace": str(args.trace), "cost_model": model,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
