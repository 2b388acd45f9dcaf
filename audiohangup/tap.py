# -*- test-case-name: tests.test_tap -*-
"""
C{twistd audiohangup}: command-line options and the service they make.

The drop-in in C{twisted/plugins/} names this module lazily, so scanning
plugins imports neither Klein nor the rest of the package.
"""

from __future__ import annotations

import getopt
import os
import re
import stat
import sys
from collections.abc import Callable, Collection, Iterable
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from audiohangup import config as config_file
from audiohangup import credentials
from audiohangup.audio import FORMATS, FRAME_MS
from audiohangup.cluster.localdirectory import check_directory
from audiohangup.cluster.redis import parse_redis_url
from audiohangup.flows import FlowLoadError, load_flow
from audiohangup.http.access import MIN_TOKEN_LENGTH, SHORT_TOKEN, TokenFileError, Tokens
from audiohangup.http.hosts import check_name
from audiohangup.interfaces import IReactor
from audiohangup.listeners import listens_beyond_loopback, server_endpoint
from audiohangup.loglevel import LEVELS
from audiohangup.outbox import Outbox
from audiohangup.reasons import Role
from audiohangup.recording import Recorder
from audiohangup.records import CallRecords
from audiohangup.service import Config, build_service
from audiohangup.sources import parse_networks
from audiohangup.streams.manager import (
    AUDIO_POLICIES,
    FAILURE_POLICIES,
    MODES,
    PROTOCOLS,
    BadStreamURL,
    StreamConfig,
    check_url,
    parse_header,
)
from audiohangup.webhooks import Webhooks, trust_root

TOKEN_ENVIRONMENT = "AUDIOHANGUP_API_TOKEN"
WEBHOOK_SECRET_ENVIRONMENT = "AUDIOHANGUP_WEBHOOK_SECRET"
STREAM_SECRET_ENVIRONMENT = "AUDIOHANGUP_STREAM_SECRET"
REDIS_PASSWORD_ENVIRONMENT = "AUDIOHANGUP_REDIS_PASSWORD"

#: Old spellings, still taken: each logs a warning at start-up naming the new one. The call records
#: (SQLite rows, 30 days) and the recordings (WAV audio, kept forever) were --records and --record,
#: one letter apart; now each store's options begin with its own name. --record DIR is
#: --record-every-call --recordings-dir DIR (L{Options.opt_record}).
RENAMED = {
    "records": "call-records",
    "records-keep-days": "call-records-days",
    "record-dir": "recordings-dir",
    "record-mix": "recordings-mix",
    "record-days": "recordings-days",
}

#: Options whose value is a comma-separated list: in a configuration file, an array too.
COMMA_LISTS = ("allow", "http-allow", "trusted-proxies", "stream-roles")

log = Logger()


def _seconds(name: str, *, zero_is_off: bool = False) -> Callable[[str], float]:
    """A coerce function for a number of seconds: positive, or also 0 meaning off."""

    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None
        if not (number > 0 or (zero_is_off and number == 0)) or number == float("inf"):
            kind = "0 (off) or a positive number" if zero_is_off else "a positive number"
            raise ValueError(f"{name} must be {kind} of seconds, not {value!r}")
        return number

    coerce.coerceDoc = "Seconds; 0 turns it off." if zero_is_off else "Seconds, greater than 0."  # type: ignore[attr-defined]
    return coerce


def _days(name: str) -> Callable[[str], float]:
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not 0 <= number < float("inf"):
            raise ValueError(f"{name} must be 0 (forever) or a positive number of days, not {value!r}")
        return number

    coerce.coerceDoc = "Days; 0 keeps everything."  # type: ignore[attr-defined]
    return coerce


def _whole(name: str, *, low: int) -> Callable[[str], int]:
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low:
            raise ValueError(f"{name} must be a whole number of at least {low}, not {value!r}")
        return number

    coerce.coerceDoc = f"A whole number, at least {low}."  # type: ignore[attr-defined]
    return coerce


def _milliseconds(name: str) -> Callable[[str], int]:
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number of milliseconds, not {value!r}") from None
        if number < FRAME_MS:
            raise ValueError(f"{name} must be at least {FRAME_MS} (one frame), not {value!r}")
        return number

    coerce.coerceDoc = f"Milliseconds, at least {FRAME_MS}."  # type: ignore[attr-defined]
    return coerce


