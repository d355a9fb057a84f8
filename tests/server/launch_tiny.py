"""Serve the tiny deterministic models with the real ``specmux serve`` CLI.

Used by the subprocess tests (SIGKILL / SIGTERM / restart)::

    python tests/server/launch_tiny.py --seed 0 --workdir DIR -- --state-dir S --save-every 1

The models are built from ``--seed`` and saved under ``DIR/models`` (reused when present),
so every launch serves the same weights.  The server listens on a free port and logs
``serving on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tiny_server import save_tiny_models


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("serve_args", nargs="*", help="more `specmux serve` options")
    args = parser.parse_args(argv)
    target, drafter = save_tiny_models(args.workdir / "models", args.seed)

    from specmux.cli import app

    app(["serve", "--target", str(target), "--drafter", str(drafter), "--drafter", "ngram",
         "--port", "0", "--served-model-name", "tiny", "--no-install", *args.serve_args])


if __name__ == "__main__":
    main(sys.argv[1:])
