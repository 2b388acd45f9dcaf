# -*- test-case-name: tests.test_link -*-
"""
The media link's messages (L{audiohangup.cluster.link} tells what crosses
it): AudioSocket frames, control messages in frames of kind L{CONTROL}, and
the HMAC that proves a hello comes from an instance of the cluster. Pure.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from audiohangup.wire import Frame, encode_frame

#: A control message: its payload is a JSON object.
CONTROL = 0xF0
#: Home to newcomer: the payload is one encoded frame to queue on the leg (played after what is queued).
QUEUED = 0xF1
#: Bytes of a nonce.
NONCE_BYTES = 32


def control(message: Mapping[str, Any]) -> bytes:
    """One control message, framed."""
    return encode_frame(CONTROL, json.dumps(message, separators=(",", ":")).encode())


def read_control(frame: Frame) -> dict[str, Any] | None:
    """The control message in C{frame}; None if it is not one (or not a JSON object)."""
    if frame.kind != CONTROL:
        return None
    try:
        message = json.loads(frame.payload)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _hello_fields(nonce: str, instance_id: str, call_id: str, role: str, audio: str) -> bytes:
    return "\n".join(["audiohangup-link", nonce, instance_id, call_id, role, audio]).encode()


def hello_mac(token: str, nonce: str, instance_id: str, call_id: str, role: str, audio: str) -> str:
    """What proves a hello comes from an instance of the cluster: the HMAC under the shared token."""
    fields = _hello_fields(nonce, instance_id, call_id, role, audio)
    return hmac.new(token.encode(), fields, hashlib.sha256).hexdigest()


def hello(token: str, nonce: str, instance_id: str, call_id: str, role: str, audio: str) -> bytes:
    """The newcomer's answer to a challenge."""
    return control({
        "type": "hello", "instance_id": instance_id, "call_id": call_id, "role": role, "format": audio,
        "mac": hello_mac(token, nonce, instance_id, call_id, role, audio),
    })
