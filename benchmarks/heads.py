"""Draft heads on the embedded target: MAT and drafting cost, then online evolution.

    flock /tmp/specmux-cpu.lock python benchmarks/heads.py --domain code --num-prompts 24

Target ``embedded:qwen2.5-coder-1.5b`` (bf16 in exact mode, as ``specmux bench``), the
domain head saved by ``specmux heads train`` (``<cache>/heads/head-DOMAIN.json``;
``--train-minutes`` trains it first when missing, or always with ``--retrain``;
``--corpus`` adds training text), greedy, ``k`` drafted tokens per round, the held-out eval
prompts of the domain (the split ``heads train`` kept out of the corpus) in a fixed order.

Phase 1 (real): target-only greedy decoding of every prompt, timed per step; it records the
state the LM head read at each step (:func:`specmux.heads.replay.record_greedy`, no extra
pass).  Phase 2 (real): the frozen head through :class:`~specmux.engine.SpeculativeDecoder`
on the first ``--real-prompts`` prompts: outputs against phase 1, MAT, seconds per drafted
token against the target's step.  Phase 3 (replay, :mod:`specmux.heads.replay`): the frozen
head and each online learner (OGD, optimistic, ensemble) through the same engine over the
whole stream, learner state kept across prompts; the outputs are asserted equal to phase 1.

Writes a JSON file with every number and a PNG of acceptance length over the stream.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import pathlib
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from specmux.drafters.head import HeadDrafter
from specmux.engine import SpeculativeDecoder
from specmux.exact import set_exact
from specmux.heads.distill import stop_tokens
from specmux.heads.online import OnlineHeadDrafter
from specmux.heads.replay import HiddenRecording, HiddenReplayTarget, record_greedy
from specmux.heads.store import HeadFile, heads_dir, load_head
from specmux.lm import CachedLM

log = logging.getLogger("benchmarks.heads")


def _train(model: Any, tok: Any, args: argparse.Namespace, path: pathlib.Path) -> None:
    from specmux.bench.datasets import load_domain
    from specmux.heads.distill import self_distill
    from specmux.heads.extract import corpus_chunks, extract, extraction_key, load_shards
    from specmux.heads.store import save_head
    from specmux.heads.train import TrainConfig, train_head
    from specmux.models import cache_dir

    extra = corpus_chunks(args.corpus, args.max_tokens, 0)
    split = load_domain(args.domain, num_eval=args.num_eval, seed=0)
    seqs, distill_meta = self_distill(
        split, tok, model, args.target, num_prompts=args.self_distill,
        max_new_tokens=args.distill_tokens, threads=args.threads,
        on_item=lambda n, done: log.info("answered %d prompts", done) if done % 20 == 0 else None)
    texts = [*seqs, *[*split.corpus, *extra][: args.max_texts]]
    where = cache_dir() / "extract" / (
        f"{args.domain}-{extraction_key(args.target, 'bfloat16', args.max_tokens)}")
    t0 = time.perf_counter()
    shards = load_shards(extract(model, tok, texts, where, max_tokens=args.max_tokens))
    cfg = TrainConfig(epochs=args.epochs, max_seconds=args.train_minutes * 60)
    meta = {"domain": args.domain, "target": args.target, "dtype": "bfloat16", "seed": 0,
            "num_eval": args.num_eval, "corpus_texts": len(texts) - len(seqs), **distill_meta,
            "extra_corpus": [str(p) for p in args.corpus],
            "corpus_tokens": int(sum(len(s.ids) for s in shards)),
            "extract_seconds": round(time.perf_counter() - t0, 1), "extract_dir": str(where)}
    head = train_head(model, shards, cfg, meta=meta,
                      on_step=lambda s, n, loss: log.info("step %d/%d loss %.3f", s, n, loss)
                      if s % 20 == 0 else None)
    save_head(head, path.parent, path.stem)
    log.info("trained %s: %s", path, {k: head.meta[k] for k in (
        "distill_seconds", "extract_seconds", "train_seconds", "steps", "holdout_agreement")
        if k in head.meta})


def _prompts(tok: Any, args: argparse.Namespace) -> list[list[int]]:
    from specmux.bench.datasets import load_domain
    from specmux.bench.runner import encode

    split = load_domain(args.domain, num_eval=args.num_eval, seed=0)
    prompts = [encode(tok, ex) for ex in split.eval[: args.num_prompts]]
    return [q[-args.max_prompt_tokens:] for q in prompts] if args.max_prompt_tokens else prompts


def _recordings_key(prompts: list[list[int]], args: argparse.Namespace) -> str:
    """What a saved recording must match: target, mode, token budget and the prompts."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return f"{args.target}|exact={args.exact}|max_new={args.max_new_tokens}|{digest}"


