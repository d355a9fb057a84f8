"""Fast regret simulator for the drafter-selection learners (``specmux simulate``).

* :mod:`specmux.sim.env`: drafter pools (per-domain, per-position acceptance), query streams,
  block-drawn positions;
* :mod:`specmux.sim.runner`: the round loop with the engine's policies and counterfactual
  tracker, and regret (pseudo, per-segment, stopping-time);
* :mod:`specmux.sim.experiments`: experiments (a)-(d) and plain runs, plots and summaries;
* :mod:`specmux.sim.cli`: the ``simulate`` command (``register(app)``).
"""

from specmux.sim.env import DrafterPool, SimEnv, Stream, expert_pool, iid_pool, make_stream
from specmux.sim.runner import Trace, arm_means, default_arms, simulate

__all__ = [
    "DrafterPool",
    "SimEnv",
    "Stream",
    "Trace",
    "arm_means",
    "default_arms",
    "expert_pool",
    "iid_pool",
    "make_stream",
    "simulate",
]
