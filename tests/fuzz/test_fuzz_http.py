"""Fuzz (a): request bodies and headers of every endpoint, through the real app.

A tiny model behind the whole app (middleware, parsing, validation, tokenizer, the model
thread); ``max_tokens_limit=8`` keeps every accepted generation short.  Whatever is sent,
the answer is never a 5xx, always well-formed (an OpenAI error JSON for a 4xx, SSE ending in
``data: [DONE]`` for a stream) and comes within a few seconds (no hang).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st
from starlette.testclient import TestClient
from tiny_server import tiny_pipeline

from specmux.server import create_app

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
         "/v1/nothing", "/"]
MAX_SECONDS = 10.0  # per request; a hang fails the case

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
small_text = st.text(alphabet="abc xyz()=:\n", max_size=12) | st.text(max_size=6)

def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (hypothesis favours the ends of a range, not the
    middle, so the rare value sits in the middle)."""
    return st.integers(0, 10 * n).map(lambda i: i % n == n // 2)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` 7 times in 8, any JSON value otherwise."""
    return one_in(8).flatmap(lambda rare: json_values if rare else valid)


def rarely(common: list[Any], rare: list[Any]) -> st.SearchStrategy[Any]:
    """One of ``common`` about 7 times in 8, one of ``rare`` otherwise."""
    return one_in(8).flatmap(lambda r: st.sampled_from(rare if r else common))


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": mostly(rarely(["tiny"], ["other"])),
    "max_tokens": mostly(st.integers(1, 8) | st.integers(-1, 12)),
    "max_completion_tokens": mostly(st.integers(1, 8) | st.integers(-1, 12)),
    "temperature": mostly(rarely([0, 0.0, 0.7, 1, 2.5], [-1])),
    "top_p": mostly(st.floats(0.05, 1.0) | st.floats(-0.1, 1.2)),
    "top_k": mostly(st.integers(-1, 60)),
    "seed": mostly(st.sampled_from([0, 7, -1, 2**63, -(2**63), 2**64 - 1, 2**64])),
    "stop": mostly(small_text | st.lists(small_text, max_size=3) | st.lists(small_text,
                                                                            max_size=18)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": mostly(rarely([1], [0, 2])),
    "echo": rarely([False], [True]), "logprobs": rarely([None], [2, True]),
    "best_of": rarely([None, 1], [0, 2]), "suffix": rarely([None, ""], ["x"]),
    "user": json_values,
}
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"])},
                                       optional={"text": small_text}), max_size=3)
messages = mostly(st.lists(min_size=1, elements=st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant", "tool", "robot"]))},
    optional={"content": mostly(small_text | st.none() | parts)}), max_size=4))
some_text = st.text(alphabet="abc xyz()=:\n", min_size=1, max_size=12) | st.text(max_size=6)
prompts = mostly(some_text | st.lists(st.integers(-1, 48), min_size=1, max_size=8) | st.lists(
    some_text, min_size=1, max_size=2) | st.lists(st.lists(st.integers(0, 47), min_size=1,
                                                           max_size=5), max_size=2))


@st.composite
def request_body(draw: st.DrawFn, path: str) -> bytes:
    kind = draw(one_in(10).flatmap(lambda rare: st.sampled_from(["json", "raw"]) if rare
                                   else st.just("structured")))
    if kind == "raw":
        return draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=5))
    body = {k: draw(FIELDS[k]) for k in keys}
    if draw(one_in(10)) != (path == "/v1/completions"):
        body["prompt"] = draw(prompts)
    if draw(one_in(10)) != (path == "/v1/chat/completions"):
        body["messages"] = draw(messages)
    text = json.dumps(body)
    if draw(one_in(20)):  # the non-JSON numbers Python's json reads
        text = text.replace("0.7", "NaN").replace("2.5", "Infinity")
    return text.encode()


CONTENT_TYPES = one_in(10).flatmap(lambda rare: st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz/;=+- ", max_size=30) | st.sampled_from(
    ["application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded",
     "application/vnd.api+json", "", "multipart/form-data"]) if rare else st.just(
    "application/json"))
HEADERS = st.fixed_dictionaries({"content-type": CONTENT_TYPES}, optional={
    "accept": st.sampled_from(["*/*", "text/event-stream", "application/json"]),
    "authorization": st.text(alphabet="abcdefXYZ0123 .-_", max_size=20),
    "content-length": rarely([""], ["abc", "-1", "99999999"]),  # "" = not sent
}).map(lambda h: {k: v for k, v in h.items() if v != "" or k == "content-type"})


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = create_app(tiny_pipeline(), model_name="tiny", max_tokens_limit=8,
                     max_body_bytes=4096, max_queue=4)
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


def check_answer(method: str, path: str, r: Any, seconds: float) -> None:
    event(f"{path if path in PATHS else 'other'} -> {r.status_code}")
    if r.status_code == 400 and "error" in r.text:
        event("400: " + str(r.json()["error"]["message"])[:40])
    assert seconds < MAX_SECONDS, f"{method} {path} took {seconds:.1f} s"
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
    ctype = r.headers.get("content-type", "")
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if r.status_code == 429:
            assert r.headers["retry-after"]
    elif ctype.startswith("text/event-stream"):
        lines = [line for line in r.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]", r.text[-300:]
        for line in lines[:-1]:
            json.loads(line.removeprefix("data: "))
    elif path != "/metrics":
        json.loads(r.text)


@fuzz_settings(1000)
@given(data=st.data(), path=rarely(PATHS[:2], PATHS[2:]), headers=HEADERS)
def test_fuzz_post_bodies_and_headers(client: TestClient, data: st.DataObject, path: str,
                                      headers: dict[str, str]) -> None:
    body = data.draw(request_body(path))
    start = time.monotonic()
    r = client.post(path, content=body, headers=headers)
    check_answer("POST", path, r, time.monotonic() - start)


@fuzz_settings(200)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(PATHS) | st.text(alphabet="/abcv1%?&=", max_size=16).map(
           lambda p: "/" + p.lstrip("/")), headers=HEADERS)
def test_fuzz_other_methods_and_paths(client: TestClient, method: str, path: str,
                                      headers: dict[str, str]) -> None:
    start = time.monotonic()
    r = client.request(method, path, headers=headers)
    if method == "HEAD":
        assert r.status_code < 500
        return
    check_answer(method, path, r, time.monotonic() - start)
