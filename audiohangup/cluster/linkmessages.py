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
#: Bytes of a nonce (each side sends one: each proves the other holds the token).
NONCE_BYTES = 32
#: What a presence's link address begins with when its listener speaks TLS (C{--link ssl:...}).
TLS_PREFIX = "tls:"


def split_address(address: str) -> tuple[str, int, bool]:
    """C{host:port} or C{[v6]:port}, after L{TLS_PREFIX} if it speaks TLS, as a presence holds it: and whether TLS."""
    tls = address.startswith(TLS_PREFIX)
    host, _, port = address.removeprefix(TLS_PREFIX).rpartition(":")
    return host.strip("[]"), int(port), tls


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


def mac(token: str, *fields: str) -> str:
    """The HMAC-SHA256 under the instances' control token of C{fields}: what proves an instance of the cluster wrote them."""
    text = "\n".join(["audiohangup-link", *fields]).encode()
    return hmac.new(token.encode(), text, hashlib.sha256).hexdigest()


def signed(token: str, given: object, *fields: str) -> bool:
    """Whether C{given} is L{mac} of C{fields}, compared in constant time."""
    return isinstance(given, str) and hmac.compare_digest(mac(token, *fields).encode(), given.encode())


def hello(token: str, challenge: str, nonce: str, instance_id: str, call_id: str, role: str, audio: str) -> bytes:
    """
    The newcomer's answer to the home's C{challenge}: which leg, signed;
    C{nonce} is the newcomer's own, which the home's acceptance must sign
    (so a listener that is not the home cannot take the leg's audio).
    """
    return control({
        "type": "hello", "instance_id": instance_id, "call_id": call_id, "role": role, "format": audio,
        "nonce": nonce, "mac": mac(token, "hello", challenge, nonce, instance_id, call_id, role, audio),
    })


def accepted(token: str, nonce: str, instance_id: str, call_id: str, role: str) -> bytes:
    """The home's acceptance of a hello whose newcomer's nonce was C{nonce}, signed."""
    return control({"type": "accepted", "mac": mac(token, "accepted", nonce, instance_id, call_id, role)})
