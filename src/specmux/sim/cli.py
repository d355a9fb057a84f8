"""``specmux simulate``: the regret simulator's command (registered on the main typer app)."""

from __future__ import annotations

import logging
import shlex
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specmux.cli_common import console, err_console, user_errors

log = logging.getLogger(__name__)



class Experiment(StrEnum):
    a = "a"
    b = "b"
    c = "c"
    d = "d"
    all = "all"
    run = "run"


class EnvKind(StrEnum):
    stationary = "stationary"
    blocks = "blocks"
    alternating = "alternating"


class Mode(StrEnum):
    greedy = "greedy"
    sampling = "sampling"


HELP = (
    "Simulate speculative-decoding rounds to study the drafter-selection learners.\n\n"
    "Runs the engine's own policy classes (specmux.policies) and counterfactual tracker "
    "(specmux.feedback) on simulated drafter pools, at scales no model run reaches, and "
    "writes OUT/results.jsonl (one row per run plus a summary row per experiment), "
    "OUT/*.png and OUT/summary.md.  `--experiment all` with the defaults reproduces "
    "docs/THEORY.md."
)


def _expected_jobs(name: str, cfg: object) -> int | None:
    """Simulation runs an experiment will do (for the progress bar), None if unknown."""
    from specmux.sim.experiments import SimConfig

    assert isinstance(cfg, SimConfig)
    seeds = cfg.seeds
    if name == "a":
        max_n = cfg.num_drafters or cfg.pick(1024, 64)
        sizes = max(1, max_n.bit_length() - 1)
        return sizes * ((seeds or cfg.pick(3, 1)) + (seeds or cfg.pick(2, 1))) * len(
            cfg.policies or range(4))
    if name == "b":
        s = seeds or cfg.pick(5, 2)
        stoch = 4 if cfg.policies is None else sum(
            (p in cfg.policies) * (2 if p == "ucb" else 1) for p in ("ucb", "exp3", "hedge"))
        return s * stoch + s * len(cfg.policies or range(4))
    if name == "c":
        s = seeds or cfg.pick(3, 1)
        variants = 6 if cfg.policies is None else 3 * sum(
            p in cfg.policies for p in ("hedge", "normalhedge"))
        return s * ((variants * 2) // 3 + variants + variants)
    if name == "d":
        s = seeds or cfg.pick(6, 2)
        return s * (2 * len(cfg.pick((0,) * 6, (0,) * 2)) + 1)
    if name == "run":
        return (seeds or 1) * len(cfg.policies or range(5))
    return None


def simulate_command(
    experiment: Annotated[Experiment, typer.Option(
        "--experiment", "-e",
        help="Which experiment: a (regret vs number of drafters, full information vs bandit), "
             "b (UCBSpec stopping-time regret vs T; adversarial domains: UCB vs EXP3), "
             "c (delayed vs naive counterfactual feedback; length vs acceptance loss), "
             "d (MetaSD block-divergence vs block-efficiency reward), all (a-d), or run "
             "(one plain simulation of --policies on --env; reports rounds/s).")
    ] = Experiment.all,
    rounds: Annotated[int | None, typer.Option(
        "--rounds", "-r", min=1,
        help="Rounds per simulation run (b: token budget = 3 x rounds for the stochastic "
             "part).  Default: each experiment's own (a 20000, b 300000 tokens / 50000 "
             "adversarial rounds, c 20000, d 50000, run 100000).")] = None,
    seeds: Annotated[int | None, typer.Option(
        "--seeds", "-s", min=1,
        help="Independent seeds per configuration (default: per experiment, 1-6).")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for results.jsonl, *.png and summary.md.")
    ] = Path("sim-out"),
    policies: Annotated[str | None, typer.Option(
        "--policies", "-p",
        help="Comma-separated policy names to run (from specmux.policies.POLICIES: fixed, "
             "ucb, exp3, metasd, hedge, normalhedge).  Default: each experiment's own set.")
    ] = None,
    num_drafters: Annotated[int | None, typer.Option(
        "--num-drafters", "-n", min=1,
        help="a: the largest N of the sweep 2, 4, ..., N (default 1024); b, d: pool size "
             "(default 8); run: pool size (default 64).")] = None,
    env: Annotated[EnvKind | None, typer.Option(
        "--env",
        help="Query stream for run, d and b's stochastic part: stationary (i.i.d. domains), "
             "blocks (20 queries per domain, then a switch) or alternating (an adaptive "
             "adversary picks each query's domain against the favoured arm).")] = None,
    mode: Annotated[Mode, typer.Option(
        "--mode",
        help="greedy: gamma = w = 0/1 hit indicators; sampling: gamma = acceptance "
             "probability (Beta-distributed), w = the realized 0/1 ratio.")] = Mode.greedy,
    k: Annotated[int, typer.Option(
        "--k", min=1, help="Draft length of every arm (c always uses k = 8).")] = 4,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Small sizes everywhere (seconds, for smoke tests); numbers are noisy.")
    ] = False,
) -> None:
    """Simulate speculative-decoding rounds (see HELP)."""
    from specmux.sim.experiments import EXPERIMENTS, SimConfig, run_experiments

    exp = experiment.value
    env_name = env.value if env is not None else None
    names = [e for e in EXPERIMENTS if e != "run"] if exp == "all" else [exp]
    policy_list = tuple(p.strip() for p in policies.split(",") if p.strip()) if policies else None
    cfg = SimConfig(out=out, seeds=seeds, rounds=rounds, policies=policy_list,
                    num_drafters=num_drafters, env=env_name, mode=mode.value, k=k,
                    quick=quick,
                    command=_reconstruct(exp, rounds, seeds, out, policies, num_drafters,
                                         env_name, mode.value, k, quick))
    with Progress(TextColumn("[bold]{task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=False) as progress:
        tasks: dict[str, int] = {}
        current = {"name": ""}

        def start(name: str, _title: str) -> None:
            current["name"] = name
            tasks[name] = progress.add_task("", total=_expected_jobs(name, cfg), name=name)

        def step(description: str, jobs: int) -> None:
            progress.update(tasks[current["name"]], completed=jobs, description=description)

        with user_errors():
            results = run_experiments(names, cfg, step=step, start=start)
        for name in tasks:
            task = progress.tasks[tasks[name]]
            progress.update(tasks[name], total=task.completed, description="done")
    table = Table(title=f"specmux simulate -> {out}")
    table.add_column("experiment")
    table.add_column("runs", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("figure")
    for r in results:
        table.add_row(r.title, str(r.jobs), f"{r.seconds:.1f}",
                      str(r.figure) if r.figure else "-")
    console.print(table)
    console.print(f"summary: {out / 'summary.md'}  rows: {out / 'results.jsonl'}")


def _reconstruct(experiment: str, rounds: int | None, seeds: int | None, out: Path,
                 policies: str | None, num_drafters: int | None, env: str | None, mode: str,
                 k: int, quick: bool) -> str:
    """The equivalent command line (recorded in summary.md)."""
    parts = ["specmux", "simulate", "--experiment", experiment, "--out", str(out)]
    for flag, value in (("--rounds", rounds), ("--seeds", seeds), ("--policies", policies),
                        ("--num-drafters", num_drafters), ("--env", env)):
        if value is not None:
            parts += [flag, str(value)]
    if mode != "greedy":
        parts += ["--mode", mode]
    if k != 4:
        parts += ["--k", str(k)]
    if quick:
        parts.append("--quick")
    return " ".join(shlex.quote(p) for p in parts)


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app``."""
    app.command("simulate", help=HELP)(simulate_command)
