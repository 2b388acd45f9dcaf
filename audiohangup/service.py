# -*- test-case-name: tests.test_tap,tests.test_twistd,tests.test_systemd -*-
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
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import cast
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from audiohangup.audio import FORMATS, AudioFormat, LegSettings
from audiohangup.cluster.directory import Directory
from audiohangup.cluster.forward import Cluster
from audiohangup.cluster.localdirectory import LocalDirectory
from audiohangup.drain import Drain
from audiohangup.events import RecentLegs
from audiohangup.flows import BridgeFlow, load_flow
from audiohangup.hour import Hour, HourSampler, Readings, counted
from audiohangup.http.access import Tokens
from audiohangup.http.api import ControlAPI
from audiohangup.http.hosts import ServedHosts
from audiohangup.http.site import ApiSite
from audiohangup.interfaces import ILegObserver, IReactor
from audiohangup.levels import Levels, LevelSampler
from audiohangup.lifecycle import InOrder
from audiohangup.listeners import (
    ConnectionCap,
    Listener,
    SourceGate,
    descriptor_limit,
    listens_beyond_loopback,
    server_endpoint,
)
from audiohangup.loglevel import LogLevelFilter
from audiohangup.logs import describe_address
from audiohangup.metrics import GarbageCollectorPauses, LegMetrics, ReactorLag, process_series, series
from audiohangup.outbox import DEFAULT_MAX as OUTBOX_MAX
from audiohangup.outbox import FILE_NAME as OUTBOX_FILE
from audiohangup.outbox import Outbox
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketFactory
from audiohangup.reasons import Role
from audiohangup.recording import Mix, Recorder, RecordingConfig
from audiohangup.records import CallRecords
from audiohangup.registry import OnDuplicate, Registry
from audiohangup.relay import Relay
from audiohangup.reload import ConfigReload, LiveParts, Reread, TokensFile
from audiohangup.sources import IPNetwork, SourceACL, is_loopback
from audiohangup.streams.listen import Listens
from audiohangup.streams.manager import StreamConfig, Streams
from audiohangup.streams.stream import Outcome
from audiohangup.systemd import SystemdNotifier
from audiohangup.webhooks import FAILED, OVERFLOW, REJECTED, Webhooks, trust_root


