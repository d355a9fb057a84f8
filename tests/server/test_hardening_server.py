"""Issue 15, problems 1-12 (server part) and the shutdown test: every accepted request gets
a well-formed answer (its result, a 503 JSON, or an SSE error event and ``data: [DONE]``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from test_server import SRC, ServerProcess
from tiny_server import save_tiny_models, tiny_pipeline
from typer.testing import CliRunner

from specmux.cli import app as cli
from specmux.server import create_app
from specmux.server.worker import STATE_FILE, QueueFull

MODEL = "tiny"


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = create_app(tiny_pipeline(), model_name=MODEL, max_tokens_limit=1000)
    with TestClient(app) as c:
        yield c


def post(client: TestClient, path: str, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, content=content,
                       headers={"content-type": "application/json", **headers})


# -- 1. seeds -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64 - 1])
def test_1_any_64_bit_seed_is_served(client: TestClient, seed: int) -> None:
    r = post(client, "/v1/completions", {"prompt": "ab", "max_tokens": 4, "temperature": 0.9,
                                         "seed": seed})
    assert r.status_code == 200, r.text


def test_1_seed_mapping_matches(client: TestClient) -> None:
    body = {"prompt": "ab", "max_tokens": 6, "temperature": 1.0}
    texts = [post(client, "/v1/completions", {**body, "seed": s}).json() for s in (-1, 2**64 - 1)]
    assert texts[0]["choices"][0]["text"] == texts[1]["choices"][0]["text"] or \
        texts[0]["spec_decode"]["drafter_selections"] != texts[1]["spec_decode"][
            "drafter_selections"]  # the learner moved between the calls; see the CLI test


# -- 10. precise 400 messages ------------------------------------------------------------------


def test_10_json_as_text_plain_names_the_content_type(client: TestClient) -> None:
    r = post(client, "/v1/completions", {"prompt": "a"}, **{"content-type": "text/plain"})
    assert r.status_code == 400
    assert "Content-Type" in r.json()["error"]["message"] and "text/plain" in r.text
    r = client.post("/v1/completions", data={"prompt": "a"})  # curl -d: form-encoded
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]


def test_10_seventeen_stop_strings_name_the_limit(client: TestClient) -> None:
    r = post(client, "/v1/completions", {"prompt": "a", "stop": [str(i) for i in range(17)]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "stop" and "at most 16" in err["message"] and "17" in err["message"]


def test_10_image_url_part_is_named(client: TestClient) -> None:
    part = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400
    assert "image_url" in r.json()["error"]["message"] and "text" in r.json()["error"]["message"]


def test_10_deep_json_is_400(client: TestClient) -> None:
    r = post(client, "/v1/completions", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


# -- 11. context limit, Retry-After ------------------------------------------------------------


def test_11_prompt_plus_max_tokens_beyond_context_is_400_with_numbers(client: TestClient) -> None:
    r = post(client, "/v1/completions", {"prompt": "ab" * 250, "max_tokens": 900})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "512" in err["message"] and "500 in the prompt" in err["message"]
    ok = post(client, "/v1/completions", {"prompt": "ab" * 250, "temperature": 0})
    assert ok.status_code == 200  # no max_tokens: cut to what fits


def test_11_queue_full_has_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(tiny_pipeline(), model_name=MODEL, max_queue=1)
    with TestClient(app) as c:
        def full(request: Any) -> None:
            raise QueueFull("the request queue is full (1 waiting); retry later")

        monkeypatch.setattr(app.state.worker, "submit", full)
        r = post(c, "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "queue_full"


def test_11_state_dir_and_port_are_checked_before_loading(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = str(tmp_path / "no-such-model")  # loading it would fail differently
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        r = runner.invoke(cli, ["serve", "--target", missing, "--drafter", "ngram",
                                "--state-dir", str(ro / "s"), "--no-install"])
        assert r.exit_code == 2 and "not writable" in r.output, r.output
    finally:
        ro.chmod(0o700)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(cli, ["serve", "--target", missing, "--drafter", "ngram", "--port",
                                str(port), "--no-install"])
    assert r.exit_code == 2 and f"127.0.0.1:{port}" in r.output, r.output


def test_11_unwritable_state_dir_as_root_is_still_checked(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = CliRunner().invoke(cli, ["serve", "--target", str(tmp_path / "none"), "--drafter",
                                 "ngram", "--state-dir", str(blocker / "sub"), "--no-install"])
    assert r.exit_code == 2 and "--state-dir" in r.output, r.output


# -- 4. state file at server start ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["short", "nan", "deep"])
def test_4_bad_state_never_stops_or_breaks_the_server(tmp_path: Path, damage: str) -> None:
    pipe = tiny_pipeline()
    arms = len(pipe.selector.arms)
    good = create_app(pipe, state_dir=tmp_path).state.store.snapshot()
    path = tmp_path / STATE_FILE
    if damage == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    else:
        loss = [0.0] * (arms - 1) if damage == "short" else [float("nan")] * arms
        path.write_text(json.dumps({**good, "policy": {**good["policy"],
                                                       "cumulative_loss": loss}}))
    app = create_app(tiny_pipeline(), model_name=MODEL, state_dir=tmp_path, save_every=1)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = post(c, "/v1/completions", {"prompt": "ab", "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert list(tmp_path.glob("*.corrupt-*"))
    saved = json.loads(path.read_text())  # strict JSON: no NaN
    assert len(saved["policy"]["cumulative_loss"]) == arms


# -- 3. shutdown: every accepted request gets a well-formed answer ----------------------------


def _answer(url: str, body: dict[str, Any], out: list[Any]) -> None:
    try:
        if body.get("stream"):
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                lines = [line for line in r.iter_lines() if line]
                out.append(("stream", r.status_code, lines))
        else:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            out.append(("json", r.status_code, r.headers.get("content-type", ""), r.text))
    except httpx.HTTPError as e:  # refused after the listener closed: never accepted
        out.append(("refused", type(e).__name__))


def test_3_sigterm_with_queued_and_streaming_requests(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--graceful-timeout", "2", "--max-queue", "64")
    results: list[Any] = []
    threads = []
    for i in range(40):
        body = {"prompt": "abc " * (1 + i % 3), "max_tokens": 150, "temperature": 0,
                "stream": i % 2 == 0}
        t = threading.Thread(target=_answer, args=(server.url, body, results))
        t.start()
        threads.append(t)
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    code = server.proc.wait(60)
    log = server.output()
    assert code == 0, log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    assert len(results) == 40
    kinds = {"ok": 0, "503": 0, "stream_error": 0}
    for res in results:
        if res[0] == "refused":
            continue
        if res[0] == "json":
            _, status, ctype, text = res
            assert ctype.startswith("application/json"), res
            body = json.loads(text)
            assert status in (200, 503), res
            if status == 503:
                assert body["error"]["code"] == "shutting_down"
                kinds["503"] += 1
            else:
                kinds["ok"] += 1
        else:
            _, status, lines = res
            if status == 503:
                kinds["503"] += 1
                continue
            assert status == 200 and lines[-1] == "data: [DONE]", res
            events = [json.loads(line[6:]) for line in lines[:-1]]
            if "error" in events[-1]:
                assert events[-1]["error"]["code"] == "shutting_down"
                kinds["stream_error"] += 1
            else:
                assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), res
                kinds["ok"] += 1
    assert kinds["503"] + kinds["stream_error"] > 0, kinds  # some were cut by the shutdown


# -- 12. Ctrl-C during start-up --------------------------------------------------------------


def test_12_ctrl_c_during_startup_prints_no_traceback(tmp_path: Path) -> None:
    target, drafter = save_tiny_models(tmp_path / "models")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for delay in (0.3, 2.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "specmux.cli", "serve", "--target", str(target),
             "--drafter", str(drafter), "--port", "0", "--no-install"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        # 130, or killed by SIGINT (-2, which a shell also reports as 130)
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
