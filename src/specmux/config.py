"""User-facing configuration (pydantic), with vLLM's ``speculative_config`` key names.

>>> cfg = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
>>> cfg.num_speculative_tokens, cfg.prompt_lookup_max
(3, 4)
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from specmux.errors import ConfigError


class SpeculativeConfig(BaseModel):
    """Speculative decoding options.

    vLLM keys: ``method``, ``model``, ``num_speculative_tokens``, ``prompt_lookup_max``,
    ``prompt_lookup_min``.  specmux adds ``drafters`` (a pool of drafter specs), ``policy``
    and its learner options, and ``backend`` (``transformers`` or ``llama.cpp``).
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft_model", "suffix", "pool"] | None = None
    model: str | None = Field(None, description="drafter model (HF id, dir, .gguf, embedded:)")
    num_speculative_tokens: PositiveInt | list[PositiveInt] = 4
    prompt_lookup_max: PositiveInt = 4
    prompt_lookup_min: PositiveInt = 1
    drafters: list[str] | None = None
    policy: str | None = None
    loss: Literal["length", "acceptance"] = "length"
    delayed_feedback: bool = True
    reset_per_query: bool = False
    backend: Literal["transformers", "llama.cpp"] | None = None

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if isinstance(self.num_speculative_tokens, list) and not self.num_speculative_tokens:
            raise ValueError("num_speculative_tokens must not be an empty list")
        if self.method == "draft_model" and not self.model:
            raise ValueError("method 'draft_model' needs 'model'")
        return self

    def drafter_specs(self) -> list[str]:
        """The drafter pool this config names (empty: use the caller's drafters)."""
        specs = list(self.drafters or [])
        if self.method == "ngram" and "ngram" not in specs:
            specs.append("ngram")
        if self.model and self.model not in specs:
            specs.append(self.model)
        return specs


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """Parse a JSON ``--speculative-config``; raises :class:`ConfigError` in one line."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"--speculative-config is not valid JSON: {e.msg} at char {e.pos}"
        raise ConfigError(msg) from None
    if not isinstance(raw, dict):
        raise ConfigError("--speculative-config must be a JSON object")
    try:
        return SpeculativeConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "config"
        raise ConfigError(f"--speculative-config: {where}: {first['msg']}") from None