def _load_recordings(path: pathlib.Path, key: str) -> list[HiddenRecording] | None:
    """The recordings saved at ``path`` for ``key`` (None when absent or for other prompts)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if saved.get("key") != key:
            log.warning("%s holds recordings of other prompts or settings: recording again",
                        path)
            return None
        return [HiddenRecording(ids=r["ids"], prompt_len=r["prompt_len"], hidden=r["hidden"],
                                seconds=r["seconds"], step_seconds=r["step_seconds"])
                for r in saved["recordings"]]
    except Exception as err:  # a truncated or foreign file: record again, overwrite it
        log.warning("%s is not a recordings file (%s): recording again", path,
                    str(err).splitlines()[0][:120] if str(err) else type(err).__name__)
        return None


def _save_recordings(path: pathlib.Path, key: str, recs: list[HiddenRecording]) -> None:
    """Write the recordings atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "recordings": [
        {"ids": r.ids, "prompt_len": r.prompt_len, "hidden": r.hidden, "seconds": r.seconds,
         "step_seconds": r.step_seconds} for r in recs]}, tmp)
    os.replace(tmp, path)


def _record(target: CachedLM, prompts: list[list[int]], args: argparse.Namespace,
            stop: list[int]) -> tuple[list[HiddenRecording], list[float]]:
    key = _recordings_key(prompts, args)
    saved = None if args.recordings is None else _load_recordings(args.recordings, key)
    if saved is not None:
        log.info("loaded %d recordings from %s", len(saved), args.recordings)
        return saved, [statistics.median(r.step_seconds[1:]) for r in saved
                       if len(r.output) > 1]
    recs, step_s = [], []
    for i, p in enumerate(prompts):
        target.reset()
        rec = record_greedy(target, p, args.max_new_tokens, stop)
        if len(rec.output) > 1:  # one-token decode steps (the first pass is the prefill)
            step_s.append(statistics.median(rec.step_seconds[1:]))
        recs.append(rec)
        log.info("recorded %d/%d: %d tokens, %.2f s/step", i + 1, len(prompts), len(rec.output),
                 step_s[-1] if step_s else float("nan"))
    if args.recordings is not None:
        _save_recordings(args.recordings, key, recs)
    return recs, step_s


def _real(model: Any, head: HeadFile, target: CachedLM, recs: list[HiddenRecording],
          args: argparse.Namespace, step_s: list[float]) -> dict[str, Any]:
    drafter = HeadDrafter(head, model, name="head", draft_vocab_size=args.draft_vocab)
    dec = SpeculativeDecoder(target, [drafter], "fixed", num_speculative_tokens=args.k)
    rows, same = [], []
    for rec in recs[: args.real_prompts]:
        target.reset()
        t0 = time.perf_counter()
        out = dec.generate(rec.ids[: rec.prompt_len], len(rec.output), stop_token_ids=())
        wall = time.perf_counter() - t0
        same.append(out.token_ids == rec.output)
        st = out.steps
        rows.append({"tokens": len(out.token_ids), "rounds": len(st), "wall_s": wall,
                     "target_only_s": rec.seconds,
                     "drafted": sum(s.num_draft_tokens for s in st),
                     "accepted": sum(s.num_accepted_tokens for s in st),
                     "draft_s": sum(s.draft_seconds for s in st[1:]),
                     "verify_s": sum(s.verify_seconds for s in st[1:]),
                     "rounds_after_first": len(st) - 1})
    drafted = sum(r["drafted"] for r in rows)
    per_tok = sum(r["draft_s"] for r in rows) / max(drafted, 1)
    step = statistics.median(step_s)
    return {
        "prompts": len(rows), "identical_to_target_only": same,
        "mat": sum(r["tokens"] for r in rows) / sum(r["rounds"] for r in rows),
        "acceptance": sum(r["accepted"] for r in rows) / max(drafted, 1),
        "draft_s_per_token": per_tok, "target_step_s": step, "cost_c": per_tok / step,
        "verify_s_per_round": sum(r["verify_s"] for r in rows)
        / max(sum(r["rounds_after_first"] for r in rows), 1),
        "speedup_vs_target_only": sum(r["target_only_s"] for r in rows)
        / sum(r["wall_s"] for r in rows),
        "queries": rows,
    }


