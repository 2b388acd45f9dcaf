# -*- test-case-name: tests.test_api,tests.test_records,tests.test_webhooks,tests.test_link -*-
"""
Leg lifecycle events, for whoever records or reports them (metrics, call
records, webhooks). Observers are told synchronously on the reactor and must
not block; one observer's bug is logged and never reaches the call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.interfaces import ILegObserver, IServerLeg
from audiohangup.logs import iso_time
from audiohangup.reasons import HangupCause

__all__ = ["LegEvents", "LegObserver", "RecentLegs", "counts_as_leg", "ended_leg"]


@implementer(ILegObserver)
class LegObserver:
    """
    An observer told of nothing it does not ask for: each event is ignored
    here, so an observer overrides only those it watches.
    """

    def legStarted(self, leg: IServerLeg) -> None:
        pass

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        pass

    def legEnded(self, leg: IServerLeg) -> None:
        pass

    def callEnded(self, call_id: str) -> None:
        pass

    def connectionEnded(self, connection: IServerLeg) -> None:
        pass


def counts_as_leg(connection: IServerLeg) -> bool:
    """
    Whether a connection that ended without becoming a leg (C{connectionEnded})
    still counts as an ended leg where legs are shown: one refused as a
    duplicate named a call, so its call record, its C{leg_ended} webhook and
    the live page's history show it with its reason (the metrics count it
    among the connections without a leg); one without a UUID named nothing.
    """
    return connection.call_id is not None


def ended_leg(leg: IServerLeg) -> dict[str, Any]:
    """How an ended leg went, as the API and the live page's history show it."""
    assert leg.ended_at is not None, "told once the leg is gone"
    return {
        "call_id": leg.call_id,
        "role": leg.role,
        "reason": leg.close_reason,
        "cause": leg.hangup_cause,
        "peer": leg.peer,
        "started_at": iso_time(leg.connected_at),
        "ended_at": iso_time(leg.ended_at),
        "duration": round(leg.ended_at - leg.connected_at, 3),
    }


def _stays(leg: IServerLeg) -> bool:
    return False


@implementer(ILegObserver)
class LegEvents:
    """
    Fans each event out to every observer, each guarded on its own.

    Observers added with C{counts} count legs (metrics, records, webhooks)
    or act for their session (streams, recordings), and a cluster counts,
    streams and records each leg once: on its session's home. A leg that
    this instance hands over through the media link to its session on
    another instance (L{handOver}) is that instance's, so these observers
    are told nothing of it here, but for the link's own failure
    (a hangup with cause C{link}, which only this side knows). As a leg
    starts, C{mayLeave} (the linker's) says whether it may be handed over;
    until the linker has decided (L{release} or L{handOver}), its events for
    counting observers wait, in order.
    """

    log = Logger()

    def __init__(self) -> None:
        self._observers: list[tuple[ILegObserver, bool]] = []
        #: Asked as each leg starts: may it yet be handed over to another instance?
        self.mayLeave: Callable[[IServerLeg], bool] = _stays
        #: The counting observers' events of each leg not decided yet.
        self._held: dict[IServerLeg, list[tuple[ILegObserver, str, Callable[[ILegObserver], object]]]] = {}
        #: Legs handed over, and their calls: counted on their session's home.
        self._away: set[IServerLeg] = set()
        self._away_calls: set[str] = set()

    @property
    def observers(self) -> list[ILegObserver]:
        return [observer for observer, _ in self._observers]

    def add(self, observer: ILegObserver, *, counts: bool = False) -> None:
        self._observers.append((observer, counts))

    def _call(self, observer: ILegObserver, event: str, call: Callable[[ILegObserver], object]) -> None:
        try:
            call(observer)
        except Exception:
            self.log.failure("{observer} failed on {event}", observer=type(observer).__name__, event=event)

    def _tell(
        self, event: str, call: Callable[[ILegObserver], object], leg: IServerLeg | None = None,
        *, away_too: bool = False,
    ) -> None:
        """C{call} on every observer (a typed call, which mypy checks); C{event} names it in the log."""
        held = None if leg is None else self._held.get(leg)
        away = leg is not None and not away_too and leg in self._away
        for observer, counts in self._observers:
            if counts and held is not None:
                held.append((observer, event, call))
            elif not (counts and away):
                self._call(observer, event, call)

    def release(self, leg: IServerLeg) -> None:
        """The leg stays this instance's to count: what waited is told now. Idempotent."""
        for observer, event, call in self._held.pop(leg, ()):
            self._call(observer, event, call)

    def handOver(self, leg: IServerLeg) -> bool:
        """
        The leg's session lives on another instance, which counts it: what
        waited is dropped, and counting observers hear no more of it (nor of
        its call). False if it was decided already (counted here: a leg
        that looked alone at first, then found its call's first leg).
        """
        if self._held.pop(leg, None) is None:
            return False
        self._away.add(leg)
        if leg.call_id is not None:
            self._away_calls.add(leg.call_id)
        return True

    def legStarted(self, leg: IServerLeg) -> None:
        if self.mayLeave(leg):
            self._held[leg] = []
        self._tell("legStarted", lambda observer: observer.legStarted(leg), leg)

    def hangupSent(self, leg: IServerLeg, cause: HangupCause) -> None:
        self._tell(
            "hangupSent", lambda observer: observer.hangupSent(leg, cause), leg, away_too=cause is HangupCause.LINK
        )

    def legEnded(self, leg: IServerLeg) -> None:
        self._tell("legEnded", lambda observer: observer.legEnded(leg), leg)
        self._away.discard(leg)
        self.release(leg)  # ended before it was handed over: it was this instance's

    def callEnded(self, call_id: str) -> None:
        if call_id in self._away_calls:
            self._away_calls.discard(call_id)
            for observer, counts in self._observers:
                if not counts:
                    self._call(observer, "callEnded", lambda observer: observer.callEnded(call_id))
            return
        self._tell("callEnded", lambda observer: observer.callEnded(call_id))

    def connectionEnded(self, connection: IServerLeg) -> None:
        self._tell("connectionEnded", lambda observer: observer.connectionEnded(connection))


@implementer(ILegObserver)
class RecentLegs(LegObserver):
    """The last legs that ended, newest first, in memory: the live page's history."""

    def __init__(self, size: int = 100) -> None:
        self._ended: deque[dict[str, Any]] = deque(maxlen=size)

    def legEnded(self, leg: IServerLeg) -> None:
        self._ended.appendleft(ended_leg(leg))

    def connectionEnded(self, connection: IServerLeg) -> None:
        if counts_as_leg(connection):
            self._ended.appendleft(ended_leg(connection))

    def latest(self, limit: int) -> list[dict[str, Any]]:
        return list(islice(self._ended, limit))
