# -*- test-case-name: tests.test_streams -*-
"""
audiohangup's own stream protocol: the leg's audio as it is, no conversion
and no base64. Binary messages are raw 20 ms frames in the leg's format
(little-endian L16 at its rate, or μ-law, or A-law), both ways; text
messages are JSON objects with an C{"event"} key. docs/streams.rst lists
them.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from audiohangup.audio import AudioFormat
from audiohangup.streams.messages import (
    AppAudio,
    AppClear,
    AppCommand,
    AppHangup,
    AppMark,
    BadMessage,
    IStreamProtocol,
    Message,
    json_object,
    mark_name,
    text,
)


def encoding_of(fmt: AudioFormat) -> str:
    """The RTP name of a leg's encoding: L16, PCMU or PCMA."""
    return {"ulaw": "PCMU", "alaw": "PCMA"}.get(fmt.name, "L16")


@implementer(IStreamProtocol)
class AudiohangupProtocol:
    name = "audiohangup"

    def __init__(
        self, stream_id: str, call_id: str, role: str, leg_format: AudioFormat, parameters: dict[str, str]
    ) -> None:
        self.stream_id = stream_id
        self.call_id = call_id
        self.role = role
        self.format = leg_format
        self.parameters = parameters

    def opening(self) -> list[Message]:
        return [
            text({
                "event": "start",
                "stream_id": self.stream_id,
                "call_id": self.call_id,
                "role": self.role,
                "format": {"encoding": encoding_of(self.format), "sample_rate": self.format.rate, "channels": 1},
                "parameters": self.parameters,
            })
        ]

    def media(self, payload: bytes) -> Message:
        return payload, True

    def dtmf(self, digit: str) -> Message:
        return text({"event": "dtmf", "digit": digit})

    def mark(self, name: str) -> Message:
        return text({"event": "mark", "name": name})

    def stop(self, reason: str) -> Message:
        return text({"event": "stop", "reason": reason})

    def parse(self, payload: bytes, binary: bool) -> AppCommand | None:
        if binary:
            if len(payload) % self.format.sample_bytes:
                raise BadMessage(f"{len(payload)} bytes is not a whole number of {self.format.sample_bytes}-byte samples")
            return AppAudio(payload)
        body: dict[str, Any] = json_object(payload)
        event = body.get("event")
        if event == "mark":
            return AppMark(mark_name(body))
        if event == "clear":
            return AppClear()
        if event == "hangup":
            after = body.get("after_playout", False)
            if not isinstance(after, bool):
                raise BadMessage("after_playout must be true or false")
            return AppHangup(after_playout=after)
        if isinstance(event, str):
            return None
        raise BadMessage("a message without an event")
