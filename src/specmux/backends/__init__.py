"""Inference backends behind the ``Target`` protocol.

``transformers`` (the reference: :class:`specmux.lm.CachedLM`) and ``llama.cpp``
(:mod:`specmux.backends.llamacpp`, through llama-cpp-python: GGUF files run as they are).
"""

from __future__ import annotations

from typing import Literal

from specmux.errors import ConfigError

Backend = Literal["transformers", "llama.cpp"]
BACKENDS: tuple[str, ...] = ("transformers", "llama.cpp")


def check_backend(name: str) -> str:
    """``name`` if it is a known backend (``llamacpp`` is accepted for ``llama.cpp``)."""
    name = "llama.cpp" if name in ("llamacpp", "llama-cpp") else name
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name
