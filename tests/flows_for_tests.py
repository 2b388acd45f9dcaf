"""
Flows loaded by dotted path (C{--flow tests.flows_for_tests.Name}) in
L{tests.test_flow_tcp}: a recorder of every event a flow is told, and a flow
with a bug, to show a flow's exception does not break the call.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from audiohangup.flows import IFlow
from audiohangup.reasons import HangupCause

#: What every L{Recorder} saw, as (event, call id, role, detail); tests clear it first.
EVENTS: list[tuple[str, str, str, Any]] = []


@implementer(IFlow)
class Recorder:
    """Records every event; hangs up a leg that dials C{#}."""

    def legJoined(self, session: Any, leg: Any) -> None:
        EVENTS.append(("legJoined", leg.call_id, str(leg.role), None))

    def audioReceived(self, session: Any, leg: Any, frame: Any) -> None:
        EVENTS.append(("audioReceived", leg.call_id, str(leg.role), frame.encode()))

    def dtmfReceived(self, session: Any, leg: Any, digit: str) -> None:
        EVENTS.append(("dtmfReceived", leg.call_id, str(leg.role), digit))
        if digit == "#":
            leg.hangup(HangupCause.API)

    def legEnded(self, session: Any, leg: Any, reason: Any) -> None:
        EVENTS.append(("legEnded", leg.call_id, str(leg.role), reason))


class FlowBug(Exception):
    """What L{Exploding} raises: a type no other code raises, so the test can find it."""


@implementer(IFlow)
class Exploding:
    """A flow with a bug in audioReceived; every other event is fine."""

    def legJoined(self, session: Any, leg: Any) -> None:
        pass

    def audioReceived(self, session: Any, leg: Any, frame: Any) -> None:
        raise FlowBug(f"flow bug on {leg.call_id} {leg.role}")

    def dtmfReceived(self, session: Any, leg: Any, digit: str) -> None:
        pass

    def legEnded(self, session: Any, leg: Any, reason: Any) -> None:
        pass
