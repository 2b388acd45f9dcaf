# -*- test-case-name: tests.test_http_edge -*-
"""
Which requests the API takes from a browser's reach. Pure decisions: the
site asks and answers.

- C{Host} must be a name the API serves. DNS rebinding gives the attacker's
  name our address, so a page of theirs can reach a loopback API without a
  token; its requests still carry the attacker's name. An IP address is
  always served: rebinding needs a name, and health checkers and NATs use
  addresses.
- A request that changes something (any method but GET, HEAD and OPTIONS)
  must not be cross-site. A browser sends a cross-site POST without asking
  first (a CORS preflight) only with a form or C{text/plain} body, or none,
  and it then always names the page in C{Origin}. So: an C{Origin} must be
  this server's own (or a C{--http-host} name), else 403; without one, the
  body type must be JSON or the audio C{/play} takes, types no page can send
  without asking, else 400 (as the routes answer a wrong type anyway).
  curl and other instances of the cluster send neither C{Origin} nor a form
  type: they are served as before.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from audiohangup.http.errors import ApiError

#: Methods that change nothing: browsers send them cross-site, and the API only reads on them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Media types a page cannot send cross-site without a preflight, which the API never answers.
_UNSENDABLE_CROSS_SITE = frozenset({"application/json", "audio/l16", "audio/pcmu", "audio/pcma", "audio/basic"})

_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def check_name(name: str) -> str:
    """A C{--http-host} name, lowercased, or a ValueError saying why not."""
    lowered = name.strip().lower()
    if not _NAME.fullmatch(lowered):
        raise ValueError(f"{name!r} is not a host name (letters, digits, '-', '.', no port or scheme)")
    return lowered


def _split_authority(value: str) -> tuple[str, int | None] | None:
    """C{name}, C{name:port}, C{[v6]} or C{[v6]:port}: the name, lowercased, and the port; None if malformed."""
    try:
        parts = urlsplit("//" + value.strip())
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    name = name.lower()
    if not (_NAME.fullmatch(name) or _is_address(name)):
        return None
    return name, port


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class ServedHosts:
    """
    The names the API answers to: C{localhost}, every IP address, and
    C{names} (C{--http-host}, the advertise URL's). Of these, C{origins}
    (C{--http-host}'s; all of C{names} if not given) are pages whose changes
    are taken whatever their scheme and port (a reverse proxy's public
    name); any other page must be the API's own: scheme, name and port.
    """

    def __init__(self, names: Iterable[str] = (), origins: Iterable[str] | None = None) -> None:
        self.names = frozenset(name.lower() for name in names)
        self.origins = self.names if origins is None else frozenset(name.lower() for name in origins)

    def serves(self, name: str) -> bool:
        return name == "localhost" or name in self.names or _is_address(name)

    def refusal(
        self, method: str, hosts: list[str], origin: str | None, media: str, secure: bool
    ) -> ApiError | None:
        """
        Why a request must not be served, or None. C{hosts} are its Host
        headers (none from HTTP/1.0), C{media} its lowercased media type
        (C{""} without a body type), C{secure} whether it came over TLS.
        """
        if len(hosts) > 1:
            return ApiError(400, "bad_host", "the request has more than one Host header")
        authority = None
        if hosts:
            authority = _split_authority(hosts[0])
            if authority is None:
                return ApiError(400, "bad_host", f"{hosts[0][:100]!r} is not a host name with an optional port")
            if not self.serves(authority[0]):
                return ApiError(
                    421, "bad_host",
                    f"this server does not answer to {hosts[0][:100]!r}; name it with --http-host if it should",
                )
        if method in SAFE_METHODS:
            return None
        if origin is not None:
            if self._sameSite(origin, authority, secure):
                return None
            return ApiError(403, "cross_site", f"a {method} from the page of {origin[:100]!r} is not taken")
        if media and media not in _UNSENDABLE_CROSS_SITE and not media.endswith("+json"):
            return ApiError(
                400, "bad_content_type",
                f"send the body as application/json (or the audio /play takes), not {media[:100]}: "
                f"a {method} of that type is what any web page can send",
            )
        return None

    def _sameSite(self, origin: str, authority: tuple[str, int | None] | None, secure: bool) -> bool:
        """The page is this server's own (scheme, name and port of the Host), or of a C{--http-host} name."""
        try:
            parts = urlsplit(origin.strip())
            name, port = parts.hostname, parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False  # "null" (a sandboxed or file: page) among them
        if name in self.origins:
            return True
        if authority is None:
            return False
        default = 443 if secure else 80
        return (
            parts.scheme == ("https" if secure else "http")
            and (name, port or (443 if parts.scheme == "https" else 80)) == (authority[0], authority[1] or default)
        )
