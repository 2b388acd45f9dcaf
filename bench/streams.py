#!/usr/bin/env python3
"""
Media streams side by side: audiohangup's ``--stream-url`` beside the
reference server ``../shared/bench/peers/asyncio_streams.py`` (asyncio and
the ``websockets`` library, the design it replaces), under one load: N
one-leg calls, each leg streamed in converse mode to a local app that echoes
what it hears. ``--bridged`` streams both legs of N bridged calls instead
(audiohangup only: the reference has no bridge), where a leg has two feeds,
its partner and the app.

As ``bench/peers.py`` does: every run is a fresh server process pinned alone
to ``--server-cpu`` with ``taskset``; this process, the echo app (a process
of its own, so its CPU is not the server's) and one process of fake Asterisk
legs run on ``--load-cpu``. The servers take turns for every load, the order
rotating each round. A server that cannot run (no ``asyncio_streams.py``, no
interpreter with ``websockets``: ``--asyncio-python``) is skipped with a line
that says so. audiohangup runs as ``twistd -n audiohangup --call-records none``
(``common.Server``: what ``pip install .`` installed, or the tree on
``PYTHONPATH``).

A run: the legs connect, send their UUID, wait until every stream is open,
then send a stamped 20 ms slin frame each, their phases spread over the 20 ms
as real channels are; after ``--warmup`` the window of ``--seconds`` is
measured; then the server is stopped (``SIGSTOP``) for ``--stall-ms`` and
resumed (``SIGCONT``), and the legs go on for 3 s more.

What it measures, per run:

- the server's CPU (utime and stime from ``/proc``) over the window, as % of
  a core and per 100 calls, user and kernel, and per frame pair it moved
  (one to the app, one played to a leg): a starved server moves fewer, so
  this holds where the others do not; and how long it waited, runnable,
  for its core (``schedstat``): what other work on a shared machine took;
- leg → app latency: the app's receive time minus the leg's send stamp;
- app → leg latency: the leg's receive time of an echo minus the send time
  the app wrote into it (the server plays an app's audio on its 20 ms tick,
  so up to one tick of this is by design);
- the frames each leg got per second over the window, and the most it got in
  any 100 ms (one timeline per leg: 50 ± 1 frames/s, never more than 6 in
  100 ms), and both again from the resume on;
- the app → leg delay (p50) of what the app sent in a second before the
  stall, and from 1.5 to 2.5 s after the resume: a playout that follows the
  clock is back at its earlier level by then; a late tick that plays one
  frame and skips the missed ones keeps the stall's 300 ms for good;
- the frames each leg got by kind (echo, bridged, silence), the echoes
  missing, the server's side (audiohangup only: ``/metrics`` stream counters
  and drops, close reasons, RSS), log lines that signal trouble, and the CPU
  that processes outside the benchmark used meanwhile: a run where they took
  over 10 % of a core, or where the server waited over 10 % of the window,
  is left out of the table (all runs shown, marked ``*``, if none was
  quiet); every run is in the JSON.

All times are ``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every
process on a Linux machine, so a stamp taken in one process can be read in
another. The legs' own reads are part of what they measure: a busy load core
makes frames arrive in bunches (the worst 100 ms) and late (the latencies);
``client.tick_lag_ms`` and the app's CPU in the JSON tell.

The stamps must survive μ-law: with ``twilio`` the server converts the
leg's slin to μ-law for the app and the app's μ-law back to slin. So each
stamp byte is carried by two samples, each the decoded value of a μ-law code
0x10-0x1F (one nibble each); G.711 gives those codes and values back
exactly (checked at start against ``audiohangup.codecs``). The leg writes
its stamp (call, role, sequence, send time) into samples 0-31; the app
echoes the frame as it came, except samples 32-49, where it writes its own
send time; the rest is silence. The app sets ``TCP_NODELAY``, as asyncio
does (``--app-nagle``: autobahn's default, Nagle on). Its WebSocket server is
a lean one of a few lines (``--app lean``, the default): autobahn's
(``--app autobahn``) spends about 70 µs a message, so at 200 calls the app
filled the load's core and its own queue was in every latency measured.

The table (reST, to paste) goes to stdout, then one JSON line with every
run; progress goes to stderr. Run from the repository root, with the working
tree on the path (the twistd child inherits it)::

    python -m venv /tmp/streams-venv && /tmp/streams-venv/bin/pip install websockets
    PYTHONPATH=$PWD python bench/streams.py --asyncio-python /tmp/streams-venv/bin/python
    PYTHONPATH=$PWD python bench/streams.py --calls 10,50,100 --protocol twilio,audiohangup --repeats 2 \\
        --asyncio-python /tmp/streams-venv/bin/python
    PYTHONPATH=$PWD python bench/streams.py --bridged --calls 10,50

A benchmark, not a test. It talks only to 127.0.0.1, every step is bounded in
time, and the servers and the workers are always stopped (a stopped server
is resumed first).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# This script's directory holds common.py; its parent, audiohangup (for the codecs).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import load  # for process_cpu_table and others_cpu_seconds: the CPU of processes not ours
import peers  # for free_ports, pinned and pin_cores: the servers pinned as bench/peers.py pins them
from common import FRAME_SECONDS, PAYLOAD_BYTES, ROLES, log

common.set_log_name("streams")

PROTOCOLS = ("twilio", "audiohangup")
READY_TIMEOUT = 60.0
STREAMS_TIMEOUT = 30.0
#: How long the app waits, after the window, for the server to close its streams.
APP_CLOSE_WAIT = 15.0
#: Other processes' CPU over a run's window (% of a core) above which the run is left out of the summary.
NOISY_OTHER = 10.0
#: The share of the window the server waited, runnable, for its core, above which the run is left out too.
NOISY_WAIT = 10.0
#: The window is cut in this many parts to show whether app → leg latency drifts.
PARTS = 4
#: The span in which a leg's worst count of frames is taken: more than 6 in it is two feeds, or a burst.
WORST_WINDOW_NS = 100_000_000
#: After the stall: the app → leg delay is read from AFTER_STALL to AFTER_STALL + STALL_SPAN seconds after the
#: resume (the issue's "back within 30 ms of its earlier level 1.5 s after"), the level before over STALL_SPAN.
AFTER_STALL = 1.5
STALL_SPAN = 1.0
#: The level before the stall is read up to this long before the stop (a frame sent just before it is held by it).
BEFORE_STALL_GAP_NS = 100_000_000
#: Sending goes on this long after the resume: the after-stall span, and time for its echoes to arrive.
STALL_TAIL = AFTER_STALL + STALL_SPAN + 0.5

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
    """
    A worker's run with its steady window [t0, t1) in monotonic ns, to
    compare with stamps, and the end of sending (after the stall and its
    tail, if there is one); empty until GO.
    """

    t0_ns = t1_ns = end_ns = 1 << 62

    def started(self, now: float) -> None:
        self.t0_ns = int(self.t0 * 1e9)
        self.t1_ns = int((self.t0 + self.cfg["steady"]) * 1e9)
        self.end_ns = int(self.t1 * 1e9)


def worst_in_window(times: list[int], width: int) -> int:
    """The most of the sorted C{times} that fall in any half-open span C{width} long (0 if none)."""
    worst = first = 0
    for last, now in enumerate(times):
        while now - times[first] >= width:
            first += 1
        worst = max(worst, last - first + 1)
    return worst


def timeline(arrivals: list[int], start: int, stop: int) -> tuple[float, int]:
    """
    A leg's frames per second over [start, stop) (ns), and the most it got in
    any 100 ms of it: one timeline per leg means 50 and 5 (6 with jitter).
    """
    inside = [t for t in arrivals if start <= t < stop]
    return round(len(inside) * 1e9 / (stop - start), 2), worst_in_window(inside, WORST_WINDOW_NS)


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
    from twisted.internet.protocol import Factory, Protocol

    from audiohangup.streams.frames import mask as ws_mask

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
            factory: Any
            if cfg["app"] == "autobahn":
                factory = WebSocketServerFactory()
                factory.protocol = EchoProtocol
            else:
                factory = Factory.forProtocol(LeanEchoProtocol)
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

    class LeanEchoProtocol(Protocol):
        """
        The same app on a WebSocket server of a few lines (RFC 6455: the
        handshake, whole masked frames in, unmasked frames out, close and
        ping answered): autobahn's server spends about 70 µs a message, so at
        200 calls the app alone filled the load core and its queue was in
        every latency the table shows. C{--app autobahn} brings it back.
        """

        streaming = False
        clean = False

        def connectionMade(self) -> None:
            if not cfg["app_nagle"]:
                self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            self.buffer = b""
            self.open = False

        def dataReceived(self, data: bytes) -> None:
            buffer = self.buffer + data if self.buffer else data
            if not self.open:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    self.buffer = buffer
                    return
                self.handshake(buffer[:end].decode("latin-1"))
                buffer = buffer[end + 4:]
            at, size = 0, len(buffer)
            while size - at >= 6:
                first, second = buffer[at], buffer[at + 1] & 0x7F
                head = at + 2
                if second == 126:
                    if size - at < 8:
                        break
                    second = int.from_bytes(buffer[head:head + 2], "big")
                    head += 2
                elif second == 127:
                    if size - at < 14:
                        break
                    second = int.from_bytes(buffer[head:head + 8], "big")
                    head += 8
                end = head + 4 + second
                if end > size:
                    break
                payload = ws_mask(buffer[head + 4:end], buffer[head:head + 4])
                at = end
                self.frame(first & 0x0F, payload)
            self.buffer = buffer[at:]

        def handshake(self, head: str) -> None:
            fields = {}
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            accept = base64.b64encode(hashlib.sha1(
                (fields["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            reply = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                     f"Sec-WebSocket-Accept: {accept}"]
            offered = fields.get("sec-websocket-protocol")
            if offered:
                reply.append(f"Sec-WebSocket-Protocol: {offered.split(',')[0].strip()}")
            self.transport.write(("\r\n".join(reply) + "\r\n\r\n").encode())  # type: ignore[union-attr]
            self.open = self.streaming = True
            app.opened += 1
            app.open_now += 1

        def send(self, opcode: int, payload: bytes) -> None:
            size = len(payload)
            if size < 126:
                head = bytes((0x80 | opcode, size))
            elif size < 65536:
                head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
            else:
                head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
            self.transport.write(head + payload)  # type: ignore[union-attr]

        def frame(self, opcode: int, payload: bytes) -> None:
            now = monotonic_ns()
            if opcode == 0x2:
                app.heard(stamps.read_pcm(payload, 0, LEG_STAMP.size), now)
                stamp = stamps.pcm(app_stamp(APP_MAGIC, monotonic_ns()))
                self.send(0x2, payload[:LEG_PCM_BYTES] + stamp + payload[LEG_PCM_BYTES + APP_PCM_BYTES:])
            elif opcode == 0x1:
                reply = media_reply(payload, now)
                if reply is not None:
                    self.send(0x1, reply)
            elif opcode == 0x8:
                self.clean = True
                self.send(0x8, payload[:2])
                self.transport.loseConnection()  # type: ignore[union-attr]
            elif opcode == 0x9:
                self.send(0xA, payload)

        def connectionLost(self, reason: Any = None) -> None:
            app.closes[f"{'clean' if self.clean else 'unclean'} {1000 if self.clean else None}"] += 1
            if self.streaming:
                self.streaming = False
                app.open_now -= 1
            app.closed()

    def media_reply(payload: bytes, now: int) -> bytes | None:
        """Twilio's protocol: a C{media} answered with a C{media} of the same μ-law, our stamp in it."""
        body = json.loads(payload)
        event = body.get("event")
        if event != "media":
            app.events[str(event)] += 1
            return None
        ulaw = base64.b64decode(body["media"]["payload"])
        app.heard(stamps.read_codes(ulaw, 0, LEG_STAMP.size), now)
        stamp = stamps.codes(app_stamp(APP_MAGIC, monotonic_ns()))
        echoed = base64.b64encode(ulaw[:LEG_CODES] + stamp + ulaw[LEG_CODES + APP_CODES:]).decode("ascii")
        reply = {"event": "media", "streamSid": body.get("streamSid"), "media": {"payload": echoed}}
        return json.dumps(reply, separators=(",", ":")).encode()

    class EchoProtocol(WebSocketServerProtocol):
        streaming = False

        def connectionMade(self) -> None:
            # An app that answers at once, as asyncio's transports (websockets) do: no Nagle on our side,
            # unless asked for (autobahn's default), to see what an app's Nagle costs.
            if not cfg["app_nagle"]:
                self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            super().connectionMade()

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
            reply = media_reply(payload, now)
            if reply is not None:
                self.sendMessage(reply, isBinary=False)

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
    One leg per call (two with --bridged), each sending a stamped slin frame
    every 20 ms, their phases spread over 20 slots of 1 ms; each leg sorts
    what it gets back into its own echoes (app → leg latency), its partner's
    bridged frames, and the server's silence, and notes when every frame
    came (frames per second, the worst 100 ms, before and after the stall).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredSemaphore, gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from audiohangup.wire import Kind, encode_frame, encode_uuid

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
            #: (app's send time, app → leg µs) of echoes the app sent from a second before the stall on.
            self.stall_pairs: list[tuple[int, int]] = []
            self.lost: Counter[str] = Counter()
            self.closed = 0

        def connect_all(self) -> None:
            semaphore = DeferredSemaphore(common.CONNECT_CONCURRENCY)
            waits = []
            for index, call_id in cfg["calls"]:
                for role_id, port in enumerate(cfg["ports"]):
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
            steady = [timeline(leg.arrivals, self.t0_ns, self.t1_ns) for leg in self.legs]
            resume = self.t1_ns + int(cfg["stall"] * 1e9)
            after = [timeline(leg.arrivals, resume, self.end_ns) for leg in self.legs] if cfg["stall"] else []
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
                    "frames_per_s": [per_s for per_s, _ in steady],
                    "worst_100ms": [worst for _, worst in steady],
                    "after_stall_frames_per_s": [per_s for per_s, _ in after],
                    "after_stall_worst_100ms": [worst for _, worst in after],
                    "stall_pairs": self.stall_pairs,
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
            #: When every audio frame came, from t0 to the end of sending.
            self.arrivals: list[int] = []
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
            self.send(encode_frame(slin, stamps.pcm(stamp) + TAIL))
            self.seq += 1
            if self.run.t0_ns <= sent < self.run.t1_ns:
                self.counts["sent_window"] += 1

        def dataReceived(self, data: bytes) -> None:
            now = monotonic_ns()
            t0, t1 = self.run.t0_ns, self.run.t1_ns
            in_window = t0 <= now < t1
            timed = t0 <= now < self.run.end_ns
            for kind, length, buffer, start in self.frames(data):
                what = self.frame_received(kind, length, buffer, start, now, t0, t1)
                if in_window:
                    self.counts[what] += 1
                if timed and what != "hangup":
                    self.arrivals.append(now)

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
            if magic != APP_MAGIC:
                return
            if t0 <= app_sent < t1:
                part = (app_sent - t0) * PARTS // (t1 - t0)
                self.run.app_to_leg_us[part].append((now - app_sent) // 1000)
            if cfg["stall"] and app_sent >= t1 - int(STALL_SPAN * 1e9) - BEFORE_STALL_GAP_NS:
                self.run.stall_pairs.append((app_sent, (now - app_sent) // 1000))

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
# Orchestrator: the servers
# ---------------------------------------------------------------------------

STREAM_OPEN = re.compile(r" stream MZ[0-9a-f]+ to \S+ open \(")
#: asyncio_streams.py's line for an open stream (at --log-level INFO).
PEER_STREAM_OPEN = re.compile(r": stream to \S+ open$")
STREAM_ENDED = re.compile(r" stream MZ[0-9a-f]+ ended \((\w+)\)")
STREAM_FAILED = re.compile(r" stream MZ[0-9a-f]+ to \S+ failed: (.*)$")
TROUBLE = ("Traceback", "Unhandled", " failed", " ignored ", "not opened", "did not close", "went away")
METRIC_LINE = re.compile(r"^(audiohangup_stream\w*)(\{[^}]*\})? (\S+)$")


class StreamsPeer(common.Server):
    """
    asyncio_streams.py as the benchmark sees audiohangup: one AudioSocket
    port (the legs' visitor port), ready at its ``listening on`` line; it
    has no HTTP API, so no /health, /metrics or close reasons.
    """

    def __init__(self, argv: list[str], port: int) -> None:
        super().__init__()
        self.argv = argv
        self.ports = {"audiosocket-visitor": port}

    def line_read(self, line: str) -> None:
        if " listening on " in line:
            self.listening.set()

    def health_legs(self) -> int | None:
        return None


@dataclass
class Contender:
    """A server to measure: a fresh one for a protocol and an app URL, and how it says a stream is open."""

    name: str
    make: Callable[[str, str], common.Server]
    stream_open: re.Pattern[str]
    audiohangup: bool = False


def audiohangup_contender(args: argparse.Namespace) -> Contender:
    """twistd -n audiohangup (common.Server: ephemeral loopback ports, --call-records none) streaming every leg."""

    def make(protocol: str, url: str) -> common.Server:
        extra = ["--call-records", "none", "--stream-url", url, "--stream-protocol", protocol, "--stream-mode", "converse"]
        if not args.bridged:
            extra += ["--stream-roles", "visitor"]
        server = common.Server(extra + shlex.split(args.audiohangup_args))
        server.argv = peers.pinned(server.argv, args.server_cpu)
        return server

    return Contender("audiohangup", make, STREAM_OPEN, audiohangup=True)


def asyncio_contender(args: argparse.Namespace) -> Contender | str:
    """asyncio_streams.py under an interpreter that has websockets, or why it is skipped."""
    if args.bridged:
        return "it has no bridge (one-leg calls only: drop --bridged)"
    script = args.peers_dir / "asyncio_streams.py"
    if not script.is_file():
        return f"no {script} (give --peers-dir)"
    python = args.asyncio_python or sys.executable
    why = common.cannot_import(python, "websockets, audioop")
    if why is not None:
        return (f"{why} (give --asyncio-python, the python of a venv that has websockets: "
                "python -m venv /tmp/streams-venv && /tmp/streams-venv/bin/pip install websockets)")

    def make(protocol: str, url: str) -> common.Server:
        port = peers.free_ports(1)[0]
        argv = [python, str(script), "--host", "127.0.0.1", "--port", str(port), "--url", url,
                "--protocol", protocol, "--log-level", "INFO"]
        return StreamsPeer(peers.pinned(argv, args.server_cpu), port)

    return Contender("asyncio", make, PEER_STREAM_OPEN)


def contenders(args: argparse.Namespace) -> tuple[list[Contender], dict[str, str]]:
    """The servers asked for that can run here, and a reason for each that cannot."""
    found: list[Contender] = []
    skipped: dict[str, str] = {}
    for name in args.servers:
        entry = audiohangup_contender(args) if name == "audiohangup" else asyncio_contender(args)
        if isinstance(entry, str):
            skipped[name] = entry
        else:
            found.append(entry)
    return found, skipped


# ---------------------------------------------------------------------------
# Orchestrator: one run
# ---------------------------------------------------------------------------


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
        "kind": "app", "port_file": port_file, "app_nagle": args.app_nagle, "app": args.app, **timing(args),
    }, directory)
    app.wait_ready(time.monotonic() + READY_TIMEOUT)
    with open(port_file) as f:
        return app, int(f.read())


def sending_seconds(args: argparse.Namespace) -> float:
    """How long the legs send after the warm-up: the steady window, then the stall and its tail."""
    return float(args.seconds) + (args.stall + STALL_TAIL if args.stall else 0.0)


def timing(args: argparse.Namespace) -> dict[str, float]:
    """What every worker needs of the run's timeline, and a budget that bounds it."""
    seconds = sending_seconds(args)
    budget = READY_TIMEOUT + STREAMS_TIMEOUT + args.warmup + seconds + args.drain + APP_CLOSE_WAIT + 30.0
    return {"warmup": args.warmup, "seconds": seconds, "steady": args.seconds, "stall": args.stall,
            "drain": args.drain, "budget": budget}


def runqueue_wait_seconds(pid: int) -> float:
    """
    How long the threads of C{pid} have waited, runnable, for a CPU (the
    second field of C{/proc/PID/task/TID/schedstat}): on a shared core, what
    other work took from the server.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def measure_window(server: common.Server, t0: float, t1: float) -> dict[str, Any]:
    """Server CPU, RSS and the machine's other load over [t0, t1): the steady part of the run."""
    common.sleep_until(t0)
    wall0, user0, system0 = time.monotonic(), *server.cpu_split()
    waited0 = runqueue_wait_seconds(server.pid)
    table0 = load.process_cpu_table()
    rss0 = server.rss_kib()
    wakeups = common.probe_wakeups(t1)
    wall1, user1, system1 = time.monotonic(), *server.cpu_split()
    waited1 = runqueue_wait_seconds(server.pid)
    table1 = load.process_cpu_table()
    wall = wall1 - wall0
    return {
        "cpu_seconds": round(user1 - user0 + system1 - system0, 3),
        "runqueue_wait_percent": round(100.0 * (waited1 - waited0) / wall, 1),
        "cpu_percent": round(100.0 * (user1 - user0 + system1 - system0) / wall, 1),
        "user_percent": round(100.0 * (user1 - user0) / wall, 1),
        "system_percent": round(100.0 * (system1 - system0) / wall, 1),
        "rss_t0_mib": mib(rss0),
        "rss_t1_mib": mib(server.rss_kib()),
        "other_cpu_percent": round(100.0 * load.others_cpu_seconds(table0, table1) / wall, 1),
        "wakeup_delay_ms": {k: v for k, v in common.summary_ms(wakeups).items() if k in ("p99", "max")},
    }


def stall(pid: int, seconds: float) -> tuple[int, int]:
    """
    Stop the server for C{seconds} (SIGSTOP, SIGCONT: what a long GC pause,
    a slow disk or a noisy neighbour do to it); when it stopped and resumed,
    in monotonic ns, the clock of the stamps.
    """
    stopped = time.monotonic_ns()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic_ns()
    return stopped, resumed


def stall_figures(pairs: list[list[int]], stopped: int, resumed: int) -> dict[str, Any]:
    """
    app → leg delay (ms) of what the app sent in a second before the stop
    (ending 100 ms before it, as what was sent just before is caught by the
    stop), and from 1.5 s to 2.5 s after the resume: a leg whose playout
    follows the clock is back at its earlier level by then; the worst in between.
    """
    span_ns = int(STALL_SPAN * 1e9)
    after_from = resumed + int(AFTER_STALL * 1e9)
    before_to = stopped - BEFORE_STALL_GAP_NS
    before = [us for sent, us in pairs if before_to - span_ns <= sent < before_to]
    after = [us for sent, us in pairs if after_from <= sent < after_from + span_ns]
    between = [us for sent, us in pairs if stopped <= sent < after_from]
    return {
        "stopped_ms": round((resumed - stopped) / 1e6, 1),
        "before": common.summary_ms(before),
        "after": common.summary_ms(after),
        "worst_between_ms": common.ms_from_us(max(between)) if between else None,
    }


def run_once(args: argparse.Namespace, contender: Contender, calls: int, protocol: str,
             round_number: int) -> dict[str, Any]:
    """One server, one load, one round: app, server, legs; the window measured, the stall; all stopped."""
    legs_total = calls * (2 if args.bridged else 1)
    workers: list[common.Worker] = []
    server: common.Server | None = None
    exit_code = None
    stall_times = None
    metrics_window: dict[str, float] = {}
    metrics_end: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as directory:
        try:
            app, app_port = start_app(args, directory)
            workers.append(app)
            server = contender.make(protocol, f"ws://127.0.0.1:{app_port}/echo")
            log(f"{contender.name}: {shlex.join(server.argv)}")
            server.start()
            rss_idle = server.rss_kib()
            ports = [server.ports["audiosocket-visitor"]]
            if args.bridged:
                ports.append(server.ports["audiosocket-resident"])
            legs = common.Worker(os.path.abspath(__file__), 1, {
                "kind": "legs", "calls": [(index, str(uuid.uuid4())) for index in range(calls)],
                "ports": ports, **timing(args),
            }, directory)
            workers.append(legs)
            common.start_workers([legs], READY_TIMEOUT)
            wait_for(lambda: count_lines(server, contender.stream_open) >= legs_total, STREAMS_TIMEOUT,
                     f"{legs_total} streams open")
            if contender.audiohangup and server.health_legs() != legs_total:
                raise RuntimeError(f"the server reports {server.health_legs()} legs, not {legs_total}")
            start = common.go_workers(workers)
            t0 = start + args.warmup
            log(f"{contender.name} {protocol}, {calls} calls, round {round_number}: {legs_total} legs live, "
                f"{args.warmup:g} s warm-up, {args.seconds:g} s measured"
                + (f", then a {args.stall * 1000:g} ms stall" if args.stall else ""))
            window = measure_window(server, t0, t0 + args.seconds)
            if contender.audiohangup:
                metrics_window = stream_metrics(server.get("/metrics").decode())
            if args.stall:
                stall_times = stall(server.pid, args.stall)
            results = {("app" if w is not legs else "legs"): w.result(sending_seconds(args) + args.drain
                                                                       + APP_CLOSE_WAIT + 30.0) for w in workers}
            if contender.audiohangup:
                wait_for(lambda: count_lines(server, common.LEG_ENDED) >= legs_total, 10.0, "every leg ended")
                wait_for(lambda: stream_metrics(server.get("/metrics").decode()).get("audiohangup_streams_active") == 0,
                         10.0, "every stream over")
                metrics_end = stream_metrics(server.get("/metrics").decode())
            rss_after = server.rss_kib()
            server_died = server.process.poll() if server.process is not None else None
        finally:
            if server is not None and server.process is not None and server.process.poll() is None:
                os.kill(server.pid, signal.SIGCONT)  # never leave it stopped
            for worker in workers:
                worker.stop()
            if server is not None:
                exit_code = server.stop()
    common.raise_worker_errors(list(results.values()))
    lines = server.log_lines()
    run = {
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
    if stall_times is not None:
        run["stall"] = stall_figures(results["legs"]["stall_pairs"], *stall_times)
    return run


def summarise_workers(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Latencies, frame counts and the workers' own CPU, from what the workers wrote."""
    legs = results["legs"]
    app = results["app"]
    counts = Counter(legs["counts"])
    per_leg_s = legs["legs"] * args.seconds
    app_to_leg = [us for part in legs["app_to_leg_us"] for us in part]

    def cpu_percent(result: dict[str, Any]) -> float | None:
        cpu = result["cpu"]
        return round(100.0 * cpu["cpu_s"] / cpu["wall_s"], 1) if cpu else None

    def low_high(values: list[float]) -> list[float] | None:
        return [min(values), max(values)] if values else None

    return {
        "latency_ms": {
            "leg_to_app": common.summary_ms(app["leg_to_app_us"]),
            "app_to_leg": common.summary_ms(app_to_leg),
            "app_to_leg_p50_by_part": [common.summary_ms(part)["p50"] for part in legs["app_to_leg_us"]],
            "round_trip": common.summary_ms(legs["round_trip_us"]),
            "bridged": common.summary_ms(legs["bridged_us"]),
        },
        "frames_per_leg_per_s": {
            what: round(counts[what] / per_leg_s, 2) for what in ("echo", "bridged", "silence", "other", "hangup")
        },
        "timeline": {
            "frames_per_s": low_high(legs["frames_per_s"]),
            "worst_100ms": max(legs["worst_100ms"], default=None),
            "after_stall_frames_per_s": low_high(legs["after_stall_frames_per_s"]),
            "after_stall_worst_100ms": max(legs["after_stall_worst_100ms"], default=None),
        },
        "echo": {
            "sent_in_window": counts["sent_window"],
            "echoed": counts["echoed_window"],
            "missing": counts["sent_window"] - counts["echoed_window"],
            "out_of_order": counts["echo_out_of_order"],
            "without_app_stamp": counts["echo_without_app_stamp"],
        },
        "client": {
            "cpu_percent": cpu_percent(legs),
            "tick_lag_ms": {k: v for k, v in common.summary_ms(legs["tick_lag_us"]).items() if k in ("p50", "p99", "max")},
            "legs_lost_during_run": legs["lost_during_run"],
        },
        "app": {
            "cpu_percent": cpu_percent(app),
            "streams_opened": app["opened"],
            "media_received": app["media"],
            "unstamped": app["unstamped"],
            "other_events": app["events"],
            "closes": app["closes"],
            "still_open": app["still_open"],
        },
    }


def problems_of(run: dict[str, Any]) -> list[str]:
    """What makes a run's figures wrong or the server's behaviour suspect."""
    name = f"{run['name']} {run['calls']} calls round {run['round']}"
    if "error" in run:
        return [f"{name}: {run['error']}"]
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
    # The app's audio dropped is what a stall or a late tick costs (or, at the end, the delay left queued):
    # the stall figures say it. What the app was not sent is a problem.
    dropped = {k: v for k, v in run["metrics_end"].items()
               if k.startswith("audiohangup_stream_dropped") and "from_app" not in k and v}
    if dropped:
        found.append(f"{name}: stream frames dropped: {dropped}")
    if run["app"]["streams_opened"] != run["legs"]:
        found.append(f"{name}: the app saw {run['app']['streams_opened']} streams, not {run['legs']}")
    return found


# ---------------------------------------------------------------------------
# Orchestrator: the rounds and the table
# ---------------------------------------------------------------------------


def span(values: list[Any], digits: int = 0) -> str:
    """min-max of what the rounds gave (one value when they agree), '-' when none."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    low, high = f"{min(present):.{digits}f}", f"{max(present):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def pick(run: dict[str, Any], *path: str) -> Any:
    """A figure deep in a run, None where a step is missing."""
    value: Any = run
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def table(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """
    One row per load and server, ranges over its clean runs (completed, other
    processes under NOISY_OTHER % of a core, the server waiting for its core
    under NOISY_WAIT % of the time); over every completed run, marked '*',
    when none was clean. A reST simple table, to paste.
    """
    header = [["calls", "server", "CPU %", "per 100", "user /", "µs per", "waited", "leg → app", "app → leg",
               "frames/s", "worst", "stall: app → leg", "after stall:", "clean"],
              ["", "", "", "calls", "kernel %", "frame pair", "%", "p50 / p99 ms", "p50 / p99 ms", "per leg",
               "/100 ms", "p50 before → after", "worst /100 ms", "runs"]]
    rows = []
    for calls in args.calls:
        for protocol in args.protocols:
            for name in dict.fromkeys(run["name"] for run in runs):
                mine = [run for run in runs if run["calls"] == calls and run["protocol"] == protocol
                        and run["name"] == name]
                good = [run for run in mine if "error" not in run]
                clean = [run for run in good if run["server"]["other_cpu_percent"] <= NOISY_OTHER
                         and run["server"]["runqueue_wait_percent"] <= NOISY_WAIT]
                kept, flag = (clean, "") if clean else (good, "*")

                def s(*path: str, digits: int = 0, kept: list[dict[str, Any]] = kept) -> str:
                    return span([pick(run, *path) for run in kept], digits)

                frames = [v for run in kept for v in (pick(run, "timeline", "frames_per_s") or [])]
                rows.append([
                    str(calls), f"{name}{flag}" + (f" {protocol}" if len(args.protocols) > 1 else ""),
                    s("server", "cpu_percent"), s("cpu_per_100_calls"),
                    f"{s('server', 'user_percent')} / {s('server', 'system_percent')}",
                    s("us_per_frame_pair"), s("server", "runqueue_wait_percent"),
                    f"{s('latency_ms', 'leg_to_app', 'p50', digits=1)} / {s('latency_ms', 'leg_to_app', 'p99')}",
                    f"{s('latency_ms', 'app_to_leg', 'p50')} / {s('latency_ms', 'app_to_leg', 'p99')}",
                    span(frames, 1), s("timeline", "worst_100ms"),
                    f"{s('stall', 'before', 'p50')} → {s('stall', 'after', 'p50')}" if args.stall else "-",
                    s("timeline", "after_stall_worst_100ms") if args.stall else "-",
                    f"{len(clean)}/{len(mine)}",
                ])
    widths = [max(len(row[i]) for row in header + rows) for i in range(len(header[0]))]
    rule = "  ".join("=" * width for width in widths)

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return [rule, *map(line, header), rule, *map(line, rows), rule]


def cpu_model() -> str | None:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def measure(args: argparse.Namespace, contender: Contender, calls: int, protocol: str, round_number: int
            ) -> dict[str, Any]:
    """One run, labelled; a failed run is kept with its error, and the rounds go on."""
    run: dict[str, Any] = {"name": contender.name, "protocol": protocol, "calls": calls,
                           "legs": calls * (2 if args.bridged else 1), "round": round_number,
                           "window_seconds": args.seconds}
    try:
        run.update(run_once(args, contender, calls, protocol, round_number))
    except (RuntimeError, OSError) as error:
        log(f"{contender.name} {protocol}, {calls} calls: run failed: {error}")
        run["error"] = str(error)
        return run
    run["cpu_per_100_calls"] = round(run["server"]["cpu_percent"] * 100.0 / calls, 1)
    run["us_per_frame_pair"] = us_per_frame_pair(run)
    return run


def us_per_frame_pair(run: dict[str, Any]) -> float | None:
    """
    The server's CPU over the window per frame pair it moved (one to the
    app, one played to a leg): the frames the app got of those the legs
    sent in the window, and the frames the legs got in it. A starved server
    moves fewer frames, so this holds where CPU % and latency do not.
    """
    frames = run["latency_ms"]["leg_to_app"]["samples"] + sum(
        run["frames_per_leg_per_s"][what] for what in ("echo", "bridged", "silence", "other")
    ) * run["legs"] * run["window_seconds"]
    return round(2e6 * run["server"]["cpu_seconds"] / frames, 1) if frames else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="audiohangup's media streams beside asyncio_streams.py: N calls streamed in converse mode "
                    "to an echo app, the server pinned alone to a core, interleaved rounds.",
    )
    parser.add_argument("--calls", default="10,50,100,200",
                        help="comma-separated loads, in calls (one leg each; two with --bridged); default 10,50,100,200")
    parser.add_argument("--servers", default="audiohangup,asyncio",
                        help="comma-separated, of audiohangup, asyncio; default both")
    parser.add_argument("--protocol", default="twilio",
                        help=f"comma-separated, of {', '.join(PROTOCOLS)}; default twilio")
    parser.add_argument("--bridged", action="store_true",
                        help="bridged calls, both legs streamed (audiohangup only: the asyncio peer has no bridge)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds after the warm-up; default 10")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of sending before measuring; default 3")
    parser.add_argument("--stall-ms", type=float, default=300.0,
                        help="after the window, SIGSTOP the server this long, then SIGCONT (0: no stall); default 300")
    parser.add_argument("--drain", type=float, default=1.0, help="seconds for echoes in flight after sending; default 1")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over every server and load, interleaved; default 2")
    parser.add_argument("--app", choices=("lean", "autobahn"), default="lean",
                        help="the echo app's WebSocket server: a lean one of a few lines, or autobahn's (about 70 µs a "
                             "message: at 200 calls it fills the load core); default lean")
    parser.add_argument("--app-nagle", action="store_true",
                        help="leave Nagle's algorithm on in the echo app (autobahn's default); default off, as in "
                             "asyncio and websockets")
    parser.add_argument("--peers-dir", type=Path, default=peers.PEERS_DIR,
                        help=f"where asyncio_streams.py is; default {peers.PEERS_DIR}")
    parser.add_argument("--asyncio-python", metavar="PYTHON",
                        help="interpreter with websockets for asyncio_streams.py; default this one")
    parser.add_argument("--audiohangup-args", default="",
                        help='extra twistd audiohangup options, one string, e.g. "--stream-max-queue-ms 2000"')
    parser.add_argument("--server-cpu", type=int, default=1, help="core the servers run on; default 1")
    parser.add_argument("--load-cpu", type=int, default=0, help="core the legs and the app run on; default 0")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to SECONDS for the machine to be idle; default 0, no wait")
    common.add_worker_option(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    try:
        args.calls = [int(n) for n in args.calls.split(",") if n.strip()]
    except ValueError:
        parser.error("--calls must be numbers, comma-separated")
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    args.protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    if not args.calls or any(not 1 <= n <= 2000 for n in args.calls):
        parser.error("--calls must be between 1 and 2000")
    if not args.servers or set(args.servers) - {"audiohangup", "asyncio"}:
        parser.error("--servers must name audiohangup and/or asyncio")
    if not args.protocols or any(p not in PROTOCOLS for p in args.protocols):
        parser.error(f"--protocol must name {' and/or '.join(PROTOCOLS)}")
    if not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 0.1 <= args.drain <= 30:
        parser.error("--seconds must be within 1..600, --warmup 0..60, --drain 0.1..30")
    if not 0 <= args.stall_ms <= 5000 or (args.stall_ms and args.seconds < STALL_SPAN):
        parser.error(f"--stall-ms must be within 0..5000, and needs --seconds of {STALL_SPAN:g} or more")
    if not 1 <= args.repeats <= 20:
        parser.error("--repeats must be between 1 and 20")
    args.stall = args.stall_ms / 1000.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker_main(*args.worker)
    if not os.path.exists("/proc/self/stat"):
        raise SystemExit("needs Linux /proc for the servers' CPU")

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    pinning = peers.pin_cores(args)
    found, skipped = contenders(args)
    for name, why in skipped.items():
        log(f"{name} skipped: {why}")
    if not found:
        log("no server to measure")
        return 1
    runs = []
    for round_number in range(1, args.repeats + 1):
        for calls in args.calls:
            for protocol in args.protocols:
                # Interleaved, the order rotated each round, so drift in the machine's load falls on every server.
                shift = (round_number - 1) % len(found)
                for contender in found[shift:] + found[:shift]:
                    if args.wait_idle:
                        common.wait_idle(args.wait_idle)
                    runs.append(measure(args, contender, calls, protocol, round_number))
                    time.sleep(1.0)  # the previous server's sockets and processes gone
    problems = [problem for run in runs for problem in problems_of(run)]
    kind = "bridged calls, both legs" if args.bridged else "one-leg calls"
    print(f"{kind} streamed in converse mode to an echo app ({', '.join(args.protocols)}); {args.seconds:g} s "
          f"window; {args.repeats} round(s), ranges min-max; {pinning}")
    for name, why in skipped.items():
        print(f"{name}: skipped, {why}")
    for line in table(runs, args):
        print(line)
    print(f"ranges over the clean runs (other processes under {NOISY_OTHER:g} % of a core in the window, the server "
          f"waiting for its core under {NOISY_WAIT:g} % of it); * = none was clean, every completed run shown; "
          "every run is in the JSON line below")
    print(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/streams.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": {"nproc": os.cpu_count(), "model": cpu_model(), "python": platform.python_version()},
        "pinning": pinning,
        "skipped": skipped,
        "runs": runs,
        "problems": problems,
    }))
    for problem in problems:
        log(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
