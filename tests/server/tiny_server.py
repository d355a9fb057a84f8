"""Server test helpers: a tiny deterministic pipeline and a real uvicorn server in a thread."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the launcher subprocess imports this module directly
    sys.path.insert(0, str(TESTS))

from specmux.api import Pipeline  # noqa: E402

from conftest import tiny_lm  # noqa: E402
from helpers import save_tiny_model, tiny_tokenizer  # noqa: E402


def tiny_models(seed: int = 0) -> tuple[Any, Any]:
    """The target and an LM drafter, deterministic in ``seed`` (vocabulary 48)."""
    return tiny_lm(seed, hidden=48), tiny_lm(seed + 1, hidden=32, layers=1)


def tiny_pipeline(seed: int = 0, policy: str = "hedge", **kwargs: Any) -> Pipeline:
    """A Pipeline over fresh copies of the tiny models (drafters: the LM and ngram)."""
    target, drafter = tiny_models(seed)
    return Pipeline(target, [drafter, "ngram"], policy, tokenizer=tiny_tokenizer(), **kwargs)


def save_tiny_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """The tiny models saved as HF directories (reused if already there)."""
    target_dir, drafter_dir = root / "target", root / "drafter"
    if not (target_dir / "config.json").exists() or not (drafter_dir / "config.json").exists():
        target, drafter = tiny_models(seed)
        save_tiny_model(target_dir, target)
        save_tiny_model(drafter_dir, drafter)
    return target_dir, drafter_dir


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
