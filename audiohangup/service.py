# -*- test-case-name: tests.test_tap,tests.test_twistd -*-
"""
Service wiring: one listening endpoint per role, the HTTP API on a third, all
on one reactor and one registry, and a shutdown that drains live legs.

L{build_service} makes every part in the order they need each other, each
given what it needs as it is made (nothing is patched in afterwards), with
one C{CollectorRegistry} each part counts in. Every part is a child service
of L{AudioHangupService}, which starts them in the order they were added and
stops them in its one stated L{AudioHangupService.STOP_ORDER}.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from audiohangup.audio import FORMATS, AudioFormat, LegSettings
from audiohangup.cluster.forward import Cluster
from audiohangup.events import RecentLegs
from audiohangup.flows import BridgeFlow, load_flow
from audiohangup.http.access import Scope, TokenFileError, Tokens
from audiohangup.http.api import ControlAPI
from audiohangup.http.hosts import ServedHosts
from audiohangup.http.site import ApiSite
from audiohangup.interfaces import ILegObserver, IReactor
from audiohangup.lifecycle import InOrder, within
from audiohangup.listeners import (
    ConnectionCap,
    Listener,
    SourceGate,
    descriptor_limit,
    listens_beyond_loopback,
    server_endpoint,
)
from audiohangup.metrics import GarbageCollectorPauses, LegMetrics
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketFactory
from audiohangup.reasons import HangupCause, Role
from audiohangup.recording import Mix, Recorder, RecordingConfig
from audiohangup.records import CallRecords
from audiohangup.registry import OnDuplicate, Registry
from audiohangup.relay import Relay
from audiohangup.sources import IPNetwork, SourceACL, is_loopback
from audiohangup.streams.listen import Listens
from audiohangup.streams.manager import StreamConfig, Streams
from audiohangup.webhooks import Webhooks


@dataclass(frozen=True)
class Config:
    """Everything C{twistd audiohangup} takes; see L{audiohangup.tap.Options}."""

    visitor: str = "tcp:9092:interface=127.0.0.1"
    resident: str = "tcp:9093:interface=127.0.0.1"
    http: str = "tcp:8080:interface=127.0.0.1"
    close_timeout: float = 2.0
    uuid_timeout: float = 5.0
    api_token: str | None = None
    api_tokens_file: str | None = None
    insecure_http: bool = False
    #: --insecure-files: take a tokens file that group or others can read.
    insecure_files: bool = False
    allow: tuple[IPNetwork, ...] | None = None
    http_allow: tuple[IPNetwork, ...] | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    http_head_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_max_connections: int = 256
    http_max_per_source: int = 64
    #: Names the API answers to beside localhost and IP addresses (--http-host).
    http_hosts: tuple[str, ...] = ()
    on_duplicate: OnDuplicate = "refuse"
    #: The call records, SQLite rows (--call-records, --call-records-days): not the recordings below.
    records: str = "audiohangup.sqlite3"
    records_keep_days: float = 30.0
    webhooks: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_ca: str | None = None
    flow: str = "bridge"
    audio: str = "slin"
    visitor_audio: str | None = None
    resident_audio: str | None = None
    max_queue_ms: int = 1000
    on_leg_end: str = "hangup"
    idle_timeout: float = 0.0
    max_duration: float = 0.0
    playout_timeout: float = 10.0
    max_legs: int = 2000
    max_pending_per_source: int = 32
    max_unsent_ms: int = 2000
    redis: str | None = None
    #: AUTH password for --redis from a file or the environment (never in the URL too).
    redis_password: str | None = field(default=None, repr=False)
    instance_id: str = ""
    advertise_url: str | None = None
    heartbeat: float = 2.0
    #: --link: where this instance's media link listens for the other instances (with --redis; "none": off,
    #: the default while a split call's streams and its cost are not yet those of a local one).
    link: str = "none"
    streams: StreamConfig = field(default_factory=StreamConfig)
    #: --record-every-call and --recordings-dir (where recordings go, started by the API or not).
    record_every_call: bool = False
    record_dir: str | None = None
    record_mix: str = "sent"
    record_days: float = 0.0

    def recordings_directory(self) -> str:
        """Where recordings go: --recordings-dir, else 'recordings' beside the call records."""
        if self.record_dir:
            return self.record_dir
        beside = os.path.dirname(self.records) if self.records not in ("none", ":memory:") else ""
        return os.path.join(beside, "recordings")

    def audio_of(self, role: Role) -> str:
        """The format a role's legs carry: --visitor-audio or --resident-audio, else --audio."""
        chosen = self.visitor_audio if role is Role.VISITOR else self.resident_audio
        return chosen or self.audio

    def leg_settings(self, role: Role | None = None) -> LegSettings:
        """The legs' settings; of one role's legs, with that role's audio format."""
        return LegSettings(
            close_timeout=self.close_timeout,
            uuid_timeout=self.uuid_timeout,
            audio=FORMATS[self.audio if role is None else self.audio_of(role)],
            max_queue_ms=self.max_queue_ms,
            idle_timeout=self.idle_timeout,
            max_duration=self.max_duration,
            playout_timeout=self.playout_timeout,
            max_legs=self.max_legs,
            max_pending_per_source=self.max_pending_per_source,
            max_unsent_ms=self.max_unsent_ms,
        )

    def endpoint(self, role: Role) -> str:
        return self.visitor if role is Role.VISITOR else self.resident


