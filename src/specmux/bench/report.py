"""Tables from a benchmark trace: Spec-Bench-style speedup and MAT per domain, plus the
learners' overhead and the goal ratios.  Everything here reads the trace records alone, so
``specmux report DIR`` re-renders exactly what ``specmux bench`` printed.

* **speedup** of a method on a domain: its output tokens per wall-clock second over the
  target-only run's on the same queries (under greedy decoding both produce the same
  tokens, so this is the ratio of times);
* **MAT**: mean accepted tokens per target call, the recovered/bonus token included
  (``1 + accepted / target calls``, :attr:`specmux.metrics.SpecStats.mean_acceptance_length`);
  target-only has MAT 1;
* **oracle** rows: for each query, the single drafter that did best on it in hindsight (by
  MAT, or by time), from the single-drafter runs;
* **overhead** of a learner: its own ``select`` + ``update`` time per round, and the
  counterfactual scoring (plus drafter bookkeeping) the engine books as learner time, each
  also as a share of the mean target verification step (prefill rounds excluded).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.table import Table

from specmux.bench.runner import FAST_PREFIX, HF_ASSISTED, SINGLE_PREFIX, TARGET_ONLY

log = logging.getLogger(__name__)

OVERALL = "overall"
ORACLE_MAT = "oracle-mat"
ORACLE_TIME = "oracle-time"
POLICY_LABELS = {
    "hedge": "HedgeSpec (Hedge)",
    "normalhedge": "HedgeSpec (NormalHedge)",
    "ucb": "UCBSpec",
    "exp3": "EXP3Spec",
    "metasd": "MetaSD (UCB)",
    "banditspec": "BanditSpec (UCB, tokens/s reward)",
}
ORACLE_FIXED = "oracle-fixed"


def label(method: str, meta: dict[str, Any] | None = None) -> str:
    """Human name of a method id."""
    if method.startswith(FAST_PREFIX):
        return f"{label(method.removeprefix(FAST_PREFIX), meta)} [exact mode off]"
    if method == TARGET_ONLY:
        return "target only (autoregressive)"
    if method == HF_ASSISTED:
        name = (meta or {}).get("drafter_model") or "drafter"
        return f"HF assisted generation ({str(name).removeprefix('embedded:')})"
    if method.startswith(SINGLE_PREFIX):
        return f"only {method.removeprefix(SINGLE_PREFIX)}"
    if method == ORACLE_MAT:
        return "oracle: best single drafter per query (MAT)"
    if method == ORACLE_TIME:
        return "oracle: best single drafter per query (time)"
    if method == ORACLE_FIXED:
        return "best fixed single drafter of the stream in hindsight (time)"
    name, *mods = method.split(":")
    words = {"ctx": "contextual", "noctx": "not contextual", "argmax": "plays the best arm",
             "sample": "samples"}
    notes = [words.get(m, f"{m} loss") for m in mods]
    return POLICY_LABELS.get(name, name) + (f" [{', '.join(notes)}]" if notes else "")


@dataclass
class Cell:
    """Totals of one method over a set of queries."""

    queries: int = 0
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    accepted: int = 0
    decode_tokens: int = 0  # after the first target call (which carries the prefill)
    decode_seconds: float = 0.0
    decode_known: bool = True  # False once an answer lacks the first call's timing

    def add(self, answer: dict[str, Any]) -> None:
        self.queries += 1
        self.tokens += int(answer["new_tokens"])
        self.seconds += float(answer["seconds"])
        self.calls += int(answer["num_target_calls"])
        self.accepted += int(answer["num_accepted_tokens"])
        if answer.get("first_seconds") is None:
            self.decode_known = False
        else:
            self.decode_tokens += int(answer["new_tokens"]) - int(answer["first_tokens"])
            self.decode_seconds += float(answer["seconds"]) - float(answer["first_seconds"])

    @property
    def decode_tokens_per_second(self) -> float | None:
        if not self.decode_known or self.decode_seconds <= 0:
            return None
        return self.decode_tokens / self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mat(self) -> float:
        """Mean accepted tokens per target call, bonus included."""
        return 1.0 + self.accepted / self.calls if self.calls else 0.0


@dataclass
class Row:
    """One method's line of the table."""

    method: str
    label: str
    kind: str
    cells: dict[str, Cell] = field(default_factory=dict)  # domain or OVERALL -> totals
    checked: int = 0  # queries compared with target-only
    mismatches: int = 0  # of those, outputs that differ
    near_ties: int = 0  # of those, rounding flips at a near-tie outside exact mode (allowed)
    divergences: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    policy_ms: float | None = None  # learner select+update per round
    scoring_ms: float | None = None  # counterfactual scoring + drafter bookkeeping per round
    verify_ms: float | None = None  # mean target verification step (non-prefill rounds)
    share: dict[str, float] = field(default_factory=dict)  # drafter -> share of rounds

    def cell(self, domain: str) -> Cell:
        return self.cells.setdefault(domain, Cell())

    @property
    def real_mismatches(self) -> int:
        """Differences rounding cannot explain (or any difference in exact mode): bugs."""
        return self.mismatches - self.near_ties


