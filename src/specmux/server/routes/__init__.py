"""The HTTP routes, one module per endpoint group (each an ``APIRouter``)."""

from specmux.server.routes import chat, completions, info

ROUTERS = (info.router, completions.router, chat.router)

__all__ = ["ROUTERS"]
