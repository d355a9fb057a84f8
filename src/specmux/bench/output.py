"""Write a benchmark's report files: ``results.md`` and the PNG plots.

Imports flow one way: :mod:`specmux.bench.report` (summaries, tables) <- :mod:`specmux.bench.plots`
(figures from a summary) <- this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specmux.bench.plots import write_plots
from specmux.bench.report import Summary, render_markdown, summarize


def write_report(records: list[dict[str, Any]], out: Path, plots: bool = True) -> Summary:
    """Write ``results.md`` (and the PNG plots) for ``records`` into ``out``."""
    summary = summarize(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(render_markdown(summary), encoding="utf-8")
    if plots:
        write_plots(records, summary, out)
    return summary
