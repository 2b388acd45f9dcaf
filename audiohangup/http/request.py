# -*- test-case-name: tests.test_api,tests.test_security -*-
"""
What a request says, read once and checked: its call id, role, query
parameters, JSON or audio body, and the source its failed authentications
count against. Each refusal is an L{ApiError} naming what was wrong.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from twisted.web.iweb import IRequest

from audiohangup.audio import AudioFormat
from audiohangup.http.access import source_key
from audiohangup.http.errors import ApiError, body_too_large
from audiohangup.reasons import Role
from audiohangup.sources import IPNetwork

#: The largest JSON body the API reads; its bodies are a few dozen bytes.
MAX_BODY = 64 * 1024

#: Media types accepted for 8-bit G.711 bodies.
_G711_TYPES = {"ulaw": ("audio/pcmu", "audio/basic"), "alaw": ("audio/pcma",)}


def header(request: IRequest, name: str) -> str | None:
    """A request header as text, whatever its bytes (latin-1 never fails to decode)."""
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    return values[-1].decode("latin-1") if values else None


def throttle_source(request: IRequest, trusted_proxies: tuple[IPNetwork, ...]) -> str | None:
    """
    What failed authentications are counted against (L{source_key}); None
    for a UNIX socket's client, never throttled: the socket's file mode
    already says who may connect, and every client there has one address.
    """
    host = getattr(request.getClientAddress(), "host", None)
    if not isinstance(host, str):
        return None
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
    return source_key(host, [value.decode("latin-1") for value in forwarded], trusted_proxies)


def parse_call_id(text: str) -> str:
    """The canonical lowercase form of a call id, or a 400."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ApiError(400, "bad_call_id", f"call id {text!r} is not a UUID") from None


def parse_role(value: object) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise ApiError(400, "bad_role", f"role {value!r} is not one of {roles}") from None


def role_of(request: IRequest, body: dict[str, Any] | None = None) -> Role | None:
    """The role a request names, in its query or its body (the same one if in both); None if neither."""
    role = query(request, "role")
    if body is not None and "role" in body:
        if role is not None and role != body["role"]:
            raise ApiError(400, "bad_role", "the query and the body name different roles")
        return parse_role(body["role"])
    return None if role is None else parse_role(role)


def query(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode(), [])
    if len(values) > 1:
        raise ApiError(400, f"bad_{name}", f"query parameter {name!r} is given more than once")
    return values[0].decode("utf-8", errors="replace") if values else None


def whole_number(request: IRequest, name: str, *, default: int, low: int, high: int) -> int:
    value = query(request, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ApiError(400, f"bad_{name}", f"query parameter {name!r} must be a whole number from {low} to {high}")
    return number


def instant(request: IRequest, name: str) -> float | None:
    """A point in time as Unix seconds or ISO 8601 (naive means UTC)."""
    value = query(request, name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"bad_{name}", f"{name} must be Unix seconds or an ISO 8601 time, not {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def flag(request: IRequest, name: str) -> bool:
    value = query(request, name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ApiError(400, f"bad_{name}", f"query parameter {name!r} must be true or false, not {value!r}")


def content_type(request: IRequest) -> tuple[str, dict[str, str]]:
    """The media type, lowercased, and its parameters (C{audio/L16;rate=8000})."""
    text = (header(request, "content-type") or "").strip()
    media, *params = [part.strip() for part in text.split(";")]
    parsed = {}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key.strip().lower()] = value.strip().strip('"')
    return media.lower(), parsed


def read_json(request: IRequest, *, allowed: set[str], required: bool) -> dict[str, Any]:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise body_too_large(MAX_BODY)
    if not raw.strip():
        if required:
            raise ApiError(400, "bad_body", "a JSON object body is required")
        return {}
    media, _ = content_type(request)
    if media and media != "application/json" and not media.endswith("+json"):
        raise ApiError(
            400, "bad_content_type", f"send the body as application/json, not {media}"
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {error!s:.200}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_body", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    return body


def read_audio(request: IRequest, fmt: AudioFormat, *, max_frames: int, max_ms: int) -> bytes:
    """Raw audio in C{fmt}, its type saying so, at most what a leg's queue holds (C{max_frames}, C{max_ms})."""
    media, params = content_type(request)
    if fmt.sample_bytes == 2:
        if media != "audio/l16":
            raise ApiError(400, "bad_content_type", f"send the audio as {fmt.content_type}, not {media or 'nothing'}")
        if params.get("rate") != str(fmt.rate):
            raise ApiError(
                400, "wrong_rate",
                f"the legs carry {fmt.rate} Hz audio; the body says rate={params.get('rate', 'nothing')}",
            )
        if params.get("channels", "1") != "1":
            raise ApiError(400, "wrong_channels", "the legs carry mono audio")
    elif media not in _G711_TYPES[fmt.name]:
        raise ApiError(400, "bad_content_type", f"send the audio as {fmt.content_type}, not {media or 'nothing'}")
    limit = max_frames * fmt.frame_bytes
    audio = request.content.read(limit + 1) if request.content is not None else b""
    if len(audio) > limit:
        raise ApiError(
            413, "audio_too_long",
            f"the body holds more than the {max_ms} ms a leg's queue "
            "holds (raise --max-queue-ms for longer prompts)",
        )
    if not audio:
        raise ApiError(400, "empty_audio", "the body holds no audio")
    if len(audio) % fmt.sample_bytes:
        raise ApiError(400, "bad_audio_length", f"{len(audio)} bytes is not a whole number of 16-bit samples")
    return audio


def largest_body(max_frames: int, formats: list[AudioFormat]) -> int:
    """The largest body a route takes: a /play prompt as long as a leg's queue, in the legs' widest format."""
    return max(MAX_BODY, *(max_frames * fmt.frame_bytes for fmt in formats))