class AudioHangupService(InOrder):
    """
    The whole server: every part of it a child service, started in the order
    given and stopped in L{STOP_ORDER}. Stopping it stops accepting, then
    hangs up every connection with cause C{shutdown} and waits for them,
    bounded by the close timeout (each leg aborts itself when its peer does
    not close in time).

    Everything its legs share (the registry, the pacer, the stores) is its
    own: nothing of it outlives C{stopService}.
    """

    #: The parts stop one step after another, each step waiting for the one
    #: before (a MultiService would stop them all at once).
    STOP_ORDER = (
        ("audiosocket-visitor", "audiosocket-resident", "link", "http", "tokens-file"),  # no new connection
        ("drain",),  # every leg hung up and gone (bounded)
        ("gc-pauses",),  # the process-wide hook goes
        ("streams",),  # their apps get stop and a close, bounded
        ("recorder",),  # the last audio written, the headers completed
        ("pacer",),  # after the drain: live legs get their frames to the end
        ("relay",),  # what is left of the legs, Twisted reads again
        ("cluster",),  # session ends still need the directory
        ("directory",),
        ("webhooks",),  # the legs' last events are out now: deliver them (bounded)
        ("records",),  # then close the store
    )

    log = Logger()

    def __init__(
        self,
        registry: Registry,
        settings: LegSettings,
        reactor: IReactor,
        pacer: Pacer,
        *,
        relay: Relay | None = None,
        records: CallRecords | None = None,
        webhooks: Webhooks | None = None,
        cluster: Cluster | None = None,
        streams: Streams | None = None,
        metrics: CollectorRegistry | None = None,
        recorder: Recorder | None = None,
        api: ControlAPI | None = None,
        doors: Sequence[IService] = (),
        warnings: Sequence[str] = (),
    ) -> None:
        super().__init__(self.STOP_ORDER)
        self.registry = registry
        self.settings = settings
        self.reactor = reactor
        self.pacer = pacer
        self.relay = relay
        self.records = records
        self.webhooks = webhooks
        self.cluster = cluster
        self.streams = streams
        #: Every series of the server, which /metrics renders.
        self.metrics = metrics
        self.recorder = recorder
        self.api = api
        #: What the configuration leaves open, logged once at start-up.
        self.warnings = list(warnings)
        # Children start in this order. The store opens before the reactor
        # runs, so no leg can start ahead of it: the first legs' writes queue
        # behind the opening. The directory never fails for want of Redis: it
        # keeps trying by itself.
        parts: list[IService | None] = [
            None if metrics is None else GarbageCollectorPauses(metrics),
            recorder,
            records,
            None if cluster is None else cluster.directory,
            pacer,
            relay,
            streams,
            cluster,
            webhooks,
            Drain(registry, settings.close_timeout, reactor),
            *doors,
        ]
        for part in parts:
            if part is not None:
                part.setServiceParent(self)

    def startService(self) -> None:
        for warning in self.warnings:
            self.log.warn("{warning}", warning=warning)
        super().startService()


