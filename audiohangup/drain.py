# -*- test-case-name: tests.test_drain,tests.test_tap -*-
"""
The stop's first step: a drain (SIGTERM's default) or an immediate hangup.

Calls last minutes and some are always live, so a stop that hung every leg
up would cut calls at every deploy. The drain closes the AudioSocket
listeners (a process sharing the ports, by C{SO_REUSEPORT} or systemd's
sockets, takes the new legs), lets the live legs end by themselves within
C{--drain-timeout}, then hangs up what is left (cause C{shutdown}).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from audiohangup.interfaces import IReactor
from audiohangup.lifecycle import within
from audiohangup.listeners import Listener
from audiohangup.reasons import HangupCause
from audiohangup.registry import Registry


class Drain(Service):
    """
    The first step of the stop. C{--on-stop drain} (the default): stop taking
    new legs (the AudioSocket listeners close, so a sibling process on the
    same ports, by C{SO_REUSEPORT} or systemd's sockets, takes the new
    connections; one still arriving is refused as C{draining}) and let the
    live legs go on until they end by themselves, bounded by
    C{--drain-timeout}. Meanwhile everything else serves them as before:
    bridges, streams, recordings, the media link, the API and the live page.
    Then, as C{--on-stop hangup} does at once, hang up every connection left
    (cause C{shutdown}) and wait until all are gone; each leg aborts after
    the close timeout, and that wait is bounded a second beyond it, which
    only guards a bug.
    """

    log = Logger()
    name = "drain"

    def __init__(
        self,
        registry: Registry,
        close_timeout: float,
        clock: IReactor,
        *,
        on_stop: str = "drain",
        drain_timeout: float = 3600.0,
        listeners: Sequence[Listener] = (),
        progress: float = 30.0,
    ) -> None:
        self.registry = registry
        self.close_timeout = close_timeout
        self.clock = clock
        self.on_stop = on_stop
        self.drain_timeout = drain_timeout
        #: The AudioSocket listeners, closed at the start of the stop (the API's and the link's stay up).
        self.listeners = list(listeners)
        #: Seconds between two progress lines of a drain.
        self.progress = progress

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.stop())

    async def stop(self) -> None:
        # What waited in the listeners' backlogs is taken and served; a connection made after (a listener
        # that could not stop at once) is refused, named.
        await DeferredList([listener.stopListening() for listener in self.listeners], consumeErrors=True)
        self.registry.refusing = "the server is stopping (--on-stop " + self.on_stop + ")"
        if self.on_stop == "drain":
            await self.drain()
        await self.hangup()

    async def drain(self) -> None:
        """Let the live legs end by themselves, at most C{drain_timeout} seconds."""
        count = self.registry.connection_count
        if not count:
            self.log.info("drain: no live leg, stopping now")
            return
        began = self.clock.seconds()
        self.log.info(
            "drain: new legs go elsewhere; {legs} live leg(s) in {calls} call(s) go on until they end "
            "(at most {timeout:g} s, --drain-timeout)",
            legs=count, calls=len(self.registry.calls()), timeout=self.drain_timeout,
        )
        progress = LoopingCall(self._progress, began)
        progress.clock = self.clock
        progress.start(self.progress, now=False)
        try:
            ended = await within(self.registry.whenEmpty(), self.drain_timeout, self.clock)
        finally:
            progress.stop()
        if ended:
            self.log.info(
                "drain: done, the last leg ended after {seconds:.1f} s", seconds=self.clock.seconds() - began
            )
        else:
            self.log.warn(
                "drain: --drain-timeout {timeout:g} s is over with {legs} leg(s) still live: they are hung up "
                "(cause shutdown)",
                timeout=self.drain_timeout, legs=self.registry.connection_count,
            )

    def _progress(self, began: float) -> None:
        self.log.info(
            "drain: {legs} live leg(s) in {calls} call(s) after {seconds:.0f} s ({left:.0f} s left)",
            legs=self.registry.connection_count, calls=len(self.registry.calls()),
            seconds=self.clock.seconds() - began, left=self.drain_timeout - (self.clock.seconds() - began),
        )

    async def hangup(self) -> None:
        """Hang up every connection (cause C{shutdown}) and wait until all are gone."""
        connections = self.registry.connections()
        if not connections:
            return
        self.log.info("shutting down: hanging up {count} connection(s)", count=len(connections))
        gone = DeferredList([c.hangup(HangupCause.SHUTDOWN) for c in connections], consumeErrors=True)
        if await within(gone, self.close_timeout + 1.0, self.clock):
            self.log.info("shutdown: every leg is gone")
        else:
            self.log.warn("shutdown: {count} connections still open", count=len(self.registry.connections()))