def _replay(name: str, drafter: HeadDrafter, recs: list[HiddenRecording], k: int,
            vocab: int) -> dict[str, Any]:
    """``drafter`` through the engine against the recordings (see the module docstring)."""
    target = HiddenReplayTarget(vocab)
    dec = SpeculativeDecoder(target, [drafter], "fixed", num_speculative_tokens=k)
    queries = []
    t0 = time.perf_counter()
    for rec in recs:
        target.use(rec)
        out = dec.generate(rec.ids[: rec.prompt_len], len(rec.output), stop_token_ids=())
        assert out.token_ids == rec.output, f"{name}: replay left the recorded output"
        queries.append({"tokens": len(out.token_ids), "rounds": len(out.steps),
                        "drafted": sum(s.num_draft_tokens for s in out.steps),
                        "accepted": sum(s.num_accepted_tokens for s in out.steps)})
    tok = sum(q["tokens"] for q in queries)
    rnd = sum(q["rounds"] for q in queries)
    res: dict[str, Any] = {"name": name, "mat": tok / rnd, "seconds": time.perf_counter() - t0,
                           "queries": queries}
    half, quarter = len(queries) // 2, len(queries) // 4
    for part, qs in (("first_half", queries[:half]), ("second_half", queries[half:]),
                     ("first_quarter", queries[:quarter]),
                     ("last_quarter", queries[len(queries) - quarter:])):
        res[f"mat_{part}"] = sum(q["tokens"] for q in qs) / max(sum(q["rounds"] for q in qs), 1)
    if isinstance(drafter, OnlineHeadDrafter):
        h = drafter.history
        res.update({"updates": len(h), "update_seconds": drafter.update_seconds,
                    "served_agree": [r.served_agree for r in h],
                    "frozen_agree": [r.frozen_agree for r in h],
                    "worth": [r.worth for r in h], "weights_last": list(h[-1].weights) if h
                    else [], "paused_until": drafter.paused_until})
    return res