@dataclass(frozen=True)
class Config:
    """Everything C{twistd audiohangup} takes; see L{audiohangup.tap.Options}."""

    visitor: str = "tcp:9092:interface=127.0.0.1"
    resident: str = "tcp:9093:interface=127.0.0.1"
    http: str = "tcp:8080:interface=127.0.0.1"
    #: --log-level: the least severe events written (under twistd; SIGHUP may change it).
    log_level: str = "info"
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
    #: --webhook-outbox: the SQLite file undelivered webhook events are kept in ("": beside the call records;
    #: "none": in memory only, lost by a crash or a restart), and --webhook-outbox-max, its bound.
    webhook_outbox: str = ""
    webhook_outbox_max: int = OUTBOX_MAX
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
    #: --link: where this instance's media link listens for the other instances (with --redis; "none": off).
    #: Loopback on a free port by default: instances on one host link with no set-up; across hosts, give
    #: an address the others reach (the start-up warns when the advertised host is not loopback).
    link: str = "tcp:0:interface=127.0.0.1"
    #: --link-ca: PEM file the other instances' TLS links (--link ssl:...) are verified against; None: the system's.
    link_ca: str | None = None
    streams: StreamConfig = field(default_factory=StreamConfig)
    #: --record-every-call and --recordings-dir (where recordings go, started by the API or not).
    record_every_call: bool = False
    record_dir: str | None = None
    record_mix: str = "sent"
    record_days: float = 0.0
    #: --on-stop: what SIGTERM does to live legs ("drain": they end by themselves, "hangup": cause shutdown).
    on_stop: str = "drain"
    #: --drain-timeout: the longest a drain waits before it hangs up the legs left.
    drain_timeout: float = 3600.0
    #: --local-directory: the call directory of the processes of one host, without Redis (a folder of files).
    local_directory: str | None = None
    #: --reuse-port: the AudioSocket and HTTP listeners (tcp:) share their ports with another process (SO_REUSEPORT).
    reuse_port: bool = False

    def recordings_directory(self) -> str:
        """Where recordings go: --recordings-dir, else 'recordings' beside the call records."""
        if self.record_dir:
            return self.record_dir
        beside = os.path.dirname(self.records) if self.records not in ("none", ":memory:") else ""
        return os.path.join(beside, "recordings")

    def webhook_outbox_path(self) -> str | None:
        """Where undelivered webhook events are kept: --webhook-outbox, else beside the call records; None: nowhere."""
        if self.webhook_outbox == "none":
            return None
        if self.webhook_outbox:
            return self.webhook_outbox
        beside = os.path.dirname(self.records) if self.records not in ("none", ":memory:") else ""
        return os.path.join(beside, OUTBOX_FILE)

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
    given and stopped in L{STOP_ORDER}. Stopping it stops taking legs, lets
    the live ones end by themselves (bounded) or hangs them up (see
    L{Drain}), and stops the rest once they are gone.

    Everything its legs share (the registry, the pacer, the stores) is its
    own: nothing of it outlives C{stopService}.
    """

    #: The parts stop one step after another, each step waiting for the one
    #: before (a MultiService would stop them all at once).
    STOP_ORDER = (
        # The AudioSocket listeners close; the live legs end by themselves (--on-stop drain, bounded by
        # --drain-timeout) or are hung up (cause shutdown); either way, every leg is gone (bounded).
        # The link and the API serve the draining calls meanwhile.
        ("drain",),
        ("audiosocket-visitor", "audiosocket-resident", "link", "http", "http-local", "tokens-file"),  # no new connection
        ("gc-pauses", "reactor-lag"),  # the process-wide hooks go
        ("streams",),  # their apps get stop and a close, bounded
        ("recorder",),  # the last audio written, the headers completed
        ("pacer",),  # after the drain: live legs get their frames to the end
        ("relay",),  # what is left of the legs, Twisted reads again
        ("cluster",),  # session ends still need the directory
        ("directory",),
        ("webhooks",),  # the legs' last events are out now: deliver them (bounded)
        ("records",),  # then close the store
        ("reload",),  # SIGHUP re-reads --config until the end (a drain may be long)
        ("log-level",),  # the log as twistd began it, for what it writes after us
        ("hour",),  # the last hour's sampling timer: nothing waits on it
        ("systemd",),  # last: its watchdog pings and status go on through the whole stop
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
        notifier: SystemdNotifier | None = None,
        on_stop: str = "drain",
        drain_timeout: float = 3600.0,
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
        #: Tells systemd (Type=notify) when every listener is up, what is live, and that the reactor turns.
        self.notifier = notifier or SystemdNotifier(
            reactor, lambda: (len(registry), registry.session_count),
            [door for door in doors if isinstance(door, Listener)],
        )
        # Children start in this order. The store opens before the reactor
        # runs, so no leg can start ahead of it: the first legs' writes queue
        # behind the opening. The directory never fails for want of Redis: it
        # keeps trying by itself.
        parts: list[IService | None] = [
            None if metrics is None else GarbageCollectorPauses(metrics),
            None if metrics is None else ReactorLag(metrics, reactor),
            recorder,
            records,
            None if cluster is None else cast(IService, cluster.directory),
            pacer,
            relay,
            streams,
            cluster,
            webhooks,
            Drain(
                registry, settings.close_timeout, reactor, on_stop=on_stop, drain_timeout=drain_timeout,
                listeners=[door for door in doors if isinstance(door, Listener) and str(door.name).startswith("audiosocket-")],
            ),
            *doors,
            self.notifier,  # after the doors: it waits for them to listen
        ]
        for part in parts:
            if part is not None:
                part.setServiceParent(self)

    def startService(self) -> None:
        for warning in self.warnings:
            self.log.warn("{warning}", warning=warning)
        super().startService()

    def stopService(self) -> Deferred[None]:
        self.notifier.stopping()  # first of all: systemd hears STOPPING=1 before any part stops
        return super().stopService()


def global_reactor() -> IReactor:
    """The reactor C{twistd} runs, under the interface the service needs of it."""
    from twisted.internet import reactor

    return cast(IReactor, reactor)


def build_service(
    config: Config, reactor: IReactor | None = None, *, reread: Reread | None = None, filter_log: bool = False
) -> AudioHangupService:
    """
    Build every part in the order they need each other, each given what it
    needs as it is made, and the service that starts and stops them.

    With C{reread} (C{--config} under twistd or twist), SIGHUP re-reads the
    configuration and applies what can change live (L{ConfigReload}); with
    C{filter_log} the log level filters the process's log (L{LogLevelFilter}).
    """
    if reactor is None:
        reactor = global_reactor()
    config, descriptors = fit_descriptors(config)
    settings = config.leg_settings()
    metrics = CollectorRegistry()
    process_series(metrics)  # open descriptors against their limit, memory, CPU
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
        outbox_path = config.webhook_outbox_path()
        outbox = None if outbox_path is None else Outbox(outbox_path, reactor, max_events=config.webhook_outbox_max)
        webhooks = Webhooks(
            list(config.webhooks), reactor, secret=config.webhook_secret, metrics=metrics, ca=config.webhook_ca,
            outbox=outbox, max_attempts=5 if outbox is None else None,  # kept: tried until delivered or the bound
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
    # Declared whatever is off; the hour reads the deliveries' failures from it.
    webhook_deliveries = Webhooks.counter(metrics, reactor)
    audio_levels = Levels(reactor)
    hour = Hour(reactor, lambda: len(registry), hour_readings(streams, webhook_deliveries))
    # Observers in this order: a leg's streams end (and say how) before its record is written. Those that
    # count, stream or record legs do so for one handed over through the media link on its session's home
    # only (see LegEvents): the newcomer's instance would stream it twice, or record half of its call.
    observers: tuple[tuple[ILegObserver | None, bool], ...] = (
        (LegMetrics(metrics, registry), True), (recent, False), (streams, True), (recorder, True),
        (records, True), (webhooks, True), (LevelSampler(audio_levels, lambda: registry, reactor), False), (hour, True),
        (listens, False),
    )
    for observer, counts in observers:
        if observer is not None:
            registry.events.add(observer, counts=counts)
    cluster = None
    directory: Directory | LocalDirectory | None = None
    instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    if config.redis:
        directory = Directory(
            config.redis, instance_id, config.advertise_url or "", registry, reactor,
            heartbeat=config.heartbeat, password=config.redis_password,
        )
    elif config.local_directory:
        directory = LocalDirectory(
            config.local_directory, instance_id, config.advertise_url or "", registry, reactor,
            heartbeat=config.heartbeat,
        )
    if directory is not None:
        cluster = Cluster(
            directory, reactor, api_token=config.api_token, end_with_leg=registry.end_with_leg,
            # A forwarded wait=true&after_playout=true may take a playout and a close.
            timeout=settings.playout_timeout + settings.close_timeout + 1.0,
        )
        registry.events.add(directory)
        registry.events.add(cluster)
        series(
            metrics, Gauge, "audiohangup_directory_available",
            "1 while the call directory (Redis) answers, 0 while it cannot be reached (only with --redis).",
        ).set_function(lambda: float(directory.available))
    doors: list[IService] = []
    # A listener has its gate with --allow, and with --config (open to all without --allow) since SIGHUP may set it.
    gates: dict[str, SourceGate] = {}
    if cluster is not None and linked(config):
        doors.append(
            link_listener(config, cluster, registry, reactor, pacer, formats, metrics, relay, gates, gated=reread is not None)
        )
    factories = []
    for role in Role:
        name = f"audiosocket-{role}"
        factory = AudioSocketFactory(role, registry, config.leg_settings(role), reactor, pacer, relay)
        factories.append(factory)
        endpoint = server_endpoint(reactor, config.endpoint(role), reuse_port=config.reuse_port)
        if config.allow is not None or reread is not None:
            gates[name] = SourceGate(name, SourceACL(config.allow), reactor, metrics)
        doors.append(Listener(name, endpoint, factory, gates.get(name)))
    api = ControlAPI(
        registry, api_token=config.api_token, settings=settings, metrics=metrics, recent=recent,
        records=records, cluster=cluster, clock=reactor, streams=streams,
        formats=formats, recorder=recorder, trusted_proxies=config.trusted_proxies, levels=audio_levels, hour=hour,
        listens=listens,
        tokens=None if config.api_tokens_file is None else Tokens.load(config.api_tokens_file, insecure=config.insecure_files),
    )
    cap = ConnectionCap(
        "http", config.http_max_connections, config.http_max_per_source, reactor, metrics,
        uncapped=config.trusted_proxies,
    )
    site = ApiSite.forAPI(
        api, reactor, head_timeout=config.http_head_timeout, body_timeout=config.http_body_timeout,
        cap=cap, hosts=ServedHosts(served_names(config), origins=config.http_hosts),
    )
    if config.http_allow is not None or reread is not None:
        gates["http"] = SourceGate("http", SourceACL(config.http_allow), reactor, metrics, option="--http-allow")
    doors.append(
        Listener("http", server_endpoint(reactor, config.http, reuse_port=config.reuse_port), site, gates.get("http"))
    )
    if isinstance(directory, LocalDirectory) and not config.advertise_url:
        # The shared --http port may reach either process: what the other forwards to must reach this one.
        doors.append(PrivateAPI(server_endpoint(reactor, LOCAL_LINK), site, directory, gates.get("http")))
    levels = LogLevelFilter(config.log_level, install=filter_log)
    if reread is None and config.api_tokens_file is not None:
        doors.append(
            TokensFile(config.api_tokens_file, api, reactor, config.api_token, insecure=config.insecure_files)
        )
    service = AudioHangupService(
        registry, settings, reactor, pacer, relay=relay, records=records, webhooks=webhooks, cluster=cluster,
        streams=streams, metrics=metrics, recorder=recorder, api=api, doors=[*doors, levels],
        warnings=start_warnings(config, reactor, api, descriptors),
        on_stop=config.on_stop, drain_timeout=config.drain_timeout,
    )
    if reread is not None:
        parts = LiveParts(service, api, gates, factories, cap, levels)
        ConfigReload(reread, config, parts, reactor).setServiceParent(service)
    HourSampler(hour, reactor).setServiceParent(service)
    return service


#: Where, with --local-directory, the media link and the private API listen unless told: loopback, a free port.
LOCAL_LINK = "tcp:0:interface=127.0.0.1"


class PrivateAPI(Listener):
    """
    The API once more, on a loopback port of this process alone, which the
    local directory gives as its URL: the other processes of the host
    forward a request for one of this process's calls to it, where the
    shared C{--http} port (C{--reuse-port}) could reach either process.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, site: IProtocolFactory, directory: LocalDirectory,
        gate: SourceGate | None,
    ) -> None:
        super().__init__("http-local", endpoint, site, gate)
        self.directory = directory

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.directory.advertise_url = f"http://{describe_address(port.getHost())}"
        return super()._listening(port)


