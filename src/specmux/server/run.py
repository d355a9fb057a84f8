"""Run an app with uvicorn: bind first, shut down so that no accepted request is lost.

:func:`bind` opens the listening socket (a port in use is a :class:`ConfigError`, found
before any model is loaded).  :class:`SpecmuxServer` is uvicorn's server with two changes:

* when shutdown starts (SIGTERM/SIGINT), the model worker stops taking work at once: queued
  requests get a 503 JSON (streams: an error event and ``data: [DONE]``), the running one
  may finish until ``graceful_timeout`` is nearly over and is then ended the same way, so
  every accepted request gets a well-formed answer before uvicorn's own deadline;
* a SIGTERM shutdown exits with status 0 (uvicorn re-raises the signal otherwise).
"""

from __future__ import annotations

import logging
import signal
import socket
from types import FrameType
from typing import Any

from specmux.errors import ConfigError

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A bound socket on ``host:port`` (``port=0``: any free port); ConfigError if the
    address is in use or not available."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another "
                          "--port or --host)") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server_class() -> type:
    import uvicorn

    class SpecmuxServer(uvicorn.Server):
        """uvicorn's server; at shutdown it first drains the model worker (see module doc)."""

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.terminated = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()  # a requested, clean shutdown: exit 0, not -SIGTERM
                self.terminated = True

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            grace = float(self.config.timeout_graceful_shutdown or 0.0)
            ctx = getattr(getattr(self.config.app, "state", None), "ctx", None)
            if ctx is not None:
                ctx.worker.begin_shutdown(grace)
            await super().shutdown(sockets)

    return SpecmuxServer


def serve(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", graceful_timeout: float = 10.0,
          access_log: bool = True, sock: socket.socket | None = None) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM (then the lifespan saves the learner).

    ``port=0`` picks a free port; the address is logged (``serving on http://HOST:PORT``).
    ``sock``: an already bound socket (:func:`bind`).  ``graceful_timeout``: seconds the
    running request gets to finish on shutdown (queued ones get 503 at once).
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, access_log=access_log)
    sock = sock or bind(host, port)
    bound = sock.getsockname()
    url_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
    log.info("serving on http://%s:%d", url_host, bound[1])
    _uvicorn_server_class()(config).run(sockets=[sock])


def make_server(app: Any, **config: Any) -> Any:
    """A :class:`SpecmuxServer` for ``app`` (``config``: ``uvicorn.Config`` options)."""
    import uvicorn

    return _uvicorn_server_class()(uvicorn.Config(app, **config))