class Drain(Service):
    """
    At stop, hang up every connection (cause C{shutdown}) and wait until all
    are gone; each leg aborts after the close timeout, and the wait is bounded
    a second beyond it, which only guards a bug.
    """

    log = Logger()
    name = "drain"

    def __init__(self, registry: Registry, close_timeout: float, clock: IReactor) -> None:
        self.registry = registry
        self.close_timeout = close_timeout
        self.clock = clock

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.drain())

    async def drain(self) -> None:
        """Hang up every connection (cause C{shutdown}) and wait until all are gone."""
        connections = self.registry.connections()
        if not connections:
            return
        self.log.info("shutting down: hanging up {count} connection(s)", count=len(connections))
        gone = DeferredList([c.hangup(HangupCause.SHUTDOWN) for c in connections], consumeErrors=True)
        if await within(gone, self.close_timeout + 1.0, self.clock):
            self.log.info("shutdown: every leg is gone")
        else:
            self.log.warn("shutdown: {count} connections still open", count=len(self.registry.connections()))


def global_reactor() -> IReactor:
    """The reactor C{twistd} runs, under the interface the service needs of it."""
    from twisted.internet import reactor

    return cast(IReactor, reactor)


def build_service(config: Config, reactor: IReactor | None = None) -> AudioHangupService:
    """
    Build every part in the order they need each other, each given what it
    needs as it is made, and the service that starts and stops them.
    """
    if reactor is None:
        reactor = global_reactor()
    config, descriptors = fit_descriptors(config)
    settings = config.leg_settings()
    metrics = CollectorRegistry()
    flow = load_flow(config.flow)
    # The built-in bridge counts the frames it converts between formats (the series is shown whatever the flow).
    bridges = BridgeFlow.counting(metrics)
    registry = Registry(
        end_with_leg=config.on_leg_end != "keep", on_duplicate=config.on_duplicate,
        flow_factory=bridges if flow is BridgeFlow else flow,
    )
    recent = RecentLegs()
    pacer = Pacer(reactor, metrics=metrics)
    relay = Relay(reactor)
    webhooks = None
    if config.webhooks:
        webhooks = Webhooks(
            list(config.webhooks), reactor, secret=config.webhook_secret, metrics=metrics, ca=config.webhook_ca
        )
    streams = Streams(config.streams, reactor, metrics=metrics, webhooks=webhooks, relay=relay)
    # A browser that listens in is bounded like a stream's application.
    listens = Listens(config.streams.max_unsent_ms, metrics)
    formats = {role: FORMATS[config.audio_of(role)] for role in Role}
    recorder = Recorder(
        RecordingConfig(
            directory=config.recordings_directory(), every_call=config.record_every_call,
            mix=Mix(config.record_mix), keep_days=config.record_days,
        ),
        reactor, formats, metrics=metrics,
    )
    records = None
    if config.records != "none":
        records = CallRecords(config.records, reactor, keep_days=config.records_keep_days, metrics=metrics)
    else:
        CallRecords.counters(metrics)  # /metrics shows every series whatever is off, as it always did
    if webhooks is None:
        Webhooks.counter(metrics)
    # Observers in this order: a leg's streams end (and say how) before its record is written. Those that
    # count legs count one handed over through the media link on its session's home only (see LegEvents).
    observers: tuple[tuple[ILegObserver | None, bool], ...] = (
        (LegMetrics(metrics, registry), True), (recent, False), (streams, False), (recorder, False),
        (records, True), (webhooks, True), (listens, False),
    )
    for observer, counts in observers:
        if observer is not None:
            registry.events.add(observer, counts=counts)
    cluster = None
    if config.redis:
        from audiohangup.cluster.directory import Directory

        instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        directory = Directory(
            config.redis, instance_id, config.advertise_url or "", registry, reactor,
            heartbeat=config.heartbeat, password=config.redis_password,
        )
        cluster = Cluster(
            directory, reactor, api_token=config.api_token, end_with_leg=registry.end_with_leg,
            # A forwarded wait=true&after_playout=true may take a playout and a close.
            timeout=settings.playout_timeout + settings.close_timeout + 1.0,
        )
        registry.events.add(directory)
        registry.events.add(cluster)
    doors: list[IService] = []
    if cluster is not None and config.api_token and config.link != "none":
        doors.append(link_listener(config, cluster, registry, reactor, formats, metrics, relay))
    for role in Role:
        name = f"audiosocket-{role}"
        factory = AudioSocketFactory(role, registry, config.leg_settings(role), reactor, pacer, relay)
        endpoint = server_endpoint(reactor, config.endpoint(role))
        gate = None if config.allow is None else SourceGate(name, SourceACL(config.allow), reactor, metrics)
        doors.append(Listener(name, endpoint, factory, gate))
    api = ControlAPI(
        registry, api_token=config.api_token, settings=settings, metrics=metrics, recent=recent,
        records=records, cluster=cluster, clock=reactor, streams=streams,
        formats=formats, recorder=recorder, trusted_proxies=config.trusted_proxies, listens=listens,
        tokens=None if config.api_tokens_file is None else Tokens.load(config.api_tokens_file, insecure=config.insecure_files),
    )
    site = ApiSite.forAPI(
        api, reactor, head_timeout=config.http_head_timeout, body_timeout=config.http_body_timeout,
        cap=ConnectionCap(
            "http", config.http_max_connections, config.http_max_per_source, reactor, metrics,
            uncapped=config.trusted_proxies,
        ),
        hosts=ServedHosts(served_names(config), origins=config.http_hosts),
    )
    http_gate = (
        None if config.http_allow is None
        else SourceGate("http", SourceACL(config.http_allow), reactor, metrics, option="--http-allow")
    )
    doors.append(Listener("http", server_endpoint(reactor, config.http), site, http_gate))
    if config.api_tokens_file is not None:
        doors.append(
            TokensFile(config.api_tokens_file, api, reactor, config.api_token, insecure=config.insecure_files)
        )
    return AudioHangupService(
        registry, settings, reactor, pacer, relay=relay, records=records, webhooks=webhooks, cluster=cluster,
        streams=streams, metrics=metrics, recorder=recorder, api=api, doors=doors,
        warnings=start_warnings(config, reactor, api, descriptors),
    )


