"""Online learners that pick, each round, which arm (drafter, k) drafts.

``make_policy(name, num_arms, **kwargs)`` builds one by name from :data:`POLICIES`:

>>> make_policy("hedge", 3, selection="argmax").select()
0
>>> make_policy("nope", 3)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
specmux.errors.ConfigError: unknown policy 'nope'; known: banditspec, exp3, fixed, hedge, ...
"""

from __future__ import annotations

from typing import Any

from specmux.errors import ConfigError
from specmux.policies.banditspec import BanditSpecTime
from specmux.policies.base import Arm, Policy
from specmux.policies.exp3 import EXP3Spec
from specmux.policies.fixed import FixedPolicy
from specmux.policies.hedge import Hedge
from specmux.policies.metasd import MetaSDUCB
from specmux.policies.normalhedge import NormalHedge
from specmux.policies.ucb import UCBSpec

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (FixedPolicy, UCBSpec, EXP3Spec, MetaSDUCB, Hedge, NormalHedge, BanditSpecTime)
}


def make_policy(name: str, num_arms: int, **kwargs: Any) -> Policy:
    """The policy called ``name`` over ``num_arms`` arms; ConfigError on a bad name or option."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    try:
        return cls(num_arms, **kwargs)
    except TypeError as err:  # an option this policy does not take
        raise ConfigError(f"bad options for policy {name!r}: {err}") from err


__all__ = [
    "POLICIES",
    "Arm",
    "BanditSpecTime",
    "EXP3Spec",
    "FixedPolicy",
    "Hedge",
    "MetaSDUCB",
    "NormalHedge",
    "Policy",
    "UCBSpec",
    "make_policy",
]
