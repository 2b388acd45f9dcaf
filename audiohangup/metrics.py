# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, with prometheus_client on a registry of our own.

Per-frame figures (frames, bytes, dropped audio) are not counted per frame:
the legs already count them, so a collector adds the live legs' counters to
the totals of ended legs when Prometheus scrapes. The hot path pays nothing.
Label values are bounded sets: roles, reasons, causes, route templates,
statuses and outcomes, never a call id.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from zope.interface import implementer

from audiohangup.interfaces import ILegObserver
from audiohangup.reasons import HangupCause, Role

if TYPE_CHECKING:
    from audiohangup.interfaces import IServerLeg
    from audiohangup.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: A young collection takes microseconds, a full one over a large heap tens of milliseconds.
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

#: From a reset right after our hangup (sub-millisecond) to the 2 s abort.
HANGUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0)

_LEG_COUNTERS = ("frames_in", "frames_out", "bytes_in", "bytes_out", "dropped_frames", "dtmf")


@implementer(ILegObserver)
class Metrics:
    """Every audiohangup metric; observes legs and is told of HTTP, webhooks and records."""

    def __init__(self, registry: Registry) -> None:
        disable_created_metrics()  # the *_created series only add noise here
        self.registry = registry
        self.collectors = CollectorRegistry()
        self.legs_started = Counter(
            "audiohangup_legs_started", "Legs whose UUID arrived.", ["role"], registry=self.collectors
        )
        self.legs_ended = Counter(
            "audiohangup_legs_ended", "Legs gone, by close reason and hangup cause.",
            ["reason", "cause"], registry=self.collectors,
        )
        self.connections_without_leg = Counter(
            "audiohangup_connections_without_leg",
            "Connections that never became a leg, by close reason (over_capacity, uuid_timeout, duplicate, ...).",
            ["reason"], registry=self.collectors,
        )
        self.connections_refused = Counter(
            "audiohangup_connections_refused",
            "Connections closed as they were accepted, by listener and reason (not_allowed: outside --allow).",
            ["listener", "reason"], registry=self.collectors,
        )
        self.hangups_sent = Counter(
            "audiohangup_hangups_sent", "Hangup frames we sent, by cause.", ["cause"], registry=self.collectors
        )
        self.hangup_to_close = Histogram(
            "audiohangup_hangup_to_close_seconds", "Seconds from our hangup to the leg being gone.",
            buckets=HANGUP_BUCKETS, registry=self.collectors,
        )
        self.http_requests = Counter(
            "audiohangup_http_requests", "HTTP requests, by route template, method and status.",
            ["route", "method", "status"], registry=self.collectors,
        )
        self.webhook_deliveries = Counter(
            "audiohangup_webhook_deliveries", "Webhook deliveries, by outcome.", ["outcome"],
            registry=self.collectors,
        )
        self.records_written = Counter(
            "audiohangup_call_records_written", "Call record writes that succeeded.", registry=self.collectors
        )
        self.records_failed = Counter(
            "audiohangup_call_records_failed", "Call record writes that failed.", registry=self.collectors
        )
        self.gc_pauses = Histogram(
            "audiohangup_gc_pause_seconds",
            "Seconds the interpreter stopped for a garbage collection, by generation: every call waits them out.",
            ["generation"], buckets=GC_BUCKETS, registry=self.collectors,
        )
        self._gcStarted = 0.0
        self.bridge_conversions = Counter(
            "audiohangup_bridge_conversions",
            "Bridged frames converted between two legs' formats, by format pair.",
            ["source", "target"], registry=self.collectors,
        )
        self.recordings_active = Gauge(
            "audiohangup_recordings_active", "Calls being recorded.", registry=self.collectors
        )
        self.recordings_written = Counter(
            "audiohangup_recordings_written", "Recordings finished, their WAV header completed.", registry=self.collectors
        )
        self.recording_bytes_written = Counter(
            "audiohangup_recording_bytes", "Audio bytes written to recordings.", registry=self.collectors
        )
        self.recording_dropped_frames = Counter(
            "audiohangup_recording_dropped_frames",
            "Frames of audio not recorded: a disk too slow or full.", registry=self.collectors,
        )
        self.streams_total = Counter(
            "audiohangup_streams", "Media streams over, by protocol and outcome (ended, app_closed, failed).",
            ["protocol", "outcome"], registry=self.collectors,
        )
        self._ended_totals = dict.fromkeys(_LEG_COUNTERS, 0)
        #: The media streams manager, once wired: its streams are summed at scrape time.
        self.streams: Any = None
        #: The shared 20 ms tick, once wired: its counts are read at scrape time.
        self.pacer: Any = None
        for role in Role:
            self.legs_started.labels(role=role.value)
        self.collectors.register(_LegCollector(self))
        self.collectors.register(_StreamCollector(self))
        self.collectors.register(_PacerCollector(self))

    def watchGarbageCollector(self) -> None:
        """Time every collection (gc.callbacks is the process's: L{unwatchGarbageCollector} on stop)."""
        if self._gcCallback not in gc.callbacks:
            gc.callbacks.append(self._gcCallback)

    def unwatchGarbageCollector(self) -> None:
        if self._gcCallback in gc.callbacks:
            gc.callbacks.remove(self._gcCallback)

    def _gcCallback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gcStarted = time.perf_counter()
        else:
            self.gc_pauses.labels(generation=str(info["generation"])).observe(time.perf_counter() - self._gcStarted)

    def render(self) -> bytes:
        return generate_latest(self.collectors)

    # ILegObserver

    def legStarted(self, leg: IServerLeg) -> None:
        self.legs_started.labels(role=leg.role.value).inc()

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        self.hangups_sent.labels(cause=cause.value).inc()

    def legEnded(self, leg: IServerLeg) -> None:
        assert leg.close_reason is not None
        cause = leg.hangup_cause.value if leg.hangup_cause is not None else "none"
        self.legs_ended.labels(reason=leg.close_reason.value, cause=cause).inc()
        if leg.hangup_to_close_ms is not None:
            self.hangup_to_close.observe(leg.hangup_to_close_ms / 1000)
        self._addEnded(leg)

    def _addEnded(self, connection: IServerLeg) -> None:
        for name, value in _leg_counters(connection).items():
            self._ended_totals[name] += value

    def callEnded(self, call_id: str) -> None:
        pass

    def connectionEnded(self, connection: IServerLeg) -> None:
        assert connection.close_reason is not None
        self.connections_without_leg.labels(reason=connection.close_reason.value).inc()
        self._addEnded(connection)

    # Told by the others

    def http_request(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(route=route, method=method, status=str(status)).inc()

    def connection_refused(self, listener: str, reason: str) -> None:
        self.connections_refused.labels(listener=listener, reason=reason).inc()

    def recording_started(self) -> None:
        self.recordings_active.inc()

    def recording_finished(self) -> None:
        self.recordings_active.dec()
        self.recordings_written.inc()

    def recording_bytes(self, count: int) -> None:
        self.recording_bytes_written.inc(count)

    def recording_dropped(self, frames: int) -> None:
        self.recording_dropped_frames.inc(frames)

    def stream_started(self, stream: Any) -> None:
        pass  # the gauge of active streams is read from the manager at scrape time

    def stream_ended(self, stream: Any) -> None:
        self.streams_total.labels(protocol=stream.protocol.name, outcome=str(stream.outcome)).inc()

    def webhook_delivery(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome=outcome).inc()

    def record_written(self) -> None:
        self.records_written.inc()

    def record_failed(self) -> None:
        self.records_failed.inc()


def _leg_counters(leg: IServerLeg) -> dict[str, int]:
    return {
        "frames_in": leg.frames_in,
        "frames_out": leg.frames_out,
        "bytes_in": leg.bytes_in,
        "bytes_out": leg.bytes_out,
        "dropped_frames": leg.queue.dropped,
        "dtmf": leg.dtmf_count,
    }


class _OnScrape(Collector):
    """A collector of what the service keeps itself, read from L{Metrics} when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily, on scrape only


class _LegCollector(_OnScrape):
    """Live legs by role, and per-frame totals: ended legs' plus live legs' own counters."""

    _HELP = {
        "frames_in": ("audiohangup_frames_received", "AudioSocket frames received from legs."),
        "frames_out": ("audiohangup_frames_sent", "AudioSocket frames sent to legs."),
        "bytes_in": ("audiohangup_bytes_received", "Bytes received from legs."),
        "bytes_out": ("audiohangup_bytes_sent", "Bytes sent to legs."),
        "dropped_frames": ("audiohangup_audio_dropped_frames", "Outbound audio frames dropped from full queues."),
        "dtmf": ("audiohangup_dtmf", "DTMF digits received from legs (each one, logged or not)."),
    }

    def collect(self) -> Iterator[Metric]:
        legs = list(self.metrics.registry)
        live = GaugeMetricFamily("audiohangup_legs", "Live legs, by role.", labels=["role"])
        for role in Role:
            live.add_metric([role.value], sum(1 for leg in legs if leg.role is role))
        yield live
        totals = dict(self.metrics._ended_totals)
        # Every open connection, not only the sessions' legs: a replaced leg
        # still closing must not drop out and make a counter go backwards.
        for connection in self.metrics.registry.connections():
            for name, value in _leg_counters(connection).items():
                totals[name] += value
        for name, (metric, text) in self._HELP.items():
            yield CounterMetricFamily(metric, text, value=totals[name])


class _StreamCollector(_OnScrape):
    """
    Media streams: how many are active, and frames, bytes and drops each way,
    the ended streams' totals plus the live ones' own counters.
    """

    #: metric, help, and the counter of each direction (to the app, from the app).
    _FAMILIES = (
        ("audiohangup_stream_frames", "Audio frames streamed, by direction.", "frames_to_app", "frames_from_app"),
        ("audiohangup_stream_bytes", "Media payload bytes, by direction.", "bytes_to_app", "bytes_from_app"),
        (
            "audiohangup_stream_dropped_frames",
            "Stream audio dropped: to an app reading too slowly, or from an app beyond its queue or cleared.",
            "dropped_to_app", "dropped_from_app",
        ),
    )

    def collect(self) -> Iterator[Metric]:
        manager = self.metrics.streams
        current = list(manager.current.values()) if manager is not None else []

        def total(name: str) -> int:
            ended = getattr(manager.ended_totals, name) if manager is not None else 0
            return int(ended + sum(getattr(stream.totals(), name) for stream in current))

        active = GaugeMetricFamily("audiohangup_streams_active", "Media streams connecting, open or closing.")
        active.add_metric([], len(current))
        yield active
        for metric, text, to_app, from_app in self._FAMILIES:
            family = CounterMetricFamily(metric, text, labels=["direction"])
            family.add_metric(["to_app"], total(to_app))
            family.add_metric(["from_app"], total(from_app))
            yield family
        yield CounterMetricFamily(
            "audiohangup_stream_ignored_frames", "Audio from apps on listen streams, not played.",
            value=total("ignored_from_app"),
        )


class _PacerCollector(_OnScrape):
    """
    The shared tick: how often it ran, how often late, and the 20 ms slots
    late ticks missed, whose audio was dropped rather than played late: the
    stalls (GC pauses, a busy or stopped process) a caller heard as gaps.
    """

    _COUNTS = (
        ("ticks", "audiohangup_pacer_ticks", "Ticks of the shared 20 ms pacer."),
        ("late_ticks", "audiohangup_pacer_late_ticks", "Ticks that ran a slot or more late."),
        ("missed_slots", "audiohangup_pacer_missed_slots", "20 ms slots late ticks missed (their audio dropped)."),
    )

    def collect(self) -> Iterator[Metric]:
        pacer = self.metrics.pacer
        for attribute, metric, text in self._COUNTS:
            yield CounterMetricFamily(metric, text, value=getattr(pacer, attribute, 0))
