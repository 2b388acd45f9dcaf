# -*- test-case-name: tests.test_flows -*-
"""
Flows decide what a conversation does with its audio and when it ends.

One flow object serves one session (the live legs sharing a call id). It is
told when a leg joins, when audio or DTMF arrives and when a leg ends, and it
acts through the session and its legs: C{leg.forward(frame)} writes a frame at
once (bridging), C{leg.play(audio)} queues raw audio for the pacer, and
C{leg.hangup(cause)} or C{session.hangup(cause)} ends legs. The pacer fills
every gap with silence, so a flow never has to.

Write your own by providing L{IFlow} and pass its dotted path to C{--flow}::

    from zope.interface import implementer
    from audiohangup.flows import IFlow  # or audiohangup.interfaces

    @implementer(IFlow)
    class Greeter:
        def legJoined(self, session, leg):
            leg.play(open("/srv/prompts/welcome.sl", "rb").read())
        def audioReceived(self, session, leg, frame): pass
        def dtmfReceived(self, session, leg, digit):
            if digit == "#":
                leg.hangupAfterPlayout()
        def legEnded(self, session, leg, reason): pass
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.reflect import namedAny
from zope.interface import implementer

from audiohangup.interfaces import FlowFactory, IFlow, ILeg, ISession
from audiohangup.reasons import CloseReason
from audiohangup.wire import Frame

__all__ = ["BUILTIN_FLOWS", "BridgeFlow", "EchoFlow", "FlowFactory", "FlowLoadError", "IFlow", "SilenceFlow", "load_flow"]


class _QuietFlow:
    """Does nothing on any event: the base the built-in flows override."""

    def legJoined(self, session: ISession, leg: ILeg) -> None:
        pass

    def audioReceived(self, session: ISession, leg: ILeg, frame: Frame) -> None:
        pass

    def dtmfReceived(self, session: ISession, leg: ILeg, digit: str) -> None:
        pass

    def legEnded(self, session: ISession, leg: ILeg, reason: CloseReason) -> None:
        pass


@implementer(IFlow)
class BridgeFlow(_QuietFlow):
    """
    Each leg hears the other one: a frame is written to the other leg as it
    arrives, one write per frame, same bytes, no queue and no tick in between.
    """

    log = Logger()

    def __init__(self) -> None:
        self._mismatch_logged = False

    def legJoined(self, session: ISession, leg: ILeg) -> None:
        self._route(session)

    def legEnded(self, session: ISession, leg: ILeg, reason: CloseReason) -> None:
        leg.route = None
        self._route(session)

    @staticmethod
    def _route(session: ISession) -> None:
        """
        Two legs of one format: each forwards its frames to the other as they
        arrive, without calling the flow (the leg's fast path). Anything else
        (a lone leg, a third, another format) goes through audioReceived.
        """
        legs = list(session.legs.values())
        paired = len(legs) == 2 and legs[0].format == legs[1].format
        for leg in legs:
            leg.route = None
        if paired:
            legs[0].route, legs[1].route = legs[1], legs[0]

    def audioReceived(self, session: ISession, leg: ILeg, frame: Frame) -> None:
        # session.legs rather than session.others(leg): no list built per frame.
        for other in session.legs.values():
            if other is leg:
                continue
            if frame.kind == other.format.kind:
                other.forward(frame)  # which skips a leg that is no longer live
            elif other.live and not self._mismatch_logged:
                # Forwarding would play the audio at the wrong speed: silence is better.
                self._mismatch_logged = True
                self.log.warn(
                    "{call_id} the {role} leg sends kind 0x{kind:02x} but the {other} leg "
                    "expects 0x{expected:02x}; the {other} leg hears silence instead",
                    call_id=session.call_id, role=leg.role, other=other.role,
                    kind=frame.kind, expected=other.format.kind,
                )


@implementer(IFlow)
class EchoFlow(_QuietFlow):
    """Each leg hears its own audio back, paced: handy to test a dialplan."""

    def audioReceived(self, session: ISession, leg: ILeg, frame: Frame) -> None:
        if frame.kind == leg.format.kind:
            leg.queueFrames([frame.encode()])


@implementer(IFlow)
class SilenceFlow(_QuietFlow):
    """The legs hear silence until they are hung up."""


BUILTIN_FLOWS: dict[str, FlowFactory] = {
    "bridge": BridgeFlow,
    "echo": EchoFlow,
    "silence": SilenceFlow,
}


class FlowLoadError(Exception):
    """C{--flow} names nothing usable; the message says why."""


def load_flow(name: str) -> FlowFactory:
    """
    A built-in flow by name, or a user's class by dotted path
    (C{package.module.Name}), checked to provide L{IFlow}.
    """
    if name in BUILTIN_FLOWS:
        return BUILTIN_FLOWS[name]
    if "." not in name:
        known = ", ".join(BUILTIN_FLOWS)
        raise FlowLoadError(f"unknown flow {name!r}: use one of {known} or a dotted path package.module.Name")
    try:
        factory = namedAny(name)
    except Exception as error:  # namedAny raises several types, all meaning "not there"
        raise FlowLoadError(f"cannot load flow {name!r}: {error}") from None
    if not callable(factory):
        raise FlowLoadError(f"flow {name!r} is not a class or factory")
    if isinstance(factory, type) and not IFlow.implementedBy(factory):
        raise FlowLoadError(f"flow {name!r} does not provide audiohangup.flows.IFlow (use @implementer(IFlow))")
    flow_factory: FlowFactory = factory
    return flow_factory
