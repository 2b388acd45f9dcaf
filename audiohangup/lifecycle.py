# -*- test-case-name: tests.test_tap,tests.test_records,tests.test_webhooks -*-
"""
What every part's start and stop share: one service that stops its parts in
a stated order, a stop that runs once for every caller, a bounded wait, and
the daily timer of the two prunes.

Each part of the server is a Twisted C{IService}, started and stopped by
L{InOrder}; these pieces keep them from writing the same few lines again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Union

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["DAY", "Daily", "InOrder", "Once", "Part", "within"]

#: Seconds between two runs of a daily job.
DAY = 86400.0


class Once:
    """
    Something done once, such as a stop: every caller, before it is done or
    after, gets a Deferred that fires when it is. Whoever does the work says
    so with L{fire}; L{begin} tells the first caller it is the one to start it.
    """

    def __init__(self) -> None:
        self.begun = False
        self.done = False
        self._waiters: list[Deferred[None]] = []

    def begin(self) -> bool:
        """Whether this call is the first: the caller is to do the work."""
        first, self.begun = not self.begun, True
        return first

    def wait(self) -> Deferred[None]:
        """Fires once the work is done (at once if it is)."""
        if self.done:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def fire(self) -> None:
        """The work is done: every waiter, now and later, hears it. A second call does nothing."""
        if self.done:
            return
        self.begun = self.done = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


async def within(waiting: Deferred[Any], seconds: float, clock: IReactorTime) -> bool:
    """
    Wait for C{waiting}, at most C{seconds}: whether it came in time. At the
    deadline it is cancelled; a failure other than the deadline's is raised.
    """
    waiting.addTimeout(seconds, clock)
    try:
        await waiting
    except TimeoutError:
        return False
    return True


class Daily(TimerService):
    """
    C{work} once a C{interval} (a day), the first time one interval after the
    start: the prunes run at start-up already, with the opening or repair
    work on the same thread, and this timer only repeats them. Its C{work}
    must not fail (it logs its own errors); a Deferred it returns is waited
    for before the next run is scheduled.
    """

    def __init__(self, work: Callable[[], object], clock: IReactorTime, interval: float = DAY) -> None:
        super().__init__(interval, self._run, work)
        self.clock = clock
        self._first = True

    def startService(self) -> None:
        self._first = True
        super().startService()

    def _run(self, work: Callable[[], object]) -> object:
        if self._first:  # TimerService runs at once on start; the start did it already
            self._first = False
            return None
        return work()


#: What a part's own start or stop may return: nothing, a Deferred, or a coroutine.
Step = Callable[[], Union["Deferred[Any]", Coroutine[Any, Any, Any], None]]


class Part(Service):
    """
    A part with a start and a stop of its own (C{start}, C{stop}: either
    may give a Deferred or be a coroutine), and so a service: the parent
    starts and stops it like any other, under its C{name}. A start that
    fails is logged (C{startFailed} says what did not start); the part goes on.
    """

    log = Logger()
    startFailed = "a part did not start"

    def start(self) -> Any:
        """Nothing to start, unless the part says otherwise."""

    def stop(self) -> Any:
        """Nothing to stop, unless the part says otherwise."""

    def startService(self) -> None:
        super().startService()
        _deferred(self.start()).addErrback(lambda failure: self.log.failure(self.startFailed, failure))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return _deferred(self.stop()).addCallback(lambda _: None)


def _deferred(result: Deferred[Any] | Coroutine[Any, Any, Any] | None) -> Deferred[Any]:
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return succeed(result)


class InOrder(MultiService):
    """
    A MultiService whose children stop one step after another, in
    C{stopping} order: a plain MultiService stops them all at once. Each step
    names the children stopped together; a child not named stops after the
    last step. Children start in the order they were added, as usual.
    """

    log = Logger()

    def __init__(self, stopping: Sequence[Iterable[str]]) -> None:
        super().__init__()
        self.stopping = [tuple(step) for step in stopping]

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = Deferred.fromCoroutine(self._stopInOrder())
        # Twisted drops a failure from stopService without a word: log our own.
        return stopped.addErrback(lambda failure: self.log.failure("shutdown failed", failure))

    async def _stopInOrder(self) -> None:
        Service.stopService(self)  # running is off; MultiService's own would stop every child at once
        named = {name for step in self.stopping for name in step}
        steps: list[list[IService]] = [
            [child for child in self if child.name in step] for step in self.stopping
        ]
        steps.append([child for child in self if child.name not in named])
        for step in steps:
            await _stopTogether(step)


async def _stopTogether(services: list[IService]) -> None:
    """Stop C{services} at once and wait for them all; one failure is logged, not in the others' way."""
    stopping = [(service, maybeDeferred(service.stopService)) for service in services]
    for service, each in stopping:
        try:
            await each
        except Exception:
            InOrder.log.failure("{service} did not stop cleanly", service=service.name)
