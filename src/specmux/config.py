"""The ONE speculative decoding config: one strict schema for CLI, JSON, Python and server.

:class:`SpeculativeConfig` uses vLLM's ``speculative_config`` key names where they exist and
is validated once, wherever it comes from (``--speculative-config`` JSON merged with the
command-line options by :meth:`SpeculativeConfig.from_cli`, the Python API, the server),
and then carried unchanged to the engine (``Pipeline.config``, ``SpeculativeDecoder.config``).
Values are checked strictly: no ``"4"`` for 4, no ``true`` for 1, no NaN/inf, no unknown keys,
policy names from :data:`specmux.policies.POLICIES`.

Defaults are defined here once (:data:`DEFAULT_TARGET`, :data:`DEFAULT_DRAFTERS`,
:data:`DEFAULT_POLICY`, :data:`DEFAULT_NUM_SPECULATIVE_TOKENS`).

Seeds: any 64-bit integer, signed or unsigned (``-2**63 <= seed < 2**64``), is accepted and
taken modulo ``2**64`` (:func:`seed_entropy`), so ``-1`` and ``2**64 - 1`` are the same seed.
Anything outside that range is an error (CLI exit 2, HTTP 400).

To add an option: add a field (with its default and constraints) below, and read it from
``Pipeline.config`` / ``SpeculativeDecoder.config``; the CLI JSON, the Python API and the
schema checks pick it up.

>>> cfg = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
>>> cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.policy
(3, 4, 'hedge')
>>> try:
...     parse_speculative_config('{"seed": "1"}')
... except ConfigError as e:
...     print(e)
--speculative-config: seed: must be an integer (got '1')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from specmux.errors import ConfigError

DEFAULT_TARGET = "embedded:qwen2.5-coder-1.5b"
DEFAULT_DRAFTER_MODEL = "embedded:qwen2.5-coder-0.5b"
DEFAULT_DRAFTERS: tuple[str, ...] = (DEFAULT_DRAFTER_MODEL, "ngram")
DEFAULT_POLICY = "hedge"
DEFAULT_NUM_SPECULATIVE_TOKENS = 4
# An LM drafter's draft ends before a token it gives less probability than this (HF assisted
# generation's assistant_confidence_threshold default; 0 turns the rule off).
DEFAULT_DRAFT_CONFIDENCE_THRESHOLD = 0.4

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any signed or unsigned 64-bit integer
MAX_NGRAM = 64  # prompt_lookup_max bound (longer n-grams never match in practice)

Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
K = Annotated[int, Field(ge=1)]
K0 = Annotated[int, Field(ge=0)]  # in a k list, 0 is the no-speculation arm
NonEmpty = Annotated[str, Field(min_length=1)]


def seed_entropy(seed: int) -> int:
    """A 64-bit seed as the unsigned integer numpy/torch take: ``seed mod 2**64``.

    >>> seed_entropy(-1) == seed_entropy(2**64 - 1) == 2**64 - 1
    True
    >>> seed_entropy(2**64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    specmux.errors.ConfigError: seed must be a 64-bit integer in [-2**63, 2**64 - 1], got ...
    """
    check_seed(seed)
    return int(seed) % 2**64


def check_seed(seed: int | None, name: str = "seed") -> None:
    """ConfigError unless ``seed`` is None or an integer in ``[SEED_MIN, SEED_MAX]``."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise ConfigError(f"{name} must be a 64-bit integer in [-2**63, 2**64 - 1], got {seed!r}")


class SpeculativeConfig(BaseModel):
    """Speculative decoding options (frozen, validated once).

    vLLM keys: ``method`` (``ngram``, ``draft_model``, ``suffix``, ``pool``), ``model`` (the
    drafter model for ``draft_model``; for ``suffix`` an optional corpus path: without one,
    SuffixDecoding drafts from the request and earlier outputs),
    ``num_speculative_tokens`` (k, or a list of k values: arms are every drafter x k),
    ``prompt_lookup_max``, ``prompt_lookup_min`` and the SuffixDecoding options
    ``suffix_decoding_max_tree_depth`` (longest suffix matched), ``_max_spec_factor`` (draft
    length cap per matched token), ``_min_token_prob`` (tokens below it are pruned), plus
    ``suffix_decoding_max_cached_tokens`` and ``_eviction`` (``fifo`` or ``lru``) for the
    store of earlier outputs.  specmux adds ``drafters`` (a pool of
    drafter specs), ``policy`` (the learner), ``loss``, ``delayed_feedback``,
    ``reset_per_query``, ``contextual`` (one learner per drafter-signal context), ``seed``
    (the learner's seed), ``backend`` (``transformers`` or
    ``llama.cpp``), ``drafter_backend`` (the LM drafters' backend; default the target's: a
    transformers target can draft with a GGUF on llama.cpp), ``drafter_context_window`` (an
    LM drafter sees at most this many recent tokens: it bounds its prefill of a long prompt),
    ``draft_confidence_threshold`` (an LM drafter's draft ends before a token it gives less
    probability; HF's ``assistant_confidence_threshold``) and ``exact`` (batch-invariant target
    passes, see :mod:`specmux.exact`: greedy output bit-identical to target-only in bf16 too).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    method: Literal["ngram", "draft_model", "suffix", "pool"] | None = None
    model: NonEmpty | None = Field(
        None, description="drafter model (HF id, dir, .gguf, embedded:NAME); the corpus "
        "path for method 'suffix'")
    # One k, or the learners' k set (arms drafter x k); 0 in a list: the no-speculation arm.
    num_speculative_tokens: K | Annotated[list[K0], Field(min_length=1)] = (
        DEFAULT_NUM_SPECULATIVE_TOKENS)
    prompt_lookup_max: Annotated[int, Field(ge=1, le=MAX_NGRAM)] = 4
    prompt_lookup_min: Annotated[int, Field(ge=1, le=MAX_NGRAM)] = 1
    # SuffixDecoding drafters (vLLM's suffix_decoding_* keys; the global store is bounded in
    # tokens rather than cached requests, with FIFO or LRU eviction).
    suffix_decoding_max_tree_depth: Annotated[int, Field(ge=1, le=1024)] = 24
    suffix_decoding_max_spec_factor: float = Field(1.0, gt=0.0, le=64.0)
    suffix_decoding_min_token_prob: float = Field(0.1, ge=0.0, le=1.0)
    suffix_decoding_max_cached_tokens: Annotated[int, Field(ge=1, le=10**9)] = 1_000_000
    suffix_decoding_eviction: Literal["fifo", "lru"] = "fifo"
    drafters: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    policy: str = DEFAULT_POLICY
    loss: Literal["length", "acceptance", "time"] = "length"
    score_rate: float = Field(1.0, gt=0.0, le=1.0,
                              description="share of rounds an expensive drafter not played is "
                              "scored counterfactually (its other rounds get the mean loss of "
                              "its scored ones)")
    delayed_feedback: bool = True
    reset_per_query: bool = False
    contextual: bool = Field(False, description="one learner per context: which model-free "
                             "drafter has a match now, and how long (specmux.selector)")
    seed: Seed = 0
    exact: bool = True
    backend: Literal["transformers", "llama.cpp"] = "transformers"
    drafter_backend: Literal["transformers", "llama.cpp"] | None = Field(
        None, description="backend of the LM drafters (default: the target's)")
    drafter_context_window: Annotated[int, Field(ge=1, le=1 << 20)] | None = Field(
        None, description="an LM drafter sees at most this many recent tokens when a query "
        "starts (its prefill is bounded; default: the whole context)")
    draft_confidence_threshold: float = Field(
        DEFAULT_DRAFT_CONFIDENCE_THRESHOLD, ge=0.0, lt=1.0,
        description="an LM drafter's draft ends before a token it gives less probability "
        "than this (0: drafts always have k tokens)")  # heads take it in specmux bench

    @field_validator("num_speculative_tokens", mode="before")
    @classmethod
    def _k_shape(cls, value: Any) -> Any:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (is_int(value) or isinstance(value, list) and all(is_int(v) for v in value)):
            raise ValueError(f"must be an integer >= 1 or a non-empty list of integers >= 0, got "
                             f"{repr(value)[:40]}")
        return value

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from specmux.policies import POLICIES

        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        return name

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        ks = self.num_speculative_tokens
        if isinstance(ks, list) and (not ks or max(ks) < 1 or len(set(ks)) != len(ks)):
            raise ValueError("num_speculative_tokens must list distinct k with one >= 1")
        if self.method == "draft_model" and not self.model:
            raise ValueError("method 'draft_model' needs 'model' (the drafter model)")
        if self.method == "ngram" and self.model:
            raise ValueError("method 'ngram' takes no 'model' (it drafts from the prompt)")
        if self.method == "pool" and not self.drafters:
            raise ValueError("method 'pool' needs 'drafters'")
        return self

    def suffix_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~specmux.drafters.suffix_tree.SuffixTreeDrafter`."""
        return {"max_match": self.suffix_decoding_max_tree_depth,
                "max_spec_factor": self.suffix_decoding_max_spec_factor,
                "min_token_prob": self.suffix_decoding_min_token_prob,
                "max_tokens": self.suffix_decoding_max_cached_tokens,
                "eviction": self.suffix_decoding_eviction}

    @property
    def ks(self) -> list[int]:
        """The speculation lengths, as a list."""
        k = self.num_speculative_tokens
        return [k] if isinstance(k, int) else list(k)

    @property
    def max_k(self) -> int:
        return max(self.ks)

    def drafter_specs(self) -> list[str]:
        """The drafter pool this config names (empty: use the caller's drafters)."""
        specs = list(self.drafters or [])
        extra = None
        if self.method == "ngram":
            extra = "ngram"
        elif self.method == "suffix":
            extra = f"suffix:{self.model}" if self.model else "suffix"
        elif self.model:
            extra = self.model
        if extra is not None and extra not in specs:
            specs.append(extra)
        return specs

    @classmethod
    def build(cls, values: Mapping[str, Any], source: str = "config") -> SpeculativeConfig:
        """Validate ``values``; a :class:`ConfigError` names the key, the problem and the value."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as e:
            raise ConfigError(f"{source}: {describe_error(e)}") from None

    @classmethod
    def from_cli(cls, speculative_config: str | None, **options: Any) -> SpeculativeConfig:
        """``--speculative-config`` JSON merged over the options given on the command line.

        ``options`` are config keys; ``None`` means "not given" (the default applies).  JSON
        keys win over options.  Errors name the option (``--num-speculative-tokens``) or
        ``--speculative-config``.
        """
        given = {k: v for k, v in options.items() if v is not None}
        raw = _parse_json(speculative_config) if speculative_config else {}
        for key, value in given.items():  # validate each option on its own first
            if key not in raw:
                try:
                    cls.model_validate({key: value})
                except ValidationError as e:
                    flag = "--" + key.replace("_", "-")
                    raise ConfigError(f"{flag}: {describe_error(e, with_key=False)}") from None
        return cls.build({**given, **raw}, "--speculative-config" if raw else "options")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "function-after",
                         "constrained-int", "constrained-str", "literal"})


_PLAIN = {  # pydantic error type -> what is allowed, in a few words
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "int_from_float": "must be an integer", "float_type": "must be a number",
    "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list",
    "dict_type": "must be a JSON object", "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object", "missing": "this field is required",
}


def plain_message(error: Any) -> str:
    """What is wrong, in the words of the constraint (``must be >= 1``), for one pydantic
    error dict; custom errors (``spec_*``, value errors) keep their own message."""
    kind, ctx = str(error.get("type", "")), error.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if kind.startswith(("greater_than", "less_than")) and key in ctx:
            return f"must be {op} {ctx[key]}"
    if kind in ("too_short", "too_long") and ctx:
        what = "at least" if kind == "too_short" else "at most"
        limit = ctx.get("min_length", ctx.get("max_length"))
        return f"must have {what} {limit} item{'s' if limit != 1 else ''}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def shown_value(error: Any) -> str:
    """`` (got VALUE)`` for a type/range error, '' otherwise."""
    kind = str(error.get("type", ""))
    if kind in ("missing", "value_error", "extra_forbidden") or kind.startswith("spec_") or (
            "input" not in error):
        return ""
    value = repr(error["input"])
    return f" (got {value[:60]}{'...' if len(value) > 60 else ''})"


def describe_error(e: ValidationError, with_key: bool = True) -> str:
    """One readable line for the first error of ``e``: ``key: problem (got VALUE)``."""
    first = e.errors()[0]
    loc = [str(p) if isinstance(p, int) or str(p).isidentifier() else repr(p)[:30]
           for p in first.get("loc", ()) if isinstance(p, int) or (
               p in SpeculativeConfig.model_fields or p not in _UNION_TAGS and "[" not in p)]
    msg = plain_message(first)
    where = f"{'.'.join(loc)}: " if loc and with_key else ""
    if first.get("type") == "extra_forbidden":
        msg = f"unknown key; known: {', '.join(SpeculativeConfig.model_fields)}"
    return f"{where}{msg}{shown_value(first)}"


def _parse_json(text: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"--speculative-config is not valid JSON: {e.msg} at char {e.pos}"
        raise ConfigError(msg) from None
    except RecursionError:
        raise ConfigError("--speculative-config is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError("--speculative-config must be a JSON object")
    return raw


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """Parse a JSON ``--speculative-config``; raises :class:`ConfigError` in one line."""
    return SpeculativeConfig.build(_parse_json(text), "--speculative-config")
