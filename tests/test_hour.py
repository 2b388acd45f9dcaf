"""
The last hour's buckets, on a Clock: legs started and ended in the minute
they did, by close reason; live legs and streams as max and last; the
hangup-to-close percentiles; failures as the growth of their totals; a
minute an hour old reused, never more than sixty kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.task import Clock

from audiohangup.hour import MAX_SAMPLES, MINUTES, Hour, HourSampler, Readings, counted
from audiohangup.reasons import CloseReason, Role

START = 1_700_000_070.0  # 30 s into a minute


@dataclass
class FakeLeg:
    """What the hour reads of an ended leg."""

    close_reason: CloseReason | None = None
    hangup_to_close_ms: float | None = None
    call_id: str | None = "c"
    role: Role = Role.VISITOR


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.live = 0
        self.readings = Readings()
        self.hour = Hour(self.clock, lambda: self.live, lambda: self.readings, seed=1)

    def start(self) -> None:
        self.live += 1
        self.hour.legStarted(FakeLeg())  # type: ignore[arg-type]

    def end(self, reason: CloseReason, ms: float | None = None) -> None:
        self.hour.legEnded(FakeLeg(reason, ms))  # type: ignore[arg-type]
        self.live -= 1

    def minutes(self) -> list[dict[str, Any]]:
        return self.hour.view()["minutes"]


def test_sixty_minutes_oldest_first() -> None:
    world = World()
    minutes = world.minutes()
    assert len(minutes) == MINUTES
    assert minutes[-1]["start"] == "2023-11-14T22:14:00.000+00:00"
    assert minutes[0]["start"] == "2023-11-14T21:15:00.000+00:00"
    assert minutes[0]["legs_started"] == 0 and minutes[0]["live_legs"] == {"max": None, "last": None}


def test_legs_in_their_minute_by_reason() -> None:
    world = World()
    for _ in range(3):
        world.start()
    world.end(CloseReason.PEER_HANGUP)
    world.clock.advance(30)  # the next minute
    world.end(CloseReason.PEER_HANGUP)
    world.end(CloseReason.HANGUP_CLEAN, 4.0)
    minutes = world.minutes()
    before, now = minutes[-2], minutes[-1]
    assert before["legs_started"] == 3 and before["legs_ended"] == {"peer_hangup": 1}
    assert before["live_legs"] == {"max": 3, "last": 2}
    assert now["legs_started"] == 0 and now["legs_ended"] == {"hangup_clean": 1, "peer_hangup": 1}
    assert now["live_legs"] == {"max": 1, "last": 0}
    assert now["hangup_to_close_ms"] == {"count": 1, "p50": 4.0, "p99": 4.0}


def test_percentiles() -> None:
    world = World()
    for ms in range(1, 101):
        world.end(CloseReason.HANGUP_CLEAN, float(ms))
    assert world.minutes()[-1]["hangup_to_close_ms"] == {"count": 100, "p50": 50.0, "p99": 99.0}


def test_samples_bounded_per_minute() -> None:
    """Beyond MAX_SAMPLES a minute keeps a uniform sample: bounded memory, percentiles near the truth."""
    world = World()
    total = MAX_SAMPLES * 5
    for n in range(total):
        world.end(CloseReason.HANGUP_CLEAN, float(n))
    [bucket] = [b for b in world.hour._ring if b is not None]
    assert len(bucket.closes) == MAX_SAMPLES
    view = world.minutes()[-1]["hangup_to_close_ms"]
    assert view["count"] == total
    assert abs(view["p50"] - total / 2) < total * 0.05


def test_failures_are_the_growth_of_their_totals() -> None:
    world = World()
    world.readings = Readings(streams=2, stream_failures=5, webhook_failures=1)
    world.hour.sample()
    world.clock.advance(60)
    world.readings = Readings(streams=1, stream_failures=7, webhook_failures=1)
    minutes = world.minutes()
    assert (minutes[-2]["stream_failures"], minutes[-2]["webhook_failures"]) == (5, 1)
    assert (minutes[-1]["stream_failures"], minutes[-1]["webhook_failures"]) == (2, 0)
    assert minutes[-2]["streams"] == {"max": 2, "last": 2}
    assert minutes[-1]["streams"] == {"max": 1, "last": 1}


def test_a_minute_an_hour_old_is_reused() -> None:
    world = World()
    world.start()
    world.clock.advance(MINUTES * 60)
    minutes = world.minutes()
    assert sum(minute["legs_started"] for minute in minutes) == 0
    assert len(world.hour._ring) == MINUTES


def test_duplicate_counts_as_ended() -> None:
    world = World()
    world.hour.connectionEnded(FakeLeg(CloseReason.DUPLICATE))  # type: ignore[arg-type]
    world.hour.connectionEnded(FakeLeg(CloseReason.UUID_TIMEOUT, call_id=None))  # type: ignore[arg-type]
    assert world.minutes()[-1]["legs_ended"] == {"duplicate": 1}


def test_counted_reads_a_labelled_counter() -> None:
    counter = Counter("things", "Things.", ["outcome"], registry=CollectorRegistry())
    counter.labels(outcome="failed").inc(2)
    counter.labels(outcome="overflow").inc()
    counter.labels(outcome="delivered").inc(5)
    assert counted(counter, "outcome", frozenset({"failed", "overflow"})) == 3


def test_sampler_runs_while_started() -> None:
    world = World()
    sampler = HourSampler(world.hour, world.clock, interval=5)
    world.readings = Readings(streams=4)
    sampler.startService()
    assert world.minutes()[-1]["streams"]["max"] == 4
    world.readings = Readings(streams=6)
    world.clock.advance(5)
    assert world.hour._now().streams.max == 6
    sampler.stopService()
    assert world.clock.getDelayedCalls() == []
