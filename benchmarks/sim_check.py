"""Fingerprint of the simulator experiments on a small grid (rows, fits, markdown and figure
hashes; timings left out), to check that a refactor of ``sim/`` changes nothing::

    PYTHONPATH=src python benchmarks/sim_check.py before.json OUTDIR   # on the old commit
    PYTHONPATH=src python benchmarks/sim_check.py after.json OUTDIR
    cmp before.json after.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from specmux.sim.experiments import RUNNERS, SimConfig

TIMED = ("rounds_per_s", "rounds_per_cpu_s", "seconds")  # machine-dependent: left out


def clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items() if k not in TIMED}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def main() -> None:
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    cfg = SimConfig(out=out, seeds=2, rounds=1500, quick=True, num_drafters=8)
    res = {}
    for name, fn in RUNNERS.items():
        r = fn(cfg, lambda *a: None)
        timed = name == "run"  # its markdown shows rounds/s (figure left out too)
        res[name] = {
            "rows": clean(r.rows), "fits": clean(r.fits), "jobs": r.jobs, "title": r.title,
            "md": None if timed else r.markdown,
            "fig": None if timed else hashlib.sha256(r.figure.read_bytes()).hexdigest(),
        }
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, sort_keys=True, default=float)


if __name__ == "__main__":
    main()