def link_listener(
    config: Config, cluster: Cluster, registry: Registry, reactor: IReactor, formats: dict[Role, AudioFormat],
    metrics: CollectorRegistry, relay: Relay | None = None,
) -> IService:
    """
    The media link: its listener, which the directory's presence names, and
    the linker that joins a leg here to its session on another instance.
    """
    from audiohangup.cluster.link import LinkListener, LinkServer
    from audiohangup.cluster.linker import Linker

    assert config.api_token is not None
    directory = cluster.directory
    server = LinkServer(
        registry, directory.instance_id, config.api_token, formats, reactor,
        close_timeout=config.close_timeout, metrics=metrics, relay=relay,
    )
    registry.events.add(Linker(directory, registry, reactor, config.api_token, relay))
    gate = None if config.allow is None else SourceGate("link", SourceACL(config.allow), reactor, metrics)
    advertised = urlsplit(config.advertise_url).hostname if config.advertise_url else None
    return LinkListener(server, server_endpoint(reactor, config.link), directory, advertised, gate)


def start_warnings(config: Config, reactor: IReactor, api: ControlAPI, descriptors: str | None) -> list[str]:
    """What this configuration leaves open, or had to change, for the log at start-up."""
    warnings = []
    open_to = [role for role in Role if listens_beyond_loopback(reactor, config.endpoint(role))]
    if open_to and config.allow is None:
        warnings.append(
            f"AudioSocket listeners for {', '.join(map(str, open_to))} accept every source beyond loopback: "
            "anyone who can reach them and knows a call id can join that call; set --allow to the "
            "addresses of your Asterisk servers"
        )
    advertised = urlsplit(config.advertise_url).hostname if config.advertise_url else None
    if (
        config.redis and config.api_token and config.link != "none" and advertised and not is_loopback(advertised)
        and not listens_beyond_loopback(reactor, config.link)
    ):
        warnings.append(
            f"--link {config.link} listens on loopback only, while the other instances reach this one at "
            f"{advertised}: an instance on another host cannot join a call here, and its leg of such a call is "
            "hung up (cause link). Give --link an address they reach (e.g. tcp:9094:interface=<this host's "
            "address>), with --allow"
        )
    if descriptors is not None:
        warnings.append(descriptors)
    if config.insecure_http:
        warnings.append(
            f"--insecure-http: the API on {config.http} takes requests without a token"
            if not api.tokens else "--insecure-http is given but tokens are configured: the API still requires them"
        )
    return warnings


