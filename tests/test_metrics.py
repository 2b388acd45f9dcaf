"""
Prometheus metrics over a real server: scraped with treq from /metrics while
fake Asterisk legs start and end with each reason.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from audiohangup.reasons import HangupCause, Role
from audiohangup.wire import HANGUP_FRAME, Kind, encode_frame
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import SILENCE_20MS, connect


async def scrape(server: Server, **kwargs: Any) -> dict[tuple[str, tuple], float]:
    response = await treq.get(f"{server.url}/metrics", persistent=False, **kwargs)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def leg(server: Server, role: Role = Role.VISITOR, call_id: uuid.UUID | None = None, **options: Any):
    call_id = call_id or uuid.uuid4()
    client = await connect(server.port(role), **options)
    client.send_uuid(call_id)
    found = await until(lambda: server.registry.get(str(call_id), role))
    return client, found


@pytest_twisted.ensureDeferred
async def test_metrics_follow_legs(make_server, logs: LogCapture) -> None:
    """Live legs, starts, ends by reason and cause, hangup latency and frame totals move."""
    # Timers of a second: long for the quick ends below, even on a starved machine.
    server = await make_server(on_leg_end="keep", close_timeout=1.0, uuid_timeout=1.0)
    before = await scrape(server)
    assert value(before, "audiohangup_legs", role="visitor") == 0

    reset, reset_leg = await leg(server, on_hangup="reset")
    _clean, clean_leg = await leg(server, Role.RESIDENT, on_hangup="close")
    _stuck, stuck_leg = await leg(server, on_hangup="ignore")
    closer, closer_leg = await leg(server)
    resetter, resetter_leg = await leg(server)
    hanger, hanger_leg = await leg(server)
    erring, erring_leg = await leg(server)
    broken, broken_leg = await leg(server)
    silent = await connect(server.port("visitor"))
    reset.send(SILENCE_20MS * 3)
    await until(lambda: reset_leg.frames_in == 4)

    live = await scrape(server)
    assert value(live, "audiohangup_legs", role="visitor") == 7
    assert value(live, "audiohangup_legs", role="resident") == 1
    assert value(live, "audiohangup_legs_started_total", role="visitor") == 7
    assert value(live, "audiohangup_frames_received_total") >= 11
    assert value(live, "audiohangup_pacer_ticks_total") >= 1  # the service's own pacer, wired

    await reset_leg.hangup(HangupCause.API)
    await clean_leg.hangup(HangupCause.API)
    await stuck_leg.hangup(HangupCause.API)
    closer.close()
    await closer_leg.whenGone()
    resetter.reset()
    await resetter_leg.whenGone()
    hanger.send(HANGUP_FRAME)
    await hanger_leg.whenGone()
    erring.send(encode_frame(Kind.ERROR, b"\x01"))
    await erring_leg.whenGone()
    broken.send(encode_frame(Kind.DTMF, b"12"))
    await broken_leg.whenGone()
    await silent.closed
    await until(lambda: not server.registry.connections())

    after = await scrape(server)
    ended = "audiohangup_legs_ended_total"
    expected = {
        ("hangup_reset", "api"): 1,
        ("hangup_clean", "api"): 1,
        ("hangup_timeout", "api"): 1,
        ("peer_closed", "none"): 1,
        ("peer_reset", "none"): 1,
        ("peer_hangup", "none"): 1,
        ("peer_error", "none"): 1,
        ("protocol_error", "none"): 1,
    }
    for (reason, cause), count in expected.items():
        assert value(after, ended, reason=reason, cause=cause) == count, (reason, cause)
    # A connection without a UUID is never a leg: its uuid_timeout is logged, not counted.
    assert value(after, ended, reason="uuid_timeout", cause="none") == 0
    assert value(after, "audiohangup_legs", role="visitor") == 0
    assert value(after, "audiohangup_hangups_sent_total", cause="api") == 3
    assert value(after, "audiohangup_hangup_to_close_seconds_count") == 3
    # The reset and the clean close came well before the close timeout; the stuck leg only at it.
    assert value(after, "audiohangup_hangup_to_close_seconds_bucket", le="1.0") == 2
    assert value(after, "audiohangup_hangup_to_close_seconds_bucket", le="10.0") == 3
    # Totals never go down when live legs end: ended legs' counters are kept.
    assert value(after, "audiohangup_frames_received_total") >= value(live, "audiohangup_frames_received_total")
    assert value(after, "audiohangup_frames_sent_total") >= 3
    assert value(after, "audiohangup_bytes_sent_total") >= 9


@pytest_twisted.ensureDeferred
async def test_http_requests_by_route_and_status(make_server, logs: LogCapture) -> None:
    server = await make_server(api_token="tok")
    auth = {"Authorization": "Bearer tok"}
    for path in ("/health", "/calls", "/nope", f"/calls/{uuid.uuid4()}"):
        response = await treq.get(server.url + path, headers=auth, persistent=False)
        await response.content()
    response = await treq.get(server.url + "/calls", persistent=False)
    await response.content()
    samples = await scrape(server, headers=auth)
    name = "audiohangup_http_requests_total"
    assert value(samples, name, route="/health", method="GET", status="200") == 1
    assert value(samples, name, route="/calls", method="GET", status="200") == 1
    assert value(samples, name, route="/calls", method="GET", status="401") == 1
    assert value(samples, name, route="unmatched", method="GET", status="404") == 1
    assert value(samples, name, route="/calls/<string:call_id>", method="GET", status="404") == 1
    response = await treq.get(server.url + "/metrics", persistent=False)
    assert response.code == 401
    await response.content()


@pytest_twisted.ensureDeferred
async def test_dropped_audio_is_counted(make_server, logs: LogCapture) -> None:
    server = await make_server(max_queue_ms=40)
    _, found = await leg(server)
    found.play(b"\x01\x00" * 160 * 5)
    samples = await scrape(server)
    assert value(samples, "audiohangup_audio_dropped_frames_total") == 3


@pytest_twisted.ensureDeferred
async def test_method_label_is_bounded(make_server, logs: LogCapture) -> None:
    server = await make_server()
    for method in ("FOO", "BAR", "BAZ"):
        response = await treq.request(method, f"{server.url}/calls", persistent=False)
        await response.content()
    samples = await scrape(server)
    assert value(samples, "audiohangup_http_requests_total", route="unmatched", method="other", status="405") == 3


def test_counters_never_go_back_when_a_leg_is_replaced() -> None:
    """A replaced leg still closing keeps counting: frame totals only grow."""
    from prometheus_client import CollectorRegistry
    from twisted.internet.error import ConnectionLost
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from audiohangup.audio import LegSettings
    from audiohangup.metrics import LegMetrics
    from audiohangup.pacer import Pacer
    from audiohangup.protocol import AudioSocketProtocol
    from audiohangup.registry import Registry
    from audiohangup.wire import encode_uuid

    registry = Registry(on_duplicate="replace")
    metrics = CollectorRegistry()
    registry.events.add(LegMetrics(metrics, registry))
    clock = Clock()
    call = uuid.uuid4()

    def leg() -> AudioSocketProtocol:
        made = AudioSocketProtocol(Role.VISITOR, registry, LegSettings(), clock, Pacer(clock))
        made.makeConnection(StringTransport())
        made.dataReceived(encode_uuid(call) + SILENCE_20MS * 5)
        return made

    def received() -> float:
        return metrics.get_sample_value("audiohangup_frames_received_total")

    old = leg()
    seen = [received()]
    new = leg()  # replaces the old one, which is now closing
    seen.append(received())
    old.connectionLost(Failure(ConnectionLost()))
    seen.append(received())
    new.connectionLost(Failure(ConnectionLost()))
    seen.append(received())
    assert seen == [6, 12, 12, 12]


@pytest_twisted.ensureDeferred
async def test_garbage_collector_pauses_are_timed_while_the_service_runs(make_server, logs: LogCapture) -> None:
    """Every collection's pause lands in the histogram; the process-wide hook goes with the service."""
    import gc

    server = await make_server()
    metrics, pauses = server.service.metrics, server.service.getServiceNamed("gc-pauses")
    assert pauses._collecting in gc.callbacks
    before = metrics.get_sample_value("audiohangup_gc_pause_seconds_count", {"generation": "2"}) or 0
    gc.collect()
    after = metrics.get_sample_value("audiohangup_gc_pause_seconds_count", {"generation": "2"})
    assert after == before + 1
    assert metrics.get_sample_value("audiohangup_gc_pause_seconds_sum", {"generation": "2"}) > 0
    await server.service.stopService()
    assert pauses._collecting not in gc.callbacks


