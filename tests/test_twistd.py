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
import os
import re
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.conftest import until
from tests.fake_asterisk import connect

REPOSITORY = Path(__file__).resolve().parent.parent
LOOPBACK = "tcp:0:interface=127.0.0.1"
LISTENERS = ("audiosocket-visitor", "audiosocket-resident", "http")
LISTENING = re.compile(
    r"\b(audiosocket-visitor|audiosocket-resident|http) listening on 127\.0\.0\.1:(\d+)\s*$", re.M
)

#: Seconds a child gets to start listening, and to exit once told to.
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0


def twistd_script() -> str:
    """The C{twistd} console script of this interpreter, as a user's shell would run it."""
    script = Path(sys.executable).with_name("twistd")
    if script.is_file():
        return str(script)
    found = shutil.which("twistd")
    if found is None:
        pytest.fail(f"no twistd script next to {sys.executable} nor on PATH")
    return found


class Child(ProcessProtocol):
    """A child process whose output is kept, in arrival order, until it ends."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.combined = bytearray()
        self.ended: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self.combined += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        self.combined += data

    def processEnded(self, reason: Failure) -> None:
        self.ended = reason

    @property
    def output(self) -> str:
        return self.combined.decode("utf-8", errors="replace")

    @property
    def log(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    def describe(self) -> str:
        status = "running" if self.ended is None else repr(self.ended.value)
        return f"{' '.join(self.argv)}\n[{status}]; its output:\n{self.output}"

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    async def exit(self, timeout: float = EXIT_TIMEOUT) -> BaseException:
        """Wait, bounded, for the child to end; return how it ended."""
        try:
            await until(lambda: self.ended is not None, timeout)
        except AssertionError:
            raise AssertionError(f"child still running after {timeout} s: {self.describe()}") from None
        assert self.ended is not None
        return self.ended.value


Spawn = Callable[..., Child]


@pytest_twisted.async_yield_fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """
    Start a child in C{tmp_path} with a copy of the environment; kill any
    child still running when the test ends, pass or fail.
    """
    children: list[Child] = []

    def start(executable: str, *args: str) -> Child:
        child = Child([executable, *args])
        reactor.spawnProcess(child, executable, [executable, *args], env=dict(os.environ), path=str(tmp_path))
        children.append(child)
        return child

    yield start
    for child in children:
        if child.ended is None:
            child.signal("KILL")
            await child.exit(timeout=10)


def listening_ports(text: str) -> dict[str, int]:
    return {name: int(port) for name, port in LISTENING.findall(text)}


async def start_server(spawn: Spawn, *extra: str) -> tuple[Child, dict[str, int]]:
    """
    Run C{twistd -n audiohangup} on loopback ports; wait until all three
    listen and the API answers.

    The "listening on" lines come from C{privilegedStartService}, before
    twistd runs its reactor and installs its SIGTERM handler: a SIGTERM
    right after them kills the child without an orderly shutdown. An answer
    from C{/health} proves the reactor runs, so the child is ready.
    """
    child = spawn(
        twistd_script(), "-n", "--pidfile=", "audiohangup",
        "--visitor", LOOPBACK, "--resident", LOOPBACK, "--http", LOOPBACK,
        "--close-timeout", "1", *extra,
    )
    try:
        await until(
            lambda: child.ended is not None or len(listening_ports(child.log)) == len(LISTENERS),
            START_TIMEOUT,
        )
    except AssertionError:
        raise AssertionError(
            f"no 'listening on' lines within {START_TIMEOUT} s: {child.describe()}"
        ) from None
    if child.ended is not None:
        raise AssertionError(f"twistd ended before listening: {child.describe()}")
    ports = listening_ports(child.log)
    assert sorted(ports) == sorted(LISTENERS), child.describe()
    assert len(set(ports.values())) == 3, ports
    await wait_for_legs(f"http://127.0.0.1:{ports['http']}", 0)
    return child, ports


async def get_json(url: str) -> tuple[int, Any]:
    response = await treq.get(url, persistent=False, timeout=10)
    return response.code, await response.json()


async def post_json(url: str) -> tuple[int, Any]:
    response = await treq.post(url, persistent=False, timeout=10)
    return response.code, await response.json()


async def wait_for_legs(base: str, legs: int, timeout: float = 10.0) -> None:
    """Poll C{GET /health} until it reports C{legs} live legs."""
    deadline = reactor.seconds() + timeout
    while True:
        code, body = await get_json(f"{base}/health")
        if code == 200 and body == {"status": "ok", "legs": legs}:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"/health is {code} {body}, not {legs} legs, after {timeout} s")
        await deferLater(reactor, 0.02)


async def settle(deferred: defer.Deferred[Any], what: str, timeout: float = 10.0) -> Any:
    try:
        return await deferred.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def assert_sigterm_exit(child: Child, ended: BaseException) -> None:
    """
    twistd stops its reactor on SIGTERM, shuts down in order, then restores
    the default handler and re-raises the signal, so the child dies of it.
    """
    assert isinstance(ended, ProcessTerminated), child.describe()
    assert ended.signal == signal.SIGTERM, child.describe()
    assert ended.exitCode is None, child.describe()


def assert_quiet(child: Child) -> None:
    text = child.output
    for word in ("Traceback", "Unhandled", "ConnectionResetError", "#warn]", "#error]", "#critical]"):
        assert word not in text, f"{word!r} in the log: {child.describe()}"
    assert child.stderr == b"", child.describe()


def assert_orderly_shutdown(child: Child) -> list[str]:
    lines = [line for line in child.log.splitlines() if line.strip()]
    assert len(lines) >= 2, child.describe()
    assert lines[-2].endswith("Main loop terminated."), child.describe()
    assert lines[-1].endswith("Server Shut Down."), child.describe()
    return lines


def index_of(lines: list[str], fragment: str, child: Child) -> int:
    found = [index for index, line in enumerate(lines) if fragment in line]
    assert len(found) == 1, f"{fragment!r} logged {len(found)} times, not once: {child.describe()}"
    return found[0]


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
    child, ports = await start_server(spawn, "--records", database)
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

    child, ports = await start_server(spawn, "--records", database)
    base = f"http://127.0.0.1:{ports['http']}"
    assert "2 call records left open by an earlier run closed as server_lost" in child.log
    code, body = await get_json(f"{base}/records?reason=server_lost")
    assert code == 200
    assert sorted(record["call_id"] for record in body["records"]) == sorted(map(str, calls))
    assert all(record["ended_at"] is not None for record in body["records"])
    child.signal("TERM")
    await child.exit()
