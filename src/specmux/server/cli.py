"""``specmux serve``: the OpenAI-compatible server (registered into the main CLI)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

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

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``specmux`` CLI."""
    app.command()(serve)


def serve(
    target: TargetOption = DEFAULT_TARGET,
    drafter: DrafterOption = None,
    policy: PolicyOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port, logged).")] = 8000,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the learner state here: restored at start, saved "
                     "periodically and on shutdown. Default: in memory only."),
    ] = None,
    num_speculative_tokens: NumSpeculativeTokensOption = None,
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
    backend: BackendOption = None,
    drafter_backend: DrafterBackendOption = None,
    threads: ThreadsOption = None,
    seed: Annotated[int | None, typer.Option(
        help=f"Learner seed (default 0): {SeedHelp}.", show_default=False)] = None,
    graceful_timeout: Annotated[
        float, typer.Option(help="Seconds the running request gets to finish on shutdown "
                            "(SIGTERM/Ctrl-C); queued ones get HTTP 503 at once.")
    ] = 10.0,
    install: InstallOption = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /metrics)."""
    from specmux.cli_common import user_errors

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("specmux").setLevel(logging.INFO)
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    with user_errors():
        from specmux.server.app import create_app
        from specmux.server.run import bind
        from specmux.server.run import serve as run_server

        check_limits(max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                     max_body_bytes=max_body_bytes, save_every=save_every,
                     max_prompt_tokens=max_prompt_tokens, port=port,
                     save_interval=save_interval, graceful_timeout=graceful_timeout)
        cfg = speculative_config_from_options(
            speculative_config, drafter=drafter, policy=policy,
            num_speculative_tokens=num_speculative_tokens, seed=seed,
            reset_per_query=reset_per_query, backend=backend, drafter_backend=drafter_backend)
        if state_dir is not None:
            check_state_dir(state_dir)
        sock = bind(host, port)  # a port in use is found before the models load
        pipe = pipeline_from_config(cfg, target, install=install, threads=threads)
        pipe.decoder.warmup()  # the cost model's calibration, before the first request
        app = create_app(
            pipe, model_name=served_model_name or target, state_dir=state_dir,
            max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
            max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
            save_every=save_every, save_interval=save_interval,
        )
    run_server(app, host=host, port=port, log_level="info" if verbose else "warning",
               graceful_timeout=graceful_timeout, access_log=verbose, sock=sock)


def check_limits(*, port: int, max_prompt_tokens: int | None, save_interval: float,
                 graceful_timeout: float, **at_least_one: int) -> None:
    """ConfigError for an option value out of range (before anything loads)."""
    from specmux.errors import ConfigError

    for name, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    for name, secs in (("--save-interval", save_interval),
                       ("--graceful-timeout", graceful_timeout)):
        if not 0 <= secs < float("inf"):
            raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {secs}")


def check_state_dir(state_dir: Path) -> None:
    """The state directory exists (or can be created) and is writable, or ConfigError."""
    import tempfile

    from specmux.errors import ConfigError

    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"--state-dir {state_dir} is not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".specmux-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"--state-dir {state_dir} is not writable: "
                          f"{e.strerror or e}") from None