@dataclass
class Goal:
    name: str
    value: float | None
    target: float
    note: str = ""
    at_most: bool = False  # the value must stay at or below the target (a cost)

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target


@dataclass
class Summary:
    """Everything the tables show, computed from a trace."""

    meta: dict[str, Any]
    domains: list[str]
    rows: list[Row]
    goals: list[Goal]
    outliers: list[dict[str, Any]] = field(default_factory=list)
    # Regret per category table (header, body): policies and the best fixed drafter.
    regret: tuple[list[str], list[list[str]]] = ([], [])

    def row(self, method: str) -> Row | None:
        return next((r for r in self.rows if r.method == method), None)

    def speedup(self, row: Row, domain: str = OVERALL) -> float | None:
        base = self.row(TARGET_ONLY)
        if base is None or domain not in row.cells or domain not in base.cells:
            return None
        ref = base.cells[domain].tokens_per_second
        return row.cells[domain].tokens_per_second / ref if ref > 0 else None

    def decode_speedup(self, row: Row, domain: str = OVERALL) -> float | None:
        """Speedup of the decoding phase alone: every output token after the first target
        call, over the time after it (the first call carries the prompt's prefill)."""
        base = self.row(TARGET_ONLY)
        if base is None or domain not in row.cells or domain not in base.cells:
            return None
        mine, ref = (row.cells[domain].decode_tokens_per_second,
                     base.cells[domain].decode_tokens_per_second)
        return mine / ref if mine is not None and ref else None

    @property
    def sampling(self) -> bool:
        return float(self.meta.get("config", {}).get("temperature", 0.0)) > 0.0


# ------------------------------------------------------------------------- summarizing


def answers(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("type") == "answer"]


