"""What every ``specmux`` sub-command shares: the consoles, the bad-input guard, logging.

The sub-CLIs (:mod:`specmux.bench.cli`, :mod:`specmux.sim.cli`, :mod:`specmux.server.cli`)
import these from here, and :mod:`specmux.cli` imports the sub-CLIs: imports flow one way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import typer
from rich.console import Console

from specmux.errors import SpecmuxError

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
