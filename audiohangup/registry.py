# -*- test-case-name: tests.test_registry -*-
"""
Which legs are live: a leg is keyed by (call id, role), and the legs sharing a
call id form a L{Session}. No I/O: the protocol registers a leg when its UUID
arrives and the registry forgets it in C{connectionLost}, whatever the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from audiohangup.events import LegEvents
from audiohangup.flows import BridgeFlow
from audiohangup.interfaces import FlowFactory, ILeg
from audiohangup.reasons import Role
from audiohangup.session import Session

LegKey = tuple[str, Role]

#: What a second connection naming a live leg's (call id, role) gets.
OnDuplicate = Literal["refuse", "replace"]


class Registry:
    """Sessions by call id, plus every open connection (legs before their UUID too)."""

    def __init__(
        self,
        flow_factory: FlowFactory = BridgeFlow,
        end_with_leg: bool = True,
        events: LegEvents | None = None,
        on_duplicate: OnDuplicate = "refuse",
    ) -> None:
        self.flow_factory = flow_factory
        self.end_with_leg = end_with_leg
        self.events = events if events is not None else LegEvents()
        self.on_duplicate = on_duplicate
        self._sessions: dict[str, Session] = {}
        self._connections: set[ILeg] = set()
        #: The session each leg joined (a replaced leg stays until it is gone).
        self._members: dict[ILeg, Session] = {}
        self._legs = 0

    def connected(self, connection: ILeg) -> None:
        self._connections.add(connection)

    def holder(self, call_id: str, role: Role) -> ILeg | None:
        """
        The live leg that keeps a newcomer naming (call id, role) out, when
        duplicates are refused: a call id is no key to a live call.
        """
        if self.on_duplicate != "refuse":
            return None
        held = self.get(call_id, role)
        return held if held is not None and held.live else None

    def register(self, leg: ILeg) -> tuple[Session, ILeg | None]:
        """
        Make C{leg} its session's leg for its role; return the session and
        the leg it replaces, if any.
        """
        assert leg.call_id is not None, "a leg is registered once its UUID is known"
        session = self._sessions.get(leg.call_id)
        if session is None:
            session = Session.create(leg.call_id, self.flow_factory, self.end_with_leg)
            self._sessions[leg.call_id] = session
        self._members[leg] = session
        # Observers hear of the leg before its flow does: a flow may hang it up at once.
        self.events.legStarted(leg)
        replaced = session.join(leg)
        if replaced is None:
            self._legs += 1
        return session, replaced

    def disconnected(self, connection: ILeg) -> None:
        """Forget a connection and, if it had started, tell that the leg ended."""
        self._connections.discard(connection)
        session = self._members.pop(connection, None)
        if session is None:  # no UUID, or refused as a duplicate
            self.events.connectionEnded(connection)
            return
        self.events.legEnded(connection)
        if session.legs.get(connection.role) is not connection:
            return  # a replaced leg: its session carries on without it
        self._legs -= 1
        try:
            session.leave(connection)
        finally:
            if not session.legs:
                del self._sessions[session.call_id]
                self.events.callEnded(session.call_id)

    def session(self, call_id: str) -> Session | None:
        return self._sessions.get(call_id)

    def get(self, call_id: str, role: Role) -> ILeg | None:
        session = self._sessions.get(call_id)
        return None if session is None else session.legs.get(role)

    def call(self, call_id: str) -> list[ILeg]:
        """The live legs of one call, visitor first; empty for an unknown call."""
        session = self._sessions.get(call_id)
        return [] if session is None else session.ordered()

    def calls(self) -> dict[str, list[ILeg]]:
        """Every call with its legs, in call id order."""
        return {call_id: self._sessions[call_id].ordered() for call_id in sorted(self._sessions)}

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections(self) -> list[ILeg]:
        """Every open connection, with or without a UUID yet."""
        return list(self._connections)

    def __len__(self) -> int:
        """The number of live legs."""
        return self._legs

    def __iter__(self) -> Iterator[ILeg]:
        return iter([leg for session in list(self._sessions.values()) for leg in session.ordered()])