def rounds_by_run(records: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[dict]]:
    """``(method, query_index) -> round records`` in order."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("type") == "round":
            out[(r["method"], int(r["query_index"]))].append(r)
    return out


def oracle_choices(
    records: Iterable[dict[str, Any]], by: str = "mat"
) -> dict[int, dict[str, Any]]:
    """Per query index, the single-drafter answer that did best in hindsight: highest MAT
    (ties: less time), or least time (``by="time"``)."""
    best: dict[int, dict[str, Any]] = {}

    def key(a: dict[str, Any]) -> tuple[float, float]:
        calls = max(int(a["num_target_calls"]), 1)
        mat = 1.0 + int(a["num_accepted_tokens"]) / calls
        secs = float(a["seconds"])
        return (-mat, secs) if by == "mat" else (secs, -mat)

    for a in answers(records):
        if not str(a["method"]).startswith(SINGLE_PREFIX):
            continue
        q = int(a["query_index"])
        if q not in best or key(a) < key(best[q]):
            best[q] = a
    return best


def summarize(records: list[dict[str, Any]]) -> Summary:
    """Build the :class:`Summary` of a trace (a ``meta`` record first)."""
    meta = records[0] if records and records[0].get("type") == "meta" else {"config": {}}
    answer_list = answers(records)
    domains = list(dict.fromkeys(
        [q["category"] for q in meta.get("queries", [])] + [a["category"] for a in answer_list]
    ))
    order = list(meta.get("methods") or dict.fromkeys(a["method"] for a in answer_list))
    kinds = meta.get("method_kinds", {})
    rows: dict[str, Row] = {
        m: Row(m, label(m, meta), kinds.get(m, _kind(m))) for m in order
    }
    for a in answer_list:
        row = rows.setdefault(a["method"], Row(a["method"], label(a["method"], meta),
                                               a.get("kind", _kind(a["method"]))))
        row.cell(a["category"]).add(a)
        row.cell(OVERALL).add(a)
        if a.get("lossless") is not None:
            row.checked += 1
            if not a["lossless"]:
                row.mismatches += 1
                div = a.get("divergence") or {}
                verdict = div.get("verdict") or ("near-tie" if div.get("near_tie") else
                                                 "mismatch")
                row.near_ties += verdict == "near-tie"
                row.divergences.append({"question_id": a["question_id"], **div})
    for oracle, by in ((ORACLE_MAT, "mat"), (ORACLE_TIME, "time")):
        chosen = oracle_choices(answer_list, by)
        if not chosen:
            continue
        row = Row(oracle, label(oracle), "oracle")
        for a in chosen.values():
            row.cell(a["category"]).add(a)
            row.cell(OVERALL).add(a)
            row.share[a["method"].removeprefix(SINGLE_PREFIX)] = (
                row.share.get(a["method"].removeprefix(SINGLE_PREFIX), 0.0) + 1.0)
        total = sum(row.share.values())
        row.share = {k: v / total for k, v in sorted(row.share.items())}
        rows[oracle] = row
    singles = [r for r in rows.values() if r.kind == "single" and OVERALL in r.cells
               and not r.method.startswith(FAST_PREFIX)]  # baselines run in the same mode
    if singles:
        best = max(singles, key=lambda r: r.cells[OVERALL].tokens_per_second)
        fixed = Row(ORACLE_FIXED, f"{label(ORACLE_FIXED)}: {best.label}", "oracle")
        fixed.cells = dict(best.cells)
        fixed.share = {best.method.removeprefix(SINGLE_PREFIX): 1.0}
        rows[ORACLE_FIXED] = fixed
    _add_overheads(rows, records)
    ordered = _order(list(rows.values()))
    for row in ordered:  # keep domain columns in stream order
        row.cells = {d: row.cells[d] for d in [*domains, OVERALL] if d in row.cells}
    summary = Summary(meta, domains, ordered, [], timing_outliers(records))
    summary.goals = goals(summary) + time_goals(summary, answer_list)
    summary.regret = regret_rows(summary, records)
    return summary


def step_times(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """``(method, query_index) -> mean target step (s)`` after the first call: the target
    verification time per round, or target-only's decode time per token."""
    out: dict[tuple[str, int], float] = {}
    for (method, q), rs in rounds_by_run(records).items():
        steady = [r["verify_seconds"] for r in rs if r["round"] > 0]
        if steady:
            out[(method, q)] = sum(steady) / len(steady)
    for a in answers(records):
        if a["method"] == TARGET_ONLY and a.get("first_seconds") is not None:
            n = int(a["new_tokens"]) - int(a["first_tokens"])
            if n > 0:
                out[(a["method"], int(a["query_index"]))] = (
                    (float(a["seconds"]) - float(a["first_seconds"])) / n)
    return out


