"""Shared hypothesis settings for the fuzz suites (tests/fuzz).

Each suite runs at least 1,000 generated cases in the default test run; raise the count with
``SPECMUX_FUZZ_EXAMPLES=N``.  Runs are derandomized (the same cases every time, so CI is
reproducible); set ``SPECMUX_FUZZ_RANDOM=1`` to explore new ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

SERVER_TESTS = str(Path(__file__).resolve().parents[1] / "server")
if SERVER_TESTS not in sys.path:  # tiny_server (the tiny pipeline of the server tests)
    sys.path.insert(0, SERVER_TESTS)

EXAMPLES = int(os.environ.get("SPECMUX_FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(default_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default_examples,
        deadline=None,  # hangs are caught by the per-case time limits in the suites
        derandomize=os.environ.get("SPECMUX_FUZZ_RANDOM") != "1",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )
