"""
The webhook outbox (audiohangup/outbox.py): events written to SQLite before
their first attempt, deleted once delivered, sent again after a restart in
their order per call, bounded with the oldest dropped; a damaged or locked
file is logged by name while calls and deliveries go on. Over real loopback
HTTP (the receiver of tests/test_webhooks.py), real SQLite files, and at the
end a real C{twistd} process killed with SIGKILL.

Delivery is at least once: a receiver may get an event twice (a crash
between its answer and the delete), so these tests count distinct event
ids and allow duplicates.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python import usage

from audiohangup import tap
from audiohangup.outbox import FILE_NAME, Outbox, receiver_key
from audiohangup.reasons import CloseReason, Role
from audiohangup.service import Config
from tests.conftest import LogCapture, bridged, until
from tests.fake_asterisk import connect
from tests.test_webhooks import (
    FAST,
    Harness,
    Received,
    count,
    free_port,
    new_metrics,
    stand_in,
    warnings,
)
from tests.test_webhooks import harness as _harness
from tests.twistd_child import Spawn, start_server

#: test_webhooks' fixture of receivers and senders, stopped and closed after each test.
harness = _harness

OUTBOX = dict(max_attempts=None, timeout=0.5, backoff=0.05, max_backoff=0.2)


def stored(path: str | Path) -> list[tuple[int, str, str, str]]:
    """
    The outbox's rows as another process sees them: (id, call id, event,
    event id), oldest first; none before the outbox made its file and table
    (this reader must not make the file: it would not be 0600).
    """
    if not Path(path).exists():
        return []
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("SELECT id, call_id, event, event_id FROM webhook_outbox ORDER BY id").fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise
    finally:
        conn.close()


def gauge(metrics: CollectorRegistry, name: str) -> float:
    value = metrics.get_sample_value(name)
    assert value is not None, name
    return value


def errors(logs: LogCapture, text: str) -> list[dict[str, Any]]:
    return [
        event for event in logs.events
        if event.get("log_level") is LogLevel.error and text in event.get("log_format", "")
    ]


def durable(harness: Harness, url: str, path: str | Path, metrics: CollectorRegistry | None = None,
            **options: Any) -> Any:
    """Webhooks with an outbox at C{path}, started (the outbox opens)."""
    max_events = options.pop("max_events", 100)
    settings = {**OUTBOX, **options}
    webhooks = harness.hooks(
        [url], metrics=metrics or new_metrics(), outbox=Outbox(str(path), reactor, max_events=max_events), **settings
    )
    webhooks.startService()
    return webhooks


@pytest_twisted.ensureDeferred
async def test_events_survive_a_stop_and_arrive_after_a_restart_in_order_per_call(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """
    Three calls' events, interleaved, while the receiver is down: all nine
    are in the outbox, kept there by the stop; the next run sends them to the
    receiver, now up, each call's in the order they happened, with their ids.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    path = tmp_path / "outbox.sqlite3"
    metrics = new_metrics()
    first = durable(harness, url, path, metrics)
    calls = [str(uuid.uuid4()) for _ in range(3)]
    for call in calls:
        first.legStarted(stand_in(call))
    for call in calls:
        first.legEnded(stand_in(call, reason=CloseReason.PEER_CLOSED))
    for call in calls:
        first.callEnded(call)
    await until(lambda: len(stored(path)) == 9, what="nine events in the outbox")
    await until(lambda: count(metrics, "retried") >= 3, what="each call's first event retried")
    assert gauge(metrics, "audiohangup_webhook_outbox_events") == 9
    assert gauge(metrics, "audiohangup_webhook_outbox_oldest_age_seconds") >= 0
    assert count(metrics, "failed") == 0  # attempts do not run out with an outbox
    await first.stop()
    before = stored(path)
    assert len(before) == 9
    [kept] = [event for event in logs.events if "kept in the outbox" in event.get("log_format", "")]
    assert kept["count"] == 9

    receiver = await harness.receiver(port=port)
    second_metrics = new_metrics()
    durable(harness, url, path, second_metrics, **FAST)
    await until(lambda: {r.json["event_id"] for r in receiver.answered()} == {row[3] for row in before},
                what="every event delivered")
    for call in calls:
        expected = [row[3] for row in before if row[1] == call]
        assert first_seen(receiver.answered(), call) == expected
        assert [r.event for r in receiver.answered() if r.call_id == call][:3] == [
            "leg_started", "leg_ended", "call_ended"
        ]
    for request in receiver.requests:
        assert request.headers["x-audiohangup-event-id"] == request.json["event_id"]
    await until(lambda: stored(path) == [], what="the outbox emptied")
    await until(lambda: gauge(second_metrics, "audiohangup_webhook_outbox_events") == 0)
    assert gauge(second_metrics, "audiohangup_webhook_outbox_oldest_age_seconds") == 0


def first_seen(requests: list[Received], call: str) -> list[str]:
    """A call's event ids in the order they first arrived (a duplicate is allowed: at least once)."""
    seen: list[str] = []
    for request in requests:
        if request.call_id == call and request.json["event_id"] not in seen:
            seen.append(request.json["event_id"])
    return seen


@pytest_twisted.ensureDeferred
async def test_written_before_the_first_attempt_and_deleted_once_delivered(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """The receiver finds each event's row in the outbox when its request arrives; once answered, the row goes."""
    path = tmp_path / "outbox.sqlite3"
    present: list[bool] = []

    def script(received: Received) -> tuple[int, float]:
        present.append(received.json["event_id"] in {row[3] for row in stored(path)})
        return 200, 0.0

    receiver = await harness.receiver(script)
    metrics = new_metrics()
    webhooks = durable(harness, receiver.url, path, metrics)
    call = str(uuid.uuid4())
    webhooks.legStarted(stand_in(call))
    webhooks.legEnded(stand_in(call, reason=CloseReason.PEER_CLOSED))
    webhooks.callEnded(call)
    await until(lambda: count(metrics, "delivered") == 3, what="three deliveries")
    assert present == [True, True, True]
    assert path.stat().st_mode & 0o777 == 0o600  # the bodies hold live call ids
    await until(lambda: stored(path) == [], what="the rows deleted")
    assert webhooks.pending == 0
    assert gauge(metrics, "audiohangup_webhook_outbox_events") == 0
    assert [r.event for r in receiver.requests] == ["leg_started", "leg_ended", "call_ended"]


@pytest_twisted.ensureDeferred
async def test_at_the_bound_the_oldest_are_dropped_counted_and_logged_once(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """
    A bound of five, the receiver down: eight events of one call leave the
    newest five in the outbox (and in memory); three are counted as
    overflow; one warn line says so.
    """
    path = tmp_path / "outbox.sqlite3"
    metrics = new_metrics()
    url = f"http://127.0.0.1:{free_port()}/hook"
    webhooks = durable(harness, url, path, metrics, max_events=5, backoff=30.0, max_backoff=30.0)
    call = str(uuid.uuid4())
    webhooks.event("e1", call, None, {})
    await until(lambda: count(metrics, "retried") == 1, what="e1 waiting for its retry")
    for n in range(2, 9):
        webhooks.event(f"e{n}", call, None, {})
    await until(lambda: [row[2] for row in stored(path)] == ["e4", "e5", "e6", "e7", "e8"], what="the newest five")
    assert count(metrics, "overflow") == 3
    assert webhooks.pending == 5
    assert gauge(metrics, "audiohangup_webhook_outbox_events") == 5
    [warned] = warnings(logs, "outbox full")
    assert (warned["event"], warned["max_queue"]) == ("e1", 5)


async def left_by_a_stopped_run(harness: Harness, url: str, path: Path, events: int) -> None:
    """Events e1, e2, ... of one call for a receiver that is down, kept in the outbox by a stop."""
    first = durable(harness, url, path, backoff=30.0)
    call = str(uuid.uuid4())
    for n in range(1, events + 1):
        first.event(f"e{n}", call, None, {})
    await until(lambda: len(stored(path)) == events)
    await first.stop()


@pytest_twisted.ensureDeferred
async def test_a_bound_lowered_since_drops_the_oldest_at_start(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    url = f"http://127.0.0.1:{free_port()}/hook"
    await left_by_a_stopped_run(harness, url, path, 4)
    metrics = new_metrics()
    second = durable(harness, url, path, metrics, max_events=2, backoff=30.0)
    await until(lambda: [row[2] for row in stored(path)] == ["e3", "e4"], what="the oldest two dropped")
    assert second.pending == 2
    assert count(metrics, "overflow") == 2
    [warned] = warnings(logs, "beyond its bound")
    assert warned["count"] == 2


@pytest_twisted.ensureDeferred
async def test_events_for_a_receiver_no_longer_configured_are_dropped_at_start(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """Rows name receivers by the hash of their URL (no token at rest); one no longer given is logged and dropped."""
    path = tmp_path / "outbox.sqlite3"
    await left_by_a_stopped_run(harness, f"http://127.0.0.1:{free_port()}/hook?token=s3cret", path, 1)
    assert b"s3cret" not in path.read_bytes()
    receiver = await harness.receiver()
    second = durable(harness, receiver.url, path)
    await until(lambda: stored(path) == [], what="the row dropped")
    [warned] = warnings(logs, "no longer configured")
    assert warned["count"] == 1
    assert second.pending == 0 and receiver.requests == []


@pytest_twisted.ensureDeferred
async def test_a_corrupt_outbox_is_logged_and_the_server_serves_calls(
    harness: Harness, make_server: Any, tmp_path: Path, logs: LogCapture
) -> None:
    """A file that is not a database: one named error line; a call goes on and its events arrive, from memory."""
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a SQLite database, " * 200)
    receiver = await harness.receiver()
    server = await make_server(webhooks=(receiver.url,), webhook_outbox=str(path))
    await until(lambda: errors(logs, "is off"), what="the error line")
    [error] = errors(logs, "is off")
    assert error["path"] == str(path)
    assert "DatabaseError" in error["error"]
    metrics = server.service.metrics
    assert gauge(metrics, "audiohangup_webhook_outbox_errors_total") == 1

    call_id, visitor, _ = await bridged(server)
    assert server.registry.get(str(call_id), Role.RESIDENT) is not None
    visitor.close()
    await until(lambda: len(receiver.answered()) == 5, what="the call's five events")
    assert [r.event for r in receiver.requests] == [
        "leg_started", "leg_started", "leg_ended", "leg_ended", "call_ended"
    ]


@pytest_twisted.ensureDeferred
async def test_a_locked_outbox_is_logged_and_the_event_delivered_from_memory(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """
    Another connection holds the write lock: the write fails after the busy
    timeout, on the outbox's thread, logged once by name and counted; the
    event is still delivered. Once the lock goes, events are kept again.
    """
    path = tmp_path / "outbox.sqlite3"
    receiver = await harness.receiver()
    metrics = new_metrics()
    webhooks = harness.hooks(
        [receiver.url], metrics=metrics, outbox=Outbox(str(path), reactor, busy_timeout=0.05), **OUTBOX
    )
    webhooks.startService()
    await until(lambda: any("earlier run" in e.get("log_format", "") for e in logs.events), what="the outbox open")
    lock = sqlite3.connect(str(path), isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        locked = str(uuid.uuid4())
        webhooks.callEnded(locked)
        await until(lambda: count(metrics, "delivered") == 1, what="the delivery")
        [error] = errors(logs, "failed")
        assert (error["what"], error["call_id"], error["path"]) == ("write", locked, str(path))
        assert "database is locked" in error["error"]
        assert gauge(metrics, "audiohangup_webhook_outbox_errors_total") == 1
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    present: list[bool] = []

    def script(received: Received) -> tuple[int, float]:
        present.append(bool(stored(path)))
        return 200, 0.0

    receiver.script = script
    webhooks.callEnded(str(uuid.uuid4()))
    await until(lambda: count(metrics, "delivered") == 2, what="the second delivery")
    assert present == [True]
    await until(lambda: stored(path) == [])


# Two processes on one outbox (an upgrade): each adopts what the other left


async def opened(logs: LogCapture) -> None:
    await until(lambda: any("earlier run" in e.get("log_format", "") for e in logs.events), what="the outbox open")


async def another_process(path: Path, url: str, rows: list[tuple[str, str]], at: float) -> list[str]:
    """
    Rows (call, event) written by another process's outbox on the same
    file, the events happening at C{at}; their event ids, in order.
    """
    other = Outbox(str(path), reactor)
    await other.open()
    ids = []
    try:
        for call, event in rows:
            event_id = uuid.uuid4().hex
            body = json.dumps({"call_id": call, "event": event, "event_id": event_id, "role": None}).encode()
            await other.add(receiver_key(url), call, event, event_id, body, at)
            ids.append(event_id)
    finally:
        await other.close()
    return ids


@pytest_twisted.ensureDeferred
async def test_rows_another_process_left_are_adopted_after_the_grace_and_delivered_in_order(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """
    Another process on the same file writes events of two calls, interleaved,
    after this one started (so not read at its start), and never delivers
    them. Younger than the grace, they are left to it; past it, the next
    look (every 30 s of the clock) queues them here, and they arrive in the
    order they were written per call; their rows go.
    """
    path = tmp_path / "outbox.sqlite3"
    receiver = await harness.receiver()
    clock = Clock()
    clock.advance(reactor.seconds())
    webhooks = durable(harness, receiver.url, path, clock=clock)
    await opened(logs)
    b, c = str(uuid.uuid4()), str(uuid.uuid4())
    rows = [(b, "b1"), (c, "c1"), (b, "b2"), (c, "c2"), (b, "b3")]
    ids = await another_process(path, receiver.url, rows, clock.seconds())
    clock.advance(30)  # a look: too young
    assert await webhooks.adopt() == 0
    assert webhooks.pending == 0 and len(stored(path)) == 5
    clock.advance(31)  # the next look, past the grace
    await until(lambda: len(receiver.answered()) == 5, what="the five adopted events")
    for call in (b, c):
        assert first_seen(receiver.answered(), call) == [ids[n] for n, row in enumerate(rows) if row[0] == call]
    [adopted] = [e for e in logs.events if "adopted" in e.get("log_format", "")]
    assert adopted["count"] == 5
    await until(lambda: stored(path) == [], what="the adopted rows deleted")
    assert await webhooks.adopt() == 0


@pytest_twisted.ensureDeferred
async def test_rows_held_are_not_adopted_and_adopted_ones_go_before_newer_events_within_the_bound(
    harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """
    The receiver is down; this process holds own-a (the oldest row) and
    own-b, waiting for their retry. Another process left five rows between
    them. With room for four under the bound of six, the look adopts the
    four oldest rows not held (own-a, older still, is not taken again), and
    call b's go before own-b, written after them; c2 stays in the file.
    """
    path = tmp_path / "outbox.sqlite3"
    url = f"http://127.0.0.1:{free_port()}/hook"
    clock = Clock()
    clock.advance(reactor.seconds())
    metrics = new_metrics()
    webhooks = durable(harness, url, path, metrics, clock=clock, max_events=6, backoff=30.0, max_backoff=30.0)
    await opened(logs)
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    webhooks.event("own-a", a, None, {})
    await until(lambda: len(stored(path)) == 1)
    await another_process(path, url, [(b, "b1"), (c, "c1"), (b, "b2"), (b, "b3"), (c, "c2")], clock.seconds())
    webhooks.event("own-b", b, None, {})
    await until(lambda: count(metrics, "retried") == 2, what="own-a and own-b waiting for their retry")
    clock.advance(90)
    await until(lambda: webhooks.pending == 6, what="four adopted")
    queues = {call: [item.event for item in queue.items] for (_, call), queue in webhooks._queues.items()}
    assert queues == {a: ["own-a"], b: ["b1", "b2", "b3", "own-b"], c: ["c1"]}
    assert webhooks.oldest_at == clock.seconds() - 90  # the adopted count as the oldest held (the age gauge)
    assert await webhooks.adopt() == 0  # no room left
    assert [row[2] for row in stored(path)] == ["own-a", "b1", "c1", "b2", "b3", "c2", "own-b"]
    assert count(metrics, "overflow") == 0


def test_options_name_the_outbox_and_its_bound(tmp_path: Path) -> None:
    options = tap.Options()
    options.parseOptions(["--webhook", "http://127.0.0.1:1/hook", "--call-records", str(tmp_path / "calls.sqlite3")])
    config = options.config()
    assert config.webhook_outbox_path() == str(tmp_path / FILE_NAME)  # beside the call records
    assert config.webhook_outbox_max == 50000
    assert Config(records="none", webhook_outbox="none").webhook_outbox_path() is None
    assert Config(records="none").webhook_outbox_path() == FILE_NAME
    options = tap.Options()
    options.parseOptions(["--webhook-outbox", str(tmp_path / "o.sqlite3"), "--webhook-outbox-max", "7"])
    assert (options.config().webhook_outbox_path(), options.config().webhook_outbox_max) == (
        str(tmp_path / "o.sqlite3"), 7
    )
    for args, fragment in [
        (["--webhook-outbox-max", "0"], "--webhook-outbox-max must be a whole number of at least 1"),
        (["--webhook", "http://127.0.0.1:1/", "--webhook-outbox", str(tmp_path / "no" / "o.sqlite3")],
         "--webhook-outbox: the directory"),
        (["--webhook-outbox", ""], "--webhook-outbox needs a file path"),
    ]:
        try:
            tap.Options().parseOptions(args)
        except usage.UsageError as error:
            assert fragment in str(error)
        else:
            raise AssertionError(f"{args} was taken")


# A real process, killed


async def scrape(port: int, name: str) -> float:
    response = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False, timeout=10)
    text = (await response.content()).decode()
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


@pytest_twisted.ensureDeferred
async def test_a_killed_server_delivers_every_event_after_its_restart(
    spawn: Spawn, harness: Harness, tmp_path: Path, logs: LogCapture
) -> None:
    """
    The receiver is down; 20 calls of two legs make 100 events; SIGKILL.
    Then the receiver comes up and the server starts again on the same
    outbox: all 100 arrive, each with its id in the body and the header, in
    the order they happened per call. A duplicate would be allowed (at least
    once); a missing event is not.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    outbox = str(tmp_path / "outbox.sqlite3")
    arguments = ("--webhook", url, "--webhook-outbox", outbox)
    child, ports = await start_server(spawn, *arguments)
    calls = [uuid.uuid4() for _ in range(20)]
    for call_id in calls:
        visitor = await connect(ports["audiosocket-visitor"], on_hangup="close")
        resident = await connect(ports["audiosocket-resident"], on_hangup="close")
        visitor.send_uuid(call_id)
        resident.send_uuid(call_id)
        await until(lambda call=str(call_id): [row[1] for row in stored(outbox)].count(call) == 2, what="both legs")
        visitor.close()  # the session hangs up the resident, which closes
    await until(lambda: len(stored(outbox)) == 100, 20, "100 events in the outbox")
    assert await scrape(ports["http"], "audiohangup_webhook_outbox_events") == 100
    assert await scrape(ports["http"], "audiohangup_webhook_outbox_oldest_age_seconds") > 0
    child.signal("KILL")
    ended = await child.exit()
    assert isinstance(ended, ProcessTerminated) and ended.signal == signal.SIGKILL
    before = stored(outbox)
    assert len(before) == 100

    receiver = await harness.receiver(port=port)
    child, ports = await start_server(spawn, *arguments)
    expected = {row[3] for row in before}
    await until(lambda: {r.json["event_id"] for r in receiver.answered()} == expected, 30, "all 100 events")
    assert len(receiver.answered()) >= 100  # duplicates allowed: delivery is at least once
    for call_id in calls:
        ids = [row[3] for row in before if row[1] == str(call_id)]
        assert first_seen(receiver.answered(), str(call_id)) == ids
        events = [row[2] for row in before if row[1] == str(call_id)]
        assert events == ["leg_started", "leg_started", "leg_ended", "leg_ended", "call_ended"]
    for request in receiver.requests:
        assert request.headers["x-audiohangup-event-id"] == request.json["event_id"]
    await until(lambda: stored(outbox) == [], 10, "the outbox emptied")
    assert "100 undelivered events from an earlier run" in child.log, child.describe()
    child.signal("TERM")
    await child.exit()


@pytest_twisted.ensureDeferred
async def test_the_backlog_series_are_shown_without_webhooks(make_server: Any, logs: LogCapture) -> None:
    """Alert rules and dashboards name them whatever is configured: 0 with no webhook."""
    server = await make_server()
    metrics = server.service.metrics
    for name in (
        "audiohangup_webhook_outbox_events", "audiohangup_webhook_outbox_oldest_age_seconds",
        "audiohangup_webhook_outbox_errors_total",
    ):
        assert gauge(metrics, name) == 0
