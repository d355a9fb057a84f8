"""specmux.bench.datasets: domain splits from the shipped data packages, mixing, synthetic data."""

from __future__ import annotations

import pytest

from specmux.bench import datasets
from specmux.bench.categories import EDITS, edit_request
from specmux.bench.datasets import DomainSplit, Example, load_domain, mixed_stream, synthetic_splits
from specmux.errors import ConfigError

N = 6


@pytest.fixture(scope="module")
def splits() -> dict[str, DomainSplit]:
    return datasets.load_domains(["code", "math", "chat"], num_eval=N, seed=0)


@pytest.mark.parametrize("domain", ["code", "math", "chat"])
def test_domain_shape(splits: dict[str, DomainSplit], domain: str) -> None:
    split = splits[domain]
    assert split.domain == domain
    assert len(split.eval) == N
    assert len({ex.id for ex in split.eval}) == N
    assert all(isinstance(ex, Example) and ex.domain == domain for ex in split.eval)
    assert all(ex.prompt.strip() and ex.reference for ex in split.eval)
    assert all(ex.chat == (domain != "code") for ex in split.eval)
    assert split.corpus and all(isinstance(t, str) and t for t in split.corpus)
    assert 0 < split.corpus_chars <= datasets.DEFAULT_MAX_CORPUS_CHARS


def test_code_split_is_disjoint(splits: dict[str, DomainSplit]) -> None:
    split = splits["code"]
    # The rest of HumanEval, less code_edit's reserved pool.
    assert len(split.eval) + len(split.corpus) == 164 - datasets.CODE_EDIT_RESERVE
    assert all(ex.id.startswith("HumanEval/") for ex in split.eval)
    for ex in split.eval:
        assert not any(text.startswith(ex.prompt) for text in split.corpus)


def test_math_split_is_disjoint_and_mixed(splits: dict[str, DomainSplit]) -> None:
    split = splits["math"]
    sources = [ex.id.split("/")[0] for ex in split.eval]
    assert sources.count("gsm_symbolic") == N - N // 2 and sources.count("champ") == N // 2
    corpus_heads = {text.split("\n", 1)[0] for text in split.corpus}
    assert not any(ex.prompt in corpus_heads for ex in split.eval)
    assert any("####" in t for t in split.corpus) and any("Answer:" in t for t in split.corpus)


def test_chat_split_is_disjoint(splits: dict[str, DomainSplit]) -> None:
    split = splits["chat"]
    assert all(len(ex.prompt) <= datasets.CHAT_MAX_PROMPT_CHARS for ex in split.eval)
    corpus = set(split.corpus)
    assert not any(ex.reference in corpus for ex in split.eval)


def test_deterministic_in_seed(splits: dict[str, DomainSplit]) -> None:
    for domain in ("code", "math", "chat"):
        assert load_domain(domain, num_eval=N, seed=0) == splits[domain]
        other = load_domain(domain, num_eval=N, seed=1)
        assert [ex.id for ex in other.eval] != [ex.id for ex in splits[domain].eval]


def test_corpus_cap() -> None:
    split = load_domain("chat", num_eval=2, max_corpus_chars=10_000)
    assert 0 < split.corpus_chars <= 10_000
    assert load_domain("code", num_eval=2, max_corpus_chars=0).corpus == []


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown category"):
        load_domain("poetry", num_eval=1)
    with pytest.raises(ConfigError, match=r"\[0, 164\]"):
        load_domain("code", num_eval=165)
    with pytest.raises(ConfigError):
        load_domain("code", num_eval=-1)


def test_missing_package_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    datasets._humaneval.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r'pip install -e "\.\[data\]"'):
            load_domain("code", num_eval=1)
        with pytest.raises(ConfigError, match="reasoning-gym"):
            datasets._gsm_symbolic(1, 0)
    finally:
        datasets._humaneval.cache_clear()


def _ids(stream: list[Example]) -> list[str]:
    return [ex.id for ex in stream]


def test_mixed_stream_orders() -> None:
    s = synthetic_splits(["code", "math"], num_eval=3, corpus_size=2)
    s["chat"] = synthetic_splits(["chat"], num_eval=1, corpus_size=2)["chat"]
    code, math, chat = (_ids(s[d].eval) for d in ("code", "math", "chat"))

    inter = mixed_stream(s)
    assert _ids(inter) == [code[0], math[0], chat[0], code[1], math[1], code[2], math[2]]
    assert _ids(mixed_stream(s, order="blocks")) == code + math + chat

    shuffled = mixed_stream(s, order="shuffle", seed=3)
    assert sorted(_ids(shuffled)) == sorted(code + math + chat)
    assert mixed_stream(s, order="shuffle", seed=3) == shuffled
    assert mixed_stream({}, order="interleave") == []
    with pytest.raises(ConfigError, match="unknown order"):
        mixed_stream(s, order="random")


