# -*- test-case-name: tests.test_flows -*-
"""
A session: the live legs sharing a call id, and the flow that runs them.

The session hands every leg event to its flow, keeps a flow's bug from
breaking the call (it is logged, the call goes on), and ends the conversation
when one leg ends: the other live legs are hung up with cause C{session},
unless C{--on-leg-end=keep}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.flows import SilenceFlow
from audiohangup.interfaces import FlowFactory, IFlow, ILeg, IServerLeg, ISession
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.wire import Frame


@implementer(ISession)
class Session:
    log = Logger()

    def __init__(self, call_id: str, flow: IFlow, end_with_leg: bool = True) -> None:
        self.call_id = call_id
        self.flow = flow
        self.end_with_leg = end_with_leg
        self.legs: dict[Role, IServerLeg] = {}
        #: The instance the session lives on, when it is not this one (see L{handOver}).
        self.home: str | None = None
        # Bound once: audio is 50 frames a second per leg, the one hot event.
        self._audioHook = flow.audioReceived

    @classmethod
    def create(cls, call_id: str, flow_factory: FlowFactory, end_with_leg: bool) -> Session:
        try:
            return cls(call_id, flow_factory(), end_with_leg)
        except Exception:  # the factory failed, or made something without the hooks
            cls.log.failure("{call_id} the flow could not be created; the legs hear silence", call_id=call_id)
            return cls(call_id, SilenceFlow(), end_with_leg)

    def others(self, leg: ILeg) -> list[IServerLeg]:
        """The session's other legs that can still take audio."""
        return [other for other in self.legs.values() if other is not leg and other.live]

    def ordered(self) -> list[IServerLeg]:
        """The legs, visitor first."""
        return [leg for role in Role if (leg := self.legs.get(role)) is not None]

    def hangup(self, cause: HangupCause) -> Deferred[list[CloseReason]]:
        """Hang up every leg; fires with their close reasons once all are gone."""
        return gatherResults([leg.hangup(cause) for leg in self.ordered()])

    def handOver(self, flow: IFlow, home: str) -> None:
        """
        The session's home is instance C{home} (the media link joined its
        legs there): from now on C{flow}, the link, takes their events.
        """
        self.flow = flow
        self._audioHook = flow.audioReceived
        self.home = home

    # Leg events, from the protocol and the registry

    def join(self, leg: IServerLeg) -> IServerLeg | None:
        """Make C{leg} the session's leg for its role; return the leg it replaces."""
        previous = self.legs.get(leg.role)
        self.legs[leg.role] = leg
        self._tell("legJoined", leg, lambda: self.flow.legJoined(self, leg))
        return previous

    def leave(self, leg: IServerLeg) -> None:
        """C{leg} is gone. A leg that was replaced has left already and is not told about."""
        if self.legs.get(leg.role) is not leg:
            return
        del self.legs[leg.role]
        reason = leg.close_reason
        assert reason is not None, "a leg leaves once it is gone, its close reason known"
        self._tell("legEnded", leg, lambda: self.flow.legEnded(self, leg, reason))
        if self.end_with_leg:
            for other in self.ordered():
                other.hangup(HangupCause.SESSION)

    def audioReceived(self, leg: ILeg, frame: Frame) -> None:
        # _tell's guard, without its lookup and argument packing on every frame.
        try:
            self._audioHook(self, leg, frame)
        except Exception:
            self._failed("audioReceived", leg)

    def dtmfReceived(self, leg: ILeg, digit: str) -> None:
        self._tell("dtmfReceived", leg, lambda: self.flow.dtmfReceived(self, leg, digit))

    def _tell(self, hook: str, leg: ILeg, call: Callable[[], object]) -> None:
        """C{call}, the flow's C{hook} (a typed call, which mypy checks), guarded."""
        try:
            call()
        except Exception:
            self._failed(hook, leg)

    def _failed(self, hook: str, leg: ILeg) -> None:
        # A flow's bug must not take the connection or the reactor with it.
        self.log.failure(
            "{call_id} {role} flow {flow} failed in {hook}",
            call_id=self.call_id, role=leg.role, flow=type(self.flow).__name__, hook=hook,
        )
