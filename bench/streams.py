#!/usr/bin/env python3
"""
Media streams benchmark for audiohangup: N bridged calls, both legs streamed
in converse mode to a local app that echoes what it hears.

For each configuration in turn, interleaved over ``--repeats`` rounds:

- ``baseline``: the same calls without streams (bridged audio only);
- ``twilio`` and ``audiohangup``: ``--stream-url`` on an echo app,
  ``--stream-protocol`` that protocol, ``--stream-mode converse``.

it starts ``twistd -n audiohangup --records none`` (``common.Server``: no
call records, which are not what is measured), an echo app in a process of
its own (so its CPU is not the server's, and the app is reported apart), and
one process of fake Asterisk legs, which send a stamped 20 ms slin frame per
leg, their phases spread over the 20 ms as real channels are.

What it measures, per run:

- the server's CPU (utime + stime from ``/proc``) over a steady window,
  as % of a core: per leg, and per streamed leg (the run minus the mean of
  the baselines, over the 2N legs);
- leg → app latency: the app's receive time minus the leg's send stamp;
- app → leg latency: the leg's receive time of an echo minus the send time
  the app wrote into it (the server plays an app's audio on its 20 ms
  pacer tick, so up to one tick of this is by design);
- the round trip, the bridge's own latency, the frames each leg got (echo,
  bridged, silence: echoes short of 50 per second mean the server plays the
  app's audio slower than real time), and the server's side: ``/metrics``
  stream counters and drops, RSS before, during and after, log lines that
  signal trouble, every leg's close reason and every stream's outcome;
- the CPU that processes outside the benchmark used meanwhile: a run where
  they took over 10 % of a core is kept in the JSON but left out of the
  summary (unless every round of that configuration was noisy).

With ``--pin`` the server runs on CPU 0 and the app and the legs on the
others, so the server has a core to itself.

All times are ``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every
process on a Linux machine, so a stamp taken in one process can be read in
another.

The stamps must survive μ-law: with ``twilio`` the server converts the
leg's slin to μ-law for the app and the app's μ-law back to slin. So each
stamp byte is carried by two samples, each the decoded value of a μ-law code
0x10-0x1F (one nibble each); G.711 gives those codes and values back
exactly (checked at start against ``audiohangup.codecs``). The leg writes
its stamp (call, role, sequence, send time) into samples 0-31; the app
echoes the frame as it came, except samples 32-49, where it writes its own
send time; the rest is silence.

A table goes to stderr with the progress lines, one JSON object to stdout
(as ``bench/bridge.py`` and ``bench/load.py`` do). Run from the repository
root, with the working tree on the path (the twistd child inherits it)::

    PYTHONPATH=$PWD python bench/streams.py --calls 100 --seconds 20 --repeats 3 --wait-idle 1800

A benchmark, not a test. It talks only to 127.0.0.1, every step is bounded in
time, and the server and the workers are always stopped.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import re
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

# This script's directory holds common.py; its parent, audiohangup (for the codecs).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import load  # for process_cpu_table and others_cpu_seconds: the CPU of processes not ours
from common import FRAME_SECONDS, PAYLOAD_BYTES, ROLES, log

common.set_log_name("streams")

PROTOCOLS = ("twilio", "audiohangup")
BASELINE = "baseline"
READY_TIMEOUT = 60.0
STREAMS_TIMEOUT = 30.0
#: How long the app waits, after the window, for the server to close its streams.
APP_CLOSE_WAIT = 15.0
#: Other processes' CPU over a run's window (% of a core) above which the run is left out of the summary.
NOISY_OTHER = 10.0
#: The window is cut in this many parts to show whether app → leg latency drifts.
PARTS = 4

# ---------------------------------------------------------------------------
# Stamps that survive μ-law
# ---------------------------------------------------------------------------

#: The leg's stamp: magic, call index, role, sequence, send time (ns).
LEG_STAMP = struct.Struct("!BHBIQ")
#: The app's stamp in its echo: magic, send time (ns).
APP_STAMP = struct.Struct("!BQ")
LEG_MAGIC = 0xA5
APP_MAGIC = 0x5A
#: Two samples per stamp byte: bytes of slin (2 per sample) and of μ-law (1 per sample).
LEG_PCM_BYTES = 4 * LEG_STAMP.size
APP_PCM_BYTES = 4 * APP_STAMP.size
LEG_CODES = 2 * LEG_STAMP.size
APP_CODES = 2 * APP_STAMP.size
SILENCE_PAYLOAD = b"\x00" * PAYLOAD_BYTES
TAIL = b"\x00" * (PAYLOAD_BYTES - LEG_PCM_BYTES)


class Stamps:
    """
    Bytes as μ-law codes 0x10-0x1F (a nibble each) and as the slin samples
    those codes decode to, and back. Built in the workers, from the product's
    own G.711, which must give every code back unchanged.
    """

    def __init__(self) -> None:
        from audiohangup.audio import FORMATS
        from audiohangup.codecs import decode, encode

        ulaw = FORMATS["ulaw"]
        self.codes_of = [bytes((0x10 | value >> 4, 0x10 | value & 0x0F)) for value in range(256)]
        self.pcm_of = [decode(codes, ulaw) for codes in self.codes_of]
        for codes, pcm in zip(self.codes_of, self.pcm_of):
            if encode(pcm, ulaw) != codes:
                raise RuntimeError(f"μ-law codes {codes.hex()} do not survive G.711: stamps would be lost")
        self.value_of_codes = {codes: value for value, codes in enumerate(self.codes_of)}
        self.value_of_pcm = {pcm: value for value, pcm in enumerate(self.pcm_of)}

    def pcm(self, data: bytes) -> bytes:
        pcm_of = self.pcm_of
        return b"".join([pcm_of[value] for value in data])

    def codes(self, data: bytes) -> bytes:
        codes_of = self.codes_of
        return b"".join([codes_of[value] for value in data])

    def read_pcm(self, buffer: bytes, offset: int, size: int) -> bytes | None:
        """C{size} stamp bytes from slin at C{offset}; None if the samples are not a stamp."""
        table = self.value_of_pcm
        try:
            return bytes([table[buffer[i:i + 4]] for i in range(offset, offset + 4 * size, 4)])
        except KeyError:
            return None

    def read_codes(self, buffer: bytes, offset: int, size: int) -> bytes | None:
        """C{size} stamp bytes from μ-law codes at C{offset}; None if they are not a stamp."""
        table = self.value_of_codes
        try:
            return bytes([table[buffer[i:i + 2]] for i in range(offset, offset + 2 * size, 2)])
        except KeyError:
            return None


class StampedRun(common.WorkerRun):
    """A worker's run with its window [t0, t1) also in monotonic ns, to compare with stamps; empty until GO."""

    t0_ns = t1_ns = 1 << 62

    def started(self, now: float) -> None:
        self.t0_ns, self.t1_ns = int(self.t0 * 1e9), int(self.t1 * 1e9)


