"""The OpenAI-compatible server against a REAL uvicorn on 127.0.0.1, with tiny models.

Clients: the official ``openai`` package, and raw ``httpx`` for malformed requests, load and
disconnects.  Greedy output must equal ``Pipeline.generate`` and ``specmux generate``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_server import LiveServer, save_tiny_models, tiny_pipeline
from typer.testing import CliRunner

from specmux.api import Pipeline
from specmux.server import create_app
from specmux.server.worker import STATE_FILE, LearnerStore

MODEL = "tiny"
PROMPTS = ["def add(a, b):", "hello world", "x = (1 + 2) * 3", "abc abc abc"]
LAUNCHER = Path(__file__).with_name("launch_tiny.py")


# -- fixtures --------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LiveServer:
    app = create_app(tiny_pipeline(), model_name=MODEL,
                     state_dir=tmp_path_factory.mktemp("state"), max_queue=16,
                     max_prompt_tokens=200, max_tokens_limit=256, max_body_bytes=64 * 1024,
                     save_every=5)
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def slow_server() -> LiveServer:
    """No stop tokens (generations run to max_tokens) and a queue of 2: for 429 / cancel."""
    app = create_app(tiny_pipeline(eos_token_ids=()), model_name=MODEL, max_queue=2)
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference() -> Pipeline:
    """A separate pipeline over separate copies of the same weights."""
    return tiny_pipeline()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


_expected: dict[tuple[Any, ...], tuple[str, str]] = {}


def expected(reference: Pipeline, prompt: str | None = None, max_tokens: int = 16,
             messages: list[dict[str, str]] | None = None) -> tuple[str, str]:
    """(text, finish_reason) of greedy generation by the reference pipeline."""
    key = (prompt, max_tokens, json.dumps(messages))
    if key not in _expected:
        if messages is None:
            out = reference.generate(prompt, max_new_tokens=max_tokens)
            _expected[key] = (out.text, out.finish_reason)
        else:
            ids = reference.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            out = reference.decoder.generate(list(ids), max_tokens)
            _expected[key] = (reference.decode(out.token_ids), out.finish_reason)
    return _expected[key]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client: {(sample name, labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def sse_text(lines: list[str], chat: bool) -> tuple[str, dict[str, Any]]:
    """Concatenated text and the final chunk of an SSE body (lines without blanks)."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(line.startswith("data: ") for line in lines)
    key = "delta" if chat else None
    text = "".join((c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"]
                   for c in chunks if c["choices"])
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    return text, final


SPEC_KEYS = {"num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length",
             "acceptance_rate", "drafter_share", "num_accepted_tokens_per_pos"}


def check_spec_decode(spec: dict[str, Any], num_tokens: int) -> None:
    assert set(spec) >= SPEC_KEYS, spec
    assert 1 <= spec["num_drafts"] <= num_tokens
    assert spec["mean_acceptance_length"] == pytest.approx(
        1 + spec["num_accepted_tokens"] / spec["num_drafts"], abs=1e-5)
    if spec["num_draft_tokens"]:
        assert spec["acceptance_rate"] == pytest.approx(
            spec["num_accepted_tokens"] / spec["num_draft_tokens"], abs=1e-5)
    assert sum(spec["drafter_share"].values()) == pytest.approx(1.0, abs=1e-4)


# -- endpoints, equality with Pipeline.generate ---------------------------------------------


def test_models_and_health(server: LiveServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completions_equal_pipeline_generate(client: openai.OpenAI, reference: Pipeline) -> None:
    for prompt in PROMPTS:
        text, reason = expected(reference, prompt, 24)
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                        temperature=0)
        assert out.choices[0].text == text
        assert out.choices[0].finish_reason == reason
        assert out.usage.prompt_tokens == len(reference.encode(prompt))
        check_spec_decode(out.model_extra["spec_decode"], out.usage.completion_tokens)


def test_chat_uses_template_for_all_messages(client: openai.OpenAI, reference: Pipeline) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "add 2 and 3"},
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": "now 4 and 4"}]
    text, reason = expected(reference, max_tokens=20, messages=messages)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                         temperature=0)
    assert out.choices[0].message.content == text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == reason
    check_spec_decode(out.model_extra["spec_decode"], out.usage.completion_tokens)
    # One user message: exactly Pipeline.generate(chat=True).
    single = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=20,
        temperature=0)
    assert single.choices[0].message.content == reference.generate(
        "hello world", max_new_tokens=20, chat=True).text


