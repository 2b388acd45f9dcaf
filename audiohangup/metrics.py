# -*- test-case-name: tests.test_metrics,tests.test_systemd -*-
"""
Prometheus metrics: one C{CollectorRegistry} for the server, passed to each
part, which registers its own series (with L{series}) and collectors. Nobody
tells a hub what happened: the records count their writes, the webhooks their
deliveries, the recorder its bytes, each in its own counter.

This module holds what they share, and the legs' own metrics: per-frame
figures (frames, bytes, dropped audio) are not counted per frame: the legs
already count them, so a collector adds the live legs' counters to the totals
of ended legs when Prometheus scrapes. The hot path pays nothing. Label
values are bounded sets: roles, reasons, causes, route templates, statuses
and outcomes, never a call id.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver
from audiohangup.reasons import HangupCause, Role

if TYPE_CHECKING:
    from audiohangup.interfaces import IServerLeg
    from audiohangup.registry import Registry
    from audiohangup.streams.manager import Streams

__all__ = [
    "CONTENT_TYPE", "GarbageCollectorPauses", "LegMetrics", "OnScrape", "ReactorLag", "StreamTotals", "process_series",
    "series",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: A young collection takes microseconds, a full one over a large heap tens of milliseconds.
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

#: From a loop that keeps up (about a millisecond) to one stalled for seconds: 20 ms is a frame.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: From a reset right after our hangup (sub-millisecond) to the 2 s abort.
HANGUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0)

_LEG_COUNTERS = ("frames_in", "frames_out", "bytes_in", "bytes_out", "dropped_frames", "dtmf")

_Series = TypeVar("_Series", Counter, Gauge, Histogram)

#: The series made in each registry, by name: two parts of one kind (two
#: gates, two webhook senders in a test) share theirs instead of clashing.
_made: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def series(
    metrics: CollectorRegistry, kind: type[_Series], name: str, documentation: str, labels: Sequence[str] = (),
    **options: Any,
) -> _Series:
    """The series C{name} of C{metrics}: made and registered the first time, the same one after."""
    disable_created_metrics()  # the *_created series only add noise here
    made = _made.setdefault(metrics, {})
    found = made.get(name)
    if found is None:
        found = made[name] = kind(name, documentation, list(labels), registry=metrics, **options)
    assert isinstance(found, kind), f"{name} is a {type(found).__name__}, not a {kind.__name__}"
    return found


@implementer(ILegObserver)
class LegMetrics(LegObserver):
    """The legs' metrics: starts, ends, hangups and their latency, and (at scrape time) live legs and frames."""

    def __init__(self, metrics: CollectorRegistry, registry: Registry) -> None:
        self.registry = registry
        self.legs_started = series(metrics, Counter, "audiohangup_legs_started", "Legs whose UUID arrived.", ["role"])
        self.legs_ended = series(
            metrics, Counter, "audiohangup_legs_ended", "Legs gone, by close reason and hangup cause.",
            ["reason", "cause"],
        )
        self.connections_without_leg = series(
            metrics, Counter, "audiohangup_connections_without_leg",
            "Connections that never became a leg, by close reason (over_capacity, uuid_timeout, duplicate, ...).",
            ["reason"],
        )
        self.hangups_sent = series(
            metrics, Counter, "audiohangup_hangups_sent", "Hangup frames we sent, by cause.", ["cause"]
        )
        self.hangup_to_close = series(
            metrics, Histogram, "audiohangup_hangup_to_close_seconds", "Seconds from our hangup to the leg being gone.",
            buckets=HANGUP_BUCKETS,
        )
        self.ended_totals = dict.fromkeys(_LEG_COUNTERS, 0)
        for role in Role:
            self.legs_started.labels(role=role.value)
        metrics.register(_LegCollector(self))
        # What a leg carried is this instance's traffic, even when the leg is its session home's to count.
        registry.events.add(_EndedTraffic(self))

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

    def _addEnded(self, connection: IServerLeg) -> None:
        for name, value in _leg_counters(connection).items():
            self.ended_totals[name] += value

    def connectionEnded(self, connection: IServerLeg) -> None:
        assert connection.close_reason is not None
        self.connections_without_leg.labels(reason=connection.close_reason.value).inc()
        self._addEnded(connection)


@implementer(ILegObserver)
class _EndedTraffic(LegObserver):
    """
    Adds each ended leg's frames and bytes to the totals. Not a counting
    observer (L{LegEvents.add}): a leg handed over through the media link is
    counted on its session's home, but its frames crossed this instance.
    """

    def __init__(self, legs: LegMetrics) -> None:
        self.legs = legs

    def legEnded(self, leg: IServerLeg) -> None:
        self.legs._addEnded(leg)


