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

from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from twisted.logger import Logger
from twisted.python.reflect import namedAny
from zope.interface import implementer

from audiohangup.audio import SLIN_BY_KIND, AudioFormat
from audiohangup.codecs import Transcoder
from audiohangup.interfaces import FlowFactory, IFlow, ILeg, ISession
from audiohangup.metrics import series
from audiohangup.reasons import CloseReason
from audiohangup.wire import Frame, encode_frame

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
    Legs of different formats (a μ-law intercom and a slin16 softphone) are
    converted, each direction keeping its resampler's state, and cut into the
    other leg's frames.

    @param conversions: counts the frames converted, by format pair (a
        C{prometheus_client} counter with C{source} and C{target} labels).
    """

    log = Logger()

    def __init__(self, conversions: Any = None) -> None:
        self.conversions = conversions
        self._converters: dict[tuple[ILeg, ILeg], _Converter] = {}

    @classmethod
    def counting(cls, metrics: CollectorRegistry) -> FlowFactory:
        """Bridges that count the frames they convert in C{metrics}."""
        conversions = series(
            metrics, Counter, "audiohangup_bridge_conversions",
            "Bridged frames converted between two legs' formats, by format pair.", ["source", "target"],
        )
        return partial(cls, conversions)

    def legJoined(self, session: ISession, leg: ILeg) -> None:
        self._route(session)

    def legEnded(self, session: ISession, leg: ILeg, reason: CloseReason) -> None:
        leg.bridgeTo(None)
        for pair in [pair for pair in self._converters if leg in pair]:
            del self._converters[pair]
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
            leg.bridgeTo(None)
        if paired:
            legs[0].bridgeTo(legs[1])
            legs[1].bridgeTo(legs[0])

    def audioReceived(self, session: ISession, leg: ILeg, frame: Frame) -> None:
        # What the frame is: the leg's declared format, or the slin rate its kind names.
        source = leg.format if frame.kind == leg.format.kind else SLIN_BY_KIND.get(frame.kind)
        if source is None:
            return
        # session.legs rather than session.others(leg): no list built per frame.
        for other in session.legs.values():
            if other is leg:
                continue
            if source == other.format:
                other.forward(frame)  # which skips a leg that is no longer live
            elif other.live:
                converter = self._converters.get((leg, other))
                if converter is None or converter.source != source:
                    converter = self._converters[(leg, other)] = _Converter(source, other.format, self.conversions)
                for converted in converter.convert(frame.payload):
                    other.forwardBytes(converted)


class _Converter:
    """One direction of a bridge between two formats: resampler state, and the part of a frame still short."""

    def __init__(self, source: AudioFormat, target: AudioFormat, conversions: Any) -> None:
        self.source = source
        self.target = target
        self._transcoder = Transcoder(source, target)
        self._pending = b""
        self._counted = None if conversions is None else conversions.labels(source=source.name, target=target.name)

    def convert(self, payload: bytes) -> list[bytes]:
        """The target's whole frames, encoded, that this payload completes (usually one)."""
        pending = self._pending + self._transcoder.convert(payload)
        size = self.target.frame_bytes
        whole = len(pending) - len(pending) % size
        self._pending = pending[whole:]
        if self._counted is not None:
            self._counted.inc()
        kind = self.target.kind
        return [encode_frame(kind, pending[i : i + size]) for i in range(0, whole, size)]


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