def test_synthetic_splits() -> None:
    s = synthetic_splits(num_eval=4, corpus_size=8, seed=0)
    assert list(s) == list(datasets.ALL_CATEGORIES)
    assert s == synthetic_splits(num_eval=4, corpus_size=8, seed=0)
    assert s != synthetic_splits(num_eval=4, corpus_size=8, seed=1)
    for domain, split in s.items():
        assert len(split.eval) == 4 and len(split.corpus) == 8
        assert all(ex.domain == domain and ex.reference for ex in split.eval)
        assert not any(ex.prompt + "\n" + ex.reference in split.corpus for ex in split.eval)
        assert not any(ex.prompt + (ex.reference or "") in split.corpus for ex in split.eval)
    assert s["multiturn"].eval[0].messages[-1] == ("user", s["multiturn"].eval[0].prompt)
    assert not s["code"].eval[0].chat and s["math"].eval[0].chat
    with pytest.raises(ConfigError):
        synthetic_splits(["poetry"])


# ---------------------------------------------------------------- the new categories


@pytest.fixture(scope="module")
def new_splits() -> dict[str, DomainSplit]:
    return datasets.load_domains(["code", "code_edit", "chat", "multiturn", "summarize", "rag"],
                                 num_eval=N, seed=0, max_corpus_chars=200_000)


def test_code_edit_prompts_copy_a_function(new_splits: dict[str, DomainSplit]) -> None:
    import ast

    split = new_splits["code_edit"]
    kinds = [ex.id.rsplit("/", 1)[1] for ex in split.eval]
    assert set(kinds) == set(EDITS)  # the edits rotate
    code_ids = {ex.id for ex in new_splits["code"].eval}
    for ex in split.eval:
        problem = ex.id.rsplit("/", 1)[0]
        assert problem not in code_ids  # disjoint from the code category's prompts
        assert ex.chat and "```python" in ex.prompt
        shown = ex.prompt.split("```python\n", 1)[1].rsplit("```", 1)[0]
        ast.parse(shown)  # the code shown is valid Python
        assert not any(t.startswith(ex.reference[:200]) for t in split.corpus)
        assert not any(t.startswith(ex.reference[:200]) for t in new_splits["code"].corpus)
    bug = next(ex for ex in split.eval if ex.id.endswith("/bugfix"))
    assert bug.reference not in bug.prompt  # a bug was planted


def test_edit_request_kinds() -> None:
    code = ("def f(xs, n):\n    total = 0\n    for x in xs:\n        total += x\n"
            "    return total < n\n")
    instr, shown = edit_request(code, "f", "rename", 0)
    assert "`xs`" in instr and shown == code
    instr, shown = edit_request(code, "f", "bugfix", 0)
    assert shown != code and "bug" in instr
    assert edit_request("def g(a):\n    return a\n", "g", "loop", 0) is None
    instr, shown = edit_request('def f(a: int, *r: str) -> int:\n    """Doc."""\n    return a\n',
                                "f", "hints", 0)
    assert "type hints" in instr and "int" not in shown and "str" not in shown
    assert '"""Doc."""' in shown and "return a" in shown  # the rest is copied as it was


def test_sharegpt_categories_are_disjoint(new_splits: dict[str, DomainSplit]) -> None:
    convs = {}
    for cat in ("chat", "multiturn", "summarize", "rag"):
        split = new_splits[cat]
        assert len(split.eval) == N and split.corpus
        for ex in split.eval:
            conv = datasets._conversation_id(ex.id)
            assert conv not in convs, (cat, convs.get(conv))
            convs[conv] = cat
        corpus = set(split.corpus)
        assert not any(ex.reference.strip() in corpus or ex.reference in corpus
                       for ex in split.eval)
    for ex in new_splits["multiturn"].eval:
        roles = [r for r, _ in ex.messages]
        assert roles[-1] == "user" and roles.count("user") >= 2 and "assistant" in roles
    for ex in new_splits["summarize"].eval:
        assert 800 <= len(ex.prompt) <= 3000
    for ex in new_splits["rag"].eval:
        assert ex.prompt.count("Document ") == 3 and ex.reference in ex.prompt


def test_chat_eval_set_unchanged_by_new_categories(new_splits) -> None:
    alone = load_domain("chat", num_eval=N, seed=0)
    assert [ex.id for ex in alone.eval] == [ex.id for ex in new_splits["chat"].eval]
