# -*- test-case-name: tests.test_hour -*-
"""
The last hour, minute by minute, for the live page's charts and
C{GET /stats/hour}: legs started and ended (by close reason), live legs and
media streams, hangup-to-close times (p50, p99), stream and webhook failures.

Bounded whatever the traffic: a ring of L{MINUTES} buckets, each reused as
its minute comes round again, each holding counts and at most
L{MAX_SAMPLES} hangup-to-close times (a uniform reservoir beyond that, so
the percentiles stay those of the whole minute, near enough). Minutes are
wall-clock minutes of the given clock (C{seconds() // 60}), so the chart's
axis is the clock's.

L{Hour} is the sans-IO core: a leg observer (legs started and ended, and the
live legs at each, exact) that is also told to L{Hour.sample} what it cannot
observe: the streams open, and the stream and webhook failure totals, read
from what their parts count already (their Prometheus counters), whose
growth since the last sample goes to the current minute. L{HourSampler} is
the timer that samples every few seconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from audiohangup.events import LegObserver, counts_as_leg
from audiohangup.interfaces import ILegObserver, IServerLeg
from audiohangup.logs import iso_time

__all__ = ["MAX_SAMPLES", "MINUTES", "Hour", "HourSampler", "Readings", "counted"]

#: Minutes kept: the last hour.
MINUTES = 60
#: Hangup-to-close times kept per minute; beyond it a uniform sample of them.
MAX_SAMPLES = 1000
#: Seconds between two samples of what is not observed (streams, failures).
SAMPLE_SECONDS = 5.0


@dataclass(frozen=True)
class Readings:
    """What the hour samples: streams open now, and the failures counted since the server started."""

    streams: int = 0
    stream_failures: float = 0.0
    webhook_failures: float = 0.0


def counted(counter: Counter, label: str, values: frozenset[str]) -> float:
    """The total of a labelled counter's series whose C{label} is one of C{values} (a read, no registry scrape)."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get(label) in values
    )


@dataclass
class _Gauge:
    """A level within one minute: its highest and its last."""

    max: int | None = None
    last: int | None = None

    def set(self, value: int) -> None:
        self.last = value
        self.max = value if self.max is None else max(self.max, value)

    def view(self) -> dict[str, int | None]:
        return {"max": self.max, "last": self.last}


@dataclass
class _Minute:
    minute: int
    started: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    live_legs: _Gauge = field(default_factory=_Gauge)
    streams: _Gauge = field(default_factory=_Gauge)
    closes: list[float] = field(default_factory=list)  # hangup-to-close ms, a reservoir of them
    closes_seen: int = 0
    stream_failures: int = 0
    webhook_failures: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "start": iso_time(self.minute * 60.0),
            "legs_started": self.started,
            "legs_ended": dict(sorted(self.ended.items())),
            "live_legs": self.live_legs.view(),
            "streams": self.streams.view(),
            "hangup_to_close_ms": {
                "count": self.closes_seen, "p50": _percentile(self.closes, 50), "p99": _percentile(self.closes, 99),
            },
            "stream_failures": self.stream_failures,
            "webhook_failures": self.webhook_failures,
        }


def _percentile(values: list[float], percent: float) -> float | None:
    """The nearest-rank percentile (a time one leg did take), None of nothing."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)], 3)


@implementer(ILegObserver)
class Hour(LegObserver):
    """
    The last hour's buckets. A counting observer (L{audiohangup.events.LegEvents.add}
    with C{counts}): in a cluster a leg is counted once, on its session's home,
    as the metrics count it. C{live_legs} tells how many legs live here now.
    """

    def __init__(
        self,
        clock: IReactorTime,
        live_legs: Callable[[], int] = lambda: 0,
        readings: Callable[[], Readings] = Readings,
        *,
        seed: int | None = None,
    ) -> None:
        self.clock = clock
        self.live_legs = live_legs
        self.readings = readings
        self._ring: list[_Minute | None] = [None] * MINUTES
        self._last = readings()
        self._random = random.Random(seed)

    def _now(self) -> _Minute:
        minute = int(self.clock.seconds() // 60)
        slot = minute % MINUTES
        bucket = self._ring[slot]
        if bucket is None or bucket.minute != minute:
            bucket = self._ring[slot] = _Minute(minute)
        return bucket

    def sample(self) -> None:
        """Read what is not observed: streams open, and failures since the last sample (to this minute)."""
        bucket = self._now()
        readings = self.readings()
        bucket.streams.set(readings.streams)
        bucket.live_legs.set(self.live_legs())
        # A counter only grows; should a part be replaced (a test's), its new count starts over.
        bucket.stream_failures += int(max(0.0, readings.stream_failures - self._last.stream_failures))
        bucket.webhook_failures += int(max(0.0, readings.webhook_failures - self._last.webhook_failures))
        self._last = readings

    def view(self) -> dict[str, Any]:
        """Every minute of the hour, oldest first, the current one last; a minute with nothing has zeros and nulls."""
        self.sample()
        current = int(self.clock.seconds() // 60)
        minutes = []
        for minute in range(current - MINUTES + 1, current + 1):
            bucket = self._ring[minute % MINUTES]
            minutes.append((bucket if bucket is not None and bucket.minute == minute else _Minute(minute)).view())
        return {"minute_seconds": 60, "now": iso_time(self.clock.seconds()), "minutes": minutes}

    # ILegObserver

    def legStarted(self, leg: IServerLeg) -> None:
        bucket = self._now()
        bucket.started += 1
        bucket.live_legs.set(self.live_legs())

    def legEnded(self, leg: IServerLeg) -> None:
        bucket = self._now()
        reason = str(leg.close_reason) if leg.close_reason is not None else "unknown"
        bucket.ended[reason] = bucket.ended.get(reason, 0) + 1
        if leg.hangup_to_close_ms is not None:
            self._close(bucket, float(leg.hangup_to_close_ms))
        # Told before the registry lets the leg go: it is not live any more.
        bucket.live_legs.set(max(0, self.live_legs() - 1))

    def _close(self, bucket: _Minute, ms: float) -> None:
        bucket.closes_seen += 1
        if len(bucket.closes) < MAX_SAMPLES:
            bucket.closes.append(ms)
        else:  # Vitter's algorithm R: each of the minute's times kept with the same chance
            kept = self._random.randrange(bucket.closes_seen)
            if kept < MAX_SAMPLES:
                bucket.closes[kept] = ms

    def connectionEnded(self, connection: IServerLeg) -> None:
        """A duplicate named a call: it ended as a leg does on the page (its reason), never having lived."""
        if counts_as_leg(connection):
            bucket = self._now()
            reason = str(connection.close_reason) if connection.close_reason is not None else "unknown"
            bucket.ended[reason] = bucket.ended.get(reason, 0) + 1


class HourSampler(Service):
    """Samples the hour every L{SAMPLE_SECONDS} while the server runs."""

    name = "hour"

    def __init__(self, hour: Hour, clock: IReactorTime, interval: float = SAMPLE_SECONDS) -> None:
        self.hour = hour
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.hour.sample)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
