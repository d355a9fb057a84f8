"""Online drafter adaptation on the embedded models: frozen vs OGD / optimistic / ensemble.

    flock /tmp/specmux-cpu.lock python benchmarks/adapt.py --domain chat --num-prompts 50

Target ``embedded:qwen2.5-coder-1.5b``, drafter ``embedded:qwen2.5-coder-0.5b`` (one copy of
its weights, shared by every drafter), greedy, ``k`` drafted tokens per round, a stream of
prompts of one domain in a fixed order, the learner state kept across prompts.

Phase 1 (real): the frozen drafter runs through :class:`~specmux.engine.SpeculativeDecoder`
against the real target, timed; it records the target's top-64 logits and the drafter's
hidden states along every committed path (untimed bookkeeping, subtracted).

Phase 2 (replay, :mod:`specmux.adapt.replay`): each adaptive drafter runs through the same
engine against the recordings.  Greedy outputs, verdicts and training signals are exactly
those of a real run (asserted: identical tokens); the adapters, their updates and the
engine run for real and are timed; the models' forward passes are charged with the times
measured in phase 1: per query, the first round's measured draft and verify time (they
include the prompt prefills), and for later rounds ``k_r`` times the query's mean measured
time per drafted token plus the query's mean measured verify time.

Outputs: a JSON file with every number, PNG figures, and a printed summary table with
the net-gain rule of docs/DESIGN.md ``τ1/τ0 > 1 + C_update / (S · (C_draft + C_verify))``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import pathlib
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from specmux.adapt import adaptive_drafter
from specmux.adapt.drafter import AdaptiveHFDrafter
from specmux.adapt.ensemble import EnsembleHead
from specmux.adapt.replay import Recording, RecordingDrafter, ReplayLM, ReplayTarget
from specmux.drafters.hf import HFDrafter
from specmux.engine import GenerationResult, SpeculativeDecoder
from specmux.versions import versions_line

log = logging.getLogger("benchmarks.adapt")

TARGET = "embedded:qwen2.5-coder-1.5b"
DRAFTER = "embedded:qwen2.5-coder-0.5b"
BASE_NAME = "qwen0.5b"


@dataclass
class QueryResult:
    """One prompt under one drafter."""

    index: int
    rounds: int
    drafted: int
    accepted: int
    tokens: int
    wall_s: float  # real (frozen) or estimated (replay), model time + everything else
    draft_s: float  # model time spent drafting (measured or charged)
    verify_s: float  # model time spent verifying (measured or charged)
    adapt_s: float  # adaptation overhead: buffering + updates + applying the adapted head
    other_s: float  # engine, policy, bookkeeping
    later_rounds: int = 0  # rounds after the first (no prompt prefill in them)
    later_draft_s: float = 0.0
    later_verify_s: float = 0.0

    @property
    def mat(self) -> float:
        return 1.0 + self.accepted / max(1, self.rounds)


@dataclass
class Charges:
    """Model times measured in the real run, per query, used to charge replayed rounds."""

    first_draft: float
    first_verify: float
    draft_per_token: float
    verify_per_round: float


@dataclass
class LearnerRun:
    name: str
    queries: list[QueryResult] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    kl: list[dict[str, Any]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)  # ensemble weights per update


def _prompts(tokenizer: Any, domain: str, n: int, max_prompt_tokens: int,
             skip: int) -> list[list[int]]:
    from specmux.bench.datasets import load_domain

    split = load_domain(domain, num_eval=min(4 * n + skip, 400), seed=0)
    out: list[list[int]] = []
    for ex in split.eval[skip:]:
        if ex.chat:
            ids = list(tokenizer.apply_chat_template(
                [{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                tokenize=True, return_dict=False))
        else:
            ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            out.append(ids)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} {domain} prompts of <= {max_prompt_tokens} tokens")


def _query(i: int, res: GenerationResult, adapt_s: float = 0.0, standin_s: float = 0.0,
           charges: Charges | None = None, bookkeeping_s: float = 0.0) -> QueryResult:
    steps = res.steps
    drafted = sum(s.num_draft_tokens for s in steps)
    # Accepted tokens that were committed (drafts accepted past a stop token are cut off and
    # do not count); MAT = 1 + accepted / rounds = committed tokens per target call.
    accepted = sum(len(s.tokens) - 1 for s in steps)
    measured = sum(s.seconds for s in steps)
    if charges is None:  # the real run
        draft = sum(s.draft_seconds for s in steps)
        verify = sum(s.verify_seconds for s in steps)
        wall = measured - bookkeeping_s
    else:
        draft = charges.first_draft + charges.draft_per_token * sum(s.k for s in steps[1:])
        verify = charges.first_verify + charges.verify_per_round * (len(steps) - 1)
        wall = measured - standin_s + draft + verify
    later = steps[1:]
    return QueryResult(i, len(steps), drafted, accepted, len(res.token_ids), wall, draft,
                       verify, adapt_s, wall - draft - verify - adapt_s, len(later),
                       sum(s.draft_seconds for s in later), sum(s.verify_seconds for s in later))


def _charges(res: GenerationResult) -> Charges:
    steps = res.steps
    later = steps[1:]
    ks = sum(s.k for s in later)
    draft_tok = sum(s.draft_seconds for s in later) / ks if ks else steps[0].draft_seconds / max(
        1, steps[0].k)
    verify = float(np.mean([s.verify_seconds for s in later])) if later else steps[
        0].verify_seconds
    return Charges(steps[0].draft_seconds, steps[0].verify_seconds, draft_tok, verify)


def real_run(target: Any, drafter_model: Any, prompts: list[list[int]], args: argparse.Namespace,
             eos: list[int]) -> tuple[LearnerRun, list[Recording], list[Charges],
                                      list[list[int]]]:
    rec = RecordingDrafter(drafter_model, name=BASE_NAME, top_k=64)
    dec = SpeculativeDecoder(target, [rec], "fixed", num_speculative_tokens=args.k,
                             eos_token_ids=eos)
    run = LearnerRun("frozen")
    charges, outputs = [], []
    t_start = time.perf_counter()
    for i, ids in enumerate(prompts):
        rec_s0 = rec.seconds
        res = dec.generate(ids, args.max_new_tokens)
        rec.finish_query()
        run.queries.append(_query(i, res, bookkeeping_s=rec.seconds - rec_s0))
        charges.append(_charges(res))
        outputs.append(res.token_ids)
        if i in (2, 9) or (i + 1) % 10 == 0:
            el = time.perf_counter() - t_start
            log.info("real run: %d/%d prompts in %.0fs (ETA phase 1 %.0fs), MAT so far %.2f",
                     i + 1, len(prompts), el, el / (i + 1) * (len(prompts) - i - 1),
                     np.mean([q.mat for q in run.queries]))
    return run, rec.recordings, charges, outputs


def replay_run(name: str, drafter: Any, lm: ReplayLM, recordings: list[Recording],
               charges: list[Charges], outputs: list[list[int]],
               args: argparse.Namespace, vocab: int, eos: list[int]) -> LearnerRun:
    target = ReplayTarget(vocab)
    dec = SpeculativeDecoder(target, [drafter], "fixed", num_speculative_tokens=args.k,
                             eos_token_ids=eos)
    run = LearnerRun(name)
    adaptive = isinstance(drafter, AdaptiveHFDrafter)
    for i, (rec, ch) in enumerate(zip(recordings, charges, strict=True)):
        target.select(rec)
        lm.select(rec)
        t_s0, l_s0 = target.seconds, lm.seconds
        a_s0 = drafter.update_seconds + lm.head_seconds if adaptive else 0.0
        e_s0 = drafter.eval_seconds if adaptive else 0.0
        res = dec.generate(rec.ids[: rec.prompt_len], args.max_new_tokens)
        if res.token_ids != outputs[i]:
            raise AssertionError(f"{name}: replayed output differs from the real run (query {i})")
        adapt_s = drafter.update_seconds + lm.head_seconds - a_s0 if adaptive else 0.0
        eval_s = drafter.eval_seconds - e_s0 if adaptive else 0.0
        standin = (target.seconds - t_s0) + (lm.seconds - l_s0) + eval_s
        run.queries.append(_query(i, res, adapt_s, standin, ch))
    if adaptive:
        run.updates = [asdict(u) for u in drafter.history]
        run.kl = [asdict(r) for r in drafter.kl_trace]
    return run


class _WeightLog:
    """Records ensemble weights after every update (wraps the drafter's update)."""

    def __init__(self, drafter: AdaptiveHFDrafter, run_weights: list[list[float]]) -> None:
        self.drafter, self.out = drafter, run_weights
        self.inner = drafter.update
        drafter.update = self  # type: ignore[method-assign]

    def __call__(self) -> Any:
        rec = self.inner()
        if rec is not None and isinstance(self.drafter.head, EnsembleHead):
            self.out.append([float(w) for w in self.drafter.head.weights])
        return rec


def summarize(runs: list[LearnerRun], stride: int) -> list[dict[str, Any]]:
    frozen = runs[0]
    f_q = frozen.queries
    n = len(f_q)
    half = slice(n // 2, n)
    rounds0 = sum(q.rounds for q in f_q)
    later = max(1, sum(q.later_rounds for q in f_q))  # steady state: no prompt prefill
    c_draft = sum(q.later_draft_s for q in f_q) / later
    c_verify = sum(q.later_verify_s for q in f_q) / later
    rows = []
    for run in runs:
        qs = run.queries
        mat = sum(q.tokens for q in qs) / sum(q.rounds for q in qs)
        mat_half = sum(q.tokens for q in qs[half]) / sum(q.rounds for q in qs[half])
        mat0 = sum(q.tokens for q in f_q) / rounds0
        mat0_half = sum(q.tokens for q in f_q[half]) / sum(q.rounds for q in f_q[half])
        n_upd = len(run.updates)
        adapt = sum(q.adapt_s for q in qs)
        c_update = adapt / n_upd if n_upd else 0.0
        threshold = 1 + c_update / (stride * (c_draft + c_verify)) if n_upd else 1.0
        wall = sum(q.wall_s for q in qs)
        wall0 = sum(q.wall_s for q in f_q)
        kl = run.kl
        row = {
            "drafter": run.name,
            "mat": mat, "mat_second_half": mat_half,
            "acceptance_rate": sum(q.accepted for q in qs) / sum(q.drafted for q in qs),
            "rounds": sum(q.rounds for q in qs),
            "tau_ratio": mat / mat0, "tau_ratio_second_half": mat_half / mat0_half,
            "updates": n_upd, "adapt_s_total": adapt, "c_update_s": c_update,
            "c_draft_s": c_draft, "c_verify_s": c_verify, "net_gain_threshold": threshold,
            "worth_it": bool(n_upd) and mat / mat0 > threshold,
            "wall_s": wall, "wall_vs_frozen": wall / wall0 - 1.0,
        }
        if kl:
            k2 = kl[len(kl) // 2:]
            row.update({
                "kl_frozen": float(np.mean([r["frozen_kl"] for r in kl])),
                "kl_adapted": float(np.mean([r["adapted_kl"] for r in kl])),
                "kl_frozen_second_half": float(np.mean([r["frozen_kl"] for r in k2])),
                "kl_adapted_second_half": float(np.mean([r["adapted_kl"] for r in k2])),
                "agree_frozen_second_half": float(np.mean([r["frozen_agree"] for r in k2])),
                "agree_adapted_second_half": float(np.mean([r["adapted_agree"] for r in k2])),
            })
        rows.append(row)
    return rows


def plot(runs: list[LearnerRun], out_dir: pathlib.Path, title: str, window: int,
         ens_lrs: list[float]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {"frozen": "black", "ogd": "tab:blue", "opt": "tab:orange", "ens": "tab:green"}

    def color(name: str) -> str:
        return colors.get(name.split("+")[-1], "tab:gray")

    def rolling(x: np.ndarray, w: int) -> np.ndarray:
        c = np.cumsum(np.insert(x, 0, 0.0))
        return np.array([(c[i + 1] - c[max(0, i + 1 - w)]) / (i + 1 - max(0, i + 1 - w))
                         for i in range(len(x))])

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        qs = run.queries
        tok = np.array([q.tokens for q in qs], float)
        rnd = np.array([q.rounds for q in qs], float)
        acc = np.array([q.accepted for q in qs], float)
        dr = np.array([q.drafted for q in qs], float)
        x = np.arange(1, len(qs) + 1)
        axes[0].plot(x, rolling(tok, window) / rolling(rnd, window), label=run.name,
                     color=color(run.name))
        axes[1].plot(x, rolling(acc, window) / rolling(dr, window), label=run.name,
                     color=color(run.name))
        extra = np.cumsum([q.wall_s for q in qs]) - np.cumsum([q.wall_s for q in runs[0].queries])
        axes[2].plot(x, extra, label=run.name, color=color(run.name))
    axes[0].set(title=f"MAT (tokens / target call), rolling {window} prompts",
                xlabel="prompt in stream")
    axes[1].set(title=f"acceptance rate, rolling {window} prompts", xlabel="prompt in stream")
    axes[2].set(title="cumulative wall clock minus frozen's [s]",
                xlabel="prompt in stream")
    axes[2].axhline(0, color="gray", lw=0.5)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    files.append(str(out_dir / "mat_over_time.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    w = 40
    for run in runs[1:]:
        if not run.kl:
            continue
        pos = np.array([r["positions"] for r in run.kl], float)
        diff = np.array([r["adapted_kl"] - r["frozen_kl"] for r in run.kl]) * pos
        axes[0].plot(np.cumsum(pos), rolling(diff, w) / rolling(pos, w), label=run.name,
                     color=color(run.name))
    axes[0].axhline(0, color="black", lw=0.8, label="frozen")
    axes[0].set(title=f"prequential KL(target || adapted) - KL(target || frozen), rolling {w} "
                "rounds", xlabel="verified positions seen")
    axes[0].title.set_fontsize(9)
    for run in runs[1:]:
        if run.weights:
            wts = np.array(run.weights)
            for j in range(wts.shape[1]):
                lr = ens_lrs[j] if j < len(ens_lrs) else j
                axes[1].plot(wts[:, j], label=f"copy lr={lr:g}" + (" (frozen)" if lr == 0 else ""))
    axes[1].set(title="ensemble weights (exp. weights, tau 1.2, discount 0.9)",
                xlabel="update")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(str(out_dir / "kl_and_weights.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def _tiny_models(spec: str) -> tuple[Any, None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    big = spec == TARGET
    torch.manual_seed(0 if big else 1)
    hidden = 48 if big else 32
    cfg = LlamaConfig(vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2 if big else 1, num_attention_heads=2,
                      num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", default="chat", choices=["chat", "math", "code"])
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--skip-prompts", type=int, default=0,
                   help="start the stream after this many eval prompts (tuning vs report)")
    p.add_argument("--max-prompt-tokens", type=int, default=160)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--stride", type=int, default=4, help="rounds between updates (S)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps-per-update", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ens-lrs", type=float, nargs="+", default=[0.0, 0.03, 0.1, 0.3],
                   help="one ensemble copy per rate; 0 = a frozen copy")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--train-a", action="store_true")
    p.add_argument("--learners", nargs="+", default=["ogd", "opt", "ens"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recordings", type=pathlib.Path, default=None,
                   help="reuse/save phase 1 (recordings + charges + real frozen results)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img/adapt"))
    p.add_argument("--results", type=pathlib.Path, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="tiny random models and token prompts: checks the script in seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    from specmux.models import load_model

    if args.smoke:
        load_model = _tiny_models  # type: ignore[assignment]  # noqa: N806
        drafter_model, _ = load_model(DRAFTER)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 48, (5,), generator=gen).tolist()
                   for _ in range(args.num_prompts)]
        eos = []
    else:
        drafter_model, tok = load_model(DRAFTER)
        eos = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
        prompts = _prompts(tok, args.domain, args.num_prompts, args.max_prompt_tokens,
                           args.skip_prompts)
    vocab = int(drafter_model.get_output_embeddings().weight.shape[0])
    log.info("%d %s prompts, %d-%d tokens", len(prompts), args.domain,
             min(map(len, prompts)), max(map(len, prompts)))

    if args.recordings is not None and args.recordings.exists():
        saved = torch.load(args.recordings, weights_only=False)
        frozen = LearnerRun("frozen", [QueryResult(**q) for q in saved["frozen"]])
        charges = [Charges(**c) for c in saved["charges"]]
        recordings = [Recording(**r) for r in saved["recordings"]]
        outputs = saved["outputs"]
        for q in frozen.queries:  # committed-accepted tokens (see _query)
            q.accepted = q.tokens - q.rounds
        log.info("phase 1 loaded from %s", args.recordings)
    else:
        target_model, _ = load_model(TARGET)
        t1 = time.perf_counter()
        frozen, recordings, charges, outputs = real_run(target_model, drafter_model, prompts,
                                                        args, eos)
        log.info("phase 1 (real target) took %.0fs", time.perf_counter() - t1)
        del target_model
        if args.recordings is not None:
            torch.save({"frozen": [asdict(q) for q in frozen.queries],
                        "recordings": [vars(r) for r in recordings],
                        "charges": [asdict(c) for c in charges], "outputs": outputs},
                       args.recordings)

    runs = [frozen]
    lm_head = drafter_model.get_output_embeddings()
    # Validation of the replay's timing model: the frozen drafter replayed (its estimated
    # wall clock should match the real one).
    lm = ReplayLM(lm_head, vocab, None)
    twin = HFDrafter(drafter_model, name=f"{BASE_NAME} (replayed)")
    twin.lm = lm
    check = replay_run(twin.name, twin, lm, recordings, charges, outputs, args, vocab, eos)
    head_kwargs = {"rank": args.rank, "lr": args.lr, "lrs": tuple(args.ens_lrs),
                   "bias": args.bias, "train_a": args.train_a}
    for kind in args.learners:
        t2 = time.perf_counter()
        lm = ReplayLM(lm_head, vocab, None)
        drafter = adaptive_drafter(
            drafter_model, kind, base_name=BASE_NAME, head_kwargs=head_kwargs, lm=lm,
            stride=args.stride, batch_size=args.batch_size,
            steps_per_update=args.steps_per_update, track_kl=True,
        )
        weights: list[list[float]] = []
        _WeightLog(drafter, weights)
        run = replay_run(drafter.name, drafter, lm, recordings, charges, outputs, args, vocab,
                         eos)
        run.weights = weights
        runs.append(run)
        log.info("%s replay took %.0fs", drafter.name, time.perf_counter() - t2)

    rows = summarize(runs, args.stride)
    real_wall = sum(q.wall_s for q in frozen.queries)
    est_wall = sum(q.wall_s for q in check.queries)
    log.info("timing model check: frozen real %.1fs, frozen replayed (estimated) %.1fs (%+.2f%%)",
             real_wall, est_wall, 100 * (est_wall / real_wall - 1))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} threads, {versions_line()}")
    title = (f"{args.domain}: {len(prompts)} prompts x {args.max_new_tokens} new tokens, k="
             f"{args.k}, greedy, S={args.stride}; target {TARGET}, drafter {DRAFTER}")
    files = plot(runs, args.out, title, window=10, ens_lrs=args.ens_lrs)
    result = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
        "summary": rows, "figures": files,
        "timing_model_check": {"frozen_real_wall_s": real_wall,
                               "frozen_replayed_estimated_wall_s": est_wall},
        "runs": [{"name": r.name, "queries": [asdict(q) for q in r.queries],
                  "updates": r.updates, "kl": r.kl, "weights": r.weights} for r in runs],
        "total_seconds": time.perf_counter() - t_all,
    }
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1))
    cols = ["drafter", "mat", "mat_second_half", "acceptance_rate", "tau_ratio", "updates",
            "c_update_s", "net_gain_threshold", "worth_it", "wall_s", "wall_vs_frozen"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    print("\n".join(lines))  # the report itself, not logging
    for r in rows[1:]:
        if "kl_frozen" in r:
            log.info("%s: KL frozen %.4f -> adapted %.4f (second half %.4f -> %.4f), greedy "
                     "agreement second half %.3f -> %.3f", r["drafter"], r["kl_frozen"],
                     r["kl_adapted"], r["kl_frozen_second_half"], r["kl_adapted_second_half"],
                     r["agree_frozen_second_half"], r["agree_adapted_second_half"])
    log.info("C_draft %.3fs, C_verify %.3fs per round; total %.0fs", rows[0]["c_draft_s"],
             rows[0]["c_verify_s"], time.perf_counter() - t_all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
