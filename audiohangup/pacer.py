# -*- test-case-name: tests.test_stream_rules,tests.test_metrics,tests.test_timeline -*-
"""
One shared 20 ms tick for every live leg.

Asterisk re-paces nothing: each frame we send goes to the channel as it
arrives, and the AudioSocket app hangs up after 2 s without traffic. So from
its UUID on, every leg gets one frame per tick: queued audio if there is some,
silence if nothing was bridged to it lately. One C{LoopingCall} serves all
legs (thousands of legs are one timer, not thousands); its deadlines come from
its start time, so it does not drift, and a late tick runs once and skips the
missed ones instead of bursting.

A leg's timeline follows the clock, not the frames it has: the slots a late
tick missed (a GC pause, a stopped process) are told to each leg, which drops
the audio that was due in them rather than play it late for the rest of the
call (see L{audiohangup.protocol.AudioSocketProtocol.paceTick}). Each tick
starts a new slot (L{Pacer.slot}); a leg writes at most one frame in a slot.

The pacer belongs to one service: it is started and stopped with it, and a
stopped pacer holds no leg and no timer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from audiohangup.audio import FRAME_SECONDS
from audiohangup.interfaces import IPacedLeg
from audiohangup.metrics import OnScrape

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: Audio bridged to a leg keeps the pacer's silence away for this many ticks,
#: so a bridge's own jitter does not make the pacer slip in extra frames.
BRIDGE_GRACE = 1.5

#: Ticks after a late one during which a leg still drops the audio due in
#: the missed slots: what was sent during a stall may be read only after the
#: late tick (a GC pause in the middle of a pass), a little later.
CATCH_UP_TICKS = 5


class Pacer(Service):
    """
    The shared tick, a service of its own: its loop runs while it paces a
    leg, and stopping the service stops the loop and forgets every leg.

    Each tick visits every leg, so the common case, a bridged leg with
    nothing queued, fed or held and not idle, on an on-time tick, is decided
    here from the leg's attributes (C{forwarded_at}, C{queue}, C{feed},
    C{held}, C{last_frame_at} against C{idle_after}) without a call; any
    other leg gets C{paceTick}.
    """

    log = Logger()

    name = "pacer"

    def __init__(
        self, clock: IReactorTime, interval: float = FRAME_SECONDS, *, metrics: CollectorRegistry | None = None
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.ticks = 0
        self.late_ticks = 0
        #: Slots late ticks skipped: each leg dropped the audio due in them.
        self.missed_slots = 0
        #: The current slot: intervals since the first start, late ticks' missed ones included; never goes back.
        self.slot = 0
        self._intervals = 0  # intervals elapsed since the loop started
        self._legs: dict[IPacedLeg, None] = {}
        self._loop = self._newLoop()
        if metrics is not None:
            metrics.register(_PacerCounts(self))  # its counts, read at scrape time

    def _newLoop(self) -> LoopingCall:
        loop = LoopingCall.withCount(self._tick)
        loop.clock = self.clock
        return loop

    def stopService(self) -> None:
        super().stopService()
        self._legs.clear()
        if self._loop.running:
            self._loop.stop()

    def add(self, leg: IPacedLeg) -> None:
        self._legs[leg] = None
        if not self._loop.running:
            # A new loop on each start: withCount counts from the last run,
            # even one before a stop, and the first tick would look hours late.
            self._loop = self._newLoop()
            self._intervals = 0
            self._loop.start(self.interval, now=False)

    def remove(self, leg: IPacedLeg) -> None:
        self._legs.pop(leg, None)
        if not self._legs and self._loop.running:
            self._loop.stop()

    def __len__(self) -> int:
        return len(self._legs)

    def _tick(self, count: int) -> None:
        self.ticks += 1
        if count > 1:
            self.late_ticks += 1
        # A tick the reactor runs late judges the bridge as of when it was due:
        # the bridged frames are held up by the same delay, and silence slipped
        # in between them would only add work when the server has none to spare.
        assert self._loop.starttime is not None
        due = self._loop.starttime + (self._intervals + 1) * self.interval
        self._intervals += count
        self.slot += count
        missed = count - 1
        self.missed_slots += missed
        bridged_since = due - self.interval * BRIDGE_GRACE
        now = self.clock.seconds()
        for leg in list(self._legs):
            if (
                leg.forwarded_at >= bridged_since and not leg.queue and not leg.feed and not leg.held
                and not missed and now - leg.last_frame_at < leg.idle_after
            ):
                continue  # bridged lately, nothing queued, fed or held, on time, not idle: nothing to do
            try:
                leg.paceTick(now, bridged_since, missed)
            except Exception:
                # One leg's failure must not stop the tick for every other leg.
                self.log.failure("{call_id} {role} pacing failed", call_id=leg.call_id, role=leg.role)
                self.remove(leg)


class _PacerCounts(OnScrape):
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

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer

    def collect(self) -> Iterator[Metric]:
        for attribute, metric, text in self._COUNTS:
            yield CounterMetricFamily(metric, text, value=getattr(self.pacer, attribute))
