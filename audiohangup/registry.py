# -*- test-case-name: tests.test_protocol,tests.test_stateful -*-
"""
Which legs are live: a leg is keyed by (call id, role), and the legs sharing a
call id form a L{Session}. No I/O: the protocol registers a leg when its UUID
arrives and the registry forgets it in C{connectionLost}, whatever the path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from twisted.internet.defer import Deferred, succeed

from audiohangup.events import LegEvents
from audiohangup.flows import BridgeFlow
from audiohangup.interfaces import FlowFactory, IServerLeg
from audiohangup.logs import LogLimit
from audiohangup.reasons import Role
from audiohangup.session import Session

LegKey = tuple[str, Role]

#: What a second connection naming a live leg's (call id, role) gets.
OnDuplicate = Literal["refuse", "replace"]


class PendingConnections:
    """
    Connections still without their UUID, oldest first, by source (None:
    UNIX sockets). When there are too many, the one to close is the oldest
    of a source past its cap or, at C{--max-legs}, the oldest of the source
    with the most: a flood from one address, or a few, crowds out its own
    connections, never a real leg in the moment between its connect and
    its UUID. O(1) each: sources are kept in buckets by their count.
    """

    def __init__(self) -> None:
        self._source: dict[IServerLeg, str | None] = {}
        self._from: dict[str | None, dict[IServerLeg, None]] = {}
        self._sized: dict[int, dict[str | None, None]] = {}
        self._most = 0
        #: When to log that a source's (or --max-legs') connections are being crowded out.
        self.logNow = LogLimit(60.0)

    def __len__(self) -> int:
        return len(self._source)

    def add(self, connection: IServerLeg, source: str | None) -> None:
        self._source[connection] = source
        waiting = self._from.setdefault(source, {})
        waiting[connection] = None
        self._move(source, len(waiting) - 1, len(waiting))

    def discard(self, connection: IServerLeg) -> None:
        """It sent its UUID, or it is closing. Idempotent."""
        if connection not in self._source:
            return
        source = self._source.pop(connection)
        waiting = self._from[source]
        del waiting[connection]
        if not waiting:
            del self._from[source]
        self._move(source, len(waiting) + 1, len(waiting))

    def _move(self, source: str | None, old: int, size: int) -> None:
        """Move C{source} from the bucket of its C{old} count to that of its new C{size} (one more or less)."""
        if old:
            bucket = self._sized[old]
            del bucket[source]
            if not bucket:
                del self._sized[old]
        if size:
            self._sized.setdefault(size, {})[source] = None
        if size > self._most or (old == self._most and old not in self._sized):
            self._most = size

    def count(self, source: str | None) -> int:
        return len(self._from.get(source, ()))

    def oldest(self, source: str | None) -> IServerLeg | None:
        """
        The connection of C{source} that has waited longest, passing over any
        whose bytes wait unread (L{IServerLeg.bytesWaiting}): the reactor accepts a
        batch of connections before it reads any, so after a stall a burst of
        real legs would otherwise crowd out each other with their UUIDs in hand.
        """
        return next((each for each in self._from.get(source, ()) if not each.bytesWaiting()), None)

    def oldestOfMost(self) -> IServerLeg | None:
        """The oldest connection (as L{oldest}) of the source with the most pending; None if none is."""
        if not self._most:
            return None
        return self.oldest(next(iter(self._sized[self._most])))


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
        self._connections: set[IServerLeg] = set()
        #: The session each leg joined (a replaced leg stays until it is gone).
        self._members: dict[IServerLeg, Session] = {}
        self._legs = 0
        #: Connections still without their UUID (see L{connected}).
        self.pending = PendingConnections()
        #: Why a new connection is refused whatever the limits (a drain: see L{audiohangup.drain.Drain}), or None.
        self.refusing: str | None = None
        self._emptied: list[Deferred[None]] = []

    def connected(self, connection: IServerLeg, source: str | None = None) -> None:
        """A new connection from C{source}, pending until it sends its UUID or closes."""
        self._connections.add(connection)
        self.pending.add(connection, source)

    def admit(
        self,
        connection: IServerLeg,
        source: str | None,
        max_legs: int,
        max_pending: int,
        crowd: Callable[[IServerLeg, str, str], None],
    ) -> str | None:
        """
        Count a new connection in, or say why it is refused (C{over_capacity}).
        Asterisk sends its UUID at once, so a connection still waiting for it
        is the likeliest to be junk: the oldest one makes way for a newcomer
        (past C{--max-pending-per-source}, the source's own; at C{--max-legs},
        that of the source with the most: see L{PendingConnections}) rather
        than let connections without a UUID keep real legs out. Only legs and
        connections already closing refuse a newcomer. C{crowd} closes the
        oldest, with the key its log line is limited by and why.
        """
        if self.connection_count >= max_legs:
            oldest = self.pending.oldestOfMost()
            if oldest is None:
                return f"{self.connection_count} connections open, --max-legs {max_legs}"
            crowd(oldest, "--max-legs", f"--max-legs {max_legs} connections are open")
        self.connected(connection, source)
        if source is not None and max_pending and self.pending.count(source) > max_pending:
            # None: every one has its bytes waiting, to be read in this pass; they are no flood.
            oldest = self.pending.oldest(source)
            if oldest is not None:
                crowd(oldest, source, f"over --max-pending-per-source {max_pending} connections without a UUID from {source}")
        return None

    def holder(self, call_id: str, role: Role) -> IServerLeg | None:
        """
        The live leg that keeps a newcomer naming (call id, role) out, when
        duplicates are refused: a call id is no key to a live call.
        """
        if self.on_duplicate != "refuse":
            return None
        held = self.get(call_id, role)
        return held if held is not None and held.live else None

    def register(self, leg: IServerLeg) -> tuple[Session, IServerLeg | None]:
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

    def whenEmpty(self) -> Deferred[None]:
        """Fires once no connection is open (at once if none is): what a drain waits for. Cancellable."""
        if not self._connections:
            return succeed(None)
        emptied: Deferred[None] = Deferred(lambda waiting: self._emptied.remove(waiting))
        self._emptied.append(emptied)
        return emptied

    def disconnected(self, connection: IServerLeg) -> None:
        """Forget a connection and, if it had started, tell that the leg ended."""
        try:
            self._disconnected(connection)
        finally:
            if self._emptied and not self._connections:
                emptied, self._emptied = self._emptied, []
                for waiting in emptied:
                    waiting.callback(None)

    def _disconnected(self, connection: IServerLeg) -> None:
        self._connections.discard(connection)
        self.pending.discard(connection)
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

    def get(self, call_id: str, role: Role) -> IServerLeg | None:
        session = self._sessions.get(call_id)
        return None if session is None else session.legs.get(role)

    def call(self, call_id: str) -> list[IServerLeg]:
        """The live legs of one call, visitor first; empty for an unknown call."""
        session = self._sessions.get(call_id)
        return [] if session is None else session.ordered()

    def calls(self) -> dict[str, list[IServerLeg]]:
        """Every call with its legs, in call id order."""
        return {call_id: self._sessions[call_id].ordered() for call_id in sorted(self._sessions)}

    @property
    def session_count(self) -> int:
        """The number of live sessions (calls with a live leg here)."""
        return len(self._sessions)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connections(self) -> list[IServerLeg]:
        """Every open connection, with or without a UUID yet."""
        return list(self._connections)

    def __len__(self) -> int:
        """The number of live legs."""
        return self._legs

    def __iter__(self) -> Iterator[IServerLeg]:
        return iter([leg for session in list(self._sessions.values()) for leg in session.ordered()])
