# -*- test-case-name: tests.test_api,tests.test_http_edge,tests.test_page,tests.test_page_listen -*-
"""
How the API's answers are written: JSON with its status, an error as
C{{"error": {"code", "message"}}}, a whole closing response for when no
request can answer (a body too large, a head too slow), and the live page's
files.
"""

from __future__ import annotations

import json
from importlib import resources

from twisted.web.http import RESPONSES
from twisted.web.iweb import IRequest

from audiohangup.http.errors import ApiError

#: Reason phrases Twisted's table lacks (it would send "Unknown Status").
_PHRASES = {421: b"Misdirected Request"}
#: The phrases of the answers written before any request can answer: RFC 9110's names.
_CLOSING_PHRASES = {408: b"Request Timeout", 413: b"Content Too Large"}


def json_answer(request: IRequest, status: int, body: object) -> bytes:
    request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader("content-type", "application/json")
    return json.dumps(body).encode() + b"\n"


def json_error(request: IRequest, error: ApiError) -> bytes:
    return json_answer(request, error.status, {"error": error.body()})


def closing_answer(error: ApiError) -> bytes:
    """A whole JSON error response that closes the connection, for when no request can answer."""
    body = json.dumps({"error": error.body()}).encode() + b"\n"
    phrase = _CLOSING_PHRASES.get(error.status) or RESPONSES.get(error.status, b"")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
        % (error.status, phrase, len(body), body)
    )


_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "levels.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "recordings.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "listen.js": "text/javascript; charset=utf-8",
    "listen-worklet.js": "text/javascript; charset=utf-8",
    "listen.css": "text/css; charset=utf-8",
}


def static_file(request: IRequest, name: str) -> bytes:
    """A file of the live page, from the package; only the files it has."""
    content_type = _STATIC_TYPES.get(name)
    if content_type is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    request.setHeader("content-type", content_type)
    request.setHeader("cache-control", "no-cache")
    # The page loads nothing from elsewhere, and nothing may make it. Media
    # from blob: too: the recordings view plays a WAV it fetched with the
    # token in a header (recordings.js), never with the token in a URL.
    request.setHeader("content-security-policy", "default-src 'self'; media-src 'self' blob:; frame-ancestors 'none'")
    return resources.files("audiohangup.http").joinpath("web").joinpath(name).read_bytes()
