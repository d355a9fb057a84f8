"""specmux: lossless speculative decoding with a pool of drafters and online learners."""

from specmux.api import Pipeline, generate, make_drafter
from specmux.engine import GenerationResult, SpeculativeDecoder, autoregressive_generate
from specmux.errors import SpecmuxError
from specmux.metrics import SpecStats
from specmux.types import Draft, Feedback, SamplingParams, Step, Verdict

__version__ = "0.1.0"

__all__ = [
    "Draft",
    "Feedback",
    "GenerationResult",
    "Pipeline",
    "SamplingParams",
    "SpecStats",
    "SpecmuxError",
    "SpeculativeDecoder",
    "Step",
    "Verdict",
    "autoregressive_generate",
    "generate",
    "make_drafter",
]
