# -*- test-case-name: tests.test_tap -*-
"""
C{twistd audiohangup}: command-line options and the service they make.

The drop-in in C{twisted/plugins/} names this module lazily, so scanning
plugins imports neither Klein nor the rest of the package.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from audiohangup.service import Config, build_service

TOKEN_ENVIRONMENT = "AUDIOHANGUP_API_TOKEN"


def _positive(name: str) -> Callable[[str], float]:
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None
        if not number > 0 or number == float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        return number

    coerce.coerceDoc = "Seconds, greater than 0."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An AudioSocket server for Asterisk: one listening endpoint per role "
        "(visitor, resident), a bounded and quiet teardown that names how every "
        "leg ended, and an HTTP API that hangs up a call by call id and role. "
        "Endpoints are Twisted endpoint strings (tcp:PORT:interface=ADDR, "
        "unix:PATH, ssl:...)."
    )
    optParameters: list[list[Any]] = [
        ["visitor", None, Config.visitor, "Endpoint for visitor legs."],
        ["resident", None, Config.resident, "Endpoint for resident legs."],
        ["http", None, Config.http, "Endpoint for the HTTP API."],
        [
            "close-timeout", None, Config.close_timeout,
            "Seconds to wait for the peer to close after our hangup before aborting.",
            _positive("--close-timeout"),
        ],
        [
            "uuid-timeout", None, Config.uuid_timeout,
            "Seconds a new connection has to send its UUID frame.",
            _positive("--uuid-timeout"),
        ],
        [
            "api-token", None, None,
            f"Bearer token the API requires on every route but /health "
            f"(default: ${TOKEN_ENVIRONMENT}, else none).",
        ],
    ]

    def postOptions(self) -> None:
        from twisted.internet import reactor

        for name in ("visitor", "resident", "http"):
            try:
                serverFromString(reactor, self[name])
            except Exception as error:  # each endpoint parser raises its own types
                raise usage.UsageError(
                    f"--{name} {self[name]!r} is not a valid endpoint ({error}); "
                    "the form is e.g. tcp:9092:interface=127.0.0.1, with colons "
                    "inside a value escaped as \\:"
                ) from None
        if self["api-token"] is None:
            self["api-token"] = os.environ.get(TOKEN_ENVIRONMENT) or None
        elif not self["api-token"]:
            raise usage.UsageError("--api-token must not be empty")

    def config(self) -> Config:
        return Config(
            visitor=self["visitor"],
            resident=self["resident"],
            http=self["http"],
            close_timeout=self["close-timeout"],
            uuid_timeout=self["uuid-timeout"],
            api_token=self["api-token"],
        )


def makeService(options: Options, reactor: IReactorCore | None = None) -> IService:
    return build_service(options.config(), reactor)
