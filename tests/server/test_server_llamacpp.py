"""``specmux serve --backend llama.cpp``: a real uvicorn over tiny GGUFs answers like
``Pipeline.generate``, bad requests get 4xx, a bad GGUF stops ``serve`` with exit 2."""

from __future__ import annotations

import re

import httpx
import pytest
from tiny_server import LiveServer
from typer.testing import CliRunner

from specmux.api import Pipeline
from specmux.cli import app
from specmux.server import create_app

from conftest import tiny_lm
from gguf_helpers import write_gguf
from helpers import tiny_tokenizer

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-gguf")
    return (write_gguf(tiny_lm(0, hidden=48), d / "target.gguf"),
            write_gguf(tiny_lm(1, hidden=32, layers=1), d / "drafter.gguf"))


def _pipeline(ggufs) -> Pipeline:
    target, drafter = ggufs
    return Pipeline(str(target), [str(drafter), "ngram"], "hedge", backend="llama.cpp",
                    threads=1, tokenizer=tiny_tokenizer())


def test_llamacpp_server_answers_like_the_pipeline(ggufs) -> None:
    reference = _pipeline(ggufs).generate("def add(a, b):", max_new_tokens=16).text
    with LiveServer(create_app(_pipeline(ggufs), model_name="tiny")) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference
        bad = httpx.post(f"{srv.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": [3, 4, 999], "max_tokens": 4})
        assert 400 <= bad.status_code < 500, bad.text
        assert bad.json()["error"]["message"]
        ok = httpx.post(f"{srv.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "abc", "max_tokens": 4})
        assert ok.status_code == 200  # still serving


def test_serve_with_a_truncated_gguf_exits_2(ggufs, tmp_path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ggufs[0].read_bytes()[:3000])
    res = CliRunner().invoke(app, ["serve", "--backend", "llama.cpp", "--target", str(cut),
                                   "--drafter", "ngram", "--no-install", "--port", "0"])
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.output)
    assert res.exit_code == 2 and text.strip().startswith("error:") and "cannot load" in text
