"""Every docstring example in the package runs and shows what it says (examples that need the
embedded GB-sized models are marked ``+SKIP``)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import specmux

ROOT = Path(specmux.__file__).parent
MODULES = sorted(
    ".".join(("specmux", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
    for p in ROOT.rglob("*.py")
)


def test_every_module_is_found() -> None:
    assert "specmux.drafters.ngram" in MODULES and "specmux.costmodel" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
