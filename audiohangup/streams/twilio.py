# -*- test-case-name: tests.test_streams -*-
"""
Twilio's bidirectional Media Streams protocol, as audiohangup speaks it.

To the application: C{connected}, then C{start}, a C{media} per 20 ms frame
the leg receives (base64 μ-law 8 kHz), C{dtmf}, C{mark} (the answer to the
application's own) and C{stop}; every message but C{connected} carries a
C{sequenceNumber} (a string counting up from "1") and the C{streamSid}.
From the application: C{media} (base64 μ-law 8 kHz of any length), C{mark},
C{clear}, and, an extension of ours, C{hangup}. Its C{streamSid} is not
required. docs/streams.rst lists every field.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from zope.interface import implementer

from audiohangup.audio import FORMATS, AudioFormat
from audiohangup.codecs import Transcoder
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

#: What Twilio streams carry, both ways.
MULAW_8K = FORMATS["ulaw"]


@implementer(IStreamProtocol)
class TwilioProtocol:
    name = "twilio"

    def __init__(
        self,
        stream_sid: str,
        call_id: str,
        leg_format: AudioFormat,
        parameters: dict[str, str],
        clock: Any,
    ) -> None:
        self.stream_sid = stream_sid
        self.call_id = call_id
        self.parameters = parameters
        self.clock = clock
        self._sequence = 0
        self._chunk = 0
        self._began = clock.seconds()
        self._toApp = Transcoder(leg_format, MULAW_8K)
        self._fromApp = Transcoder(MULAW_8K, leg_format)
        # A media message, 50 a second: what text() makes of its fields, from
        # a template (a fifth of json.dumps's cost), the stream's id escaped once.
        self._mediaTemplate = (
            b'{"event":"media","sequenceNumber":"%d","streamSid":'
            + json.dumps(stream_sid).encode("utf-8").replace(b"%", b"%%")
            + b',"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
        )

    def _message(self, event: str, **fields: Any) -> Message:
        self._sequence += 1
        return text({"event": event, "sequenceNumber": str(self._sequence), "streamSid": self.stream_sid, **fields})

    def opening(self) -> list[Message]:
        self._began = self.clock.seconds()
        return [
            text({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            self._message(
                "start",
                start={
                    "streamSid": self.stream_sid,
                    "accountSid": "",
                    "callSid": self.call_id,
                    "tracks": ["inbound"],
                    "customParameters": self.parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            ),
        ]

    def media(self, payload: bytes) -> Message:
        self._sequence += 1
        self._chunk += 1
        milliseconds = round((self.clock.seconds() - self._began) * 1000)
        encoded = binascii.b2a_base64(self._toApp.convert(payload), newline=False)
        return self._mediaTemplate % (self._sequence, self._chunk, milliseconds, encoded), False

    def dtmf(self, digit: str) -> Message:
        return self._message("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    def mark(self, name: str) -> Message:
        return self._message("mark", mark={"name": name})

    def stop(self, reason: str) -> Message:
        return self._message("stop", stop={"accountSid": "", "callSid": self.call_id})

    def parse(self, payload: bytes, binary: bool) -> AppCommand | None:
        if binary:
            raise BadMessage("a binary message (Twilio's protocol is JSON text)")
        body = json_object(payload)
        event = body.get("event")
        if event == "media":
            media = body.get("media")
            encoded = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(encoded, str):
                raise BadMessage("a media message without a payload")
            try:
                ulaw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise BadMessage("a media payload that is not base64") from None
            return AppAudio(self._fromApp.convert(ulaw))
        if event == "mark":
            return AppMark(mark_name(body.get("mark")))
        if event == "clear":
            return AppClear()
        if event == "hangup":
            return AppHangup(after_playout=body.get("afterPlayout") is True)
        if isinstance(event, str):
            return None  # another of Twilio's events, or one of the future: read and ignored
        raise BadMessage("a message without an event")