def _plot(runs: list[dict[str, Any]], path: pathlib.Path, window: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        tok = np.array([q["tokens"] for q in run["queries"]], float)
        rnd = np.array([q["rounds"] for q in run["queries"]], float)
        ct, cr = np.cumsum(np.insert(tok, 0, 0)), np.cumsum(np.insert(rnd, 0, 0))
        lo = np.maximum(np.arange(1, len(tok) + 1) - window, 0)
        hi = np.arange(1, len(tok) + 1)
        ax.plot(hi, (ct[hi] - ct[lo]) / (cr[hi] - cr[lo]), label=f"{run['name']} "
                f"(MAT {run['mat']:.2f})")
    ax.set(title=title, xlabel="prompt in stream",
           ylabel=f"acceptance length (MAT), rolling {window}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", default="code")
    p.add_argument("--target", default="embedded:qwen2.5-coder-1.5b")
    p.add_argument("--head", type=pathlib.Path, default=None)
    p.add_argument("--num-eval", type=int, default=40)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="keep the last N (0: all)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--real-prompts", type=int, default=4)
    p.add_argument("--learners", nargs="+", default=["frozen", "ogd", "opt", "ens"])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ens-lrs", type=float, nargs="+", default=[0.0, 0.03, 0.1, 0.3])
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=False,
                   help="let the net-gain rule pause updates (default: record its verdicts)")
    p.add_argument("--train-minutes", type=float, default=0.0,
                   help="train the head first when it is missing (0: fail instead)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="exact mode on the target while decoding (specmux.exact), as specmux "
                   "bench: greedy outputs bit-identical to target-only in bf16")
    p.add_argument("--retrain", action="store_true",
                   help="train even if the head file exists (else --train-minutes trains only "
                   "a missing head)")
    p.add_argument("--max-texts", type=int, default=39)
    p.add_argument("--self-distill", type=int, default=0,
                   help="also train on the target's answers to N corpus prompts (heads train "
                   "--self-distill)")
    p.add_argument("--distill-tokens", type=int, default=64)
    p.add_argument("--corpus", type=pathlib.Path, nargs="+", action="extend", default=[],
                   help="more training text: files or directories (as heads train --corpus)")
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img/heads"))
    p.add_argument("--results", type=pathlib.Path, default=None)
    p.add_argument("--recordings", type=pathlib.Path, default=None,
                   help="cache of the target-only recordings (phase 1): loaded when it holds "
                   "these prompts and settings, else written after recording")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from transformers import __version__ as tf_version

    from specmux.bench.runner import fix_lm_head_strides
    from specmux.models import load_model

    model, tok = load_model(args.target, dtype=torch.bfloat16, install=True)
    fix_lm_head_strides(model)
    path = args.head or heads_dir() / f"head-{args.domain}.json"
    if args.train_minutes > 0 and (args.retrain or not path.is_file()):
        _train(model, tok, args, path)
    head = load_head(path)
    set_exact(model, args.exact)  # after training: extraction runs whole texts in one pass
    stop = sorted(stop_tokens(model, tok))
    prompts = _prompts(tok, args)
    target = CachedLM(model, name="target")
    t0 = time.perf_counter()
    recs, step_s = _record(target, prompts, args, stop)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/heads.py " + " ".join(argv or __import__("sys").argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "dtype": "bfloat16", "exact": args.exact},
        "versions": {"torch": torch.__version__, "transformers": tf_version},
        "args": {k: str(v) for k, v in vars(args).items()}, "head": head.meta,
        "record_seconds": time.perf_counter() - t0, "target_step_s_median": statistics.median(
            step_s), "output_tokens": [len(r.output) for r in recs],
    }
    result["real"] = _real(model, head, target, recs, args, step_s)
    log.info("real: %s", {k: v for k, v in result["real"].items() if k != "queries"})
    runs = []
    vocab = int(model.get_output_embeddings().weight.shape[0])
    for name in args.learners:
        if name == "frozen":
            d: HeadDrafter = HeadDrafter(head, model, name="frozen",
                                         draft_vocab_size=args.draft_vocab)
        else:
            real = result["real"]  # charge the real round time to the net-gain rule
            d = OnlineHeadDrafter(head, model, kind=name, lr=args.lr, lrs=args.ens_lrs,
                                  stride=args.stride, name=name, gate=args.gate,
                                  draft_vocab_size=args.draft_vocab,
                                  round_seconds=real["verify_s_per_round"]
                                  + args.k * real["draft_s_per_token"])
        runs.append(_replay(name, d, recs, args.k, vocab))
        log.info("replay %s: MAT %.3f (first half %.3f, second half %.3f; first quarter "
                 "%.3f, last quarter %.3f) in %.0f s", name, runs[-1]["mat"],
                 runs[-1]["mat_first_half"], runs[-1]["mat_second_half"],
                 runs[-1]["mat_first_quarter"], runs[-1]["mat_last_quarter"], runs[-1]["seconds"])
    result["replay"] = runs
    out = args.results or args.out / f"heads-{args.domain}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    _plot(runs, args.out / f"heads-{args.domain}-stream.png", max(2, len(recs) // 6),
          f"{args.domain} head over {len(recs)} held-out prompts (k={args.k}, greedy)")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
