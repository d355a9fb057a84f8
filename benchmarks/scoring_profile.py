"""Where a learner's scoring time goes: ``specmux bench`` with the engine's scoring calls timed.

Runs the ``specmux`` command line given after the script name with these wrapped and timed:
``SpeculativeDecoder._scores`` (every-round scoring), ``_score_span`` (deferred runs: coins
and played drafters' bonus rows, one ``SPAN`` line each on stderr with the drafter, rows,
backlog and milliseconds), ``_catch_up``, ``Selector.select`` / ``observe`` and the drafters'
``offer`` / ``observe``.  Totals print as ``PROF`` lines at exit (stderr).  The bench's own
figures are unchanged in kind, but the wrappers add a little time: read it as a diagnosis.

    python benchmarks/scoring_profile.py bench --prompts-per-domain 2 --max-new-tokens 48 \\
        --drafters suffix,ngram,lm,head:code,head:math,head:chat -k 0,2,4,8 \\
        --no-single-drafters --no-hf-baseline --score-rate 0.05 \\
        --policies hedge:time:ctx:argmax --drafter-backend llama.cpp --out /tmp/prof
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib
import inspect
import pkgutil
import sys
import time
from typing import Any

import specmux.drafters as drafters_pkg
from specmux import engine, selector

TOTAL: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()


def wrap(owner: Any, name: str, label: str | None = None) -> None:
    f = getattr(owner, name)
    label = label or f"{owner.__name__}.{name}"

    @functools.wraps(f)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            TOTAL[label] += time.perf_counter() - t0
            CALLS[label] += 1

    setattr(owner, name, timed)


def span(self: engine.SpeculativeDecoder, drafter: int, lo: int, hi: int) -> Any:
    d = self.drafters[drafter]
    backlog = d.backlog(self._log.tokens[: self._log.position[lo]])
    t0 = time.perf_counter()
    out = _span(self, drafter, lo, hi)
    print(f"SPAN {d.name} rows {lo}-{hi} backlog {backlog} "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms", file=sys.stderr)
    return out


_span = engine.SpeculativeDecoder._score_span
engine.SpeculativeDecoder._score_span = span  # type: ignore[method-assign]
for method in ("_scores", "_score_span", "_catch_up", "_backlogs"):
    wrap(engine.SpeculativeDecoder, method)
for method in ("select", "observe"):
    wrap(selector.Selector, method)
seen: set[type] = set()
for info in pkgutil.walk_packages(drafters_pkg.__path__, "specmux.drafters."):
    module = importlib.import_module(info.name)
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and cls not in seen:
            seen.add(cls)
            for method in ("offer", "observe", "observe_target", "backlog"):
                if method in cls.__dict__:
                    wrap(cls, method)


@atexit.register
def report() -> None:
    for label, seconds in sorted(TOTAL.items(), key=lambda kv: -kv[1]):
        print(f"PROF {label:40s} {1e3 * seconds:9.1f} ms  n={CALLS[label]}  "
              f"{1e3 * seconds / max(CALLS[label], 1):.3f} ms/call", file=sys.stderr)


if __name__ == "__main__":
    from specmux.cli import app

    sys.argv = ["specmux", *sys.argv[1:]]
    app()