def hour_readings(streams: Streams, webhook_deliveries: Counter) -> Callable[[], Readings]:
    """What the hour samples of the streams and the webhooks: what they count already."""
    failed = frozenset({str(Outcome.FAILED)})
    lost = frozenset({REJECTED, FAILED, OVERFLOW})

    def read() -> Readings:
        return Readings(
            streams=len(streams.current),
            stream_failures=counted(streams.streams_total, "outcome", failed),
            webhook_failures=counted(webhook_deliveries, "outcome", lost),
        )

    return read


def link_listener(
    config: Config, cluster: Cluster, registry: Registry, reactor: IReactor, pacer: Pacer,
    formats: dict[Role, AudioFormat], metrics: CollectorRegistry, relay: Relay | None = None,
    gates: dict[str, SourceGate] | None = None, *, gated: bool = False,
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
        registry, directory.instance_id, config.api_token, formats, reactor, pacer,
        settings=config.leg_settings(), metrics=metrics, relay=relay,
    )
    tls = config.link.startswith("ssl:")
    trust = None if config.link_ca is None else trust_root(config.link_ca)
    registry.events.add(Linker(directory, registry, reactor, config.api_token, relay, tls_only=tls, trust=trust))
    gate = None
    if config.allow is not None or gated:  # gated: SIGHUP may set --allow
        gate = SourceGate("link", SourceACL(config.allow), reactor, metrics)
        if gates is not None:
            gates["link"] = gate
    advertised = urlsplit(config.advertise_url).hostname if config.advertise_url else None
    return LinkListener(server, server_endpoint(reactor, config.link), directory, advertised, gate, tls=tls)


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
        linked(config) and advertised and not is_loopback(advertised)
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