def timing_outliers(records: list[dict[str, Any]], factor: float = 2.0) -> list[dict[str, Any]]:
    """Runs whose target step took over ``factor`` times the method's median over the
    queries: the machine was busy with something else then (the target's step time does
    not depend on the prompt enough to explain it), so that run's speedups are distorted."""
    times = step_times(records)
    per_method: dict[str, list[float]] = defaultdict(list)
    for (method, _), t in times.items():
        per_method[method].append(t)
    qid = {int(a["query_index"]): a["question_id"] for a in answers(records)}
    out = []
    for (method, q), t in sorted(times.items(), key=lambda kv: kv[0][1]):
        values = sorted(per_method[method])
        median = values[len(values) // 2]
        if len(values) >= 3 and t > factor * median:
            out.append({"method": method, "question_id": qid.get(q, str(q)),
                        "step_ms": 1e3 * t, "median_ms": 1e3 * median})
    return out


def _kind(method: str) -> str:
    if method == TARGET_ONLY:
        return "target"
    if method == HF_ASSISTED:
        return "hf"
    if method.startswith(SINGLE_PREFIX):
        return "single"
    return "policy"


def _order(rows: list[Row]) -> list[Row]:
    rank = {"target": 0, "hf": 1, "single": 2, "oracle": 3, "policy": 4}
    return sorted(rows, key=lambda r: rank.get(r.kind, 5))  # stable: trace order within


def _add_overheads(rows: dict[str, Row], records: list[dict[str, Any]]) -> None:
    per_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("type") == "round":
            per_method[r["method"]].append(r)
    for method, rs in per_method.items():
        row = rows.get(method)
        if row is None or not rs:
            continue
        row.rounds = len(rs)
        counts = Counter(r["drafter"] for r in rs)
        row.share = {k: v / len(rs) for k, v in sorted(counts.items())}
        steady = [r for r in rs if r["round"] > 0] or rs
        row.verify_ms = 1e3 * sum(r["verify_seconds"] for r in steady) / len(steady)
        if row.kind == "policy":
            row.policy_ms = 1e3 * sum(r["policy_seconds"] for r in rs) / len(rs)
            row.scoring_ms = 1e3 * sum(
                max(r["learner_seconds"] - r["policy_seconds"], 0.0) for r in rs) / len(rs)


def best_fixed(summary: Summary) -> Row | None:
    """The single-drafter row with the best overall speedup (the best fixed drafter)."""
    singles = [r for r in summary.rows if r.kind == "single" and OVERALL in r.cells
               and not r.method.startswith(FAST_PREFIX)]  # baselines run in the same mode
    return max(singles, key=lambda r: summary.speedup(r) or 0.0, default=None)


def family_row(summary: Summary, name: str,
               losses: tuple[str, ...] | None = None) -> Row | None:
    """The row of policy ``name`` (``"hedge"``), else its fastest variant of the run
    (``"hedge:time:ctx:argmax"``): a goal about "Hedge" reads whichever Hedge ran.
    ``losses``: only variants that name none of the other losses (``"hedge:argmax"``
    under ``--loss length`` qualifies, ``"hedge:time"`` does not)."""
    row = summary.row(name)
    if row is not None:
        return row
    others = set() if losses is None else {"length", "acceptance", "time"} - set(losses)
    variants = [r for r in summary.rows if r.kind == "policy"
                and r.method.partition(":")[0] == name and OVERALL in r.cells
                and not others & set(r.method.split(":")[1:])]
    return max(variants, key=lambda r: summary.speedup(r) or 0.0, default=None)


def choice_goals(summary: Summary) -> list[Goal]:
    """Does the choice of drafter matter on this stream, do the learners capture it, and
    does the suffix drafter copy well where the output repeats its input (issue 12)."""
    fixed, oracle = best_fixed(summary), summary.row(ORACLE_TIME)
    fixed_x = summary.speedup(fixed) if fixed else None
    oracle_x = summary.speedup(oracle) if oracle else None
    out = [Goal("per-query oracle (time) speedup / best fixed drafter's"
                + (f" ({fixed.label})" if fixed else ""),
                oracle_x / fixed_x if oracle_x and fixed_x else None, 1.15)]
    for name in ("hedge", "normalhedge"):
        row = family_row(summary, name)
        x = summary.speedup(row) if row else None
        share = None
        if x is not None and oracle_x and fixed_x and oracle_x > fixed_x:
            share = (x - fixed_x) / (oracle_x - fixed_x)
        out.append(Goal(f"{row.label if row else label(name)}: share of the oracle's headroom "
                        "over the best fixed "
                        "drafter (wall clock)", share, 0.8))
    suffix = [r for r in summary.rows if r.method == SINGLE_PREFIX + "suffix"
              or r.method.startswith(SINGLE_PREFIX + "suffix@")]  # "only:suffix@8" too
    for cat in ("code_edit", "multiturn"):
        mats = [r.cells[cat].mat for r in suffix if cat in r.cells]
        if mats:
            out.append(Goal(f"suffix drafter alone: MAT on {cat}", max(mats), 3.0))
    return out


def regret_by_category(
    records: list[dict[str, Any]], methods: Iterable[str]
) -> dict[str, dict[str, float]]:
    """``method -> category -> extra target calls per 100 output tokens`` against the
    per-query MAT oracle (the same regret as ``regret.png``, split by query category)."""
    runs = rounds_by_run(records)
    oracle = oracle_choices(records, by="mat")
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        extra: dict[str, float] = defaultdict(float)
        tokens: dict[str, int] = defaultdict(int)
        for q, best in oracle.items():
            mine, ref = runs.get((method, q)), runs.get((best["method"], q))
            if not mine or not ref:
                continue
            f_m, f_o = _calls_per_token(mine), _calls_per_token(ref)
            n = min(len(f_m), len(f_o))
            if n:
                extra[best["category"]] += float(f_m[n - 1] - f_o[n - 1])
                tokens[best["category"]] += n
        out[method] = {c: 100 * extra[c] / tokens[c] for c in tokens if tokens[c]}
    return out


def _calls_per_token(rounds: list[dict[str, Any]]) -> list[int]:
    """``f[t]``: target calls needed for the first ``t + 1`` output tokens."""
    return [i + 1 for i, r in enumerate(rounds) for _ in range(int(r["new_tokens"]))]


def regret_rows(
    summary: Summary, records: list[dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    rows = [r for r in summary.rows if r.kind == "policy"]
    fixed = best_fixed(summary)
    if fixed is not None:
        rows.append(fixed)
    table = regret_by_category(records, [r.method for r in rows])
    header = ["method", *summary.domains]
    body = [[r.label, *(_fmt(table.get(r.method, {}).get(d), ".1f") for d in summary.domains)]
            for r in rows]
    return header, body


def goals(summary: Summary) -> list[Goal]:
    """The project's goal ratios, each ``None`` when the run lacks what it needs."""
    def mat(method: str) -> float | None:  # a time-loss Hedge is not compared by MAT
        row = (family_row(summary, method, losses=("length", "acceptance"))
               if method == "hedge" else summary.row(method))
        return row.cells[OVERALL].mat if row and OVERALL in row.cells else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    hedge = family_row(summary, "hedge")
    hf = summary.row(HF_ASSISTED)
    out = choice_goals(summary)
    out += [
        Goal("Hedge MAT / per-query oracle MAT", ratio(mat("hedge"), mat(ORACLE_MAT)), 0.97),
        Goal("Hedge MAT / UCBSpec MAT", ratio(mat("hedge"), mat("ucb")), 1.3),
        Goal("Hedge MAT / EXP3Spec MAT", ratio(mat("hedge"), mat("exp3")), 1.3),
    ]
    if "code" in summary.domains:
        out.append(Goal("Hedge speedup on code", summary.speedup(hedge, "code") if hedge
                        else None, 2.0))
    out.append(Goal("Hedge speedup on the mixed stream",
                    summary.speedup(hedge) if hedge else None, 1.5))
    out.append(Goal("Hedge speedup / HF assisted speedup",
                    ratio(summary.speedup(hedge) if hedge else None,
                          summary.speedup(hf) if hf else None), 1.0))
    from specmux.bench.anchors import anchor_goals  # llama.cpp runs: vs its own loops

    return out + anchor_goals(summary)


def query_speedups(answer_list: list[dict[str, Any]], method: str) -> list[float]:
    """Per query, ``method``'s wall-clock speedup over target-only on that query."""
    answers_ = [a for a in answer_list if a["method"] in (method, TARGET_ONLY)]
    base = {a["query_index"]: float(a["seconds"]) / max(int(a["new_tokens"]), 1)
            for a in answers_ if a["method"] == TARGET_ONLY}
    return [base[a["query_index"]] / (float(a["seconds"]) / max(int(a["new_tokens"]), 1))
            for a in answers_ if a["method"] == method and a["query_index"] in base]


def time_goals(summary: Summary, answer_list: list[dict[str, Any]]) -> list[Goal]:
    """Issue 11's wall-clock goals for the best full-information learner of the run."""
    learners = [r for r in summary.rows if r.kind == "policy"
                and r.method.partition(":")[0] in ("hedge", "normalhedge")
                and OVERALL in r.cells]
    if not learners:
        return []
    row = max(learners, key=lambda r: r.cells[OVERALL].tokens_per_second)
    name = row.label
    tps = row.cells[OVERALL].tokens_per_second
    fixed, oracle = summary.row(ORACLE_FIXED), summary.row(ORACLE_TIME)
    out = [
        Goal(f"{name} tok/s / best fixed (drafter, k) in hindsight",
             tps / fixed.cells[OVERALL].tokens_per_second if fixed else None, 1.05),
        Goal(f"{name} tok/s / per-query time oracle",
             tps / oracle.cells[OVERALL].tokens_per_second if oracle else None, 0.95),
    ]
    speedups = query_speedups(answer_list, row.method)
    out.append(Goal(f"{name} 5th-percentile per-query speedup",
                    float(np.percentile(speedups, 5)) if speedups else None, 0.95))
    out.append(Goal(f"{name} speedup on the mixed stream", summary.speedup(row), 2.0))
    if "code" in summary.domains:
        out.append(Goal(f"{name} speedup on code", summary.speedup(row, "code"), 2.5))
    if row.verify_ms and row.policy_ms is not None and row.scoring_ms is not None:
        share = (row.policy_ms + row.scoring_ms) / row.verify_ms
        out.append(Goal(f"{name} learner + scoring / target step", share, 0.02,
                        at_most=True))
    return out


# ------------------------------------------------------------------------- rendering


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _lossless(summary: Summary, row: Row) -> str:
    if row.kind == "target":
        return "reference"
    if row.kind == "oracle":
        return ""
    if summary.sampling:
        return "n/a (sampling)"
    if row.checked == 0:
        return "unchecked"
    ties = ""
    if row.near_ties:
        ulps = [abs(d["logit_gap"]) / d["ulp"] for d in row.divergences
                if d.get("verdict", "near-tie") == "near-tie" and d.get("ulp")]
        gap = f", gap ≤ {max(ulps):.1f} ulp" if ulps else ""
        ties = f"{row.near_ties} near-tie flip{'s' if row.near_ties > 1 else ''}{gap}"
    if row.real_mismatches:
        return f"**MISMATCH {row.real_mismatches}/{row.checked}**" + (f" (+{ties})" if ties
                                                                      else "")
    if row.near_ties:
        return f"≈ {row.checked - row.near_ties}/{row.checked} ({ties})"
    return f"✓ {row.checked}/{row.checked}"


WIDE = 3  # more categories than this: MAT per category goes into its own table


def mat_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """MAT per category (the main table keeps only the speedups when it would be wide)."""
    header = ["method", *summary.domains, OVERALL]
    body = [[row.label, *(_fmt(row.cells[d].mat if d in row.cells else None)
                          for d in [*summary.domains, OVERALL])]
            for row in summary.rows]
    return header, body


def table_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and body of the main table (shared by markdown and rich): speedup and MAT per
    category, or (over ``WIDE`` categories) speedup per category and overall MAT."""
    wide = len(summary.domains) > WIDE
    if wide:
        body = []
        header = ["method", *(f"{d} ×" for d in summary.domains), "overall ×", "overall MAT",
                  "decode ×", "tok/s", "lossless"]
        for row in summary.rows:
            overall = row.cells.get(OVERALL)
            body.append([row.label,
                         *(_fmt(summary.speedup(row, d), ".2f", "×")
                           for d in [*summary.domains, OVERALL]),
                         _fmt(overall.mat if overall else None),
                         _fmt(summary.decode_speedup(row), ".2f", "×"),
                         _fmt(overall.tokens_per_second if overall else None, ".2f"),
                         _lossless(summary, row)])
        return header, body
    header = ["method"]
    for d in [*summary.domains, OVERALL]:
        header += [f"{d} ×", f"{d} MAT"]
    header += ["decode ×", "tok/s", "lossless"]
    body = []
    for row in summary.rows:
        line = [row.label]
        for d in [*summary.domains, OVERALL]:
            cell = row.cells.get(d)
            line += [_fmt(summary.speedup(row, d), ".2f", "×"),
                     _fmt(cell.mat if cell else None)]
        overall = row.cells.get(OVERALL)
        line += [_fmt(summary.decode_speedup(row), ".2f", "×"),
                 _fmt(overall.tokens_per_second if overall else None, ".2f"),
                 _lossless(summary, row)]
        body.append(line)
    return header, body


def overhead_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    header = ["learner", "rounds", "policy ms/round", "scoring ms/round", "target step ms",
              "policy % of step", "scoring % of step", "drafter share"]
    body = []
    for row in summary.rows:
        if row.kind != "policy":
            continue
        step = row.verify_ms
        pct = [None if x is None or not step else 100 * x / step
               for x in (row.policy_ms, row.scoring_ms)]
        share = ", ".join(f"{k} {v:.0%}" for k, v in
                          sorted(row.share.items(), key=lambda kv: -kv[1]) if v >= 0.005)
        body.append([row.label, str(row.rounds), _fmt(row.policy_ms, ".3f"),
                     _fmt(row.scoring_ms, ".1f"), _fmt(row.verify_ms, ".1f"),
                     _fmt(pct[0], ".2f", "%"), _fmt(pct[1], ".1f", "%"),
                     share])
    return header, body


def goal_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    header = ["goal", "measured", "target", "met"]
    body = [[g.name, _fmt(g.value, ".3f"), f"{'≤' if g.at_most else '≥'} {g.target:g}",
             "–" if g.met is None else ("yes" if g.met else "**no**")] for g in summary.goals]
    return header, body


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    aligns = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def describe_run(summary: Summary) -> str:
    """One paragraph: what ran, on what, when."""
    meta, cfg = summary.meta, summary.meta.get("config", {})
    machine = meta.get("machine", {})
    per_domain = Counter(q["category"] for q in meta.get("queries", [])) or Counter(
        meta.get("categories") or {})
    prompts = ", ".join(f"{n} {d}" for d, n in per_domain.items())
    learners = ("reset per query" if cfg.get("reset_per_query")
                else "persistent across the stream")
    mode = ("greedy" if not summary.sampling else f"sampling at temperature "
            f"{cfg.get('temperature')}")
    on_llama = (machine.get("drafter_backend") == "llama.cpp"
                and machine.get("backend") != "llama.cpp")
    drafter_on = (f" on llama.cpp (llama-cpp-python {machine.get('llama_cpp_python')}, "
                  f"{machine.get('llama_threads')} threads)" if on_llama else "")
    if cfg.get("drafter_context_window"):
        drafter_on += f", context window {cfg['drafter_context_window']} tokens"
    if cfg.get("draft_confidence_threshold"):
        drafter_on += f", drafts end below confidence {cfg['draft_confidence_threshold']}"
    return (
        f"Target `{meta.get('model_id')}`, drafter model `{meta.get('drafter_model')}`"
        f"{drafter_on}; pool "
        f"{', '.join('`' + p + '`' for p in meta.get('pool', []))}; k = "
        f"{cfg.get('k_choices') or cfg.get('num_speculative_tokens')}"
        f"{' (single drafters at ' + str(cfg['single_ks']) + ')' if cfg.get('single_ks') else ''}"
        f"; full-information loss {cfg.get('loss', 'length')}, score rate "
        f"{cfg.get('score_rate', 1.0)}; {mode}, batch 1; {prompts} prompts "
        f"({cfg.get('order')} stream), at most {cfg.get('max_new_tokens')} new tokens each; "
        f"learners {learners}. "
        f"Machine: {machine.get('cpu') + ', ' if machine.get('cpu') else ''}"
        f"{machine.get('cpu_count')} CPU cores, {machine.get('device')}, "
        f"{machine.get('dtype')}, exact mode "
        f"{'on' if cfg.get('exact') else 'off'}, torch {machine.get('torch')} with "
        f"{machine.get('torch_threads')} threads, transformers {machine.get('transformers')}. "
        f"Date: {meta.get('date')}."
    )


def exact_cost_lines(summary: Summary) -> list[str]:
    """Exact mode's speed cost, from each ``fast:`` twin (the same method with exact mode off
    in the same run): 1 - exact tok/s / fast tok/s."""
    lines = []
    for row in summary.rows:
        if not row.method.startswith(FAST_PREFIX):
            continue
        twin = summary.row(row.method.removeprefix(FAST_PREFIX))
        fast, exact = row.cells.get(OVERALL), twin.cells.get(OVERALL) if twin else None
        if twin is None or fast is None or exact is None or fast.tokens_per_second <= 0:
            continue
        cost = 1.0 - exact.tokens_per_second / fast.tokens_per_second
        lines.append(f"- {twin.label}: {exact.tokens_per_second:.2f} tok/s in exact mode, "
                     f"{fast.tokens_per_second:.2f} with it off: exact mode costs "
                     f"{100 * cost:.1f}%")
    return ["**Exact mode's cost** (same run, same prompts):", "", *lines, ""] if lines else []


def render_markdown(summary: Summary) -> str:
    """The results page: main table, learner overheads, goal ratios."""
    parts = ["# specmux bench results", ""]
    if summary.meta.get("command"):
        parts += [f"`{summary.meta['command']}`", ""]
    parts += [describe_run(summary), ""]
    parts += ["Speedup (×) is wall clock over target-only decoding on the same prompts, "
              "prefill included, per domain and over the whole mixed stream (overall); MAT is "
              "mean accepted tokens per target call (bonus included); decode × is the overall "
              "speedup after each query's first target call (which carries the prefill); tok/s "
              "is overall output tokens per second.", ""]
    parts += [_markdown_table(*table_rows(summary)), ""]
    if len(summary.domains) > WIDE:
        parts += ["## MAT per category", "", _markdown_table(*mat_rows(summary)), ""]
    parts += exact_cost_lines(summary)
    mismatched = [r for r in summary.rows if r.mismatches]
    if mismatched:
        failed = [r.label for r in mismatched if r.real_mismatches]
        head = (f"**LOSSLESS CHECK FAILED** for: {', '.join(failed)}." if failed else
                "Lossless up to near-ties: every difference is a rounding flip outside exact "
                "mode.")
        parts += [f"{head} Where each output left target-only, with the target's logit gap "
                  "between its own token and the method's, recomputed one token at a time. "
                  "Verdicts: *near-tie* = outside exact mode, a gap within 2 ulp of the "
                  "logits' precision, or a verification-sized pass over the same position "
                  "that prefers the method's token (a one-token step and a verification pass "
                  "round differently); *mismatch* = a larger gap that no pass size reproduces, "
                  "or any difference in exact mode, where both passes compute a position "
                  "bitwise alike:", ""]
        for r in mismatched:
            for d in r.divergences:
                gap = d.get("logit_gap")
                verdict = d.get("verdict") or ("near-tie" if d.get("near_tie") else "mismatch")
                detail = ("" if gap is None else f", logit gap {gap:.4f} = "
                          f"{abs(gap) / d['ulp']:.1f} ulp") + (
                    "" if d.get("batched_gap") is None
                    else f", in a verification-sized pass {d['batched_gap']:.4f}") + (
                    f": **{verdict}**")
                parts.append(f"- {r.label}, `{d['question_id']}`: token {d.get('index')}, "
                             f"target-only {d.get('reference_token')} vs "
                             f"{d.get('method_token')}{detail}")
        parts.append("")
    if summary.outliers:
        parts += ["**Timing outliers** (target step over twice the method's median; the "
                  "machine was busy, so these runs' times, and the speedups built on them, "
                  "are distorted):", ""]
        parts += [f"- {label(o['method'], summary.meta)}, `{o['question_id']}`: "
                  f"{o['step_ms']:.0f} ms per target step against a median of "
                  f"{o['median_ms']:.0f} ms" for o in summary.outliers]
        parts.append("")
    header, body = overhead_rows(summary)
    if body:
        parts += ["## Learner overhead", "", _markdown_table(header, body), ""]
    header, body = summary.regret
    if body and summary.domains:
        parts += ["## Regret per category", "",
                  "Extra target calls per 100 output tokens against the per-query oracle "
                  "(the single drafter with the best MAT on each query, in hindsight); the "
                  "best fixed drafter is the last row.", "",
                  _markdown_table(header, body), ""]
    header, body = goal_rows(summary)
    parts += ["## Goals", "", _markdown_table(header, body), ""]
    return "\n".join(parts)


def render_rich(summary: Summary) -> list[Table]:
    """The same tables for the terminal."""
    tables = []
    header, body = table_rows(summary)
    t = Table(title="speedup over target-only (×) and MAT per domain", title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row, cells in zip(summary.rows, body, strict=True):
        style = "bold red" if row.real_mismatches else ("bold" if row.kind == "policy" else None)
        t.add_row(*[c.replace("**", "") for c in cells], style=style)
    tables.append(t)
    header, body = overhead_rows(summary)
    if body:
        t = Table(title="learner overhead", title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i in (0, len(header) - 1) else "right")
        for cells in body:
            t.add_row(*cells)
        tables.append(t)
    header, body = goal_rows(summary)
    t = Table(title="goals", title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for cells in body:
        t.add_row(*[c.replace("**", "") for c in cells])
    tables.append(t)
    return tables

