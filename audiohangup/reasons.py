# -*- test-case-name: tests.test_protocol -*-
"""
Where a leg is in its life, why it ended, and why we hung it up.

A leg ends with exactly one L{CloseReason}, chosen by L{classify} from what we
did (sent a hangup, decided to close) and how the socket went away. The level
of each reason is part of the product: a reset right after our hangup is how
Asterisk behaves, so it is C{info}, never an error with a traceback.
"""

from __future__ import annotations

import enum

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.logger import LogLevel
from twisted.python.failure import Failure


class StrEnum(str, enum.Enum):
    """
    A string enum that prints as its value, in logs and in JSON alike: every
    string enum of the package is one (Python 3.11's C{enum.StrEnum}, for 3.10).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Role(StrEnum):
    """The part a leg plays in a call; each role has its own listening port."""

    VISITOR = "visitor"
    RESIDENT = "resident"


class LegState(StrEnum):
    """Where a connection is in its life: waiting for its UUID, a live leg, closing, gone."""

    AWAITING_UUID = "awaiting_uuid"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


# The states as module names for the checks every frame makes: on CPython
# 3.11 a member looked up through its Enum class costs about 90 ns, more
# than the rest of such a check.
AWAITING_UUID = LegState.AWAITING_UUID
LIVE = LegState.LIVE
CLOSING = LegState.CLOSING
CLOSED = LegState.CLOSED


class HangupCause(StrEnum):
    """Why we sent C{00 00 00} to a leg."""

    API = "api"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"
    STREAM = "stream"
    SHUTDOWN = "shutdown"
    SESSION = "session"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"
    #: The media link to the instance holding the call's session could not be made, or broke.
    LINK = "link"


class CloseReason(StrEnum):
    """How a leg ended: one per leg, logged once."""

    level: LogLevel
    explanation: str

    def __new__(cls, value: str, level: LogLevel, explanation: str) -> CloseReason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.level = level
        member.explanation = explanation
        return member

    HANGUP_CLEAN = ("hangup_clean", LogLevel.info, "peer closed cleanly after our hangup")
    HANGUP_RESET = (
        "hangup_reset",
        LogLevel.info,
        "peer reset the connection after our hangup, which is normal for Asterisk",
    )
    HANGUP_TIMEOUT = (
        "hangup_timeout",
        LogLevel.info,
        "peer did not close in time after our hangup, so we aborted",
    )
    PEER_CLOSED = ("peer_closed", LogLevel.info, "peer closed the connection")
    PEER_RESET = ("peer_reset", LogLevel.warn, "peer reset the connection without our hangup")
    PEER_HANGUP = ("peer_hangup", LogLevel.info, "peer sent a hangup frame")
    PEER_ERROR = ("peer_error", LogLevel.warn, "peer sent an error frame")
    PROTOCOL_ERROR = ("protocol_error", LogLevel.warn, "frame out of order or malformed")
    UUID_TIMEOUT = ("uuid_timeout", LogLevel.warn, "no UUID frame in time")
    OVER_CAPACITY = ("over_capacity", LogLevel.warn, "refused: the server holds --max-legs connections")
    #: A connection accepted in the instant the listeners closed for a drain (the next process takes the others).
    DRAINING = ("draining", LogLevel.warn, "refused: the server is draining (stopping) and takes no new leg")
    #: At debug, one line per connection: the crowding is logged once a minute per source instead.
    TOO_MANY_PENDING = (
        "too_many_pending",
        LogLevel.debug,
        "closed without a UUID: the oldest waiting, and newer connections needed its place",
    )
    DUPLICATE = (
        "duplicate", LogLevel.warn, "refused: a live leg already holds this call id and role (--on-duplicate refuse)"
    )
    SLOW_CONSUMER = (
        "slow_consumer", LogLevel.warn, "aborted: the peer stopped reading what we sent"
    )
    #: A remote leg (L{audiohangup.cluster.remoteleg}) whose link broke before its instance said how it ended.
    LINK_LOST = (
        "link_lost", LogLevel.warn, "the media link to the instance holding the connection broke"
    )
    INTERNAL_ERROR = (
        "internal_error",
        LogLevel.critical,
        "the connection failed in a way audiohangup does not expect (a bug)",
    )


class Loss(enum.Enum):
    """How the transport went away, from the Twisted failure type alone."""

    CLEAN = "clean"
    RESET = "reset"
    ABORTED = "aborted"
    OTHER = "other"


def loss_of(reason: Failure) -> Loss:
    """
    Map C{connectionLost}'s failure to a L{Loss}.

    C{ConnectionAborted} subclasses C{ConnectionLost} and C{Failure.check}
    answers the first matching argument, so the checks go one at a time, most
    specific first. Twisted drops the errno: a reset is "lost, not aborted".
    """
    if reason.check(ConnectionAborted):
        return Loss.ABORTED
    if reason.check(ConnectionDone):
        return Loss.CLEAN
    if reason.check(ConnectionLost):
        return Loss.RESET
    return Loss.OTHER


def classify(*, hangup_sent: bool, decided: CloseReason | None, loss: Loss) -> CloseReason:
    """
    Choose the one close reason of a leg.

    @param hangup_sent: we wrote C{00 00 00} to this leg.
    @param decided: a reason fixed before the socket closed (the peer sent a
        hangup or error frame, broke the protocol, or never sent its UUID).
    @param loss: how the socket went away.
    """
    if loss is Loss.OTHER:
        return CloseReason.INTERNAL_ERROR
    if decided is not None:
        # Decided before the socket went (nothing is sent after such a
        # decision), or a peer too slow to take even our hangup.
        return decided
    if hangup_sent:
        return {
            Loss.CLEAN: CloseReason.HANGUP_CLEAN,
            Loss.RESET: CloseReason.HANGUP_RESET,
            Loss.ABORTED: CloseReason.HANGUP_TIMEOUT,
        }[loss]
    if loss is Loss.CLEAN:
        return CloseReason.PEER_CLOSED
    # A reset, or an abort nobody asked for: the peer's fault either way.
    return CloseReason.PEER_RESET
