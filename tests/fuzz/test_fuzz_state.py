"""Fuzz (c): the learner state file, for every policy.

Valid snapshots are mutated (values replaced by any JSON, lists grown or cut, keys dropped,
NaN/Infinity written in, bytes corrupted, deep nesting).  Loading never raises and never
stops the server: a state that does not fit this pool is quarantined and the learner starts
fresh; a state that loads leaves a learner that selects, learns and saves strict JSON.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st
from tiny_server import tiny_pipeline

from specmux.api import Pipeline
from specmux.policies import POLICIES
from specmux.server.worker import STATE_FILE, LearnerStore
from specmux.types import Feedback

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=10)

PIPELINES: dict[str, tuple[Pipeline, dict[str, Any]]] = {}


def pipeline(policy: str) -> tuple[Pipeline, dict[str, Any]]:
    """A tiny pipeline with ``policy`` and a valid snapshot after some learning."""
    if policy not in PIPELINES:
        kwargs = {"policy_kwargs": {"window": 3}} if policy == "metasd" else {}
        pipe = tiny_pipeline(policy=policy, **kwargs)
        pipe.generate("def add(a, b):", max_new_tokens=12)
        PIPELINES[policy] = (pipe, LearnerStore(tempfile.mkdtemp(), pipe).snapshot())
    return PIPELINES[policy]


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += paths(v, (*prefix, i))
    return out


def set_at(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = set_at(obj[path[0]], path[1:], value)
    return obj


@st.composite
def damaged_state(draw: st.DrawFn, snapshot: dict[str, Any]) -> bytes:
    state = json.loads(json.dumps(snapshot))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(state)))
        target = state
        for p in where:
            target = target[p]
        how = draw(st.sampled_from(["value", "value", "grow", "cut", "drop", "nan", "scale"]))
        if how == "value":
            state = set_at(state, where, draw(json_values))
        elif how in ("grow", "cut") and isinstance(target, list):
            new = target + [draw(scalars)] if how == "grow" else target[:-1]
            state = set_at(state, where, new)
        elif how == "drop" and where:
            parent = state
            for p in where[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent.pop(where[-1], None)
        elif how == "nan":
            state = set_at(state, where, draw(st.sampled_from([float("nan"), float("inf"),
                                                               -float("inf")])))
        elif how == "scale" and isinstance(target, int | float) and not isinstance(target, bool):
            state = set_at(state, where, target * draw(st.sampled_from([-1, 1e300, 10**30])))
    text = json.dumps(state).encode()
    kind = draw(st.integers(0, 29))
    if kind == 3:
        cut = draw(st.integers(0, len(text)))
        return text[:cut]
    if kind == 5:
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return b"[" * depth + b"]" * depth
    if kind == 7:
        return draw(st.binary(max_size=64))
    return text


def check_learner_usable(pipe: Pipeline) -> None:
    policy = pipe.selector.policy
    probs = np.asarray(policy.probabilities(), dtype=float)
    assert probs.shape == (len(pipe.selector.arms),) and np.all(np.isfinite(probs))
    assert abs(probs.sum() - 1.0) < 1e-6
    arm = policy.select()
    assert 0 <= arm < policy.num_arms
    n = policy.num_arms
    policy.update(Feedback(arm=arm, k=4, max_k=4, num_draft_tokens=4, num_accepted_tokens=2,
                           losses=(tuple([0.5] * n),), divergence=0.5))
    json.dumps(policy.state_dict(), allow_nan=False)  # it can be saved as strict JSON


@pytest.mark.parametrize("policy", sorted(POLICIES))
@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_state_file(policy: str, data: st.DataObject) -> None:
    pipe, snapshot = pipeline(policy)
    raw = data.draw(damaged_state(snapshot))
    saved = json.dumps(pipe.selector.policy.state_dict())
    with tempfile.TemporaryDirectory() as d:
        store = LearnerStore(d, pipe)
        (Path(d) / STATE_FILE).write_bytes(raw)
        loaded = store.restore()
        event("loaded" if loaded else "quarantined")
        if not loaded:
            assert not (Path(d) / STATE_FILE).exists()  # moved aside, never left in the way
            assert list(Path(d).glob(f"{STATE_FILE}.corrupt-*"))
            assert json.dumps(pipe.selector.policy.state_dict()) == saved  # unchanged
        check_learner_usable(pipe)
        store.save()
        json.loads((Path(d) / STATE_FILE).read_text())  # strict JSON on disk
    pipe.selector.policy.load_state_dict(json.loads(saved))  # next case starts the same
