# -*- test-case-name: tests.test_registry -*-
"""
Which legs are live: a leg is keyed by (call id, role), a call is the legs
sharing a call id. Plain data, no I/O: the protocol registers a leg when its
UUID arrives and removes it in C{connectionLost}, whatever the path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from audiohangup.reasons import Role

if TYPE_CHECKING:
    from audiohangup.protocol import AudioSocketProtocol

LegKey = tuple[str, Role]
_ROLE_ORDER = {role: index for index, role in enumerate(Role)}


class Registry:
    """Live legs by key, plus every open connection (legs before their UUID too)."""

    def __init__(self) -> None:
        self._legs: dict[LegKey, AudioSocketProtocol] = {}
        self._connections: set[AudioSocketProtocol] = set()

    def connected(self, connection: AudioSocketProtocol) -> None:
        self._connections.add(connection)

    def disconnected(self, connection: AudioSocketProtocol) -> None:
        """Forget a connection and, if it is still the live leg for its key, the leg."""
        self._connections.discard(connection)
        key = connection.key
        if key is not None and self._legs.get(key) is connection:
            del self._legs[key]

    def register(self, leg: AudioSocketProtocol) -> AudioSocketProtocol | None:
        """Make C{leg} the live leg for its key; return the leg it replaces, if any."""
        key = leg.key
        assert key is not None, "a leg is registered once its UUID is known"
        previous = self._legs.get(key)
        self._legs[key] = leg
        return previous

    def get(self, call_id: str, role: Role) -> AudioSocketProtocol | None:
        return self._legs.get((call_id, role))

    def call(self, call_id: str) -> list[AudioSocketProtocol]:
        """The live legs of one call, visitor first; empty for an unknown call."""
        return [leg for role in Role if (leg := self._legs.get((call_id, role))) is not None]

    def calls(self) -> dict[str, list[AudioSocketProtocol]]:
        """Every call with its legs, in call id order."""
        grouped: dict[str, list[AudioSocketProtocol]] = {}
        for call_id, role in sorted(self._legs, key=lambda k: (k[0], _ROLE_ORDER[k[1]])):
            grouped.setdefault(call_id, []).append(self._legs[call_id, role])
        return grouped

    def connections(self) -> list[AudioSocketProtocol]:
        """Every open connection, with or without a UUID yet."""
        return list(self._connections)

    def __len__(self) -> int:
        return len(self._legs)

    def __iter__(self) -> Iterator[AudioSocketProtocol]:
        return iter(list(self._legs.values()))
