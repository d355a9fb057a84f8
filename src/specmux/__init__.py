"""specmux: lossless speculative decoding with a pool of drafters and online learners.

The public names are imported lazily (PEP 562), so ``import specmux.cli`` stays light and a
Ctrl-C while torch/transformers load reaches the CLI's handler instead of a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "specmux.api", "generate": "specmux.api", "make_drafter": "specmux.api",
    "GenerationResult": "specmux.engine", "SpeculativeDecoder": "specmux.engine",
    "autoregressive_generate": "specmux.engine", "SpecmuxError": "specmux.errors",
    "SpecStats": "specmux.metrics", "SpeculativeConfig": "specmux.config",
    "Draft": "specmux.types", "Feedback": "specmux.types", "SamplingParams": "specmux.types",
    "Step": "specmux.types", "Verdict": "specmux.types",
}

__all__ = [
    "Draft", "Feedback", "GenerationResult", "Pipeline", "SamplingParams", "SpecStats",
    "SpecmuxError", "SpeculativeConfig", "SpeculativeDecoder", "Step", "Verdict",
    "autoregressive_generate", "generate", "make_drafter",
]

if TYPE_CHECKING:
    from specmux.api import Pipeline, generate, make_drafter
    from specmux.config import SpeculativeConfig
    from specmux.engine import GenerationResult, SpeculativeDecoder, autoregressive_generate
    from specmux.errors import SpecmuxError
    from specmux.metrics import SpecStats
    from specmux.types import Draft, Feedback, SamplingParams, Step, Verdict


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specmux' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