def served_names(config: Config) -> tuple[str, ...]:
    """The names the API answers to: --http-host's, and the one the other instances reach it at."""
    advertised = urlsplit(config.advertise_url).hostname if config.advertise_url else None
    return (*config.http_hosts, *([advertised] if advertised else []))


#: Descriptors beside the legs and the API's: listeners, the records (and -wal, -shm), Redis, webhooks, logs.
DESCRIPTOR_MARGIN = 64


def descriptors_needed(config: Config) -> tuple[int, str]:
    """The descriptors this configuration may hold at once, and what they are made of."""
    parts = [(config.max_legs, "--max-legs"), (config.http_max_connections, "--http-max-connections")]
    if config.streams.url is not None:
        parts.append((config.max_legs, "a stream per leg"))
    if config.record_every_call:
        parts.append(((config.max_legs + 1) // 2, "a recording per call"))
    parts.append((DESCRIPTOR_MARGIN, "spare"))
    return sum(n for n, _ in parts), " + ".join(f"{n} {what}" for n, what in parts)


def fit_descriptors(
    config: Config, limit: Callable[[int], tuple[int, int | None]] = descriptor_limit
) -> tuple[Config, str | None]:
    """
    The configuration whose descriptors fit the open files limit, raised up to
    the hard limit if need be, and a warning if it had to change. Past the
    limit accepts fail with EMFILE, and Asterisk's new legs and C{/health}
    are the first to go; so when the limit cannot be raised, C{--max-legs} is
    lowered to what fits beside the API's connections and the spare, where a
    flood meets C{over_capacity} and C{too_many_pending} instead.
    """
    needed, what = descriptors_needed(config)
    allowed, hard = limit(needed)
    if allowed >= needed:
        return config, None
    per_leg = 1 + (config.streams.url is not None) + 0.5 * config.record_every_call
    fits = max(1, int((allowed - config.http_max_connections - DESCRIPTOR_MARGIN) / per_leg))
    return replace(config, max_legs=min(fits, config.max_legs)), (
        f"the open files limit is {allowed} (hard limit {'unlimited' if hard is None else hard}), below the "
        f"{needed} this configuration may hold ({what}): --max-legs is lowered to {min(fits, config.max_legs)}, "
        "which fits. Raise the limit (systemd LimitNOFILE=, ulimit -n) for more"
    )


class TokensFile(Service):
    """
    The API's tokens file, re-read on SIGHUP. A file that cannot be read or
    parsed keeps the tokens in force and logs why; a good one replaces them
    (with --api-token's) and logs how many there are per scope, never a token.
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
        self._previous: Any = None

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
        try:
            tokens = Tokens.load(self.path, insecure=self.insecure)
        except TokenFileError as error:
            self.log.error("API tokens not reloaded, the old ones stay in force: {error}", error=str(error))
            return
        if self.api_token:
            tokens = tokens + Tokens([(Scope.CONTROL, self.api_token)])
        self.api.tokens = tokens
        counts = tokens.counts()
        self.log.info(
            "API tokens reloaded from {path}: {read} read, {listen} listen, {control} control",
            path=self.path, read=counts["read"], listen=counts["listen"], control=counts["control"],
        )
