"""The OpenAI-compatible server: ``specmux serve`` or :func:`create_app` + :func:`serve`.

>>> from specmux.server import create_app, serve          # doctest: +SKIP
>>> serve(create_app(pipeline, state_dir="state/"), port=8000)   # doctest: +SKIP

See ``docs/SERVING.md``.
"""

from specmux.server.app import APIError, ServerConfig, create_app, serve
from specmux.server.run import bind, make_server

__all__ = ["APIError", "ServerConfig", "bind", "create_app", "make_server", "serve"]
