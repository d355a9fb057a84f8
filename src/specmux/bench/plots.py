"""PNG plots of a benchmark trace (matplotlib, Agg backend).

* ``regret.png``: cumulative regret against the per-query oracle (best single drafter per
  query by MAT, in hindsight): extra target calls the method needed for the same output
  tokens, along the stream;
* ``selection.png``: which drafter each learner picked, as a rolling share over its rounds,
  on a background coloured by the query's domain;
* ``mat.png``: MAT per query along the stream, learners against the oracle;
* ``speedup.png``: speedup over target-only per domain and overall;
* ``regret_category.png``: each learner's (and the best fixed drafter's) regret per category.

Pools of 10-30 drafters stay readable: drafters of one family (``suffix:*``, ``lm@k``...)
share a hue in shades, grouped together, with the legend below the panels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from specmux.bench.report import (  # noqa: E402
    OVERALL,
    Summary,
    answers,
    best_fixed,
    oracle_choices,
    regret_by_category,
    rounds_by_run,
)
from specmux.bench.runner import TARGET_ONLY  # noqa: E402

log = logging.getLogger(__name__)

PLOTS = ("regret.png", "selection.png", "mat.png", "speedup.png", "regret_category.png")
_DOMAIN_COLORS = ["#e8f0fb", "#fbf0e6", "#eaf7ea", "#f6e9f6", "#f3f3e3", "#e3f3f3", "#f3e3e3"]
# One colour map per drafter family, shades within it: a pool of 10-30 arms stays readable.
_FAMILY_CMAPS = {"suffix": "Greens", "ngram": "Oranges", "lm": "Reds"}


def drafter_family(name: str) -> str:
    """``suffix:code`` -> ``suffix``; ``lm@4`` -> ``lm``; anything else -> itself."""
    return name.split(":", 1)[0].split("@", 1)[0]


def drafter_colors(pool: list[str]) -> dict[str, Any]:
    """A colour per drafter: drafters of one family share a hue, in shades."""
    families: dict[str, list[str]] = {}
    for d in pool:
        families.setdefault(drafter_family(d), []).append(d)
    extra = iter(["Blues", "Purples", "Greys", "YlOrBr", "PuRd"])
    out: dict[str, Any] = {}
    for fam, members in families.items():
        cmap = plt.get_cmap(_FAMILY_CMAPS.get(fam) or next(extra, "Greys"))
        for i, d in enumerate(members):
            out[d] = cmap(0.85 - 0.55 * i / max(len(members) - 1, 1) if len(members) > 1
                          else 0.7)
    return out


def grouped_pool(pool: list[str]) -> list[str]:
    """The pool ordered family by family (first appearance order)."""
    order = list(dict.fromkeys(drafter_family(d) for d in pool))
    return sorted(pool, key=lambda d: order.index(drafter_family(d)))


def _calls_per_token(rounds: list[dict[str, Any]]) -> np.ndarray:
    """``f[t]``: target calls needed for the first ``t + 1`` output tokens."""
    per = [np.full(int(r["new_tokens"]), i + 1) for i, r in enumerate(rounds)]
    return np.concatenate(per) if per else np.zeros(0)


def regret_curves(records: list[dict[str, Any]], methods: list[str]) -> dict[str, tuple]:
    """``method -> (tokens [n], regret [n])``: cumulative extra target calls against the
    per-query MAT oracle, along the stream's output tokens."""
    runs = rounds_by_run(records)
    oracle = oracle_choices(records, by="mat")
    queries = sorted(oracle)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for method in methods:
        xs, ys = [], []
        offset_tokens, offset_regret = 0, 0.0
        for q in queries:
            mine = runs.get((method, q))
            best = runs.get((oracle[q]["method"], q))
            if not mine or not best:
                continue
            f_m, f_o = _calls_per_token(mine), _calls_per_token(best)
            n = min(len(f_m), len(f_o))
            if n == 0:
                continue
            diff = f_m[:n] - f_o[:n]
            xs.append(offset_tokens + np.arange(1, n + 1))
            ys.append(offset_regret + diff)
            offset_tokens += n
            offset_regret += float(diff[-1])
        if xs:
            out[method] = (np.concatenate(xs), np.concatenate(ys).astype(float))
    return out