def _choice(name: str, choices: Iterable[str]) -> Callable[[str], str]:
    allowed = list(choices)

    def coerce(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        return value

    coerce.coerceDoc = f"One of: {', '.join(allowed)}."  # type: ignore[attr-defined]
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
        [
            "config", None, None,
            "TOML file of options, one key per option (max-legs = 200); the command line overrides it. "
            "SIGHUP re-reads it and applies what can change without a restart.",
        ],
        [
            "log-level", None, Config.log_level,
            "The least severe events twistd writes (debug adds lines per connection crowded out, per webhook delivered...).",
            _choice("--log-level", LEVELS),
        ],
        ["visitor", None, Config.visitor, "Endpoint for visitor legs."],
        ["resident", None, Config.resident, "Endpoint for resident legs."],
        ["http", None, Config.http, "Endpoint for the HTTP API."],
        [
            "close-timeout", None, Config.close_timeout,
            "Seconds to wait for the peer to close after our hangup before aborting.",
            _seconds("--close-timeout"),
        ],
        [
            "on-stop", None, Config.on_stop,
            "What SIGTERM does to live legs: drain (the listeners close, so a process on the same ports "
            "takes new legs; live legs go on until they end, at most --drain-timeout) or hangup (at once, cause shutdown).",
            _choice("--on-stop", ("drain", "hangup")),
        ],
        [
            "drain-timeout", None, Config.drain_timeout,
            "Seconds a drain lets live legs go on; then those left are hung up (cause shutdown). 0: at once.",
            _seconds("--drain-timeout", zero_is_off=True),
        ],
        [
            "uuid-timeout", None, Config.uuid_timeout,
            "Seconds a new connection has to send its UUID frame.",
            _seconds("--uuid-timeout"),
        ],
        [
            "max-legs", None, Config.max_legs,
            "Connections held at most; one more is closed at once (reason over_capacity).",
            _whole("--max-legs", low=1),
        ],
        [
            "max-pending-per-source", None, Config.max_pending_per_source,
            "Connections without a UUID yet from one address (IPv6: one /64); past it the oldest is "
            "closed (reason too_many_pending). 0: no cap.",
            _whole("--max-pending-per-source", low=0),
        ],
        [
            "max-unsent-ms", None, Config.max_unsent_ms,
            "Audio a leg may leave unsent before it is aborted as a slow consumer.",
            _milliseconds("--max-unsent-ms"),
        ],
        [
            "redis", None, None,
            "Redis URL (redis://host:port/db or unix:///path) of the call directory shared "
            "by several instances; without it this instance runs alone. Its password is best given "
            f"by --redis-password-file or ${REDIS_PASSWORD_ENVIRONMENT}, not in the URL (on the command line).",
        ],
        [
            "local-directory", None, None,
            "Folder (made 0700 if missing; /run/audiohangup is a good one) of the call directory shared by the "
            "processes of this host without Redis: two processes that take turns on the same ports (--reuse-port) "
            "forward API requests and link split calls to each other through it. Needs --api-token.",
        ],
        [
            "redis-password-file", None, None,
            "File holding the Redis password (AUTH; a trailing newline is ignored): kept off the command line.",
        ],
        [
            "instance-id", None, None,
            "This instance's name in the directory (default: hostname-pid).",
        ],
        [
            "advertise-url", None, None,
            "URL other instances reach this instance's API at (required with --redis).",
        ],
        [
            "heartbeat", None, Config.heartbeat,
            "Seconds between directory heartbeats; entries live three heartbeats.",
            _seconds("--heartbeat"),
        ],
        [
            "link", None, Config.link,
            "Endpoint of the media link other instances join this one's calls through (with --redis; "
            "'none': off). Its address goes into the directory; only instances (the --api-token HMAC) are let in. "
            "An ssl: endpoint makes it TLS: links to it are made over TLS, and this instance links over TLS only.",
        ],
        [
            "link-ca", None, None,
            "PEM file of the CA certificates the other instances' TLS links (--link ssl:...) are verified against "
            "(default: the system's trust store).",
        ],
        [
            "call-records", None, Config.records,
            "SQLite file of call records (one row per leg), or 'none' to keep none.",
        ],
        [
            "call-records-days", None, Config.records_keep_days,
            "Days call records are kept; 0 keeps them forever.",
            _days("--call-records-days"),
        ],
        [
            "webhook-secret", None, None,
            f"Key of the X-Audiohangup-Signature header (HMAC-SHA256 of the body) "
            f"(default: ${WEBHOOK_SECRET_ENVIRONMENT}, else none; prefer --webhook-secret-file).",
        ],
        [
            "webhook-secret-file", None, None,
            "File holding --webhook-secret (a trailing newline is ignored): kept off the command line.",
        ],
        [
            "flow", None, Config.flow,
            "What a session does with its audio: bridge, echo, silence, or the "
            "dotted path of your own IFlow class.",
        ],
        [
            "audio", None, Config.audio,
            "The audio format the dialplan sends and gets (ulaw/alaw: Dial without c(slin)).",
            _choice("--audio", FORMATS),
        ],
        [
            "visitor-audio", None, None,
            "The visitor legs' format, if not --audio's (a μ-law intercom, say); the bridge converts.",
            _choice("--visitor-audio", FORMATS),
        ],
        [
            "resident-audio", None, None,
            "The resident legs' format, if not --audio's (a slin16 softphone, say); the bridge converts.",
            _choice("--resident-audio", FORMATS),
        ],
        [
            "max-queue-ms", None, Config.max_queue_ms,
            "Audio a leg's outbound queue holds; when full, the oldest is dropped.",
            _milliseconds("--max-queue-ms"),
        ],
        [
            "on-leg-end", None, Config.on_leg_end,
            "When a leg ends: hang up the session's other legs (cause session), or keep them.",
            _choice("--on-leg-end", ("hangup", "keep")),
        ],
        [
            "idle-timeout", None, Config.idle_timeout,
            "Hang up a leg that receives no frame for this long (cause idle_timeout).",
            _seconds("--idle-timeout", zero_is_off=True),
        ],
        [
            "max-duration", None, Config.max_duration,
            "Hang up a leg older than this (cause max_duration).",
            _seconds("--max-duration", zero_is_off=True),
        ],
        [
            "playout-timeout", None, Config.playout_timeout,
            "Longest wait for queued audio to play out before a hangup after playout.",
            _seconds("--playout-timeout"),
        ],
        [
            "api-token", None, None,
            f"Bearer token with full control the API requires on every route but /health "
            f"(default: ${TOKEN_ENVIRONMENT}, else none).",
        ],
        [
            "api-tokens-file", None, None,
            "File of 'SCOPE TOKEN' lines (scope read, listen or control, # comments), re-read on SIGHUP.",
        ],
        [
            "allow", None, None,
            "Sources the AudioSocket listeners accept, CIDR[,CIDR...] (IPv4 or IPv6); "
            "others are closed at once (default: every source).",
        ],
        [
            "http-allow", None, None,
            "Sources the HTTP API accepts, CIDR[,CIDR...]; others are closed at once (default: every source).",
        ],
        [
            "trusted-proxies", None, None,
            "Proxies in front of the API, CIDR[,CIDR...]: the throttle on failed authentication counts "
            "the client their X-Forwarded-For names (default: none, the peer's own address).",
        ],
        [
            "http-head-timeout", None, Config.http_head_timeout,
            "Seconds a request's head may take to arrive (from the connection, or its first byte); then 408.",
            _seconds("--http-head-timeout"),
        ],
        [
            "http-body-timeout", None, Config.http_body_timeout,
            "Seconds a request's body may take to arrive after its head; then 408.",
            _seconds("--http-body-timeout"),
        ],
        [
            "http-max-connections", None, Config.http_max_connections,
            "API connections held at most; a newcomer closes the oldest still sending its request, else is refused.",
            _whole("--http-max-connections", low=1),
        ],
        [
            "http-max-per-source", None, Config.http_max_per_source,
            "API connections held at most from one address (IPv6: one /64), the same way; UNIX sockets: no cap.",
            _whole("--http-max-per-source", low=1),
        ],
        [
            "on-duplicate", None, Config.on_duplicate,
            "A connection naming the call id and role of a live leg: refuse it (00 00 00, reason "
            "duplicate) or let it replace the live leg.",
            _choice("--on-duplicate", ("refuse", "replace")),
        ],
        [
            "webhook-ca", None, None,
            "PEM file of the CA certificates HTTPS webhook receivers are verified against "
            "(default: the system's trust store).",
        ],
        [
            "webhook-outbox", None, None,
            "SQLite file undelivered webhook events are kept in (0600), so a crash or a restart loses none "
            "(default: webhook-outbox.sqlite3 beside --call-records; 'none': in memory only).",
        ],
        [
            "webhook-outbox-max", None, Config.webhook_outbox_max,
            "Webhook events the outbox holds at most (one per event and receiver); at the bound the oldest are "
            "dropped.",
            _whole("--webhook-outbox-max", low=1),
        ],
        [
            "recordings-dir", None, None,
            "Where recordings go, one stereo WAV per call: DIR/YYYY-MM-DD/<call id>.wav "
            "(default: 'recordings' beside the call records).",
        ],
        [
            "recordings-mix", None, "sent",
            "What each channel holds: what its leg sent (the voices), or what it heard.",
            _choice("--recordings-mix", ("sent", "heard")),
        ],
        [
            "recordings-days", None, 0.0,
            "Days recordings are kept, pruned daily with the call records; 0 keeps them forever.",
            _days("--recordings-days"),
        ],
        [
            "stream-url", None, None,
            "Stream every new leg to this ws:// or wss:// URL ({call_id} and {role} are filled in).",
        ],
        [
            "stream-roles", None, "visitor,resident",
            "The roles --stream-url streams, comma-separated.",
        ],
        [
            "stream-protocol", None, StreamConfig.protocol,
            "twilio (Twilio Media Streams, μ-law 8 kHz) or audiohangup (the leg's own audio, binary).",
            _choice("--stream-protocol", PROTOCOLS),
        ],
        [
            "stream-mode", None, StreamConfig.mode,
            "converse (the app hears and speaks) or listen (it only hears).",
            _choice("--stream-mode", MODES),
        ],
        [
            "stream-audio", None, StreamConfig.audio,
            "What a bridged leg hears while its app speaks: floor (the app instead of the bridge) "
            "or mix (both, summed).",
            _choice("--stream-audio", AUDIO_POLICIES),
        ],
        [
            "stream-connect-timeout", None, StreamConfig.connect_timeout,
            "Seconds an app has to accept a stream's WebSocket.",
            _seconds("--stream-connect-timeout"),
        ],
        [
            "stream-failure", None, StreamConfig.failure,
            "When a stream fails: the leg goes on (continue) or is hung up (hangup, cause stream).",
            _choice("--stream-failure", FAILURE_POLICIES),
        ],
        [
            "stream-max-unsent-ms", None, StreamConfig.max_unsent_ms,
            "Audio waiting for an app that reads too slowly; beyond it the oldest is dropped.",
            _milliseconds("--stream-max-unsent-ms"),
        ],
        [
            "stream-max-queue-ms", None, StreamConfig.max_queue_ms,
            "Audio from an app waiting to be played to its leg; beyond it the oldest is dropped.",
            _milliseconds("--stream-max-queue-ms"),
        ],
        [
            "stream-secret", None, None,
            f"Key of the X-Audiohangup-Signature header of every stream's WebSocket handshake "
            f"(default: ${STREAM_SECRET_ENVIRONMENT}, else none; prefer --stream-secret-file).",
        ],
        [
            "stream-secret-file", None, None,
            "File holding --stream-secret (a trailing newline is ignored): kept off the command line.",
        ],
        [
            "stream-ca", None, None,
            "PEM file of the CA certificates wss:// apps are verified against (default: the system's).",
        ],
    ]
    optFlags: list[list[Any]] = [
        [
            "reuse-port", None,
            "Listen with SO_REUSEPORT on the AudioSocket and HTTP ports (tcp: endpoints), so that the next "
            "process (an upgrade) listens on the same ports while this one drains.",
        ],
        [
            "record-every-call", None,
            "Record every call into --recordings-dir from its first leg on; without it, a call is recorded "
            "when the API is asked to.",
        ],
        [
            "insecure-http", None,
            "Let the API listen beyond loopback without a token (something else must guard it).",
        ],
        [
            "insecure-files", None,
            "Take an --api-tokens-file or a secret file that others may read or its group write "
            "(default: refused; chmod 600, or 640 for a group that only reads).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        #: The deprecated spellings given (L{RENAMED}), and what to say instead: each warned of once.
        self.oldSpellings: dict[str, str] = {}
        self["record"] = None
        self["webhook"] = []
        self["stream-header"] = []
        self._headerSources: list[tuple[str, str]] = []  # (option, its argument), read in postOptions
        self["http-host"] = []
        #: The command line as given, and the options it names (by their names, old spellings as the new).
        self.argv: list[str] = []
        self.given: set[str] = set()
        #: What the configuration file gave, by key: where each error about it is.
        self.fromFile: dict[str, config_file.Setting] = {}
        #: Off when the file is re-read on SIGHUP: the old spellings were warned of at start-up.
        self.warnOldSpellings = True

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Note which options the command line gives (they override the file), then parse as usual."""
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            opts, _ = getopt.getopt(self.argv, self.shortOpt, self.longOpt)
        except getopt.error:
            opts = []  # usage.Options says what is wrong
        for opt, _value in opts:
            name = self.synonyms.get(opt.lstrip("-"), opt.lstrip("-"))
            self.given.add(RENAMED.get(name, name))
            if name == "record":
                self.given.update(("recordings-dir", "record-every-call"))
        super().parseOptions(self.argv)

    def opt_stream_header(self, header: str) -> None:
        """'NAME: VALUE' added to every stream's WebSocket handshake (repeat for several; never logged)."""
        self._headerSources.append(("--stream-header", header))

    def opt_stream_header_file(self, header: str) -> None:
        """'NAME: PATH': a --stream-header whose value is read from PATH (a trailing newline is ignored)."""
        self._headerSources.append(("--stream-header-file", header))

    def opt_stream_header_env(self, header: str) -> None:
        """'NAME: VARIABLE': a --stream-header whose value is the environment variable's."""
        self._headerSources.append(("--stream-header-env", header))

    def _streamHeaders(self) -> None:
        """The handshake headers, in order, their values as given or read from where they name; each name once."""
        read: dict[str, Callable[[str], str]] = {
            "--stream-header": lambda value: value,
            "--stream-header-file": self._fromFile,
            "--stream-header-env": credentials.from_environment,
        }
        for option, header in self._headerSources:
            try:
                name, where = parse_header(header)
                name, value = parse_header(f"{name}: {read[option](where)}")
            except ValueError as error:
                raise usage.UsageError(f"{option}: {error}") from None
            if any(name.lower() == given.lower() for given, _ in self["stream-header"]):
                raise usage.UsageError(f"{option}: {name} is given twice (header names are case-insensitive)")
            self["stream-header"].append((name, value))

    def _secret(self, name: str, environment: str) -> None:
        """--NAME as given, or read from --NAME-file, else from $ENVIRONMENT if set; never empty."""
        given, path = self[name], self[f"{name}-file"]
        try:
            if path is not None and given is not None:
                raise ValueError(f"give --{name} or --{name}-file, not both")
            if given is None:
                self[name] = self._fileOrEnvironment(path, environment)
        except ValueError as error:
            raise usage.UsageError(f"--{name}{'-file' if path else ''}: {error}") from None
        if self[name] is not None and not self[name]:
            raise usage.UsageError(f"--{name} must not be empty")

    def _fromFile(self, path: str) -> str:
        """A secret file's text, as private as --insecure-files asks (L{credentials.from_file})."""
        return credentials.from_file(path, insecure=bool(self["insecure-files"]))

    def _fileOrEnvironment(self, path: str | None, environment: str) -> str | None:
        """The secret in C{path} if given, else in C{$environment} if set (not empty), else None."""
        if path is not None:
            return self._fromFile(path)
        if os.environ.get(environment):
            return credentials.from_environment(environment)
        return None

    def _redisPassword(self, in_url: bool) -> None:
        """The Redis password from --redis-password-file, else $AUDIOHANGUP_REDIS_PASSWORD; one place only."""
        path = self["redis-password-file"]
        try:
            self["redis-password"] = self._fileOrEnvironment(path, REDIS_PASSWORD_ENVIRONMENT)
        except ValueError as error:
            raise usage.UsageError(f"--redis-password-file: {error}") from None
        if in_url and self["redis-password"] is not None:
            given = "--redis-password-file" if path is not None else f"${REDIS_PASSWORD_ENVIRONMENT}"
            raise usage.UsageError(f"--redis: the URL holds a password and {given} gives one too: give it once")

    def opt_http_host(self, names: str) -> None:
        """A name the API answers to beside localhost and IP addresses (NAME[,NAME...]; repeat for more)."""
        try:
            self["http-host"].extend(check_name(name) for name in names.split(",") if name.strip())
        except ValueError as error:
            raise usage.UsageError(f"--http-host: {error}") from None

    def opt_record(self, directory: str) -> None:
        """Deprecated: say --record-every-call --recordings-dir DIR."""
        self.oldSpellings.setdefault("record", "--record-every-call --recordings-dir DIR")
        self["record"] = directory

    def _renamed(self, old: str, new: str, value: str) -> None:
        """--OLD VALUE, a deprecated spelling: VALUE is taken (and checked) as --NEW's."""
        self.oldSpellings.setdefault(old, f"--{new}")
        coerce = next((entry[4] for entry in self.optParameters if entry[0] == new and len(entry) > 4), str)
        usage.CoerceParameter(self, coerce).dispatch(new, value)

    def opt_webhook(self, url: str) -> None:
        """URL to POST leg and call events to (repeat for several)."""
        self["webhook"].append(url)

    def postOptions(self) -> None:
        if self["config"] is not None:
            self._readConfig(self["config"])
        try:
            self._checkOptions()
        except usage.UsageError as error:
            raise usage.UsageError(self._located(str(error))) from None

    def _readConfig(self, path: str) -> None:
        """The file's settings, for every option the command line does not give."""
        try:
            with open(path, "rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                text = file.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8 text"
            raise usage.UsageError(f"--config: cannot read {path}: {why}") from None
        try:
            settings = config_file.parse(text, path, CONFIG_KEYS)
            overridden = {_sameSetting(name) for name in self.given}
            for setting in settings:
                if _sameSetting(setting.key) not in overridden:
                    self._apply(setting)
        except config_file.ConfigError as error:
            raise usage.UsageError(str(error)) from None
        secrets = config_file.holds_secret(settings)
        if secrets and credentials.exposed(mode):
            log.warn(
                "{path} holds secrets ({keys}) and its mode {mode} lets others read it or its group write it: "
                "chmod 600 it (or name files that hold them: webhook-secret-file, ...)",
                path=path, keys=", ".join(secrets), mode=f"{stat.S_IMODE(mode):04o}",
            )

    def _apply(self, setting: config_file.Setting) -> None:
        """One key of the file, given to its option as the command line would give it."""
        self.fromFile[setting.key] = setting
        if setting.flag is not None:
            self[setting.key] = int(setting.flag)
            return
        try:
            if setting.key in CONFIG_KEYS.repeatable:
                handler = getattr(self, f"opt_{setting.key.replace('-', '_')}")
                for argument in setting.arguments:
                    handler(argument)
            else:
                coerce = CONFIG_KEYS.parameters[setting.key] or str
                usage.CoerceParameter(self, coerce).dispatch(setting.key, setting.arguments[0])
        except usage.UsageError as error:
            raise config_file.ConfigError(self._located(str(error), f"--{setting.key}")) from None

    def _located(self, message: str, option: str | None = None) -> str:
        """An error about an option the file gave, with the file, line and key it came from."""
        for key, setting in self.fromFile.items():
            if option == f"--{key}" or re.match(rf"--{re.escape(key)}(?![\w-])", message):
                line = f", line {setting.line}" if setting.line is not None else ""
                return f"{self['config']}{line}, key {key}: {message}"
        return message

    def _checkOptions(self) -> None:
        from twisted.internet import reactor

        for old, new in self.oldSpellings.items() if self.warnOldSpellings else ():
            log.warn("--{old} is deprecated and will go: say {new}", old=old, new=new)
        for name in ("visitor", "resident", "http"):
            try:
                serverFromString(reactor, self[name])
            except Exception as error:  # each endpoint parser raises its own types
                raise usage.UsageError(
                    f"--{name} {self[name]!r} is not a valid endpoint ({error}); "
                    "the form is e.g. tcp:9092:interface=127.0.0.1, with colons "
                    "inside a value escaped as \\:"
                ) from None
            if self["reuse-port"]:
                try:
                    server_endpoint(reactor, self[name], reuse_port=True)
                except ValueError as error:
                    raise usage.UsageError(f"--{name}: {error}") from None
        self._secret("webhook-secret", WEBHOOK_SECRET_ENVIRONMENT)
        self._secret("stream-secret", STREAM_SECRET_ENVIRONMENT)
        self._streamHeaders()
        try:
            Webhooks.check(self["webhook"], secret=self["webhook-secret"])
        except ValueError as error:
            raise usage.UsageError(f"--webhook: {error}") from None
        if self["webhook-outbox"] == "":
            raise usage.UsageError("--webhook-outbox needs a file path, or 'none'")
        outbox = Config(records=self["call-records"], webhook_outbox=self["webhook-outbox"] or "").webhook_outbox_path()
        if self["webhook"] and outbox is not None:
            try:
                Outbox.check_path(outbox)
            except ValueError as error:
                named = "--webhook-outbox" if self["webhook-outbox"] else "--webhook-outbox (beside --call-records)"
                raise usage.UsageError(f"{named}: {error}") from None
        if self["redis"] is None and self["redis-password-file"] is not None:
            raise usage.UsageError("--redis-password-file needs --redis")
        if self["redis"] is not None:
            try:
                address = parse_redis_url(self["redis"])
            except ValueError as error:
                raise usage.UsageError(
                    f"--redis must be a redis://host:port/db or unix:///path URL: {error}"
                ) from None
            self._redisPassword(address.password is not None)
            if not self["advertise-url"]:
                raise usage.UsageError("--advertise-url is required with --redis: other instances forward to it")
            if not self["advertise-url"].startswith(("http://", "https://")):
                raise usage.UsageError("--advertise-url must be an http:// or https:// URL")
            if self["api-token"] is None and not os.environ.get(TOKEN_ENVIRONMENT):
                raise usage.UsageError(
                    "--redis needs --api-token: it is the control token the instances use between themselves "
                    "(the same on every instance), and the key that proves a request was forwarded by one of them"
                )
        if self["local-directory"] is not None:
            if self["redis"] is not None:
                raise usage.UsageError("--local-directory and --redis are two call directories: give one")
            try:
                check_directory(self["local-directory"])
            except ValueError as error:
                raise usage.UsageError(f"--local-directory: {error}") from None
            if self["api-token"] is None and not os.environ.get(TOKEN_ENVIRONMENT):
                raise usage.UsageError(
                    "--local-directory needs --api-token: it is the control token the processes use between "
                    "themselves, and the key that proves a request was forwarded by one of them"
                )
        if not self["call-records"]:
            raise usage.UsageError("--call-records needs a file path, or 'none'")
        if self["call-records"] != "none":
            try:
                CallRecords.check_path(self["call-records"])
            except ValueError as error:
                raise usage.UsageError(f"--call-records: {error}") from None
        if self["record"] is not None:
            if self["recordings-dir"] is not None and self["recordings-dir"] != self["record"]:
                raise usage.UsageError(
                    "--record DIR sets where recordings go: give --recordings-dir the same, or drop it"
                )
            self["recordings-dir"], self["record-every-call"] = self["record"], 1
        if self["recordings-dir"] is not None:
            try:
                Recorder.check_directory(self["recordings-dir"])
            except ValueError as error:
                raise usage.UsageError(f"--recordings-dir: {error}") from None
        elif self["record-every-call"]:  # into the default directory: it too must be usable at once
            try:
                Recorder.check_directory(Config(records=self["call-records"]).recordings_directory())
            except ValueError as error:
                raise usage.UsageError(f"--record-every-call, into the default --recordings-dir: {error}") from None
        for option in ("allow", "http-allow", "trusted-proxies"):
            if self[option] is not None:
                try:
                    self[option] = parse_networks(self[option])
                except ValueError as error:
                    raise usage.UsageError(f"--{option}: {error}") from None
        if self["api-tokens-file"] is not None:
            try:
                Tokens.load(self["api-tokens-file"], insecure=bool(self["insecure-files"]))
            except TokenFileError as error:
                raise usage.UsageError(f"--api-tokens-file: {error}") from None
        if self["stream-url"] is not None:
            try:
                check_url(self["stream-url"])
            except BadStreamURL as error:
                raise usage.UsageError(f"--stream-url: {error}") from None
        try:
            self["stream-roles"] = tuple(Role(role.strip()) for role in self["stream-roles"].split(","))
        except ValueError:
            raise usage.UsageError("--stream-roles must name visitor, resident or both, comma-separated") from None
        for option in ("webhook-ca", "stream-ca", "link-ca"):
            if self[option] is not None:
                try:
                    trust_root(self[option])
                except ValueError as error:
                    raise usage.UsageError(f"--{option}: {error}") from None
        try:
            load_flow(self["flow"])
        except FlowLoadError as error:
            raise usage.UsageError(f"--flow: {error}") from None
        if self["api-token"] is None:
            self["api-token"] = os.environ.get(TOKEN_ENVIRONMENT) or None
        elif not self["api-token"]:
            raise usage.UsageError("--api-token must not be empty")
        if self["api-token"] is not None and len(self["api-token"]) < MIN_TOKEN_LENGTH:
            raise usage.UsageError(f"--api-token (or ${TOKEN_ENVIRONMENT}): {SHORT_TOKEN}")
        tokened = self["api-token"] is not None or self["api-tokens-file"] is not None
        if not tokened and not self["insecure-http"] and listens_beyond_loopback(reactor, self["http"]):
            raise usage.UsageError(
                f"--http {self['http']} listens beyond loopback and no API token is configured: anyone who "
                "can reach it could list and hang up calls. Set --api-token (or $AUDIOHANGUP_API_TOKEN) or "
                "--api-tokens-file, listen on loopback (--http tcp:8080:interface=127.0.0.1), or, if "
                "something in front of it does the guarding, pass --insecure-http."
            )

    def config(self) -> Config:
        return Config(
            visitor=self["visitor"],
            resident=self["resident"],
            http=self["http"],
            log_level=self["log-level"],
            close_timeout=self["close-timeout"],
            uuid_timeout=self["uuid-timeout"],
            on_stop=self["on-stop"],
            drain_timeout=self["drain-timeout"],
            reuse_port=bool(self["reuse-port"]),
            local_directory=self["local-directory"],
            api_token=self["api-token"],
            api_tokens_file=self["api-tokens-file"],
            insecure_http=bool(self["insecure-http"]),
            allow=self["allow"],
            http_allow=self["http-allow"],
            trusted_proxies=self["trusted-proxies"] or (),
            insecure_files=bool(self["insecure-files"]),
            http_head_timeout=self["http-head-timeout"],
            http_body_timeout=self["http-body-timeout"],
            http_max_connections=self["http-max-connections"],
            http_max_per_source=self["http-max-per-source"],
            http_hosts=tuple(self["http-host"]),
            on_duplicate=self["on-duplicate"],
            webhook_ca=self["webhook-ca"],
            records=self["call-records"],
            records_keep_days=self["call-records-days"],
            webhooks=tuple(self["webhook"]),
            webhook_secret=self["webhook-secret"],
            webhook_outbox=self["webhook-outbox"] or "",
            webhook_outbox_max=self["webhook-outbox-max"],
            redis=self["redis"],
            redis_password=self.get("redis-password"),
            instance_id=self["instance-id"] or "",
            advertise_url=self["advertise-url"],
            heartbeat=self["heartbeat"],
            link=self["link"],
            link_ca=self["link-ca"],
            max_legs=self["max-legs"],
            max_pending_per_source=self["max-pending-per-source"],
            max_unsent_ms=self["max-unsent-ms"],
            flow=self["flow"],
            audio=self["audio"],
            visitor_audio=self["visitor-audio"],
            resident_audio=self["resident-audio"],
            max_queue_ms=self["max-queue-ms"],
            on_leg_end=self["on-leg-end"],
            idle_timeout=self["idle-timeout"],
            max_duration=self["max-duration"],
            playout_timeout=self["playout-timeout"],
            record_every_call=bool(self["record-every-call"]),
            record_dir=self["recordings-dir"],
            record_mix=self["recordings-mix"],
            record_days=self["recordings-days"],
            streams=StreamConfig(
                url=self["stream-url"],
                roles=self["stream-roles"],
                protocol=self["stream-protocol"],
                mode=self["stream-mode"],
                audio=self["stream-audio"],
                connect_timeout=self["stream-connect-timeout"],
                failure=self["stream-failure"],
                max_unsent_ms=self["stream-max-unsent-ms"],
                max_queue_ms=self["stream-max-queue-ms"],
                headers=tuple(self["stream-header"]),
                secret=self["stream-secret"],
                ca=self["stream-ca"],
            ),
        )


def _oldSpelling(old: str, new: str) -> Callable[[Options, str], None]:
    def handler(options: Options, value: str) -> None:
        options._renamed(old, new, value)

    handler.__doc__ = f"Deprecated: say --{new}."
    return handler


for _old, _new in RENAMED.items():  # Options.opt_records and the others: usage.Options finds them by name
    setattr(Options, f"opt_{_old.replace('-', '_')}", _oldSpelling(_old, _new))


#: The configuration file's keys: every option's name (old spellings refused with the new one named).
CONFIG_KEYS = config_file.keys_of(
    Options, comma_lists=COMMA_LISTS,
    refused={
        **{old: f"an old spelling: say {new}" for old, new in RENAMED.items()},
        "record": "an old spelling: say record-every-call = true and recordings-dir",
    },
)


def _sameSetting(name: str) -> str:
    """Options that set one thing (--webhook-secret, --webhook-secret-file): the command line giving one overrides all."""
    for suffix in ("-file", "-env"):
        if name.endswith(suffix) and name[: -len(suffix)] in {*CONFIG_KEYS.parameters, *CONFIG_KEYS.repeatable}:
            return name[: -len(suffix)]
    return name


#: Values kept under a name that is not an option's: said as the option that gives them.
_VALUE_OF = {"redis-password": "redis-password-file"}


class Reread:
    """
    The configuration again, for SIGHUP: the same command line over the file
    as it is now, through every check of start-up, and the options whose
    values differ from those in force.
    """

    def __init__(self, options: Options) -> None:
        self.path: str = options["config"]
        self.argv = list(options.argv)
        self.current = dict(options)
        self._read: dict[str, Any] = {}

    def __call__(self) -> tuple[Config, list[str]]:
        """The new configuration and what changed; a ValueError says why the file is not taken."""
        options = Options()
        options.warnOldSpellings = False
        try:
            options.parseOptions(self.argv)
        except usage.UsageError as error:
            raise ValueError(str(error)) from None
        self._read = dict(options)
        changed = config_file.changed(self.current, self._read)
        return options.config(), sorted({_VALUE_OF.get(key, key) for key in changed})

    def settle(self, applied: Collection[str]) -> None:
        """These options are in force now: a later reload compares against them (the others, against start-up)."""
        names = {name: key for key, name in _VALUE_OF.items()}
        for option in applied:
            key = names.get(option, option)
            self.current[key] = self._read.get(key)


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    # Under twistd or twist (the options' parent) the service owns the process: SIGHUP re-reads --config, and
    # under twistd, which has no level of its own, --log-level filters its log (twist has its --log-level, and
    # begins logging only after the service has started). A service made in a test's process leaves both alone.
    from twisted.application.app import ServerOptions

    parent = getattr(options, "parent", None)
    reread = Reread(options) if options["config"] is not None and parent is not None else None
    return build_service(options.config(), reactor, reread=reread, filter_log=isinstance(parent, ServerOptions))