class GarbageCollectorPauses(Service):
    """
    Times every collection while it runs: C{gc.callbacks} is the process's,
    so the hook goes when the service stops.
    """

    name = "gc-pauses"

    def __init__(self, metrics: CollectorRegistry) -> None:
        self.pauses = series(
            metrics, Histogram, "audiohangup_gc_pause_seconds",
            "Seconds the interpreter stopped for a garbage collection, by generation: every call waits them out.",
            ["generation"], buckets=GC_BUCKETS,
        )
        self._started = 0.0

    def startService(self) -> None:
        super().startService()
        if self._collecting not in gc.callbacks:
            gc.callbacks.append(self._collecting)

    def stopService(self) -> None:
        super().stopService()
        if self._collecting in gc.callbacks:
            gc.callbacks.remove(self._collecting)

    def _collecting(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.labels(generation=str(info["generation"])).observe(time.perf_counter() - self._started)


class ReactorLag(Service):
    """
    How late a timer of the reactor fires, every C{interval}: whatever holds
    the reactor (a slow callback, a long collection, a starved CPU) delays
    every leg's next frame by as much, so this is the lag calls hear. A
    reactor stuck for good fires nothing and answers no scrape: the systemd
    watchdog (L{audiohangup.systemd}) is what catches that.
    """

    name = "reactor-lag"

    def __init__(self, metrics: CollectorRegistry, clock: IReactorTime, interval: float = 0.5) -> None:
        self.lag = series(
            metrics, Histogram, "audiohangup_reactor_lag_seconds",
            "Seconds a reactor timer fired late (one every half second): the delay every leg's audio met.",
            buckets=LAG_BUCKETS,
        )
        self.clock = clock
        self.interval = interval
        self._due = 0.0
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._fired)

    def _fired(self) -> None:
        self.lag.observe(max(0.0, self.clock.seconds() - self._due))
        self._schedule()


def process_series(metrics: CollectorRegistry) -> None:
    """
    The process's own series in C{metrics} (prometheus_client's collector:
    C{process_open_fds} and C{process_max_fds}, the soft limit in force,
    memory, CPU seconds), which the default registry has but /metrics does
    not render. On a system without C{/proc} it yields nothing.
    """
    ProcessCollector(registry=metrics)


def _leg_counters(leg: IServerLeg) -> dict[str, int]:
    return {
        "frames_in": leg.frames_in,
        "frames_out": leg.frames_out,
        "bytes_in": leg.bytes_in,
        "bytes_out": leg.bytes_out,
        "dropped_frames": leg.queue.dropped,
        "dtmf": leg.dtmf_count,
    }


class OnScrape(Collector):
    """A collector of what a part keeps itself, read when Prometheus scrapes."""

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily, on scrape only


class _LegCollector(OnScrape):
    """Live legs by role, and per-frame totals: ended legs' plus live legs' own counters."""

    _HELP = {
        "frames_in": ("audiohangup_frames_received", "AudioSocket frames received from legs."),
        "frames_out": ("audiohangup_frames_sent", "AudioSocket frames sent to legs."),
        "bytes_in": ("audiohangup_bytes_received", "Bytes received from legs."),
        "bytes_out": ("audiohangup_bytes_sent", "Bytes sent to legs."),
        "dropped_frames": ("audiohangup_audio_dropped_frames", "Outbound audio frames dropped from full queues."),
        "dtmf": ("audiohangup_dtmf", "DTMF digits received from legs (each one, logged or not)."),
    }

    def __init__(self, legs: LegMetrics) -> None:
        self.legs = legs

    def collect(self) -> Iterator[Metric]:
        legs = list(self.legs.registry)
        live = GaugeMetricFamily("audiohangup_legs", "Live legs, by role.", labels=["role"])
        for role in Role:
            live.add_metric([role.value], sum(1 for leg in legs if leg.role is role))
        yield live
        totals = dict(self.legs.ended_totals)
        # Every open connection, not only the sessions' legs: a replaced leg
        # still closing must not drop out and make a counter go backwards.
        for connection in self.legs.registry.connections():
            for name, value in _leg_counters(connection).items():
                totals[name] += value
        for name, (metric, text) in self._HELP.items():
            yield CounterMetricFamily(metric, text, value=totals[name])


class StreamTotals(OnScrape):
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

    def __init__(self, manager: Streams) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        current = list(manager.current.values())

        def total(name: str) -> int:
            ended = getattr(manager.ended_totals, name)
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