def test_streaming_equals_non_streaming(client: openai.OpenAI, reference: Pipeline) -> None:
    prompt = PROMPTS[0]
    text, reason = expected(reference, prompt, 24)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    check_spec_decode(chunks[-1].model_extra["spec_decode"], 24)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "hello world"}]
    chat_text, _ = expected(reference, max_tokens=20, messages=messages)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert "spec_decode" in chunks[-1].model_extra


def test_raw_sse_format(server: LiveServer, reference: Pipeline) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    text, final = sse_text([ln for ln in raw.split("\n") if ln], chat=False)
    assert text == expected(reference, PROMPTS[1], 16)[0]
    check_spec_decode(final["spec_decode"], 16)


def test_stop_strings_trim_and_finish_with_stop(client: openai.OpenAI,
                                                reference: Pipeline) -> None:
    prompt = PROMPTS[0]
    full, _ = expected(reference, prompt, 24)
    stop = full[6:8]
    assert len(stop) == 2
    want = full[: full.find(stop)]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                    stop=[stop, "never-there"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_parameters_are_accepted(client: openai.OpenAI) -> None:
    # Seeded sampling is exact in distribution but not reproducible across requests: the
    # shared learner's drafter choice changes which random numbers verification draws.
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16,
                                    temperature=0.8, top_p=0.9, seed=1234,
                                    extra_body={"top_k": 20})
    assert out.choices[0].finish_reason in ("stop", "length")
    assert 1 <= out.usage.completion_tokens <= 16
    check_spec_decode(out.model_extra["spec_decode"], 16)


def test_server_equals_cli_generate(client: openai.OpenAI, tmp_path: Path) -> None:
    from specmux.cli import app as cli

    target, _ = save_tiny_models(tmp_path)
    prompt = PROMPTS[2]
    result = CliRunner().invoke(cli, ["generate", "--target", str(target), "--drafter", "ngram",
                                      "--policy", "fixed", "--prompt", prompt,
                                      "--max-new-tokens", "24", "--no-install"])
    assert result.exit_code == 0, result.output
    served = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                       temperature=0).choices[0].text
    assert result.output.startswith(served + "\n")