def linked(config: Config) -> bool:
    """Whether this instance's legs may each hold a media link (a leg here whose session is elsewhere, or the reverse)."""
    return bool((config.redis or config.local_directory) and config.api_token and config.link != "none")


def descriptors_needed(config: Config) -> tuple[int, str]:
    """The descriptors this configuration may hold at once, and what they are made of."""
    parts = [(config.max_legs, "--max-legs"), (config.http_max_connections, "--http-max-connections")]
    if config.streams.url is not None:
        parts.append((config.max_legs, "a stream per leg"))
    if config.record_every_call:
        parts.append(((config.max_legs + 1) // 2, "a recording per call"))
    if linked(config):
        parts.append((config.max_legs, "a media link per leg"))
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
    per_leg = 1 + (config.streams.url is not None) + 0.5 * config.record_every_call + linked(config)
    fits = max(1, int((allowed - config.http_max_connections - DESCRIPTOR_MARGIN) / per_leg))
    return replace(config, max_legs=min(fits, config.max_legs)), (
        f"the open files limit is {allowed} (hard limit {'unlimited' if hard is None else hard}), below the "
        f"{needed} this configuration may hold ({what}): --max-legs is lowered to {min(fits, config.max_legs)}, "
        "which fits. Raise the limit (systemd LimitNOFILE=, ulimit -n) for more"
    )
