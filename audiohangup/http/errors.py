# -*- test-case-name: tests.test_api,tests.test_cluster,tests.test_stream_rules -*-
"""
The one place a refusal becomes a status and a stable code. The routes raise
L{ApiError} for what only HTTP decides (a bad query, a missing token); the
domain raises its own exceptions (L{AlreadyRecording}, L{BadStreamURL}, ...),
and L{REFUSALS} says how each is answered, as Klein's C{handle_errors} does
at the edge. No module outside C{audiohangup.http} knows a status code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from audiohangup.cluster.directory import DirectoryUnavailable
from audiohangup.cluster.forward import OwnerAnswerTooLarge, OwnerUnreachable
from audiohangup.recording import AlreadyRecording, NotRecording, RecorderStopped, RecordingOff
from audiohangup.records import BadQuery
from audiohangup.streams.manager import AlreadyConversing, BadStreamField, LegNotLive, TooManyStreams


class ApiError(Exception):
    """An answer other than success, with its status and a stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        """The C{error} object of the answer."""
        return {"code": self.code, "message": self.message}


class Refusal(NamedTuple):
    """How the API answers one kind of domain exception."""

    kind: type[Exception]
    status: int
    #: The error code, or how to make it from the exception.
    code: str | Callable[[Any], str]
    #: The message, from the exception (its text unless said otherwise).
    message: Callable[[Any], str] = str


#: Every domain refusal the routes let through, subclasses before their bases.
REFUSALS = (
    Refusal(BadStreamField, 400, lambda error: f"bad_{error.field}"),
    Refusal(LegNotLive, 404, "no_live_leg"),
    Refusal(TooManyStreams, 409, "too_many_streams"),
    Refusal(AlreadyConversing, 409, "already_conversing"),
    Refusal(RecordingOff, 404, "recording_off"),
    Refusal(AlreadyRecording, 409, "already_recording"),
    Refusal(NotRecording, 404, "not_recording"),
    Refusal(RecorderStopped, 503, "shutting_down"),
    Refusal(BadQuery, 400, "bad_query"),
    Refusal(
        DirectoryUnavailable, 503, "redis_unavailable",
        lambda error: f"the call directory (Redis) is unreachable: {error}",
    ),
    # The owner of a leg, on another instance: it did not answer, or answered more than is read.
    Refusal(OwnerAnswerTooLarge, 502, "owner_answer_too_large"),
    Refusal(OwnerUnreachable, 502, "owner_unreachable"),
)

#: What C{handle_errors} catches: every refusal of the table (and the API's own L{ApiError}).
REFUSED: tuple[type[Exception], ...] = tuple(refusal.kind for refusal in REFUSALS)


def refusal(error: BaseException) -> ApiError | None:
    """The answer to C{error}: itself if it is an L{ApiError}, else from L{REFUSALS}; None if it is neither."""
    if isinstance(error, ApiError):
        return error
    for entry in REFUSALS:
        if isinstance(error, entry.kind):
            code = entry.code if isinstance(entry.code, str) else entry.code(error)
            return ApiError(entry.status, code, entry.message(error))
    return None


def body_too_large(limit: int) -> ApiError:
    """A body past what is read: the routes' own bound, or the site's before any route runs."""
    return ApiError(413, "body_too_large", f"the body exceeds {limit} bytes")


def unknown_call(call_id: str) -> ApiError:
    return ApiError(404, "unknown_call", f"no live leg has call id {call_id}")