def test_missed_slots_are_counted() -> None:
    """
    A tick the reactor runs 100 ms late is one late tick and four missed
    slots, whose audio the legs dropped: a stall a caller heard as a gap.
    """
    from prometheus_client import CollectorRegistry
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from audiohangup.audio import LegSettings
    from audiohangup.pacer import Pacer
    from audiohangup.protocol import AudioSocketProtocol
    from audiohangup.registry import Registry
    from audiohangup.wire import encode_uuid

    registry = Registry()
    metrics = CollectorRegistry()
    clock = Clock()
    pacer = Pacer(clock, metrics=metrics)
    leg = AudioSocketProtocol(Role.VISITOR, registry, LegSettings(), clock, pacer)
    leg.makeConnection(StringTransport())
    leg.dataReceived(encode_uuid(uuid.uuid4()))
    clock.pump([0.02] * 5 + [0.1])

    def sample(name: str) -> float:
        return metrics.get_sample_value(name)

    assert (sample("audiohangup_pacer_ticks_total"), sample("audiohangup_pacer_late_ticks_total")) == (6, 1)
    assert sample("audiohangup_pacer_missed_slots_total") == 4
    pacer.stopService()


def test_every_series_is_shown_whatever_is_off() -> None:
    """
    With the call records off, no webhook and a flow other than the bridge,
    /metrics still names their series (the call records' at 0), as one
    registry made them all before the parts counted their own.
    """
    from prometheus_client import generate_latest
    from twisted.internet.testing import MemoryReactorClock

    from audiohangup.service import Config, build_service

    service = build_service(Config(records="none", flow="echo"), MemoryReactorClock())  # type: ignore[arg-type]
    assert service.metrics is not None
    text = generate_latest(service.metrics).decode()
    for name in ("audiohangup_call_records_written_total", "audiohangup_call_records_failed_total"):
        assert f"\n{name} 0.0\n" in text, name
    for name in ("audiohangup_webhook_deliveries_total", "audiohangup_bridge_conversions_total"):
        assert f"# TYPE {name} counter" in text, name
