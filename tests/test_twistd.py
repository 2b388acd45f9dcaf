"""
C{twistd -n audiohangup} as a user runs it: the installed console script in a
child process, driven over loopback by the fake Asterisk and the HTTP API, and
stopped with SIGTERM.

The tests run inside the reactor (pytest-twisted), so nothing blocks: the
child is a L{ProcessProtocol}, HTTP goes through treq, and every wait is a
bounded poll. A test that fails midway still kills its child in the fixture.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ProcessDone, ProcessTerminated

from tests.conftest import until
from tests.fake_asterisk import connect
from tests.twistd_child import (
    LOOPBACK,
    REPOSITORY,
    START_TIMEOUT,
    Child,
    Spawn,
    assert_orderly_shutdown,
    assert_quiet,
    assert_sigterm_exit,
    get_json,
    index_of,
    post_json,
    settle,
    start_server,
    twistd_script,
    wait_for_legs,
)

# The installed plugin


@pytest_twisted.ensureDeferred
async def test_installed_copy_is_the_source(spawn: Spawn) -> None:
    """
    twistd runs whatever audiohangup is installed; if that differs from this
    checkout, the other tests here exercise stale code. After an edit, run
    C{pip install .} again (or install in editable mode).
    """
    probe = (
        "import audiohangup, pathlib; "
        "print(pathlib.Path(audiohangup.__file__).resolve().parent)"
    )
    child = spawn(sys.executable, "-c", probe)
    ended = await child.exit()
    assert isinstance(ended, ProcessDone), child.describe()
    installed = Path(child.stdout.decode().strip())
    pairs = [
        (source, installed / source.name) for source in sorted((REPOSITORY / "audiohangup").glob("*.py"))
    ]
    pairs.append(
        (
            REPOSITORY / "twisted" / "plugins" / "audiohangup_plugin.py",
            installed.parent / "twisted" / "plugins" / "audiohangup_plugin.py",
        )
    )
    stale = [
        str(source.relative_to(REPOSITORY))
        for source, copy in pairs
        if not copy.is_file() or copy.read_bytes() != source.read_bytes()
    ]
    assert stale == [], f"the audiohangup installed at {installed} differs from the checkout in {stale}"


@pytest_twisted.ensureDeferred
async def test_twistd_help_lists_audiohangup(spawn: Spawn) -> None:
    """Run outside the checkout, twistd finds the installed plugin."""
    child = spawn(twistd_script(), "--help")
    ended = await child.exit()
    assert isinstance(ended, ProcessDone), child.describe()
    assert re.search(r"^\s+audiohangup\s+AudioSocket server", child.output, re.M), child.describe()


@pytest_twisted.ensureDeferred
async def test_twistd_audiohangup_help_lists_options(spawn: Spawn) -> None:
    child = spawn(twistd_script(), "audiohangup", "--help")
    ended = await child.exit()
    assert isinstance(ended, ProcessDone), child.describe()
    options = ("--visitor=", "--resident=", "--http=", "--close-timeout=", "--uuid-timeout=", "--api-token=")
    for option in options:
        assert option in child.output, child.describe()
    assert "Traceback" not in child.output, child.describe()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--close-timeout", "abc"], "--close-timeout must be a number of seconds, not 'abc'"),
        (["--uuid-timeout", "0"], "--uuid-timeout must be a positive number of seconds, not '0'"),
        (["--visitor", "tcp:notaport"], "--visitor 'tcp:notaport' is not a valid endpoint"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_option_is_a_usage_error(spawn: Spawn, args: list[str], message: str) -> None:
    """A bad value stops twistd before it listens: exit status 1, the reason, no traceback."""
    # Loopback endpoints first, so even a wrongly accepted value binds no fixed port.
    child = spawn(
        twistd_script(), "-n", "--pidfile=", "audiohangup",
        "--visitor", LOOPBACK, "--resident", LOOPBACK, "--http", LOOPBACK, *args,
    )
    ended = await child.exit()
    assert isinstance(ended, ProcessTerminated), child.describe()
    assert ended.exitCode == 1 and ended.signal is None, child.describe()
    assert message in child.output, child.describe()
    assert "Traceback" not in child.output, child.describe()
    assert "listening on" not in child.output, child.describe()


@pytest_twisted.ensureDeferred
async def test_an_old_spelling_warns_once_in_the_log(spawn: Spawn, tmp_path: Path) -> None:
    """
    --records and --record, the old spellings, still start the server; each
    is named once in its log, before logging began (twistd replays it), with
    the new spelling to say.
    """
    child, _ = await start_server(spawn, "--records", "none", "--record", str(tmp_path / "wav"), "--records", "none")
    lines = [line for line in child.log.splitlines() if "deprecated" in line]
    assert len(lines) == 2, child.describe()
    index_of(lines, "--records is deprecated and will go: say --call-records", child)
    index_of(lines, "--record is deprecated and will go: say --record-every-call --recordings-dir DIR", child)
    assert all("#warn]" in line for line in lines), child.describe()
    child.signal("TERM")
    await child.exit()


# The server end to end


@pytest_twisted.ensureDeferred
async def test_api_hangup_of_a_resetting_leg(spawn: Spawn, logs: Any) -> None:
    """
    The original bug: Asterisk resets right after reading C{00 00 00}. Through
    the real twistd, that is one quiet info line, and SIGTERM still stops
    the server in order.
    """
    child, ports = await start_server(spawn)
    base = f"http://127.0.0.1:{ports['http']}"
    call_id = uuid.uuid4()

    leg = await connect(ports["audiosocket-visitor"], on_hangup="reset")
    leg.send_uuid(call_id)
    await wait_for_legs(base, 1)

    code, body = await post_json(f"{base}/calls/{call_id}/hangup?role=visitor&wait=true")
    assert (code, body) == (
        200,
        {
            "call_id": str(call_id),
            "legs": [{"role": "visitor", "result": "hangup_sent", "reason": "hangup_reset"}],
        },
    ), child.describe()
    await settle(leg.closed, "the fake Asterisk's connection to close")
    assert leg.ended_with_single_hangup(), (leg.frames, leg.bytes_after_hangup)
    # wait=true answers once the leg is gone, so it is gone now, not eventually.
    assert await get_json(f"{base}/health") == (200, {"status": "ok", "legs": 0})

    child.signal("TERM")
    ended = await child.exit()

    assert_sigterm_exit(child, ended)
    lines = assert_orderly_shutdown(child)
    assert_quiet(child)
    started = index_of(lines, f"{call_id} visitor leg started from 127.0.0.1:", child)
    sent = index_of(lines, f"{call_id} visitor hangup sent (cause api)", child)
    gone = index_of(lines, f"{call_id} visitor leg ended: hangup_reset (", child)
    stopping = index_of(lines, "Received SIGTERM, shutting down.", child)
    assert started < sent < gone < stopping, child.describe()
    # Nothing was live at shutdown, so there was nothing to drain.
    assert "cause shutdown" not in child.log, child.describe()


@pytest_twisted.ensureDeferred
async def test_sigterm_hangs_up_a_live_leg(spawn: Spawn, logs: Any) -> None:
    """SIGTERM drains: the live leg gets C{00 00 00}, closes, and only then does twistd exit."""
    child, ports = await start_server(spawn)
    base = f"http://127.0.0.1:{ports['http']}"
    call_id = uuid.uuid4()

    leg = await connect(ports["audiosocket-visitor"], on_hangup="close")
    leg.send_uuid(call_id)
    await wait_for_legs(base, 1)

    child.signal("TERM")
    await settle(leg.hangup_received, "00 00 00 from the server on SIGTERM")
    await settle(leg.closed, "the fake Asterisk's connection to close")
    assert leg.ended_with_single_hangup(), (leg.frames, leg.bytes_after_hangup)
    ended = await child.exit()

    assert_sigterm_exit(child, ended)
    lines = assert_orderly_shutdown(child)
    assert_quiet(child)
    started = index_of(lines, f"{call_id} visitor leg started from 127.0.0.1:", child)
    stopping = index_of(lines, "Received SIGTERM, shutting down.", child)
    draining = index_of(lines, "shutting down: hanging up 1 connection(s)", child)
    sent = index_of(lines, f"{call_id} visitor hangup sent (cause shutdown)", child)
    gone = index_of(lines, f"{call_id} visitor leg ended: hangup_clean (", child)
    drained = index_of(lines, "shutdown: every leg is gone", child)
    terminated = index_of(lines, "Main loop terminated.", child)
    assert started < stopping < draining < sent < gone < drained < terminated, child.describe()


# Structured logs


def json_events(child: Child) -> list[dict[str, Any]]:
    """Every event of a C{twist --log-format=json} child: one JSON text per record."""
    events = []
    for record in child.log.replace("\x1e", "\n").splitlines():
        if record.strip():
            events.append(json.loads(record))  # every record must parse
    return events


@pytest_twisted.ensureDeferred
async def test_twist_json_log_has_the_fields_as_keys(spawn: Spawn, logs: Any) -> None:
    """
    C{twist --log-format=json} gives one JSON object per event, with no code of
    ours: call_id, role, reason and cause are keys of their own.
    """
    child = spawn(
        str(Path(sys.executable).with_name("twist")), "--log-format=json", "audiohangup",
        "--visitor", LOOPBACK, "--resident", LOOPBACK, "--http", LOOPBACK, "--close-timeout", "1",
    )

    def ports() -> dict[str, int]:
        return {
            event["name"]: int(event["address"].rsplit(":", 1)[1])
            for event in json_events(child)
            if event.get("log_format") == "{name} listening on {address}"
        }

    await until(lambda: child.ended is not None or len(ports()) == 3, START_TIMEOUT)
    assert child.ended is None, child.describe()
    base = f"http://127.0.0.1:{ports()['http']}"
    await wait_for_legs(base, 0)
    call_id = uuid.uuid4()
    leg = await connect(ports()["audiosocket-resident"], on_hangup="reset")
    leg.send_uuid(call_id)
    await wait_for_legs(base, 1)
    code, _ = await post_json(f"{base}/calls/{call_id}/hangup?wait=true")
    assert code == 200
    child.signal("TERM")
    await child.exit()

    mine = [event for event in json_events(child) if event.get("call_id") == str(call_id)]
    formats = [event["log_format"].split(": ")[0] for event in mine]
    assert formats == [
        "{call_id} {role} leg started from {peer}",
        "{call_id} {role} hangup sent (cause {cause})",
        "{call_id} {role} leg ended",
    ], mine
    ended = mine[-1]
    assert (ended["role"], ended["reason"], ended["cause"]) == ("resident", "hangup_reset", "api")
    assert ended["log_level"]["name"] == "info"
    assert ended["peer"].startswith("127.0.0.1:")
    assert isinstance(ended["duration"], float) and ended["hangup_to_close_ms"] >= 0


# Call records survive a crash


@pytest_twisted.ensureDeferred
async def test_records_of_a_killed_server_are_closed_as_server_lost(spawn: Spawn, tmp_path: Path, logs: Any) -> None:
    """
    SIGKILL a server with live legs: their rows were written when the UUIDs
    arrived; the next start closes them as server_lost, and /records says so.
    """
    database = str(tmp_path / "calls.sqlite3")
    child, ports = await start_server(spawn, "--call-records", database)
    base = f"http://127.0.0.1:{ports['http']}"
    calls = [uuid.uuid4(), uuid.uuid4()]
    legs = []
    for call_id in calls:
        leg = await connect(ports["audiosocket-visitor"])
        leg.send_uuid(call_id)
        legs.append(leg)
    await wait_for_legs(base, 2)
    code, body = await get_json(f"{base}/records")
    assert code == 200 and len(body["records"]) == 2
    assert all(record["ended_at"] is None and record["reason"] is None for record in body["records"])

    child.signal("KILL")
    ended = await child.exit()
    assert isinstance(ended, ProcessTerminated) and ended.signal == signal.SIGKILL
    for leg in legs:
        await settle(leg.closed, "the killed server's sockets to close")

    child, ports = await start_server(spawn, "--call-records", database)
    base = f"http://127.0.0.1:{ports['http']}"
    # The store opens in a thread: the API may answer before it has logged.
    recovered = "2 call records left open by an earlier run closed as server_lost"
    await until(lambda: child.ended is not None or recovered in child.log, 10, "the recovery line")
    assert recovered in child.log, child.describe()
    code, body = await get_json(f"{base}/records?reason=server_lost")
    assert code == 200
    assert sorted(record["call_id"] for record in body["records"]) == sorted(map(str, calls))
    assert all(record["ended_at"] is not None for record in body["records"])
    child.signal("TERM")
    await child.exit()
