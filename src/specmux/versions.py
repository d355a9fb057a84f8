"""The exact versions behind a figure: recorded next to every benchmark and simulation result.

>>> v = package_versions()
>>> sorted(v)[:3], v["python"].count(".") == 2
(['accelerate', 'fastapi', 'gguf'], True)
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

# Everything that can change a measured figure: the numerics (torch, transformers, numpy,
# tokenizers, safetensors, gguf, accelerate), the server path (fastapi, starlette, uvicorn,
# pydantic) and the optional engines.
PACKAGES = ("specmux", "torch", "transformers", "tokenizers", "safetensors", "accelerate",
            "gguf", "numpy", "pydantic", "fastapi", "starlette", "uvicorn",
            "llama-cpp-python", "vllm")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{name: version}`` of the installed ``packages`` (absent ones are left out), plus
    ``python``."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return dict(sorted(out.items()))


def versions_line(packages: tuple[str, ...] = PACKAGES) -> str:
    """``torch 2.13.0, transformers 5.24.0, ...`` for a table caption."""
    return ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; else what :mod:`platform` knows):
    figures taken on one machine kind differ on another (an AMD EPYC and an Intel Xeon with
    AMX round and price the same passes differently)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