# ---------------------------------------------------------------------------
# Worker: the echo app (autobahn's server side)
# ---------------------------------------------------------------------------


def app_main(cfg: dict[str, Any], result_path: str) -> int:
    """
    The application end of every stream: echoes each media message or binary
    frame with its own send time stamped in, and records, for frames the legs
    sent inside the window, how long they took to get here.
    """
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    stamps = Stamps()
    monotonic_ns = time.monotonic_ns
    app_stamp = APP_STAMP.pack

    class Echo(StampedRun):
        def __init__(self) -> None:
            super().__init__(cfg, reactor)
            self.leg_to_app_us: list[int] = []
            self.media = 0
            self.unstamped = 0
            self.events: Counter[str] = Counter()
            self.opened = 0
            self.open_now = 0
            self.closes: Counter[str] = Counter()

        def listen(self) -> None:
            factory = WebSocketServerFactory()
            factory.protocol = EchoProtocol
            endpoint = TCP4ServerEndpoint(reactor, 0, backlog=256, interface="127.0.0.1")
            endpoint.listen(factory).addCallbacks(self.listening, lambda failure: self.fail(repr(failure.value)))

        def listening(self, port: Any) -> None:
            with open(cfg["port_file"], "w") as f:
                f.write(str(port.getHost().port))
            self.ready()

        def heard(self, stamp: bytes | None, now: int) -> None:
            """A frame from a leg: its latency, if the leg sent it inside the window."""
            if stamp is None:
                self.unstamped += 1
                return
            magic, _index, _role, _seq, sent = LEG_STAMP.unpack(stamp)
            if magic != LEG_MAGIC:
                self.unstamped += 1
                return
            self.media += 1
            if self.t0_ns <= sent < self.t1_ns:
                self.leg_to_app_us.append((now - sent) // 1000)

        def close_calls(self) -> None:
            """The legs end now; their streams close after them. Wait for that, bounded."""
            reactor.callLater(APP_CLOSE_WAIT, self.finish)
            self.closed()

        def closed(self) -> None:
            if self.phase == "closing" and self.open_now == 0:
                self.finish()

        def shut_down(self) -> None:
            reactor.callLater(0, reactor.stop)

        def write_result(self) -> None:
            with open(result_path, "w") as f:
                json.dump({
                    "errors": self.errors,
                    "cpu": self.cpu_used(),
                    "leg_to_app_us": self.leg_to_app_us,
                    "media": self.media,
                    "unstamped": self.unstamped,
                    "events": dict(self.events),
                    "opened": self.opened,
                    "still_open": self.open_now,
                    "closes": dict(self.closes),
                }, f)

    app = Echo()

    class EchoProtocol(WebSocketServerProtocol):
        streaming = False

        def onOpen(self) -> None:
            self.streaming = True
            app.opened += 1
            app.open_now += 1

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            now = monotonic_ns()
            if isBinary:
                self.echo_frame(payload, now)
            else:
                self.echo_media(payload, now)

        def echo_frame(self, frame: bytes, now: int) -> None:
            """audiohangup's protocol: the leg's raw slin frame, sent back with our stamp in it."""
            app.heard(stamps.read_pcm(frame, 0, LEG_STAMP.size), now)
            stamp = stamps.pcm(app_stamp(APP_MAGIC, monotonic_ns()))
            self.sendMessage(frame[:LEG_PCM_BYTES] + stamp + frame[LEG_PCM_BYTES + APP_PCM_BYTES:], isBinary=True)

        def echo_media(self, payload: bytes, now: int) -> None:
            """Twilio's protocol: a C{media} answered with a C{media} of the same μ-law, our stamp in it."""
            body = json.loads(payload)
            event = body.get("event")
            if event != "media":
                app.events[str(event)] += 1
                return
            ulaw = base64.b64decode(body["media"]["payload"])
            app.heard(stamps.read_codes(ulaw, 0, LEG_STAMP.size), now)
            stamp = stamps.codes(app_stamp(APP_MAGIC, monotonic_ns()))
            echoed = base64.b64encode(ulaw[:LEG_CODES] + stamp + ulaw[LEG_CODES + APP_CODES:]).decode("ascii")
            reply = {"event": "media", "streamSid": body.get("streamSid"), "media": {"payload": echoed}}
            self.sendMessage(json.dumps(reply, separators=(",", ":")).encode(), isBinary=False)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            app.closes[f"{'clean' if wasClean else 'unclean'} {code}"] += 1
            if self.streaming:
                self.streaming = False
                app.open_now -= 1
            app.closed()

    return app.serve(app.listen, READY_TIMEOUT, lambda: "the echo app is not listening")


# ---------------------------------------------------------------------------
# Worker: the fake Asterisk legs
# ---------------------------------------------------------------------------


def legs_main(cfg: dict[str, Any], result_path: str) -> int:
    """
    Two legs per call, each sending a stamped slin frame every 20 ms, their
    phases spread over 20 slots of 1 ms; each leg sorts what it gets back
    into its own echoes (app → leg latency), its partner's bridged frames,
    and the server's silence.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredSemaphore, gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from audiohangup.wire import Kind, encode, encode_uuid

    stamps = Stamps()
    monotonic_ns = time.monotonic_ns
    slin = int(Kind.SLIN)
    slots = common.SPREAD_SLOTS

    class Legs(StampedRun):
        def __init__(self) -> None:
            super().__init__(cfg, reactor)
            self.legs: list[Leg] = []
            self.groups: list[list[Leg]] = []
            self.k = 0
            self.app_to_leg_us: list[list[int]] = [[] for _ in range(PARTS)]
            self.round_trip_us: list[int] = []
            self.bridged_us: list[int] = []
            self.tick_lag_us: list[int] = []
            self.lost: Counter[str] = Counter()
            self.closed = 0

        def connect_all(self) -> None:
            semaphore = DeferredSemaphore(common.CONNECT_CONCURRENCY)
            waits = []
            for index, call_id in cfg["calls"]:
                for role_id, port in enumerate((cfg["visitor_port"], cfg["resident_port"])):
                    leg = Leg(self, index, role_id, uuid.UUID(call_id))
                    self.legs.append(leg)
                    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
                    waits.append(semaphore.run(connectProtocol, endpoint, leg))
            self.groups = [self.legs[slot::slots] for slot in range(slots)]
            gatherResults(waits, consumeErrors=True).addErrback(lambda failure: self.fail(f"connect: {failure.value!r}"))

        def leg_heard(self) -> None:
            if self.phase == "setup" and all(leg.heard for leg in self.legs):
                self.ready()

        def started(self, now: float) -> None:
            super().started(now)
            reactor.callLater(max(0.0, self.start - now), self.tick)

        def tick(self) -> None:
            """One 1 ms slot: its legs send. Deadlines come from the start, so sending does not drift."""
            if self.phase != "running":
                return
            slot = FRAME_SECONDS / slots
            due = self.start + self.k * slot
            if self.t0 <= due < self.t1:
                self.tick_lag_us.append(int((time.monotonic() - due) * 1e6))
            for leg in self.groups[self.k % slots]:
                if not leg.gone:
                    leg.send_frame()
            self.k += 1
            following = self.start + self.k * slot
            if following < self.t1:
                reactor.callLater(max(0.0, following - time.monotonic()), self.tick)

        def close_calls(self) -> None:
            """
            Each leg sends a FIN and reads until the server closes: closing the
            socket outright would reset it whenever frames sit unread in it, and
            the server's close reasons could not tell an unexpected end apart.
            """
            for leg in self.legs:
                if leg.transport is not None and not leg.gone:
                    leg.transport.loseWriteConnection()
            reactor.callLater(5.0, self.finish)
            self.check_closed()

        def leg_lost(self, leg: Leg, reason: Any) -> None:
            self.closed += 1
            if self.phase in ("setup", "ready", "running"):
                self.lost[f"{ROLES[leg.role_id]} {type(reason.value).__name__}"] += 1
                if self.phase != "running":
                    self.fail(f"leg {leg.index}/{ROLES[leg.role_id]} lost before the run: {reason.value!r}")
            self.check_closed()

        def check_closed(self) -> None:
            if self.phase == "closing" and self.closed >= len(self.legs):
                self.finish()

        def shut_down(self) -> None:
            reactor.callLater(0, reactor.stop)

        def write_result(self) -> None:
            counts: Counter[str] = Counter()
            for leg in self.legs:
                counts.update(leg.counts)
            with open(result_path, "w") as f:
                json.dump({
                    "errors": self.errors,
                    "legs": len(self.legs),
                    "cpu": self.cpu_used(),
                    "counts": dict(counts),
                    "app_to_leg_us": self.app_to_leg_us,
                    "round_trip_us": self.round_trip_us,
                    "bridged_us": self.bridged_us,
                    "tick_lag_us": self.tick_lag_us,
                    "lost_during_run": dict(self.lost),
                }, f)

    class Leg(common.LegIO, Protocol):
        def __init__(self, run: Legs, index: int, role_id: int, call_id: uuid.UUID) -> None:
            self.run = run
            self.index = index
            self.role_id = role_id
            self.call_id = call_id
            self.gone = False
            self.seq = 0
            self.last_echo = -1
            #: sent_window, echoed_window: frames sent in the window and their echoes;
            #: echo, bridged, silence, other: frames received in the window, by kind.
            self.counts: Counter[str] = Counter()

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.socket = self.transport.getHandle()
            self.transport.write(encode_uuid(self.call_id))

        def send_frame(self) -> None:
            sent = monotonic_ns()
            stamp = LEG_STAMP.pack(LEG_MAGIC, self.index, self.role_id, self.seq, sent)
            self.send(encode(slin, stamps.pcm(stamp) + TAIL))
            self.seq += 1
            if self.run.t0_ns <= sent < self.run.t1_ns:
                self.counts["sent_window"] += 1

        def dataReceived(self, data: bytes) -> None:
            now = monotonic_ns()
            t0, t1 = self.run.t0_ns, self.run.t1_ns
            in_window = t0 <= now < t1
            for kind, length, buffer, start in self.frames(data):
                what = self.frame_received(kind, length, buffer, start, now, t0, t1)
                if in_window:
                    self.counts[what] += 1

        def frame_received(self, kind: int, length: int, buffer: bytes, start: int, now: int, t0: int, t1: int) -> str:
            """Sort one frame, note its latency; return what it was."""
            if kind == 0x00:
                return "hangup"
            if kind != slin or length != PAYLOAD_BYTES:
                return "other"
            stamp = stamps.read_pcm(buffer, start, LEG_STAMP.size)
            if stamp is None:
                return "silence" if buffer[start:start + length] == SILENCE_PAYLOAD else "other"
            magic, index, role_id, seq, sent = LEG_STAMP.unpack(stamp)
            if magic != LEG_MAGIC or index != self.index:
                return "other"
            if role_id != self.role_id:
                if t0 <= sent < t1:
                    self.run.bridged_us.append((now - sent) // 1000)
                return "bridged"
            self.echo_received(buffer, start, seq, sent, now, t0, t1)
            return "echo"

        def echo_received(self, buffer: bytes, start: int, seq: int, sent: int, now: int, t0: int, t1: int) -> None:
            """Our own frame back from the app: its round trip, and app → leg from the app's stamp."""
            if seq <= self.last_echo:
                self.counts["echo_out_of_order"] += 1
            self.last_echo = seq
            if t0 <= sent < t1:
                self.counts["echoed_window"] += 1
                self.run.round_trip_us.append((now - sent) // 1000)
            app = stamps.read_pcm(buffer, start + LEG_PCM_BYTES, APP_STAMP.size)
            if app is None:
                self.counts["echo_without_app_stamp"] += 1
                return
            magic, app_sent = APP_STAMP.unpack(app)
            if magic == APP_MAGIC and t0 <= app_sent < t1:
                part = (app_sent - t0) * PARTS // (t1 - t0)
                self.run.app_to_leg_us[part].append((now - app_sent) // 1000)

        def heard_first_frame(self) -> None:
            self.run.leg_heard()

        def connectionLost(self, reason: Any) -> None:
            self.gone = True
            self.run.leg_lost(self, reason)

    run = Legs()
    return run.serve(run.connect_all, READY_TIMEOUT, lambda: (
        f"not every leg heard from the server within {READY_TIMEOUT:.0f} s "
        f"({sum(leg.heard for leg in run.legs)}/{len(run.legs)})"
    ))


def worker_main(config_path: str, result_path: str) -> int:
    """A worker process: the echo app or the legs, as its config says."""
    with open(config_path) as f:
        cfg = json.load(f)
    return app_main(cfg, result_path) if cfg["kind"] == "app" else legs_main(cfg, result_path)


# ---------------------------------------------------------------------------
# Orchestrator: one run
# ---------------------------------------------------------------------------

STREAM_OPEN = re.compile(r" stream MZ[0-9a-f]+ to \S+ open \(")
STREAM_ENDED = re.compile(r" stream MZ[0-9a-f]+ ended \((\w+)\)")
STREAM_FAILED = re.compile(r" stream MZ[0-9a-f]+ to \S+ failed: (.*)$")
TROUBLE = ("Traceback", "Unhandled", " failed", " ignored ", "not opened", "did not close")
METRIC_LINE = re.compile(r"^(audiohangup_stream\w*)(\{[^}]*\})? (\S+)$")


def stream_metrics(text: str) -> dict[str, float]:
    """The C{audiohangup_stream*} samples of a /metrics page, by name and labels."""
    values = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match and not match.group(1).endswith("_created"):
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Poll C{condition()} every 50 ms; RuntimeError naming C{what} if it is not true in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout:g} s")
        time.sleep(0.05)


def count_lines(server: common.Server, pattern: re.Pattern[str]) -> int:
    return sum(1 for line in server.log_lines() if pattern.search(line))


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024.0, 1)


def start_app(args: argparse.Namespace, directory: str) -> tuple[common.Worker, int]:
    """The echo app's process, listening; its port."""
    port_file = os.path.join(directory, "app.port")
    app = common.Worker(os.path.abspath(__file__), 0, {
        "kind": "app", "port_file": port_file, **timing(args),
    }, directory)
    app.wait_ready(time.monotonic() + READY_TIMEOUT)
    with open(port_file) as f:
        return app, int(f.read())


def timing(args: argparse.Namespace) -> dict[str, float]:
    """What every worker needs of the run's timeline, and a budget that bounds it."""
    budget = READY_TIMEOUT + STREAMS_TIMEOUT + args.warmup + args.seconds + args.drain + APP_CLOSE_WAIT + 30.0
    return {"warmup": args.warmup, "seconds": args.seconds, "drain": args.drain, "budget": budget}


def server_args(config: str, app_port: int | None) -> list[str]:
    args = ["--records", "none"]
    if config != BASELINE:
        args += ["--stream-url", f"ws://127.0.0.1:{app_port}/echo", "--stream-protocol", config, "--stream-mode", "converse"]
    return args


def pin(pid: int, cpus: set[int]) -> None:
    """
    Keep a process, every thread of it, on C{cpus}: with --pin the server
    gets a core of its own, so what it costs is not mixed with how much of a
    core it could get next to the app and the legs.
    """
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def measure_window(server: common.Server, t0: float, t1: float) -> dict[str, Any]:
    """Server CPU, RSS and the machine's other load over [t0, t1): the steady part of the run."""
    common.sleep_until(t0)
    wall0, user0, system0 = time.monotonic(), *server.cpu_split()
    table0 = load.process_cpu_table()
    rss0 = server.rss_kib()
    wakeups = common.probe_wakeups(t1)
    wall1, user1, system1 = time.monotonic(), *server.cpu_split()
    table1 = load.process_cpu_table()
    wall = wall1 - wall0
    return {
        "cpu_percent": round(100.0 * (user1 - user0 + system1 - system0) / wall, 1),
        "user_percent": round(100.0 * (user1 - user0) / wall, 1),
        "system_percent": round(100.0 * (system1 - system0) / wall, 1),
        "rss_t0_mib": mib(rss0),
        "rss_t1_mib": mib(server.rss_kib()),
        "other_cpu_percent": round(100.0 * load.others_cpu_seconds(table0, table1) / wall, 1),
        "wakeup_delay_ms": {k: v for k, v in common.summary_ms(wakeups).items() if k in ("p99", "max")},
    }


def run_once(args: argparse.Namespace, config: str, round_number: int) -> dict[str, Any]:
    """One configuration, one round: app (unless baseline), server, legs; the window measured; all stopped."""
    legs_total = 2 * args.calls
    workers: list[common.Worker] = []
    server: common.Server | None = None
    exit_code = None
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as directory:
        try:
            app_port = None
            if config != BASELINE:
                app, app_port = start_app(args, directory)
                workers.append(app)
            server = common.Server(server_args(config, app_port))
            server.start()
            if args.pin:
                pin(server.pid, {0})
            rss_idle = server.rss_kib()
            calls = [(index, str(uuid.uuid4())) for index in range(args.calls)]
            legs = common.Worker(os.path.abspath(__file__), 1, {
                "kind": "legs", "calls": calls, **timing(args),
                "visitor_port": server.ports["audiosocket-visitor"],
                "resident_port": server.ports["audiosocket-resident"],
            }, directory)
            workers.append(legs)
            if args.pin:
                for worker in workers:
                    pin(worker.process.pid, set(range(1, os.cpu_count() or 2)))
            common.start_workers([legs], READY_TIMEOUT)
            if config != BASELINE:
                wait_for(lambda: count_lines(server, STREAM_OPEN) >= legs_total, STREAMS_TIMEOUT,
                         f"{legs_total} streams open")
            if server.health_legs() != legs_total:
                raise RuntimeError(f"the server reports {server.health_legs()} legs, not {legs_total}")
            start = common.go_workers(workers)
            log(f"{config} round {round_number}: {legs_total} legs live, {args.warmup:g} s warm-up, {args.seconds:g} s measured")
            window = measure_window(server, start + args.warmup, start + args.warmup + args.seconds)
            metrics_window = stream_metrics(server.get("/metrics").decode())
            results = {("app" if w is not legs else "legs"): w.result(args.drain + APP_CLOSE_WAIT + 30.0) for w in workers}
            wait_for(lambda: count_lines(server, common.LEG_ENDED) >= legs_total, 10.0, "every leg ended")
            if config != BASELINE:
                wait_for(lambda: stream_metrics(server.get("/metrics").decode()).get("audiohangup_streams_active") == 0,
                         10.0, "every stream over")
            metrics_end = stream_metrics(server.get("/metrics").decode())
            rss_after = server.rss_kib()
            server_died = server.process.poll() if server.process is not None else None
        finally:
            for worker in workers:
                worker.stop()
            if server is not None:
                exit_code = server.stop()
    common.raise_worker_errors(list(results.values()))
    lines = server.log_lines()
    return {
        "config": config,
        "round": round_number,
        "server": {
            **window,
            "rss_idle_mib": mib(rss_idle),
            "rss_after_mib": mib(rss_after),
            "legs_ended": dict(Counter(m.group(1) for line in lines if (m := common.LEG_ENDED.search(line)))),
            "streams_ended": dict(Counter(m.group(1) for line in lines if (m := STREAM_ENDED.search(line)))),
            "streams_failed": dict(Counter(m.group(1) for line in lines if (m := STREAM_FAILED.search(line)))),
            "trouble_lines": [line for line in lines if any(word in line for word in TROUBLE)][:10],
            "died_during_run": server_died,
            "exit_code": exit_code,
        },
        "metrics_window": metrics_window,
        "metrics_end": metrics_end,
        **summarise_workers(args, results),
    }


def summarise_workers(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Latencies, frame counts and the workers' own CPU, from what the workers wrote."""
    legs = results["legs"]
    app = results.get("app")
    counts = Counter(legs["counts"])
    per_leg_s = legs["legs"] * args.seconds
    app_to_leg = [us for part in legs["app_to_leg_us"] for us in part]

    def cpu_percent(result: dict[str, Any] | None) -> float | None:
        cpu = result and result["cpu"]
        return round(100.0 * cpu["cpu_s"] / cpu["wall_s"], 1) if cpu else None

    return {
        "latency_ms": {
            "leg_to_app": common.summary_ms(app["leg_to_app_us"]) if app else None,
            "app_to_leg": common.summary_ms(app_to_leg) if app else None,
            "app_to_leg_p50_by_part": [common.summary_ms(part)["p50"] for part in legs["app_to_leg_us"]] if app else None,
            "round_trip": common.summary_ms(legs["round_trip_us"]) if app else None,
            "bridged": common.summary_ms(legs["bridged_us"]),
        },
        "frames_per_leg_per_s": {
            what: round(counts[what] / per_leg_s, 2) for what in ("echo", "bridged", "silence", "other", "hangup")
        },
        "echo": {
            "sent_in_window": counts["sent_window"],
            "echoed": counts["echoed_window"],
            "missing": counts["sent_window"] - counts["echoed_window"] if app else None,
            "out_of_order": counts["echo_out_of_order"],
            "without_app_stamp": counts["echo_without_app_stamp"],
        },
        "client": {
            "cpu_percent": cpu_percent(legs),
            "tick_lag_ms": {k: v for k, v in common.summary_ms(legs["tick_lag_us"]).items() if k in ("p50", "p99", "max")},
            "legs_lost_during_run": legs["lost_during_run"],
        },
        "app": None if app is None else {
            "cpu_percent": cpu_percent(app),
            "streams_opened": app["opened"],
            "media_received": app["media"],
            "unstamped": app["unstamped"],
            "other_events": app["events"],
            "closes": app["closes"],
            "still_open": app["still_open"],
        },
    }


# ---------------------------------------------------------------------------
# Orchestrator: the rounds, the summary, the table
# ---------------------------------------------------------------------------


def problems_of(run: dict[str, Any], legs_total: int) -> list[str]:
    """What makes a run's figures wrong or the server's behaviour suspect."""
    name = f"{run['config']} round {run['round']}"
    found = []
    server = run["server"]
    if server["died_during_run"] is not None:
        found.append(f"{name}: the server exited during the run")
    if run["client"]["legs_lost_during_run"]:
        found.append(f"{name}: legs lost during the run: {run['client']['legs_lost_during_run']}")
    if run["frames_per_leg_per_s"]["hangup"]:
        found.append(f"{name}: the server hung up legs during the window")
    if server["trouble_lines"]:
        found.append(f"{name}: {len(server['trouble_lines'])}+ trouble lines in the server log")
    if server["streams_failed"]:
        found.append(f"{name}: streams failed: {server['streams_failed']}")
    dropped = {k: v for k, v in run["metrics_end"].items() if k.startswith("audiohangup_stream_dropped") and v}
    if dropped:
        found.append(f"{name}: stream frames dropped: {dropped}")
    app = run["app"]
    if app is not None and app["streams_opened"] != legs_total:
        found.append(f"{name}: the app saw {app['streams_opened']} streams, not {legs_total}")
    return found


def span(values: list[float | None], digits: int = 1) -> list[float] | None:
    """[min, max] of a figure over the rounds, None if it was never measured."""
    present = [v for v in values if v is not None]
    return [round(min(present), digits), round(max(present), digits)] if present else None


def summarise(runs: list[dict[str, Any]], configs: list[str], legs_total: int) -> dict[str, Any]:
    """
    Each configuration over its quiet rounds (all of them if none was
    quiet): ranges, and the CPU per streamed leg against the mean of the
    quiet baselines (a round's own baseline may have been a noisy one).
    """

    def quiet(config: str) -> list[dict[str, Any]]:
        mine = [run for run in runs if run["config"] == config]
        calm = [run for run in mine if run["server"]["other_cpu_percent"] <= NOISY_OTHER]
        return calm or mine

    baselines = [run["server"]["cpu_percent"] for run in quiet(BASELINE)]
    baseline = sum(baselines) / len(baselines)
    summary = {}
    for config in configs:
        mine = quiet(config)
        cpu = [run["server"]["cpu_percent"] for run in mine]
        extra = [c - baseline for c in cpu]

        def latency(direction: str, q: str, mine: list[dict[str, Any]] = mine) -> list[float] | None:
            return span([(run["latency_ms"][direction] or {}).get(q) for run in mine], 2)

        summary[config] = {
            "rounds": [run["round"] for run in mine],
            "noisy_rounds": sorted({run["round"] for run in runs if run["config"] == config} - {run["round"] for run in mine}),
            "server_cpu_percent": span(cpu),
            "cpu_per_leg_percent": span([c / legs_total for c in cpu], 3),
            "cpu_per_streamed_leg_percent": span([e / legs_total for e in extra], 3) if config != BASELINE else None,
            "cpu_per_streamed_leg_us_per_frame": (
                span([e / 100.0 / legs_total * FRAME_SECONDS * 1e6 for e in extra], 1) if config != BASELINE else None
            ),
            "leg_to_app_ms": {"p50": latency("leg_to_app", "p50"), "p99": latency("leg_to_app", "p99")},
            "app_to_leg_ms": {"p50": latency("app_to_leg", "p50"), "p99": latency("app_to_leg", "p99")},
            "bridged_ms": {"p50": latency("bridged", "p50"), "p99": latency("bridged", "p99")},
            "echo_frames_per_leg_per_s": span([run["frames_per_leg_per_s"]["echo"] for run in mine], 2),
            "app_cpu_percent": span([(run["app"] or {}).get("cpu_percent") for run in mine]),
            "client_cpu_percent": span([run["client"]["cpu_percent"] for run in mine]),
            "other_cpu_percent": span([run["server"]["other_cpu_percent"] for run in mine]),
            "rss_t1_mib": span([run["server"]["rss_t1_mib"] for run in mine]),
        }
    return summary


def table(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width table for the terminal: ranges over the rounds."""

    def r(value: list[float] | None) -> str:
        if value is None:
            return "-"
        low, high = value
        return f"{low:g}" if low == high else f"{low:g}-{high:g}"

    def pair(figures: dict[str, Any]) -> str:
        return "-" if figures["p50"] is None else f"{r(figures['p50'])} / {r(figures['p99'])}"

    head = ("config", "rounds", "server CPU %", "per leg %", "per streamed leg %", "leg->app p50/p99 ms",
            "app->leg p50/p99 ms", "echoes/s per leg", "bridged p50/p99 ms", "app CPU %", "others %")
    rows = [head] + [
        (config, ",".join(str(n) for n in s["rounds"]),
         r(s["server_cpu_percent"]), r(s["cpu_per_leg_percent"]), r(s["cpu_per_streamed_leg_percent"]),
         pair(s["leg_to_app_ms"]), pair(s["app_to_leg_ms"]),
         r(s["echo_frames_per_leg_per_s"]) if config != BASELINE else "-",
         pair(s["bridged_ms"]), r(s["app_cpu_percent"]), r(s["other_cpu_percent"]))
        for config, s in summary.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def cpu_model() -> str | None:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    configs = [BASELINE, *args.protocols]
    legs_total = 2 * args.calls
    runs = []
    for round_number in range(1, args.repeats + 1):
        # Interleaved, and rotated each round, so drift in the machine's load falls on every configuration.
        shift = (round_number - 1) % len(configs)
        for config in configs[shift:] + configs[:shift]:
            if args.wait_idle:
                common.wait_idle(args.wait_idle)
            runs.append(run_once(args, config, round_number))
            time.sleep(1.0)  # the previous server's sockets and processes gone
    summary = summarise(runs, configs, legs_total)
    log(f"figures (ranges over the rounds with other processes under {NOISY_OTHER:g}% of a core):\n" + table(summary))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "model": cpu_model(), "python": platform.python_version()},
        "calls": args.calls,
        "legs": legs_total,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "pinned": args.pin,
        "summary": summary,
        "runs": runs,
        "problems": [problem for run in runs for problem in problems_of(run, legs_total)],
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CPU and latency of media streams (converse mode, echo app) against the same calls without streams.",
    )
    parser.add_argument("--calls", type=int, default=100, help="bridged calls, 2 legs each; default 100")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds after the warm-up; default 20")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of sending before measuring; default 3")
    parser.add_argument("--drain", type=float, default=1.0, help="seconds for echoes in flight after the window; default 1")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS),
                        help=f"comma-separated, of {', '.join(PROTOCOLS)}; default both (a baseline always runs)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every configuration, interleaved; default 2")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the machine to be idle; default 0, no wait")
    parser.add_argument("--pin", action="store_true",
                        help="the server on CPU 0, the app and the legs on the other CPUs (needs 2 or more)")
    common.add_worker_option(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs at least 2 CPUs")
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.protocols or any(p not in PROTOCOLS for p in args.protocols):
        parser.error(f"--protocols must name {' and/or '.join(PROTOCOLS)}")
    if not 1 <= args.calls <= 2000:
        parser.error("--calls must be between 1 and 2000")
    if not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 0.1 <= args.drain <= 30:
        parser.error("--seconds must be within 1..600, --warmup 0..60, --drain 0.1..30")
    if not 1 <= args.repeats <= 20:
        parser.error("--repeats must be between 1 and 20")
    return args


def suspect(result: dict[str, Any]) -> str | None:
    """A warning when other processes took enough of the machine to make the CPU figures suspect."""
    noisy = [run for run in result["runs"] if run["server"]["other_cpu_percent"] > 20]
    if noisy:
        worst = max(run["server"]["other_cpu_percent"] for run in noisy)
        return f"warning: other processes used up to {worst:.0f}% of a core in {len(noisy)} runs; the figures are suspect"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return common.run_script(args, worker_main, orchestrate, "the server's CPU and memory", suspect)


if __name__ == "__main__":
    sys.exit(main())
