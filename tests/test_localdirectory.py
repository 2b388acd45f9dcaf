"""
The local call directory (C{--local-directory}): files in a folder, the
queries of the Redis one, presence by heartbeat. Two directories in one
folder stand for two processes; a L{Clock} is their time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from audiohangup.cluster.directory import DirectoryUnavailable
from audiohangup.cluster.localdirectory import LocalDirectory, check_directory
from audiohangup.reasons import Role
from audiohangup.registry import Registry


class Leg:
    """Just what the directory reads of a leg."""

    def __init__(self, call_id: str, role: Role, connected_at: float) -> None:
        self.call_id = call_id
        self.role = role
        self.connected_at = connected_at


def pair(folder: Path) -> tuple[Clock, LocalDirectory, LocalDirectory]:
    clock = Clock()
    clock.advance(1000)
    old = LocalDirectory(str(folder), "old", "http://127.0.0.1:1", Registry(), clock, heartbeat=1.0)
    new = LocalDirectory(str(folder), "new", "http://127.0.0.1:2", Registry(), clock, heartbeat=1.0)
    old.link = "127.0.0.1:3"
    old.startService()
    new.startService()
    return clock, old, new


@pytest_twisted.ensureDeferred
async def test_one_process_finds_the_others_legs_and_link(tmp_path: Path) -> None:
    _, old, new = pair(tmp_path)
    leg: Any = Leg("call-1", Role.VISITOR, 999.5)
    old.legStarted(leg)
    owners = await new.owners("call-1")
    assert list(owners) == ["visitor"]
    assert (owners["visitor"].instance_id, owners["visitor"].url) == ("old", "http://127.0.0.1:1")
    assert await new.link_of("old") == "127.0.0.1:3"
    assert await new.link_of("nobody") is None
    assert [(entry.instance_id, entry.legs) for entry in await new.instances()] == [("new", 0), ("old", 1)]
    assert [entry.call_id for entry in await new.legs()] == ["call-1"]

    old.legEnded(leg)
    assert await new.owners("call-1") == {}
    for directory in (old, new):
        await directory.stopService()
    assert os.listdir(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_a_process_that_stops_heartbeating_is_gone_with_its_legs(tmp_path: Path) -> None:
    """A crashed process's presence expires after three heartbeats; its legs go with it."""
    clock, old, new = pair(tmp_path)
    old.legStarted(Leg("call-2", Role.RESIDENT, 999.0))  # type: ignore[arg-type]
    old._loop.stop()  # as if it crashed: no more heartbeats
    old._running = False
    clock.advance(2.5)  # new's heartbeats go on
    assert list(await new.owners("call-2")) == ["resident"]
    clock.advance(1.0)
    assert await new.owners("call-2") == {}
    assert await new.link_of("old") is None
    assert [entry.instance_id for entry in await new.instances()] == ["new"]
    await new.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stopped_directory_answers_no_query(tmp_path: Path) -> None:
    _, old, new = pair(tmp_path)
    await old.stopService()
    with pytest.raises(DirectoryUnavailable):
        await old.owners("call-3")
    await new.stopService()


def test_the_folder_is_made_private_and_an_open_one_refused(tmp_path: Path) -> None:
    made = tmp_path / "run" / "audiohangup"
    check_directory(str(made))
    assert made.stat().st_mode & 0o777 == 0o700
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(ValueError, match="others could write entries"):
        check_directory(str(tmp_path / "open"))
