"""specmux.state: atomic JSON writes and loads that quarantine damaged files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from specmux import state
from specmux.state import atomic_write_json, load_json_or_quarantine, quarantine


def test_round_trip_creates_parent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.json"
    obj = {"t": 3, "w": [0.25, 0.75], "name": "ngram@k=4", "big": 2**100}
    atomic_write_json(path, obj)
    assert load_json_or_quarantine(path) == obj
    atomic_write_json(path, {"t": 4})
    assert json.loads(path.read_text()) == {"t": 4}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_permissions_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, 1)
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    atomic_write_json(path, 2)
    assert path.stat().st_mode & 0o777 == 0o600


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert load_json_or_quarantine(tmp_path / "nope.json") is None


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": object()}])
def test_unserializable_object_keeps_previous_file(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises((TypeError, ValueError)):
        atomic_write_json(path, bad)
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_crash_before_rename_keeps_previous_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"version": 1})

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(state.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(path, {"version": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_is_fsynced_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(state.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(state.os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b)))
    atomic_write_json(tmp_path / "s.json", [1, 2])
    assert events[:2] == ["fsync", "replace"]  # file data durable before it becomes visible
    assert events[2:] == ["fsync"]  # then the directory entry


@pytest.mark.parametrize("content", [b"{truncated", b"", b"\xff\xfe\x00garbage"])
def test_corrupt_file_is_renamed_aside_with_warning(tmp_path: Path, content: bytes,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="specmux.state"):
        assert load_json_or_quarantine(path) is None
    assert not path.exists()
    (aside,) = tmp_path.iterdir()
    assert aside.name.startswith("state.json.corrupt-") and aside.read_bytes() == content
    assert "unusable" in caplog.text


def test_quarantine_never_overwrites_an_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    names = set()
    for i in range(3):
        path.write_text(f"bad {i}")
        moved = quarantine(path, "test")
        assert moved is not None
        names.add(moved.name)
    assert len(names) == 3
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["bad 0", "bad 1", "bad 2"]
    assert quarantine(path, "gone") is None


def test_a_directory_in_the_way_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()
    assert load_json_or_quarantine(path) is None
    atomic_write_json(path, {"fresh": True})
    assert load_json_or_quarantine(path) == {"fresh": True}