def test_serve_cli_documents_options_and_rejects_bad_ones() -> None:
    from specmux.cli import app as cli

    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    for option in ["--target", "--drafter", "--policy", "--host", "--port", "--state-dir",
                   "--num-speculative-tokens", "--max-queue", "--reset-per-query",
                   "--max-prompt-tokens", "--max-tokens-limit", "--max-body-bytes"]:
        assert option in text, option
    for bad, message in [(["--policy", "bandit"], "unknown policy"),
                         (["-k", "0"], "must be >= 1"), (["--max-queue", "0"], "--max-queue")]:
        result = runner.invoke(cli, ["serve", "--drafter", "ngram", *bad])
        assert result.exit_code == 2 and message in result.output, result.output


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_parse_and_move(server: LiveServer, client: openai.OpenAI) -> None:
    before = scrape(server.url)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16,
                                    temperature=0)
    spec = out.model_extra["spec_decode"]
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("specmux:spec_decode_num_drafts_total") == spec["num_drafts"]
    assert delta("specmux:spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"]
    assert delta("specmux:spec_decode_num_accepted_tokens_total") == spec["num_accepted_tokens"]
    per_pos = [delta("specmux:spec_decode_num_accepted_tokens_per_pos_total", position=str(j))
               for j in range(4)]
    assert per_pos[: len(spec["num_accepted_tokens_per_pos"])] == \
        spec["num_accepted_tokens_per_pos"]
    for drafter, count in spec["drafter_selections"].items():
        assert delta("specmux:spec_decode_drafter_selections_total", drafter=drafter) == count
    weights = {dict(k[1])["arm"]: v for k, v in after.items() if k[0] == "specmux:learner_weight"}
    assert set(weights) == {"LlamaForCausalLM@k=4", "ngram@k=4"}
    assert sum(weights.values()) == pytest.approx(1.0)
    reason = out.choices[0].finish_reason
    assert delta("specmux:request_success_total", finished_reason=reason) == 1
    assert delta("specmux:http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("specmux:generation_tokens_total") == out.usage.completion_tokens
    assert delta("specmux:e2e_request_latency_seconds_count") == 1


# -- bad requests ----------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, str | dict[str, Any], int, str | None]] = [
    # (name, path, body (str = raw bytes), status, param)
    ("malformed json", "/v1/completions", '{"prompt": "a",', 400, None),
    ("not an object", "/v1/completions", "[1, 2]", 400, None),
    ("empty body", "/v1/completions", "", 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400,
     "max_tokens"),
    ("max_tokens as string", "/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400,
     "max_tokens"),
    ("max_tokens over limit", "/v1/completions", {"prompt": "a", "max_tokens": 10_000}, 400,
     "max_tokens"),
    ("temperature string", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400,
     "temperature"),
    ("negative temperature", "/v1/completions", {"prompt": "a", "temperature": -0.5}, 400,
     "temperature"),
    ("NaN temperature", "/v1/completions", '{"prompt": "a", "temperature": NaN}', 400,
     "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("stream not bool", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("stop not strings", "/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop"),
    ("seed too large", "/v1/completions", {"prompt": "a", "seed": 2**70}, 400, "seed"),
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("prompt missing", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty token prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [3, 999]}, 400, "prompt"),
    ("batched prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("over-long prompt", "/v1/completions", {"prompt": "ab" * 150}, 400, "prompt"),
    ("n > 1", "/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
    ("logprobs", "/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("body too large", "/v1/completions", {"prompt": "a" * 70_000}, 413, None),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages missing", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard",
                                                             "content": "hi"}]}, 400,
     "messages"),
    ("content wrong type", "/v1/chat/completions", {"messages": [{"role": "user",
                                                                  "content": 7}]}, 400,
     "messages"),
    ("image content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages"),
    ("over-long chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "ab" * 150}]}, 400, "messages"),
    ("chat unknown model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


def _post(url: str, path: str, body: str | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content,
                      headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server: LiveServer, name: str, path: str,
                                        body: str | dict[str, Any], status: int,
                                        param: str | None) -> None:
    r = _post(server.url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


def test_unknown_routes_and_methods(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/models")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_openai_client_sees_4xx_as_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=-3)


# -- concurrency: load, 429, disconnects ----------------------------------------------------


def test_load_200_requests_16_concurrent(server: LiveServer, reference: Pipeline) -> None:
    bad = [b for b in BAD_REQUESTS if b[3] < 413]
    jobs: list[tuple[str, Any, Any]] = []  # (path, body, expected text or status)
    for i in range(200):
        if i % 10 == 9:
            _, path, body, status, _ = bad[i // 10 % len(bad)]
            jobs.append((path, body, status))
            continue
        prompt = PROMPTS[i % len(PROMPTS)]
        chat, stream = (i // 4) % 2 == 1, (i // 8) % 2 == 1
        if chat:
            messages = [{"role": "user", "content": prompt}]
            body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
            want = expected(reference, max_tokens=6, messages=messages)[0]
        else:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            want = expected(reference, prompt, 6)[0]
        body["stream"] = stream
        jobs.append(("/v1/chat/completions" if chat else "/v1/completions", body, want))

    async def one(c: httpx.AsyncClient, sem: asyncio.Semaphore, path: str,
                  body: Any) -> tuple[int, Any]:
        content = body if isinstance(body, str) else json.dumps(body)
        async with sem:
            r = await c.post(path, content=content, headers={"content-type": "application/json"})
        if r.status_code != 200:
            return r.status_code, r.json()
        if isinstance(body, dict) and body.get("stream"):
            lines = [ln for ln in r.text.split("\n") if ln]
            return 200, sse_text(lines, chat="messages" in body)[0]
        data = r.json()
        choice = data["choices"][0]
        return 200, choice["message"]["content"] if "message" in choice else choice["text"]

    async def run() -> list[tuple[int, Any]]:
        sem = asyncio.Semaphore(16)
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(one(c, sem, p, b) for p, b, _ in jobs))

    start = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - start
    assert elapsed < 45, elapsed
    assert not [r for r in results if r[0] >= 500]
    for (path, body, want), (status, got) in zip(jobs, results, strict=True):
        if isinstance(want, int):
            assert status == want, (body, got)
            assert set(got["error"]) == {"message", "type", "param", "code"}
        else:
            assert status == 200, (path, body, got)
            assert got == want, (path, body)


def test_full_queue_gives_429_and_disconnect_cancels(slow_server: LiveServer) -> None:
    url = slow_server.url
    before = scrape(url)
    abort_key = ("specmux:request_success_total", (("finished_reason", "abort"),))
    tokens_key = ("specmux:generation_tokens_total", ())
    long_body = {"model": MODEL, "prompt": "abc", "max_tokens": 500, "temperature": 0,
                 "stream": True}  # ~1 s of work on an idle CPU
    short = {"model": MODEL, "prompt": "ab", "max_tokens": 2, "temperature": 0}

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            async with c.stream("POST", "/v1/completions", json=long_body) as long:
                assert long.status_code == 200
                lines = long.aiter_lines()
                while not (await anext(lines)).startswith("data: "):
                    pass  # the long generation is running now
                tasks = [asyncio.create_task(c.post("/v1/completions", json=short))
                         for _ in range(8)]
                # At most 2 can wait behind the long generation; the others are refused.
                for _ in range(500):
                    if sum(t.done() for t in tasks) >= 6:
                        break
                    await asyncio.sleep(0.01)
                # Leaving the block closes the connection mid-stream: a client disconnect,
                # which cancels the long generation and lets the queued requests run.
            replies = await asyncio.gather(*tasks)
            return [r.status_code for r in replies]

    codes = asyncio.run(run())
    assert set(codes) <= {200, 429} and codes.count(429) >= 5, codes
    assert wait_for(lambda: scrape(url).get(abort_key, 0) == before.get(abort_key, 0) + 1)
    # The abandoned 500-token generation stopped early, and the worker is free again.
    assert scrape(url)[tokens_key] - before.get(tokens_key, 0) < 400
    r = httpx.post(f"{url}/v1/completions", json=short, timeout=10)
    assert r.status_code == 200
    # A non-streaming client that gives up also cancels its generation.
    aborted = scrape(url)[abort_key]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={**long_body, "stream": False}, timeout=0.2)
    assert wait_for(lambda: scrape(url)[abort_key] == aborted + 1)
    r = httpx.post(f"{url}/v1/completions", json=short, timeout=10)
    assert r.status_code == 200


# -- learner state ----------------------------------------------------------------------------


def test_learner_state_saved_on_shutdown_and_restored(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    app = create_app(pipe, model_name=MODEL, state_dir=tmp_path, save_every=1000,
                     save_interval=1000)
    with LiveServer(app) as srv:
        for prompt in PROMPTS[:3]:
            assert _post(srv.url, "/v1/completions",
                         {"prompt": prompt, "max_tokens": 12, "temperature": 0}
                         ).status_code == 200
        assert not (tmp_path / STATE_FILE).exists()  # nothing periodic yet
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["requests"] == 3
    assert state["policy"] == json.loads(json.dumps(pipe.selector.policy.state_dict()))
    assert state["policy"]["num_losses"] > 0

    fresh = tiny_pipeline()
    with LiveServer(create_app(fresh, model_name=MODEL, state_dir=tmp_path)) as srv:
        restored = fresh.selector.policy
        assert restored.state_dict()["cumulative_loss"] == state["policy"]["cumulative_loss"]
        weights = scrape(srv.url)
        arms = [str(a) for a in fresh.selector.arms]
        for arm, p in zip(arms, restored.probabilities(), strict=True):
            assert weights[("specmux:learner_weight", (("arm", arm),))] == pytest.approx(p)
    assert not list(tmp_path.glob("*.corrupt-*"))


@pytest.mark.parametrize("content", ["{not json", '{"format": "something else"}',
                                     "MISMATCH"])
def test_bad_state_file_is_quarantined_not_fatal(tmp_path: Path, content: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / STATE_FILE
    if content == "MISMATCH":  # valid state of a different drafter pool
        other = tiny_pipeline(policy="hedge")
        other_store = LearnerStore(tmp_path, Pipeline(
            other.decoder.target.model, ["ngram"], "hedge", tokenizer=other.tokenizer))
        other_store.save()
    else:
        path.write_text(content)
    original = path.read_bytes()
    with caplog.at_level("WARNING"), LiveServer(create_app(
            tiny_pipeline(), model_name=MODEL, state_dir=tmp_path)) as srv:
        assert _post(srv.url, "/v1/completions", {"prompt": "ab", "max_tokens": 3}
                     ).status_code == 200
    aside = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == original
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["requests"] == 1  # fresh state saved at shutdown


# -- a server process killed with SIGKILL, restarted, then stopped with SIGTERM --------------


class ServerProcess:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.log = workdir / f"server-{time.monotonic_ns()}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(LAUNCHER), "--seed", "0", "--workdir", str(workdir), "--",
                 *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", self.log.read_text())
            if found:
                url = found.group(1)
                if wait_for(lambda u=url: _healthy(u), 30):
                    return url
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"server did not start:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigkill_mid_run_then_restart_keeps_valid_state(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_file = state_dir / STATE_FILE
    first = ServerProcess(tmp_path, "--state-dir", str(state_dir), "--save-every", "1")
    try:
        answers = [_post(first.url, "/v1/completions",
                         {"prompt": p, "max_tokens": 10, "temperature": 0}).json()
                   for p in PROMPTS]
        body = {"prompt": "abc", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{first.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            first.proc.send_signal(signal.SIGKILL)  # mid-generation, mid-stream
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
    finally:
        first.proc.kill()
        first.proc.wait(10)

    state = json.loads(state_file.read_text())  # complete, valid JSON
    assert state["format"] == "specmux.learner-state" and state["requests"] >= len(PROMPTS)
    target, drafter = tmp_path / "models" / "target", tmp_path / "models" / "drafter"
    probe = Pipeline(str(target), [str(drafter), "ngram"], "hedge")
    assert LearnerStore(state_dir, probe).restore()  # it loads into the same pool

    second = ServerProcess(tmp_path, "--state-dir", str(state_dir), "--save-every", "1000",
                           "--save-interval", "1000")
    try:
        again = [_post(second.url, "/v1/completions",
                       {"prompt": p, "max_tokens": 10, "temperature": 0}).json()
                 for p in PROMPTS[:2]]
        assert [a["choices"][0]["text"] for a in again] == \
            [a["choices"][0]["text"] for a in answers[:2]]
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(30)
    finally:
        second.proc.kill()
    assert "restored learner state" in second.output(), second.output()
    final = json.loads(state_file.read_text())
    assert final["requests"] == state["requests"] + 2  # saved by the SIGTERM shutdown
    assert not list(state_dir.glob("*.corrupt-*"))