def _colors(methods: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _plot_regret(records: list[dict[str, Any]], summary: Summary, path: Path) -> None:
    policies = [r.method for r in summary.rows if r.kind == "policy"]
    singles = [r for r in summary.rows if r.kind == "single" and OVERALL in r.cells]
    best_single = max(singles, key=lambda r: r.cells[OVERALL].mat).method if singles else None
    methods = policies + ([best_single] if best_single else [])
    curves = regret_curves(records, methods)
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in methods:
        if m in curves:
            x, y = curves[m]
            ax.plot(x, y, label=summary.row(m).label if summary.row(m) else m,  # type: ignore[union-attr]
                    color=colors[m], linestyle="--" if m == best_single else "-")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("output tokens along the stream")
    ax.set_ylabel("extra target calls vs per-query oracle")
    ax.set_title("Cumulative regret against the best single drafter per query (MAT oracle)")
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _domain_bands(ax: Any, domains_per_round: list[str], domain_order: list[str]) -> None:
    start = 0
    for i in range(1, len(domains_per_round) + 1):
        if i == len(domains_per_round) or domains_per_round[i] != domains_per_round[start]:
            d = domains_per_round[start]
            color = _DOMAIN_COLORS[domain_order.index(d) % len(_DOMAIN_COLORS)]
            ax.axvspan(start - 0.5, i - 0.5, color=color, linewidth=0)
            start = i


def _plot_selection(records: list[dict[str, Any]], summary: Summary, path: Path) -> None:
    policies = [r.method for r in summary.rows if r.kind == "policy"]
    pool = grouped_pool(list(summary.meta.get("pool") or []))
    n = max(len(policies), 1)
    legend_rows = (len(pool) + 4) // 5
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n + 0.8 + 0.25 * legend_rows),
                             sharex=False, squeeze=False)
    colors = drafter_colors(pool)
    for ax, method in zip(axes[:, 0], policies, strict=False):
        rs = [r for r in records if r.get("type") == "round" and r["method"] == method]
        rs.sort(key=lambda r: (int(r["query_index"]), int(r["round"])))
        if not rs:
            continue
        chosen = np.array([pool.index(r["drafter"]) if r["drafter"] in pool else -1 for r in rs])
        window = max(1, min(15, len(rs) // 10 or 1))
        kernel = np.ones(window) / window
        shares = [np.convolve((chosen == i).astype(float), kernel, mode="same")
                  for i in range(len(pool))]
        _domain_bands(ax, [r["category"] for r in rs], summary.domains)
        ax.stackplot(np.arange(len(rs)), *shares, colors=[colors[d] for d in pool],
                     labels=pool, alpha=0.9)
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.5, len(rs) - 0.5)
        ax.set_ylabel("share")
        ax.set_title(f"{summary.row(method).label}: drafter picked per round "  # type: ignore[union-attr]
                     f"(rolling {window}; background = query domain)", fontsize=9)
    axes[-1, 0].set_xlabel("round along the stream")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.03 * legend_rows + 0.02, 1, 1))
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=min(5, len(pool)) or 1,
               title="drafter (shades of one hue = one family)", title_fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_mat(records: list[dict[str, Any]], summary: Summary, path: Path) -> None:
    policies = [r.method for r in summary.rows if r.kind == "policy"]
    by_query: dict[str, dict[int, float]] = {}
    domain_of: dict[int, str] = {}
    for a in answers(records):
        q = int(a["query_index"])
        domain_of[q] = a["category"]
        calls = max(int(a["num_target_calls"]), 1)
        by_query.setdefault(a["method"], {})[q] = 1.0 + int(a["num_accepted_tokens"]) / calls
    oracle = oracle_choices(records, by="mat")
    by_query["oracle"] = {q: 1.0 + int(a["num_accepted_tokens"]) /
                          max(int(a["num_target_calls"]), 1) for q, a in oracle.items()}
    queries = sorted(domain_of)
    methods = policies + ["oracle"]
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _domain_bands(ax, [domain_of[q] for q in queries], summary.domains)
    for m in methods:
        ys = [by_query.get(m, {}).get(q, np.nan) for q in queries]
        name = "per-query oracle (MAT)" if m == "oracle" else summary.row(m).label  # type: ignore[union-attr]
        ax.plot(range(len(queries)), ys, marker="o", markersize=3, label=name,
                color="black" if m == "oracle" else colors[m],
                linestyle="--" if m == "oracle" else "-")
    ax.set_xticks(range(len(queries)))
    ax.set_xticklabels([domain_of[q][:4] for q in queries], fontsize=7, rotation=90)
    ax.set_xlim(-0.5, len(queries) - 0.5)
    ax.set_xlabel("query along the stream (background = domain)")
    ax.set_ylabel("MAT (tokens per target call)")
    ax.set_title("Mean accepted tokens per query")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_speedup(summary: Summary, path: Path) -> None:
    rows = [r for r in summary.rows if r.method != TARGET_ONLY]
    groups = [*summary.domains, OVERALL]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / max(len(rows), 1)
    cmap = plt.get_cmap("tab20")
    for i, row in enumerate(rows):
        values = [summary.speedup(row, g) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width, values, width,
               label=row.label, color=cmap(i % 20),
               edgecolor="black" if row.kind == "policy" else None)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("speedup over target-only (×)")
    ax.set_title("Wall-clock speedup per domain")
    ax.legend(fontsize=7, ncol=4 if len(rows) > 12 else 3, loc="upper center",
              bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_regret_by_category(
    records: list[dict[str, Any]], summary: Summary, path: Path
) -> None:
    rows = [r for r in summary.rows if r.kind == "policy"]
    fixed = best_fixed(summary)
    if fixed is not None:
        rows.append(fixed)
    table = regret_by_category(records, [r.method for r in rows])
    cats = summary.domains
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cats) + 3), 4.5))
    width = 0.8 / max(len(rows), 1)
    colors = _colors([r.method for r in rows])
    for i, row in enumerate(rows):
        values = [table.get(row.method, {}).get(c, np.nan) for c in cats]
        ax.bar(np.arange(len(cats)) + (i - (len(rows) - 1) / 2) * width, values, width,
               label=row.label + (" (best fixed)" if row is fixed else ""),
               color=colors[row.method], hatch="//" if row is fixed else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(cats)))
    ax.set_xticklabels(cats, fontsize=8)
    ax.set_ylabel("extra target calls per 100 tokens")
    ax.set_title("Regret per category against the per-query oracle (MAT)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(records: list[dict[str, Any]], summary: Summary, out: Path) -> list[Path]:
    """Write the PNGs of :data:`PLOTS` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in PLOTS]
    _plot_regret(records, summary, paths[0])
    _plot_selection(records, summary, paths[1])
    _plot_mat(records, summary, paths[2])
    _plot_speedup(summary, paths[3])
    _plot_regret_by_category(records, summary, paths[4])
    return paths
