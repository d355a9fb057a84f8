"""``specmux serve``: the OpenAI-compatible server (registered into the main CLI)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from specmux.cli_options import (
    DrafterOption,
    InstallOption,
    NumSpeculativeTokensOption,
    PolicyOption,
    SpeculativeConfigOption,
    TargetOption,
    pipeline_from_options,
    resolve_speculative_config,
)

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``specmux`` CLI."""
    app.command()(serve)


def serve(
    target: TargetOption = "embedded:qwen2.5-coder-1.5b",
    drafter: DrafterOption = None,
    policy: PolicyOption = "hedge",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port, logged).")] = 8000,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the learner state here: restored at start, saved "
                     "periodically and on shutdown. Default: in memory only."),
    ] = None,
    num_speculative_tokens: NumSpeculativeTokensOption = 4,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for the model; more get HTTP 429.")
    ] = 64,
    reset_per_query: Annotated[
        bool, typer.Option(help="Start the learner afresh on every request instead of "
                           "learning the workload across requests.")
    ] = False,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt accepted (default: the model context).")
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option(help="Largest max_tokens a request may ask for (and chat's default).")
    ] = 4096,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body; larger gets HTTP 413.")
    ] = 2 * 2**20,
    save_every: Annotated[
        int, typer.Option(help="Save the learner state every N requests.")
    ] = 20,
    save_interval: Annotated[
        float, typer.Option(help="... and at least every this many seconds when it changed.")
    ] = 60.0,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name in the API (default: --target).")
    ] = None,
    speculative_config: SpeculativeConfigOption = None,
    seed: Annotated[int, typer.Option(help="Learner seed.")] = 0,
    graceful_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests get to finish on shutdown.")
    ] = 10.0,
    install: InstallOption = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /metrics)."""
    from specmux.cli_common import user_errors
    from specmux.errors import ConfigError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("specmux").setLevel(logging.INFO)
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    with user_errors():
        from specmux.server.app import create_app
        from specmux.server.app import serve as run_server

        if num_speculative_tokens < 1:
            raise ConfigError(
                f"--num-speculative-tokens must be >= 1, got {num_speculative_tokens}")
        for name, value in (("--max-queue", max_queue), ("--max-tokens-limit",
                            max_tokens_limit), ("--max-body-bytes", max_body_bytes),
                            ("--save-every", save_every)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {port}")
        cfg = resolve_speculative_config(speculative_config, num_speculative_tokens, policy)
        if state_dir is not None and state_dir.exists() and not state_dir.is_dir():
            raise ConfigError(f"--state-dir {state_dir} is not a directory")
        pipe = pipeline_from_options(cfg, target, drafter, policy, seed=seed, install=install,
                                     reset_per_query=reset_per_query)
        app = create_app(
            pipe, model_name=served_model_name or target, state_dir=state_dir,
            max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
            max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
            save_every=save_every, save_interval=save_interval,
        )
    run_server(app, host=host, port=port, log_level="info" if verbose else "warning",
               graceful_timeout=graceful_timeout, access_log=verbose)
