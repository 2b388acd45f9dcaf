# -*- test-case-name: tests.test_config,tests.test_tap -*-
"""
SIGHUP: what the running server takes again without a restart.

Without C{--config}, the API's tokens file is read again (L{TokensFile});
with it, the whole configuration (L{ConfigReload}): what can change in place
(tokens, allow lists, the log level, webhook targets, the limits of new
legs...; L{LIVE}) is applied, and one log line names what needs a restart.
"""

from __future__ import annotations

import signal
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.logger import Logger

from audiohangup.audio import LegSettings
from audiohangup.drain import Drain
from audiohangup.http.access import Scope, TokenFileError, Tokens
from audiohangup.http.api import ControlAPI
from audiohangup.interfaces import IReactor
from audiohangup.listeners import ConnectionCap, SourceGate
from audiohangup.loglevel import LEVELS, LogLevelFilter
from audiohangup.reasons import Role
from audiohangup.sources import SourceACL

if TYPE_CHECKING:
    from audiohangup.service import AudioHangupService, Config


class LegFactory(Protocol):
    """What SIGHUP changes of a role's AudioSocket factory: the settings of its new legs."""

    role: Role
    settings: LegSettings


class OnSighup(Service):
    """
    A part that acts on SIGHUP: its handler is installed when it starts and
    the one before put back when it stops. The signal arrives between two
    bytecodes of whatever runs; the work is done in the reactor's turn.
    """

    reactor: IReactor
    _previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _signalled(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        raise NotImplementedError


def load_tokens(path: str | None, api_token: str | None, *, insecure: bool) -> Tokens:
    """The API's tokens: a tokens file's (TokenFileError if it cannot be taken) and --api-token, of scope control."""
    tokens = Tokens() if path is None else Tokens.load(path, insecure=insecure)
    return tokens + Tokens([(Scope.CONTROL, api_token)] if api_token else [])


class TokensFile(OnSighup):
    """
    The API's tokens file, re-read on SIGHUP. A file that cannot be read or
    parsed keeps the tokens in force and logs why; a good one replaces them
    (with --api-token's) and logs how many there are per scope, never a token.
    Without --config only: with it, L{ConfigReload} re-reads the file too.
    """

    log = Logger()
    name = "tokens-file"

    def __init__(
        self, path: str, api: ControlAPI, reactor: IReactor, api_token: str | None = None, *, insecure: bool = False
    ) -> None:
        self.path = path
        self.insecure = insecure
        self.api = api
        self.reactor = reactor
        self.api_token = api_token

    def reload(self) -> None:
        try:
            tokens = load_tokens(self.path, self.api_token, insecure=self.insecure)
        except TokenFileError as error:
            self.log.error("API tokens not reloaded, the old ones stay in force: {error}", error=str(error))
            return
        self.api.tokens = tokens
        counts = tokens.counts()
        self.log.info(
            "API tokens reloaded from {path}: {read} read, {listen} listen, {control} control",
            path=self.path, read=counts["read"], listen=counts["listen"], control=counts["control"],
        )


class Reread(Protocol):
    """The configuration read again (tap.Reread): --config's path, the new configuration and what changed."""

    path: str

    def __call__(self) -> tuple[Config, list[str]]: ...

    def settle(self, applied: Collection[str]) -> None: ...


@dataclass
class LiveParts:
    """The parts whose settings SIGHUP may change in place."""

    service: AudioHangupService
    api: ControlAPI
    #: By listener name: audiosocket-visitor, audiosocket-resident, link (--allow), http (--http-allow).
    gates: dict[str, SourceGate]
    factories: Sequence[LegFactory]
    cap: ConnectionCap
    levels: LogLevelFilter


#: Options applied on SIGHUP, each to what it sets; any other whose value changed needs a restart.
#: The limits are those of new legs: a live leg keeps the settings it started with.
LIVE_LIMITS = frozenset({
    "max-legs", "max-pending-per-source", "uuid-timeout", "close-timeout", "idle-timeout", "max-duration",
    "playout-timeout", "max-queue-ms", "max-unsent-ms",
})
LIVE_TOKENS = frozenset({"api-token", "api-tokens-file", "insecure-files"})
LIVE_WEBHOOKS = frozenset({"webhook", "webhook-secret", "webhook-secret-file"})
LIVE_STREAMS = frozenset({
    "stream-url", "stream-roles", "stream-protocol", "stream-mode", "stream-audio", "stream-connect-timeout",
    "stream-failure", "stream-max-unsent-ms", "stream-max-queue-ms", "stream-header", "stream-secret",
    "stream-secret-file",
})
LIVE_OTHERS = frozenset({
    "allow", "http-allow", "log-level", "http-max-connections", "http-max-per-source", "record-every-call",
})
LIVE = LIVE_LIMITS | LIVE_TOKENS | LIVE_WEBHOOKS | LIVE_STREAMS | LIVE_OTHERS


class ConfigReload(OnSighup):
    """
    SIGHUP: C{--config} read again, with the same command line over it, and
    checked as at start-up. What can change in place is applied (L{LIVE}); the
    log says in one line what was applied and which changed options need a
    restart. A file that is not taken changes nothing and is logged with the
    key at fault. The tokens file is re-read whatever changed.
    """

    log = Logger()
    name = "reload"

    def __init__(self, reread: Reread, config: Config, parts: LiveParts, reactor: IReactor) -> None:
        self.reread = reread
        self.config = config
        self.parts = parts
        self.reactor = reactor

    def reload(self) -> None:
        from audiohangup.service import fit_descriptors  # the service imports this module

        try:
            new, changed = self.reread()
            new, descriptors = fit_descriptors(new)
            tokens = load_tokens(
                new.api_tokens_file, self._api_token(new, changed), insecure=new.insecure_files
            )
        except (ValueError, TokenFileError) as error:
            self.log.error(
                "configuration not reloaded from {path}, nothing changed: {error}", path=self.reread.path, error=str(error)
            )
            return
        applied, restart = self.apply(new, changed, tokens)
        self.reread.settle(applied)
        # The line below is written at the more verbose of the two levels: a level raised hides it after, not before.
        more_verbose = LEVELS.index(new.log_level) < LEVELS.index(self.parts.levels.level)
        if more_verbose:
            self.parts.levels.set(new.log_level)
        counts = tokens.counts()
        self.log.info(
            "configuration reloaded from {path}: applied {applied}; API tokens {read} read, {control} control; "
            "changed but needing a restart: {restart}",
            path=self.reread.path, applied=", ".join(applied) or "nothing new",
            read=counts["read"], control=counts["control"], restart=", ".join(restart) or "none",
            applied_keys=applied, restart_keys=restart,
        )
        if descriptors is not None and "max-legs" in applied:
            self.log.warn("{warning}", warning=descriptors)
        self.parts.levels.set(new.log_level)

    def _api_token(self, new: Config, changed: list[str]) -> str | None:
        """--api-token as it applies: with --redis it is also the instances' shared key, which a restart changes."""
        return self.config.api_token if self.config.redis and "api-token" in changed else new.api_token

    def apply(self, new: Config, changed: list[str], tokens: Tokens) -> tuple[list[str], list[str]]:
        """Apply what can change in place; the options applied, and those that need a restart."""
        parts, old = self.parts, self.config
        restart = [key for key in changed if key not in LIVE]
        if old.redis and "api-token" in changed:
            restart.append("api-token")
        webhooks = parts.service.webhooks
        if any(key in LIVE_WEBHOOKS for key in changed) and webhooks is None:
            restart.extend(key for key in changed if key in LIVE_WEBHOOKS)
        applied = [key for key in changed if key not in restart]
        parts.api.tokens = tokens
        for name, gate in parts.gates.items():
            gate.acl = SourceACL(new.http_allow if name == "http" else new.allow)
        parts.cap.total, parts.cap.per_source = new.http_max_connections, new.http_max_per_source
        if webhooks is not None:
            webhooks.retarget(list(new.webhooks), new.webhook_secret)
        if parts.service.streams is not None:
            parts.service.streams.config = new.streams
        if parts.service.recorder is not None:  # calls from now on: one being recorded goes on
            recorder = parts.service.recorder
            recorder.config = replace(recorder.config, every_call=new.record_every_call)
        for factory in parts.factories:
            factory.settings = replace(new.leg_settings(factory.role), audio=factory.settings.audio)
        settings = replace(new.leg_settings(), audio=parts.service.settings.audio)
        parts.service.settings = parts.api.settings = settings
        drain = parts.service.getServiceNamed("drain")
        if isinstance(drain, Drain):
            drain.close_timeout = new.close_timeout
        self.config = replace(new, api_token=old.api_token) if "api-token" in restart else new
        return applied, sorted(restart)
