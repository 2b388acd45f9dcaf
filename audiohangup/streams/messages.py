# -*- test-case-name: tests.test_streams -*-
"""
What a media stream's two protocols share: the commands an application
sends, and the interface each protocol provides to turn a leg's events into
WebSocket messages and the application's messages into commands. Pure code:
no sockets, no reactor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface

#: One WebSocket message: its payload, and whether it is binary (else UTF-8 text).
Message = tuple[bytes, bool]

#: The longest message an application may send (a 60 s μ-law answer in base64
#: is about 640 kB; 1 MiB of slin is 32 s at 8 kHz): a longer one ends the stream.
MAX_APP_MESSAGE = 1 << 20

#: The longest mark name an application may give, in UTF-8 bytes. A name is
#: a label (Twilio's examples, Pipecat's ids: a few dozen characters), and we
#: hold it until its audio has played and then send it back: a longer one is
#: refused (ignored, logged), or an app could make us hold its megabytes.
MAX_MARK_NAME = 256


class BadMessage(ValueError):
    """An application's message that is not one of the protocol's; the text says why (never its content)."""


@dataclass(frozen=True)
class AppAudio:
    """Audio for the leg, already in the leg's own format (raw samples, any length)."""

    audio: bytes


@dataclass(frozen=True)
class AppMark:
    """Answer C{name} once the audio sent before it has been written to the leg (or dropped)."""

    name: str


@dataclass(frozen=True)
class AppClear:
    """Drop the audio sent so far and not yet played: barge-in."""


@dataclass(frozen=True)
class AppHangup:
    """Hang the leg up (cause C{stream}), at once or after the queued audio."""

    after_playout: bool = False


AppCommand = AppAudio | AppMark | AppClear | AppHangup


class IStreamProtocol(Interface):
    """
    One stream's protocol: its messages to the application, and its reading
    of the application's. Stateful (sequence numbers, resampler state), so
    one instance serves one stream.
    """

    name: str = Attribute("As --stream-protocol names it.")

    def opening() -> list[Message]:
        """What the application gets once the WebSocket is open."""

    def media(payload: bytes) -> Message:
        """One 20 ms frame the leg received, as the leg carries it (raw samples)."""

    def dtmf(digit: str) -> Message:
        """A DTMF digit the leg received."""

    def mark(name: str) -> Message:
        """The answer to the application's mark C{name}."""

    def stop(reason: str) -> Message:
        """The last message: the stream ends, for C{reason}."""

    def parse(payload: bytes, binary: bool) -> AppCommand | None:
        """
        An application's message as a command (audio in the leg's format), or
        None for one the protocol reads and ignores; L{BadMessage} otherwise.
        """


def text(body: dict[str, Any]) -> Message:
    """A JSON text message, compact."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8"), False


def json_object(payload: bytes) -> dict[str, Any]:
    """A text message's JSON object, or L{BadMessage}."""
    if len(payload) > MAX_APP_MESSAGE:
        raise BadMessage(f"a text message over {MAX_APP_MESSAGE} bytes")
    try:
        # What json.loads does with bytes, without its encoding detection
        # (half its cost) when the start shows UTF-8: every app's usual message.
        body = json.loads(payload.decode("utf-8", "surrogatepass") if payload[:2] == b'{"' else payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadMessage("a text message that is not JSON") from None
    if not isinstance(body, dict):
        raise BadMessage("a JSON message that is not an object")
    return body


def mark_name(mark: object) -> str:
    """The name of a mark (Twilio's C{{"mark": {"name": ...}}}), or L{BadMessage}."""
    name = mark.get("name") if isinstance(mark, dict) else None
    if not isinstance(name, str) or not name:
        raise BadMessage("a mark without a name")
    if len(name) > MAX_MARK_NAME or len(name.encode("utf-8", "surrogatepass")) > MAX_MARK_NAME:
        raise BadMessage(f"a mark name over {MAX_MARK_NAME} bytes")
    return name
