#!/usr/bin/env python3
"""
Load and soak generator for audiohangup: many Asterisk legs in real time.

Starts ``twistd -n audiohangup`` on ephemeral loopback ports (as
``bench/bridge.py`` does: the server, worker, ``/proc`` and machine-load
helpers the two share are in ``bench/common.py``), then plays, from
``--client-procs`` worker processes:

- ``--sessions`` held calls: a visitor and a resident leg sharing a call id,
  both sending 20 ms frames for the whole run (sequence number and
  ``time.monotonic()`` stamp in the payload), closed with a FIN at the end;
- ``--churn`` calls per second opened on top of them, each living a random
  ``--lifetime`` and ended as ``--mix`` says: ``api`` (``POST
  /calls/{id}/hangup?role=...&wait=true``; the leg then resets or closes right
  after reading ``00 00 00``, as Asterisk does), ``reset`` (a client RST on one
  leg) or ``close`` (a client FIN on one leg);
- with ``--faults P``, a share P of the churned calls ends with a fault
  instead: a reset in the middle of a frame, a partial frame then FIN, a leg
  that goes silent (the server must time it out: start it with
  ``--server-args "--idle-timeout 5"``), a second UUID frame (protocol error),
  or a bare connection sending half a UUID frame (the server's UUID timeout).

It measures bridge latency (stamp on one leg to receipt on the other), frames
lost or late, hangup latency (API request to ``00 00 00`` at the client, and
to the ``?wait=true`` answer, i.e. the leg gone), how long the server takes to
hang up the other leg of a call, the server's CPU share, file descriptors and
resident memory sampled through the run, and leaks after it: ``GET /health``
legs back to 0, open descriptors back to the idle baseline, legs started
equal to legs ended in ``/metrics``, no ``Traceback``/``Unhandled`` in the
server's log. One JSON object on stdout, progress on stderr.

A benchmark, not a test. It talks only to 127.0.0.1, every step is bounded in
time and count, and the server is always stopped (SIGTERM, then SIGKILL).

Run from the repository root after ``pip install .``::

    python bench/load.py --sessions 500 --seconds 60 --spread --churn 5
    python bench/load.py --sessions 50 --churn 50 --seconds 210 --spread
    python bench/load.py --sessions 100 --churn 20 --seconds 600 --spread --faults 0.2 \\
        --server-args "--idle-timeout 5"
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter, defaultdict
from importlib import metadata
from typing import Any

# This script's directory (sys.path[0] when it is run as a script) holds common.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Shared with bench/bridge.py: frame format, server wrapper, workers, /proc and machine-load helpers.
import common
from common import FRAME_SECONDS, MAGIC, PADDING, PAYLOAD_BYTES, ROLES, STAMP, log

READY_TIMEOUT = 90.0
#: How long a churned call may take to be gone once its ending began (plus the idle timeout).
END_TIMEOUT = 10.0
#: A client more than this far behind its 20 ms schedule skips ahead instead of bursting.
MAX_CATCH_UP = 0.100
#: Other processes' CPU (% of a core) over the window, and in any one sample, that makes a run noisy.
NOISY_MEAN = 10.0
NOISY_SAMPLE = 30.0
HANGUP_SENT = re.compile(r" hangup sent \(cause (\w+)\)")
TROUBLE = ("Traceback", "Unhandled", " failed")
MIX_KINDS = ("api", "reset", "close")
FAULT_KINDS = ("reset_mid_frame", "partial_close", "silent", "protocol_error", "half_uuid")
#: Bytes of a 320-byte payload sent before a mid-frame fault.
PARTIAL_PAYLOAD = 100
SLIN_HEADER = common.HEADER.pack(0x10, PAYLOAD_BYTES)
#: Calls a worker numbers: its number times this, plus its own count.
INDEX_STRIDE = 10_000_000

common.set_log_name("load")


# ---------------------------------------------------------------------------
# A compact histogram of microseconds: workers ship it, the orchestrator merges it.
# ---------------------------------------------------------------------------


class Histogram:
    """10 us buckets up to 100 ms, then 1 ms buckets; exact count, sum and max."""

    FINE_US = 10
    FINE_LIMIT_US = 100_000

    def __init__(self) -> None:
        self.fine = [0] * (self.FINE_LIMIT_US // self.FINE_US)
        self.coarse: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.max = 0

    def add(self, us: int) -> None:
        if us < 0:
            us = 0
        if us < 100_000:
            self.fine[us // 10] += 1
        else:
            ms = us // 1000
            self.coarse[ms] = self.coarse.get(ms, 0) + 1
        self.count += 1
        self.total += us
        if us > self.max:
            self.max = us

    def to_json(self) -> dict[str, Any]:
        return {
            "fine": {str(i): c for i, c in enumerate(self.fine) if c},
            "coarse": {str(ms): c for ms, c in self.coarse.items()},
            "count": self.count, "total": self.total, "max": self.max,
        }

    def merge_json(self, data: dict[str, Any]) -> None:
        for i, c in data["fine"].items():
            self.fine[int(i)] += c
        for ms, c in data["coarse"].items():
            self.coarse[int(ms)] = self.coarse.get(int(ms), 0) + c
        self.count += data["count"]
        self.total += data["total"]
        self.max = max(self.max, data["max"])

    def above(self, us: int) -> int:
        """How many values are at or above C{us} (to the bucket's resolution)."""
        if us >= self.FINE_LIMIT_US:
            return sum(c for ms, c in self.coarse.items() if ms * 1000 >= us)
        return sum(self.fine[us // self.FINE_US:]) + sum(self.coarse.values())

    def quantile_us(self, q: float) -> float | None:
        """Nearest-rank quantile, as the middle of its bucket (never above the max)."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self.fine):
            seen += c
            if seen >= rank:
                return min(i * self.FINE_US + self.FINE_US / 2, self.max)
        for ms in sorted(self.coarse):
            seen += self.coarse[ms]
            if seen >= rank:
                return min(ms * 1000 + 500, self.max)
        return float(self.max)

    def summary_ms(self) -> dict[str, Any]:
        return {
            "p50": common.ms_from_us(self.quantile_us(0.50)),
            "p99": common.ms_from_us(self.quantile_us(0.99)),
            "p999": common.ms_from_us(self.quantile_us(0.999)),
            "max": common.ms_from_us(self.max if self.count else None),
            "mean": common.ms_from_us(self.total / self.count if self.count else None),
            "samples": self.count,
        }


# ---------------------------------------------------------------------------
# Worker: held and churned calls on one Twisted reactor.
# ---------------------------------------------------------------------------


def worker_main(config_path: str, result_path: str) -> int:
    with open(config_path) as f:
        cfg = json.load(f)

    from twisted.internet import reactor
    from twisted.internet.defer import DeferredSemaphore
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    from audiohangup.wire import encode_uuid

    # Twisted's own pool transport lacks abortConnection; readBody warns about it on every answer.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message="Using readBody")
    rng = random.Random(cfg["seed"])
    monotonic = time.monotonic
    stamp_pack = STAMP.pack
    stamp_unpack = STAMP.unpack_from
    slin = 0x10
    reset_prob: float = cfg["reset_after_hangup"]
    late_us = int(cfg["late_ms"] * 1000)
    ports = (cfg["visitor_port"], cfg["resident_port"])
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    pool.retryAutomatically = False
    agent = Agent(reactor, pool=pool)
    api_headers = Headers({b"authorization": [f"Bearer {cfg['api_token']}".encode()]}) if cfg["api_token"] else None
    end_timeout = END_TIMEOUT + cfg["idle_timeout"]

    class Run(common.WorkerRun):
        def __init__(self) -> None:
            super().__init__(cfg, reactor)
            self.slots = common.SPREAD_SLOTS if cfg["spread"] else 1
            self.slot_s = FRAME_SECONDS / self.slots
            self.groups: list[dict[Leg, None]] = [{} for _ in range(self.slots)]
            self.next_slot = 0
            self.origin = 0.0
            self.k = 0
            self.held: list[Call] = []
            self.open_calls: set[Any] = set()
            self.call_count = 0
            self.latency = Histogram()
            self.tick_lag = Histogram()
            self.counts: Counter[str] = Counter()
            self.endings_opened: Counter[str] = Counter()
            self.endings_done: Counter[str] = Counter()
            self.force_closed: Counter[str] = Counter()
            self.api_to_frame_us: list[int] = []
            self.api_to_gone_us: list[int] = []
            self.api_status: Counter[str] = Counter()
            self.api_reasons: Counter[str] = Counter()
            self.session_end_us: dict[str, list[int]] = defaultdict(list)
            self.idle_hangup_us: list[int] = []
            self.uuid_timeout_us: list[int] = []
            self.notes: dict[str, list[str]] = defaultdict(list)
            self.churn_first = self.churn_interval = 0.0
            self.churn_opened = 0

        def note(self, what: str, detail: str) -> None:
            """Count a problem and keep its first few details."""
            self.counts[what] += 1
            if len(self.notes[what]) < 5:
                self.notes[what].append(detail)

        def assign_slot(self) -> int:
            slot = self.next_slot
            self.next_slot = (slot + 1) % self.slots
            return slot

        # setup

        def begin(self) -> None:
            self.origin = monotonic() + 0.01
            reactor.callLater(0.01, self.tick)
            semaphore = DeferredSemaphore(common.CONNECT_CONCURRENCY)
            for index, call_id in cfg["held"]:
                call = Call(self, index, uuid.UUID(call_id), "held", 0.0, 0)
                self.held.append(call)
                for role_id in (0, 1):
                    semaphore.run(call.connect, role_id)
            self.leg_heard()

        def leg_heard(self) -> None:
            if self.phase == "setup" and all(call.heard() for call in self.held):
                self.ready()

        def started(self, now: float) -> None:
            if cfg["churn_rate"] > 0:
                self.churn_interval = 1.0 / cfg["churn_rate"]
                self.churn_first = self.start + cfg["churn_offset"] * self.churn_interval
                reactor.callLater(max(0.0, self.churn_first - now), self.churn)

        # sending: deadlines from one origin, so no drift; a late client catches
        # up (its frames go out late and bunched; their stamps say when), unless
        # it is more than MAX_CATCH_UP behind, when it skips ahead and counts it.

        def tick(self) -> None:
            if self.phase == "done":
                return
            begin = monotonic()
            deadline = self.origin + self.k * self.slot_s
            in_window = self.t0 <= deadline < self.t1
            if in_window:
                self.tick_lag.add(int((begin - deadline) * 1e6))
            group = self.groups[self.k % self.slots]
            if group:
                t0, t1 = self.t0, self.t1
                for leg in tuple(group):
                    sent = monotonic()
                    leg.send(SLIN_HEADER + stamp_pack(MAGIC, leg.index, leg.role_id, leg.seq, sent) + PADDING)
                    leg.seq += 1
                    if t0 <= sent < t1:
                        leg.sent_window += 1
            self.k += 1
            end = monotonic()
            behind = end - (self.origin + self.k * self.slot_s)
            if behind > MAX_CATCH_UP:
                skipped = int(behind / self.slot_s)
                self.k += skipped
                if in_window:
                    self.counts["ticks_skipped"] += skipped
            following = self.origin + self.k * self.slot_s
            reactor.callLater(max(0.0, following - end), self.tick)

        # churn: calls opened at an even rate until the window ends

        def churn(self) -> None:
            if self.phase != "running":
                return
            now = monotonic()
            while True:
                due = self.churn_first + self.churn_opened * self.churn_interval
                if due > now or due >= self.t1:
                    break
                self.churn_opened += 1
                self.open_churn_call()
            due = self.churn_first + self.churn_opened * self.churn_interval
            if due < self.t1:
                reactor.callLater(max(0.0, due - monotonic()), self.churn)

        def open_churn_call(self) -> None:
            self.call_count += 1
            index = cfg["index_base"] + self.call_count
            if rng.random() < cfg["faults"]:
                ending = rng.choice(cfg["fault_kinds"])
            else:
                ending = rng.choices(cfg["mix_kinds"], cfg["mix_weights"])[0]
            self.endings_opened[ending] += 1
            lifetime = rng.uniform(*cfg["lifetime"])
            if ending == "half_uuid":
                probe = Probe(self)
                self.open_calls.add(probe)
                probe.open()
                return
            call = Call(self, index, uuid.uuid4(), ending, lifetime, rng.randrange(2))
            self.open_calls.add(call)
            call.open()

        def call_done(self, call: Any) -> None:
            if call in self.open_calls:
                self.open_calls.discard(call)
                self.endings_done[call.ending] += 1
            self.check_done()

        # ending

        def close_calls(self) -> None:
            for call in self.held:
                call.begin_end()
            reactor.callLater(
                cfg["lifetime"][1] + end_timeout + 5.0,
                lambda: self.finish_now("calls still open at the end of the run"),
            )
            self.check_done()

        def check_done(self) -> None:
            if self.phase == "closing" and not self.open_calls and all(call.done for call in self.held):
                self.finish()

        def finish_now(self, why: str) -> None:
            if self.finished:
                return
            for call in list(self.open_calls) + [c for c in self.held if not c.done]:
                self.note("open_at_finish", f"{call.ending} {getattr(call, 'call_id', '-')}")
                call.force()
            reactor.callLater(0.5, self.finish)

        def shut_down(self) -> None:
            closing = pool.closeCachedConnections()
            closing.addBoth(lambda _: reactor.callLater(0, reactor.stop))
            reactor.callLater(2.0, lambda: reactor.running and reactor.stop())

        def write_result(self) -> None:
            counts = Counter(self.counts)
            held_rx_window = 0
            held_legs = 0
            for call in self.held:
                for leg in call.legs:
                    if leg is None:
                        continue
                    held_legs += 1
                    peer = call.legs[1 - leg.role_id]
                    held_rx_window += leg.rx_window_by_receipt
                    counts["held_silence_in_window"] += leg.silence_window
                    if peer is not None:
                        counts["held_lost_tail"] += max(0, peer.sent_window - leg.rx_window)
            result = {
                "errors": self.errors,
                "held_legs": held_legs,
                "held_rx_window": held_rx_window,
                "latency": self.latency.to_json(),
                "tick_lag": self.tick_lag.to_json(),
                "counts": dict(counts),
                "endings_opened": dict(self.endings_opened),
                "endings_done": dict(self.endings_done),
                "force_closed": dict(self.force_closed),
                "api_to_frame_us": self.api_to_frame_us,
                "api_to_gone_us": self.api_to_gone_us,
                "api_status": dict(self.api_status),
                "api_reasons": dict(self.api_reasons),
                "session_end_us": dict(self.session_end_us),
                "idle_hangup_us": self.idle_hangup_us,
                "uuid_timeout_us": self.uuid_timeout_us,
                "notes": dict(self.notes),
                "cpu": self.cpu_used(),
            }
            with open(result_path, "w") as f:
                json.dump(result, f)

    run = Run()

    class Call:
        """Two legs sharing a call id, and how the call is to end."""

        def __init__(self, run: Run, index: int, call_id: uuid.UUID, ending: str, lifetime: float,
                     target: int) -> None:
            self.run = run
            self.index = index
            self.call_id = str(call_id)
            self.uuid_frame = encode_uuid(call_id)
            self.ending = ending
            self.lifetime = lifetime
            self.target = target  # role id the ending acts on
            self.legs: list[Leg | None] = [None, None]
            self.opened_at = monotonic()
            self.end_started: float | None = None
            self.done = False
            self.api_pending = False
            self.deadline: Any = None

        def heard(self) -> bool:
            return all(leg is not None and leg.heard for leg in self.legs)

        def connect(self, role_id: int) -> Any:
            leg = Leg(self, role_id)
            self.legs[role_id] = leg
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports[role_id], timeout=10)
            d = connectProtocol(endpoint, leg)
            d.addErrback(self.connect_failed, leg)
            return d

        def connect_failed(self, failure: Any, leg: Leg) -> None:
            leg.gone = True
            if self.ending == "held":
                self.run.fail(f"held leg {self.index}/{ROLES[leg.role_id]} could not connect: {failure.value!r}")
                return
            self.run.note("connect_errors", repr(failure.value))
            self.leg_lost(leg, None)

        def open(self) -> None:
            self.connect(0)
            reactor.callLater(rng.uniform(0.0, cfg["join_delay"]), self.connect, 1)
            reactor.callLater(self.lifetime, self.begin_end)

        def begin_end(self, attempts: int = 0) -> None:
            if self.done or self.end_started is not None:
                return
            if not self.heard():
                # Both legs must be live at the server before the ending means anything.
                if attempts < 50 and not any(leg is not None and leg.gone for leg in self.legs):
                    reactor.callLater(0.1, self.begin_end, attempts + 1)
                else:
                    self.run.note("not_live_at_end", f"{self.ending} {self.call_id}")
                    self.force()
                return
            now = monotonic()
            self.end_started = now
            self.deadline = reactor.callLater(end_timeout, self.timed_out)
            ending = self.ending
            leg = self.legs[self.target]
            assert leg is not None
            if ending == "held":
                self.legs[0].fin()
            elif ending == "api":
                self.api_hangup(now)
            elif ending == "reset":
                leg.rst()
            elif ending == "close":
                leg.fin()
            elif ending == "reset_mid_frame":
                leg.stop_sending()
                leg.send(SLIN_HEADER + PADDING[:PARTIAL_PAYLOAD])
                leg.rst()
            elif ending == "partial_close":
                leg.stop_sending()
                leg.send(SLIN_HEADER + PADDING[:PARTIAL_PAYLOAD])
                leg.fin()
            elif ending == "silent":
                leg.stop_sending()
            elif ending == "protocol_error":
                leg.stop_sending()
                leg.send(self.uuid_frame)
            else:
                raise AssertionError(ending)

        def api_hangup(self, requested: float) -> None:
            role = ROLES[self.target]
            url = f"http://127.0.0.1:{cfg['http_port']}/calls/{self.call_id}/hangup?role={role}&wait=true"
            self.api_pending = True
            d = agent.request(b"POST", url.encode(), api_headers)
            d.addCallback(lambda response: readBody(response).addCallback(lambda body: (response.code, body)))
            d.addCallbacks(self.api_answered, self.api_failed, callbackArgs=(requested,))
            d.addBoth(self.api_done)

        def api_done(self, _: Any) -> None:
            self.api_pending = False
            self.check_done()

        def api_answered(self, answer: tuple[int, bytes], requested: float) -> None:
            now = monotonic()
            code, body = answer
            self.run.api_status[str(code)] += 1
            if code != 200:
                self.run.note("api_errors", f"{code} {body[:200]!r}")
                return
            self.run.api_to_gone_us.append(int((now - requested) * 1e6))
            try:
                for leg in json.loads(body)["legs"]:
                    self.run.api_reasons[f"{leg['result']}/{leg.get('reason')}"] += 1
            except (ValueError, KeyError, TypeError):
                self.run.note("api_errors", f"unreadable answer {body[:200]!r}")

        def api_failed(self, failure: Any) -> None:
            self.run.api_status["failed"] += 1
            self.run.note("api_errors", repr(failure.value))

        def hangup_heard(self, leg: Leg, now: float) -> None:
            started = self.end_started
            if started is None:
                self.run.note("unexpected_hangups", f"{self.ending} {self.call_id} {ROLES[leg.role_id]}")
                return
            us = int((now - started) * 1e6)
            if leg.role_id == self.target and self.ending == "api":
                self.run.api_to_frame_us.append(us)
            elif leg.role_id == self.target and self.ending == "silent":
                self.run.idle_hangup_us.append(us)
            elif leg.role_id != self.target or self.ending == "held":
                self.run.session_end_us[self.ending].append(us)
            else:
                self.run.note("unexpected_hangups", f"{self.ending} {self.call_id} {ROLES[leg.role_id]} (target)")

        def leg_lost(self, leg: Leg, reason: Any) -> None:
            if (self.end_started is None and not leg.closed_by_us and leg.hangup_at is None
                    and reason is not None):
                what = "held_legs_lost" if self.ending == "held" and self.run.phase != "closing" else "unexpected_closes"
                self.run.note(what, f"{self.ending} {self.call_id} {ROLES[leg.role_id]}: {reason.value!r}")
            self.check_done()

        def check_done(self) -> None:
            """Done once both legs are gone and the API answer, if one is due, is in."""
            if (not self.done and not self.api_pending and self.legs[1] is not None
                    and all(leg is None or leg.gone for leg in self.legs)):
                self.done = True
                if self.deadline is not None and self.deadline.active():
                    self.deadline.cancel()
                self.run.call_done(self)

        def timed_out(self) -> None:
            if not self.done:
                self.run.force_closed[self.ending] += 1
                self.run.note("force_closed", f"{self.ending} {self.call_id}: legs still open or API "
                              f"unanswered {end_timeout:g} s after the ending began")
                self.api_pending = False
                self.force()

        def force(self) -> None:
            for leg in self.legs:
                if leg is not None and not leg.gone:
                    if leg.transport is not None:
                        leg.rst()
                    else:
                        leg.gone = True  # still connecting: connectionMade aborts it
            if self.legs[1] is None:
                # The resident's connect is still scheduled: the call ends without it.
                self.legs[1] = Leg(self, 1)
                self.legs[1].gone = True
            self.api_pending = False
            self.check_done()

    class Leg(common.LegIO, Protocol):
        def __init__(self, call: Call, role_id: int) -> None:
            self.call = call
            self.run = call.run
            self.index = call.index
            self.role_id = role_id
            self.peer_role = 1 - role_id
            self.held = call.ending == "held"
            self.slot = call.run.assign_slot()
            self.seq = 0
            self.sent_window = 0
            self.expected = -1
            self.rx_window = 0            # bridged frames stamped in the window that arrived
            self.rx_window_by_receipt = 0  # bridged frames received in the window
            self.silence_window = 0
            self.gone = False
            self.sending = False
            self.hangup_at: float | None = None
            self.closed_by_us: str | None = None

        def connectionMade(self) -> None:
            if self.call.done or self.gone:
                self.transport.abortConnection()
                return
            self.transport.setTcpNoDelay(True)
            self.socket = self.transport.getHandle()
            # Straight to the socket, like the audio: transport.write would send
            # the UUID only after the first frames.
            self.send(self.call.uuid_frame)
            self.sending = True
            self.run.groups[self.slot][self] = None

        def fell_back_to_buffering(self) -> None:
            self.run.counts["buffered_writes"] += 1

        def stop_sending(self) -> None:
            if self.sending:
                self.sending = False
                self.run.groups[self.slot].pop(self, None)

        def fin(self) -> None:
            """
            A clean close: FIN, then read and discard until the server closes.
            (Closing the socket outright would send a RST on top whenever
            frames from the server sit unread in it, which is most of the time.)
            """
            self.stop_sending()
            if self.closed_by_us is None and not self.gone:
                self.closed_by_us = "fin"
                self.transport.loseWriteConnection()

        def rst(self) -> None:
            self.stop_sending()
            if self.closed_by_us != "rst" and not self.gone:
                self.closed_by_us = "rst"
                try:
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                self.transport.abortConnection()

        def dataReceived(self, data: bytes) -> None:
            now = monotonic()
            run = self.run
            if self.hangup_at is not None:
                run.counts["bytes_after_hangup"] += len(data)
                return
            t0, t1 = run.t0, run.t1
            in_window = t0 <= now < t1
            for kind, length, buffer, start in self.frames(data):
                if kind == slin:
                    if length == PAYLOAD_BYTES and buffer[start:start + 4] == MAGIC:
                        _, index, role_id, seq, sent = stamp_unpack(buffer, start)
                        if index != self.index or role_id != self.peer_role:
                            run.counts["misrouted"] += 1
                            continue
                        expected = self.expected
                        if seq >= expected:
                            if expected >= 0:
                                run.counts["lost_gaps"] += seq - expected
                            self.expected = seq + 1
                        else:
                            run.counts["out_of_order"] += 1
                        if in_window:
                            self.rx_window_by_receipt += 1
                        if t0 <= sent < t1:
                            self.rx_window += 1
                            run.counts["received_window"] += 1
                            us = int((now - sent) * 1e6)
                            run.latency.add(us)
                            if us > late_us:
                                run.counts["late"] += 1
                    elif in_window and self.held:
                        self.silence_window += 1
                elif kind == 0x00:
                    if length:
                        run.counts["other_frames"] += 1
                    self.hangup_at = now
                    after = len(buffer) - (start + length)
                    if after > 0:
                        run.counts["bytes_after_hangup"] += after
                    self.buffer = b""
                    self.stop_sending()
                    self.call.hangup_heard(self, now)
                    # Reply as Asterisk does: a reset right after 00 00 00, or a clean close.
                    if self.closed_by_us is not None:
                        run.counts["hangup_while_closing"] += 1
                    elif rng.random() < reset_prob:
                        run.counts["replied_rst"] += 1
                        self.rst()
                    else:
                        run.counts["replied_fin"] += 1
                        self.fin()
                    return
                else:
                    run.counts["other_frames"] += 1

        def heard_first_frame(self) -> None:
            if self.held:
                self.run.leg_heard()

        def connectionLost(self, reason: Any) -> None:
            self.gone = True
            self.stop_sending()
            self.call.leg_lost(self, reason)

    class Probe(Protocol):
        """A connection that sends half a UUID frame and waits for the server's UUID timeout."""

        ending = "half_uuid"

        def __init__(self, run: Run) -> None:
            self.run = run
            self.opened_at = 0.0
            self.gone = False
            self.done = False
            self.transport: Any = None

        def open(self) -> None:
            self.deadline = reactor.callLater(cfg["uuid_timeout"] + end_timeout, self.timed_out)
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports[rng.randrange(2)], timeout=10)
            connectProtocol(endpoint, self).addErrback(self.failed)

        def failed(self, failure: Any) -> None:
            self.run.note("connect_errors", repr(failure.value))
            self.end()

        def connectionMade(self) -> None:
            self.opened_at = monotonic()
            self.transport.write(encode_uuid(uuid.uuid4())[:10])

        def dataReceived(self, data: bytes) -> None:
            self.run.counts["probe_bytes_received"] += len(data)

        def connectionLost(self, reason: Any) -> None:
            self.gone = True
            self.run.uuid_timeout_us.append(int((monotonic() - self.opened_at) * 1e6))
            self.end()

        def timed_out(self) -> None:
            if not self.gone:
                self.run.force_closed["half_uuid"] += 1
                self.run.note("force_closed", "half_uuid connection not closed by the server")
                self.force()

        def force(self) -> None:
            if self.transport is not None and not self.gone:
                self.transport.abortConnection()
            self.end()

        def end(self) -> None:
            if not self.done:
                self.done = True
                if self.deadline.active():
                    self.deadline.cancel()
                self.run.call_done(self)

    return run.serve(run.begin, READY_TIMEOUT, lambda: (
        f"not every held leg heard from the server within {READY_TIMEOUT:.0f} s"
    ))


# ---------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------


def process_cpu_table() -> dict[int, tuple[int, float]]:
    """pid: (ppid, utime + stime in seconds) of every user process (kernel threads left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = common.proc_stat_fields(name)
        except (OSError, IndexError):
            continue
        if int(fields[6]) & 0x00200000:  # PF_KTHREAD
            continue
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def others_cpu_seconds(before: dict[int, tuple[int, float]], after: dict[int, tuple[int, float]]) -> float:
    """
    CPU seconds that processes outside this benchmark's own tree (this process,
    the server, the workers, py-spy) used between two tables. A process new in
    C{after} counts whole; one gone by then loses its last stretch, so a short
    test run is undercounted rather than missed.
    """
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in after.items():
        children[ppid].append(pid)
    ours: set[int] = set()
    stack = [os.getpid()]
    while stack:
        pid = stack.pop()
        ours.add(pid)
        stack.extend(children[pid])
    total = 0.0
    for pid, (_, cpu) in after.items():
        if pid not in ours:
            total += cpu - before.get(pid, (0, 0.0))[1]
    return total


class Sampler:
    """Every few seconds: the server's RSS, descriptors, legs and CPU, the clients' CPU, the machine's other load."""

    def __init__(self, server: common.Server, workers: list[common.Worker], origin: float) -> None:
        self.server = server
        self.workers = workers
        self.origin = origin
        self.samples: list[dict[str, Any]] = []
        self.wakeups_us: list[int] = []
        self._clients = [0.0] * len(workers)
        self.others_seconds: dict[str, float] = {}
        self.others_wall: dict[str, float] = {}
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        for i, worker in enumerate(self.workers):
            seconds = worker.cpu_seconds()  # an exited worker keeps its last reading
            if not math.isnan(seconds):
                self._clients[i] = seconds
        return {
            "wall": time.monotonic(),
            "server": self.server.cpu_seconds(),
            "clients": sum(self._clients),
            "own": common.own_cpu(),
            "busy": common.machine_busy_seconds() + common.machine_busy_seconds(interrupts=True),
            "table": process_cpu_table(),
        }

    def sample(self, phase: str) -> None:
        now = self._read()
        last, self._last = self._last, now
        wall = now["wall"] - last["wall"]
        server_cpu = 100.0 * (now["server"] - last["server"]) / wall
        clients_cpu = 100.0 * (now["clients"] - last["clients"]) / wall
        own = 100.0 * (now["own"] - last["own"]) / wall
        busy = 100.0 * (now["busy"] - last["busy"]) / wall
        others = others_cpu_seconds(last["table"], now["table"])
        self.others_seconds[phase] = self.others_seconds.get(phase, 0.0) + others
        self.others_wall[phase] = self.others_wall.get(phase, 0.0) + wall
        rss = self.server.rss_kib()
        self.samples.append({
            "t": round(now["wall"] - self.origin, 1),
            "phase": phase,
            "legs": self.server.health_legs(),
            "rss_mib": round(rss / 1024.0, 1) if rss is not None else None,
            "fds": self.server.fd_count(),
            "server_cpu": round(server_cpu, 1),
            "clients_cpu": round(clients_cpu, 1),
            "other_cpu": round(100.0 * others / wall, 1),
            "other_cpu_procstat": round(busy - server_cpu - clients_cpu - own, 1),
        })

    def run_until(self, until: float, every: float, phase: Any, stop: Any = None) -> None:
        """Sample every C{every} s until C{until} (or C{stop()}), probing wake-ups in 10 ms sleeps between."""
        next_sample = self._last["wall"] + every
        while (now := time.monotonic()) < until:
            if stop is not None and stop():
                return
            if now >= next_sample:
                self.sample(phase(now))
                next_sample += every
                continue
            time.sleep(0.010)
            self.wakeups_us.append(int((time.monotonic() - now - 0.010) * 1e6))


def parse_weights(text: str, allowed: tuple[str, ...], option: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in allowed:
            raise ValueError(f"{option}: {name!r} is not one of {', '.join(allowed)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"{option}: {part!r} is not name=number") from None
        if weights[name] < 0:
            raise ValueError(f"{option}: negative weight in {part!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{option}: the weights add up to nothing")
    return weights


def option_value(argv: list[str], name: str) -> str | None:
    """The value of C{--name V} or C{--name=V} in a server argv, the last one winning."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def settle_fds(server: common.Server, limit: float = 5.0) -> int:
    """The server's descriptor count once it has stopped changing (two equal reads 0.5 s apart)."""
    deadline = time.monotonic() + limit
    previous = server.fd_count()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = server.fd_count()
        if current == previous:
            return current
        previous = current
    return previous


def metrics_totals(text: str) -> dict[str, Any]:
    started = ended = 0.0
    without_leg: Counter[str] = Counter()
    gc_stats: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("audiohangup_legs_started_total"):
            started += float(line.rsplit(" ", 1)[1])
        elif line.startswith("audiohangup_legs_ended_total"):
            ended += float(line.rsplit(" ", 1)[1])
        elif line.startswith("audiohangup_gc_pause_seconds_"):
            name, value = line.rsplit(" ", 1)
            gc_stats[name] = float(value)
        elif line.startswith("audiohangup_connections_without_leg_total"):
            match = re.search(r'reason="(\w+)"', line)
            without_leg[match.group(1) if match else "?"] += float(line.rsplit(" ", 1)[1])
    return {"legs_started": int(started), "legs_ended": int(ended),
            "connections_without_leg": {k: int(v) for k, v in without_leg.items()},
            "gc": gc_summary(gc_stats)}


def gc_summary(stats: dict[str, float]) -> dict[str, Any]:
    """Collections, seconds paused, and pauses over 10 ms, per generation (audiohangup_gc_pause_seconds)."""
    summary: dict[str, Any] = {}
    for generation in ("0", "1", "2"):
        label = f'generation="{generation}"'
        count = stats.get(f"audiohangup_gc_pause_seconds_count{{{label}}}", 0.0)
        total = stats.get(f"audiohangup_gc_pause_seconds_sum{{{label}}}", 0.0)
        under = stats.get(f'audiohangup_gc_pause_seconds_bucket{{{label},le="0.01"}}', count)
        summary[generation] = {"collections": int(count), "seconds": round(total, 4), "over_10ms": int(count - under)}
    return summary


def thirds(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean RSS of the middle and last thirds of the window's samples."""
    values = [s["rss_mib"] for s in samples if s["phase"] == "window" and s["rss_mib"] is not None]
    if len(values) < 3:
        return None
    n = len(values)
    middle = values[n // 3: 2 * n // 3]
    last = values[2 * n // 3:]
    mid_mean = sum(middle) / len(middle)
    last_mean = sum(last) / len(last)
    return {
        "first_mib": values[0],
        "middle_third_mean_mib": round(mid_mean, 1),
        "last_third_mean_mib": round(last_mean, 1),
        "growth_mib": round(last_mean - mid_mean, 1),
        "growth_percent": round(100.0 * (last_mean - mid_mean) / mid_mean, 2),
        "max_mib": max(values),
    }


def orchestrate(args: argparse.Namespace, server: common.Server | None = None) -> dict[str, Any]:
    """
    One run against C{server}, not yet started; by default ``twistd -n
    audiohangup`` with C{--server-args}. ``bench/peers.py`` passes servers
    started otherwise (pinned to a core, or the reference servers), so they
    are measured by the same load and the same counters.
    """
    if args.wait_idle:
        common.wait_idle(args.wait_idle, stretch=args.idle_stretch)
    server_args = shlex.split(args.server_args)
    try:
        idle_timeout = float(option_value(server_args, "--idle-timeout") or 0)
        uuid_timeout = float(option_value(server_args, "--uuid-timeout") or 5.0)
    except ValueError as error:
        raise RuntimeError(f"--server-args: {error}") from None
    api_token = option_value(server_args, "--api-token") or os.environ.get("AUDIOHANGUP_API_TOKEN")
    fault_kinds = [kind for kind in args.fault_kinds.split(",") if kind]
    for kind in fault_kinds:
        if kind not in FAULT_KINDS:
            raise RuntimeError(f"--fault-kinds: {kind!r} is not one of {', '.join(FAULT_KINDS)}")
    if args.faults and "silent" in fault_kinds and not idle_timeout:
        log("no --idle-timeout in --server-args: the 'silent' fault is left out")
        fault_kinds.remove("silent")
    if args.faults and not fault_kinds:
        raise RuntimeError("--faults needs at least one fault kind")
    mix = parse_weights(args.mix, MIX_KINDS, "--mix")
    server = common.Server(server_args) if server is None else server
    workers: list[common.Worker] = []
    results: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    wakeups: list[int] = []
    leak: dict[str, Any] = {}
    metrics: dict[str, Any] | None = None
    server_died = None
    lines: list[str] = []
    directory: str | None = None
    try:
        server.start()
        fds_idle = settle_fds(server)
        rss_idle = server.rss_kib()
        sessions = [(index, str(uuid.uuid4())) for index in range(args.sessions)]
        lifetime_max = args.lifetime[1]
        run_length = args.warmup + args.seconds + args.drain + lifetime_max + END_TIMEOUT + idle_timeout
        directory = tempfile.mkdtemp(prefix="bench-load-")
        for number in range(args.client_procs):
            held = [(number * INDEX_STRIDE + index, call_id) for index, call_id in sessions[number::args.client_procs]]
            workers.append(common.Worker(os.path.abspath(__file__), number, {
                "held": held,
                "index_base": number * INDEX_STRIDE + args.sessions,
                "visitor_port": server.ports["audiosocket-visitor"],
                "resident_port": server.ports["audiosocket-resident"],
                "http_port": server.ports["http"],
                "api_token": api_token,
                "warmup": args.warmup,
                "seconds": args.seconds,
                "drain": args.drain,
                "spread": args.spread,
                "churn_rate": args.churn / args.client_procs,
                "churn_offset": number / args.client_procs,
                "lifetime": list(args.lifetime),
                "join_delay": args.join_delay,
                "mix_kinds": list(mix),
                "mix_weights": list(mix.values()),
                "faults": args.faults,
                "fault_kinds": fault_kinds,
                "reset_after_hangup": args.reset_after_hangup,
                "late_ms": args.late_ms,
                "idle_timeout": idle_timeout,
                "uuid_timeout": uuid_timeout,
                "seed": args.seed * 1000 + number,
                "budget": READY_TIMEOUT + 30.0 + run_length + 30.0,
            }, directory))
        common.start_workers(workers, READY_TIMEOUT)
        health_before = server.health_legs()
        if health_before != 2 * args.sessions:
            raise RuntimeError(f"server reports {health_before} legs, not {2 * args.sessions}")
        log(f"{2 * args.sessions} held legs live in {len(workers)} client process(es), server pid {server.pid}; "
            f"churn {args.churn:g}/s; {args.warmup:g} s warm-up, {args.seconds:g} s measured")
        start = common.go_workers(workers)
        t0 = start + args.warmup
        t1 = t0 + args.seconds
        every = args.sample_every or (2.0 if args.seconds <= 120 else 5.0)
        sampler = Sampler(server, workers, t0)
        sampler.run_until(t0, every, lambda now: "warmup")
        sampler.sample("warmup")
        profiler = None
        if args.py_spy:
            # Profiling costs the server time (py-spy stops it to sample): not for the figures.
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--rate", "500", "--nonblocking", "--format", "raw",
                 "--duration", str(int(min(args.seconds, 20))), "--output", args.py_spy],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        split0 = server.cpu_split()
        cpu0, wall0, own0 = server.cpu_seconds(), time.monotonic(), common.own_cpu()
        busy0, irq0 = common.machine_busy_seconds(), common.machine_busy_seconds(interrupts=True)
        clients0 = [w.cpu_seconds() for w in workers]
        sampler.wakeups_us = []
        progress_every = max(every, 60.0)
        next_progress = t0 + progress_every
        while time.monotonic() < t1:
            sampler.run_until(min(t1, next_progress), every, lambda now: "window")
            if time.monotonic() >= next_progress and time.monotonic() < t1:
                last = sampler.samples[-1]
                log(f"{time.monotonic() - t0:.0f} s: legs {last['legs']}, rss {last['rss_mib']} MiB, "
                    f"fds {last['fds']}, server cpu {last['server_cpu']} %")
                next_progress += progress_every
        cpu1, wall1, own1 = server.cpu_seconds(), time.monotonic(), common.own_cpu()
        split1 = server.cpu_split()
        busy1, irq1 = common.machine_busy_seconds(), common.machine_busy_seconds(interrupts=True)
        clients1 = [w.cpu_seconds() for w in workers]
        rss_window_end = server.rss_kib()
        wakeups = sampler.wakeups_us
        sampler.sample("window")
        others_window = 100.0 * sampler.others_seconds.get("window", 0.0) / max(
            sampler.others_wall.get("window", 0.0), 1e-9)
        if profiler is not None:
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
        server_died = server.process.poll() if server.process is not None else None
        log("window over: closing the calls")
        sampler.run_until(time.monotonic() + run_length + 60.0, every, lambda now: "closing",
                          stop=lambda: all(w.process.poll() is not None for w in workers))
        results = [worker.result(30.0) for worker in workers]
        # Leaks: every client is gone now; the server must come back to idle.
        settle_start = time.monotonic()
        legs_after = fds_after = None
        while time.monotonic() - settle_start < args.leak_wait:
            legs_after = server.health_legs()
            fds_after = server.fd_count()
            if legs_after == 0 and fds_after <= fds_idle:
                break
            time.sleep(0.2)
        fds_after = settle_fds(server, 2.0) if fds_after is not None and fds_after <= fds_idle else server.fd_count()
        rss_after = server.rss_kib()
        leak = {
            "health_legs_after": legs_after,
            "fds_idle_baseline": fds_idle,
            "fds_after": fds_after,
            "leaked_fds": max(0, (fds_after or 0) - fds_idle),
            "settle_seconds": round(time.monotonic() - settle_start, 2),
            "rss_idle_mib": round(rss_idle / 1024.0, 1) if rss_idle else None,
            "rss_after_mib": round(rss_after / 1024.0, 1) if rss_after else None,
        }
        try:
            metrics = metrics_totals(server.get("/metrics", api_token).decode())
        except (OSError, ValueError) as error:
            metrics = {"error": repr(error)}
        sampler.sample("after")
        samples = sampler.samples
    finally:
        for worker in workers:
            worker.stop()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        exit_code = server.stop()
        lines = server.log_lines()
        if args.server_log:
            with open(args.server_log, "w") as f:
                f.write("\n".join(lines) + "\n")
        log(f"server stopped, exit code {exit_code}")
    common.raise_worker_errors(results)
    wall = wall1 - wall0
    server_cpu = 100.0 * (cpu1 - cpu0) / wall
    clients_cpu = [round(100.0 * (b - a) / wall, 1) for a, b in zip(clients0, clients1)]
    own = 100.0 * (own1 - own0) / wall
    busy = 100.0 * (busy1 - busy0) / wall
    irq = 100.0 * (irq1 - irq0) / wall
    other_procstat = busy + irq - server_cpu - sum(clients_cpu) - own
    return report(args, server, results, lines, samples, wakeups, leak, metrics, {
        "server_cpu": server_cpu, "clients_cpu": clients_cpu, "busy": busy, "irq": irq,
        "other": others_window, "other_procstat": other_procstat,
        "server_user": 100.0 * (split1[0] - split0[0]) / wall, "server_system": 100.0 * (split1[1] - split0[1]) / wall,
        "rss_window_end": rss_window_end, "health_before": health_before, "exit_code": exit_code,
        "server_died": server_died, "fault_kinds": fault_kinds, "mix": mix, "server_args": server_args,
    })


def report(
    args: argparse.Namespace,
    server: common.Server,
    results: list[dict[str, Any]],
    lines: list[str],
    samples: list[dict[str, Any]],
    wakeups: list[int],
    leak: dict[str, Any],
    metrics: dict[str, Any] | None,
    m: dict[str, Any],
) -> dict[str, Any]:
    latency = Histogram()
    tick_lag = Histogram()
    counts: Counter[str] = Counter()
    opened: Counter[str] = Counter()
    done: Counter[str] = Counter()
    forced: Counter[str] = Counter()
    api_status: Counter[str] = Counter()
    api_reasons: Counter[str] = Counter()
    api_frame: list[int] = []
    api_gone: list[int] = []
    session_end: dict[str, list[int]] = defaultdict(list)
    idle_hangup: list[int] = []
    uuid_timeouts: list[int] = []
    notes: dict[str, list[str]] = defaultdict(list)
    held_rx = held_legs = 0
    for r in results:
        latency.merge_json(r["latency"])
        tick_lag.merge_json(r["tick_lag"])
        counts.update(r["counts"])
        opened.update(r["endings_opened"])
        done.update(r["endings_done"])
        forced.update(r["force_closed"])
        api_status.update(r["api_status"])
        api_reasons.update(r["api_reasons"])
        api_frame += r["api_to_frame_us"]
        api_gone += r["api_to_gone_us"]
        for kind, values in r["session_end_us"].items():
            session_end[kind] += values
        idle_hangup += r["idle_hangup_us"]
        uuid_timeouts += r["uuid_timeout_us"]
        for what, details in r["notes"].items():
            notes[what] += details[: 5 - len(notes[what])]
        held_rx += r["held_rx_window"]
        held_legs += r["held_legs"]
    ends = Counter(match.group(1) for line in lines if (match := common.LEG_ENDED.search(line)))
    causes = Counter(match.group(1) for line in lines if (match := HANGUP_SENT.search(line)))
    troubles = [line for line in lines if any(word in line for word in TROUBLE)]
    window = [s for s in samples if s["phase"] == "window"]
    legs_seen = [s["legs"] for s in window if s["legs"] is not None]
    others = [s["other_cpu"] for s in window if s["other_cpu"] is not None]
    rx = counts["received_window"]
    lost_tail = counts["held_lost_tail"]
    lost = counts["lost_gaps"] + lost_tail
    api_frame_summary = common.summary_ms(api_frame)
    api_gone_summary = common.summary_ms(api_gone)
    bridge_summary = latency.summary_ms()
    churned = sum(opened.values())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "twisted": _version("twisted"),
            "audiohangup": _version("audiohangup"),
            "busy_percent": round(m["busy"], 1),
            "interrupts_percent": round(m["irq"], 1),
            "other_cpu_percent": round(m["other"], 1),
            "other_cpu_percent_max_sample": max(others) if others else None,
            "other_cpu_percent_procstat": round(m["other_procstat"], 1),
            "wakeup_delay_ms": {k: v for k, v in common.summary_ms(wakeups).items() if k in ("p50", "p99", "max")},
        },
        "config": {
            "sessions": args.sessions, "seconds": args.seconds, "warmup": args.warmup, "drain": args.drain,
            "spread": args.spread, "client_procs": len(results), "churn_per_s": args.churn,
            "lifetime_s": list(args.lifetime), "mix": m["mix"], "faults": args.faults,
            "fault_kinds": m["fault_kinds"], "reset_after_hangup": args.reset_after_hangup,
            "late_ms": args.late_ms, "server_args": m["server_args"], "seed": args.seed,
        },
        "legs_held": {
            "held_target": 2 * args.sessions,
            "health_before_run": m["health_before"],
            "health_in_window": {
                "min": min(legs_seen) if legs_seen else None,
                "mean": round(sum(legs_seen) / len(legs_seen), 1) if legs_seen else None,
                "max": max(legs_seen) if legs_seen else None,
            },
        },
        "bridge_latency_ms": bridge_summary,
        "frames": {
            "received_in_window": rx,
            "lost": lost,
            "lost_gaps": counts["lost_gaps"],
            "lost_tail_held": lost_tail,
            "late": counts["late"],
            "late_over_ms": args.late_ms,
            "misrouted": counts["misrouted"],
            "out_of_order": counts["out_of_order"],
            "other_frames": counts["other_frames"],
            "bytes_after_hangup": counts["bytes_after_hangup"],
            "held_bridged_per_leg_per_s": round(held_rx / held_legs / args.seconds, 2) if held_legs else None,
            "held_silence_inserted": counts["held_silence_in_window"],
        },
        "hangup_latency_ms": {
            "api_to_hangup_frame": api_frame_summary,
            "api_to_leg_gone": api_gone_summary,
            "api_status": dict(api_status),
            "api_answers": dict(api_reasons),
            "other_leg_hangup_after_ending": {k: common.summary_ms(v) for k, v in sorted(session_end.items())},
            "silent_leg_to_idle_hangup": common.summary_ms(idle_hangup),
            "half_uuid_to_server_close": common.summary_ms(uuid_timeouts),
        },
        "churn": {
            "calls_opened": churned,
            "calls_done": sum(done.values()),
            "opened_by_ending": dict(opened),
            "done_by_ending": dict(done),
            "force_closed": dict(forced),
            "connect_errors": counts["connect_errors"],
            "unexpected_hangups": counts["unexpected_hangups"],
            "unexpected_closes": counts["unexpected_closes"],
            "not_live_at_end": counts["not_live_at_end"],
        },
        "leaks": dict(
            leak,
            metrics=metrics,
            log_trouble_lines=len(troubles),
            log_trouble_sample=troubles[:5],
        ),
        "server": {
            "pid": server.pid,
            "cpu_percent": round(m["server_cpu"], 1),
            "cpu_percent_user": round(m["server_user"], 1),
            "cpu_percent_system": round(m["server_system"], 1),
            "rss_mib": round(m["rss_window_end"] / 1024.0, 1) if m["rss_window_end"] else None,
            "memory": thirds(samples),
            "legs_ended": dict(ends),
            "hangups_sent_by_cause": dict(causes),
            "orderly_shutdown": any("Server Shut Down." in line for line in lines),
            "exit_code": m["exit_code"],
        },
        "client": {
            "cpu_percent": round(sum(m["clients_cpu"]), 1),
            "cpu_percent_per_process": m["clients_cpu"],
            "tick_lag_ms": {k: v for k, v in tick_lag.summary_ms().items() if k in ("p50", "p99", "max")},
            "ticks_skipped": counts["ticks_skipped"],
            "buffered_writes": counts["buffered_writes"],
            "held_legs_lost": counts["held_legs_lost"],
            "hangup_replies": {"rst": counts["replied_rst"], "fin": counts["replied_fin"],
                               "while_closing": counts["hangup_while_closing"]},
            "notes": dict(notes),
        },
        "series": samples,
    }
    # How each leg should end, from what the clients did; the server's log must agree.
    expected = {
        "hangup_reset": counts["replied_rst"],
        "hangup_clean": counts["replied_fin"],
        "peer_reset": opened["reset"] + opened["reset_mid_frame"],
        "peer_closed": opened["close"] + opened["partial_close"] + args.sessions,
        "protocol_error": opened["protocol_error"],
        "uuid_timeout": opened["half_uuid"],
    }
    result["server"]["legs_ended_expected"] = expected
    mismatched = {
        reason: {"expected": expected.get(reason, 0), "logged": ends.get(reason, 0)}
        for reason in sorted(set(expected) | set(ends))
        if expected.get(reason, 0) != ends.get(reason, 0)
    }
    result["server"]["legs_ended_mismatch"] = mismatched
    result["targets"] = {
        "bridge_p99_under_20ms": bridge_summary["p99"] is not None and bridge_summary["p99"] < 20.0,
        "no_frame_lost": lost == 0 and counts["misrouted"] == 0,
        "api_hangup_p99_under_50ms": (
            api_frame_summary["p99"] < 50.0 and api_gone_summary["p99"] < 50.0
            if api_frame_summary["samples"] and api_gone_summary["samples"] else None
        ),
        "no_leaks": (
            leak.get("health_legs_after") == 0 and leak.get("leaked_fds") == 0 and not troubles
            and isinstance(metrics, dict) and metrics.get("legs_started") == metrics.get("legs_ended")
        ),
    }
    problems = []
    if m["server_died"] is not None:
        problems.append(f"the server exited during the run (code {m['server_died']})")
    for what in ("held_legs_lost", "unexpected_hangups", "unexpected_closes", "connect_errors",
                 "not_live_at_end", "force_closed", "api_errors", "open_at_finish"):
        if counts[what]:
            problems.append(f"{what}: {counts[what]} (e.g. {notes[what][:2]})")
    if counts["misrouted"] or counts["bytes_after_hangup"] or counts["other_frames"]:
        problems.append("misrouted or unexpected bytes from the server")
    if lost:
        problems.append(f"bridged frames lost: {lost}")
    if leak.get("health_legs_after") != 0:
        problems.append(f"legs leaked: /health says {leak.get('health_legs_after')} after the run")
    if leak.get("leaked_fds"):
        problems.append(f"descriptors leaked: {leak['fds_after']} open, idle baseline {leak['fds_idle_baseline']}")
    if isinstance(metrics, dict) and metrics.get("legs_started") != metrics.get("legs_ended"):
        problems.append(f"/metrics: {metrics.get('legs_started')} legs started, {metrics.get('legs_ended')} ended")
    if troubles:
        problems.append(f"{len(troubles)} trouble line(s) in the server log: {troubles[:2]}")
    if mismatched and not counts["force_closed"] and not counts["hangup_while_closing"]:
        problems.append(f"close reasons in the log differ from what the clients did: {mismatched}")
    if churned != sum(done.values()):
        problems.append(f"churned calls opened {churned}, done {sum(done.values())}")
    result["problems"] = problems
    result["noisy"] = bool(m["other"] > NOISY_MEAN or (others and max(others) > NOISY_SAMPLE))
    return result


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def parse_lifetime(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    try:
        lo, hi = float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lifetime {text!r} is not MIN:MAX seconds") from None
    if not 0.5 <= lo <= hi <= 600:
        raise argparse.ArgumentTypeError("--lifetime needs 0.5 <= MIN <= MAX <= 600")
    return lo, hi


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load and soak generator for audiohangup: held and churned bridged calls over loopback.",
    )
    parser.add_argument("--sessions", type=int, default=100,
                        help="calls held for the whole run (2 legs each); default 100")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds after the warm-up; default 30")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring; default 2")
    parser.add_argument("--drain", type=float, default=1.0,
                        help="seconds held legs keep going after the window, for frames in flight; default 1")
    parser.add_argument("--churn", type=float, default=0.0,
                        help="calls per second opened on top of the held ones, each ended after a "
                             "random --lifetime as --mix says; default 0")
    parser.add_argument("--lifetime", type=parse_lifetime, default=(2.0, 10.0), metavar="MIN:MAX",
                        help="a churned call's lifetime, uniform in seconds; default 2:10")
    parser.add_argument("--mix", default="api=0.5,reset=0.25,close=0.25",
                        help="how churned calls end: api (POST hangup, the leg then resets or closes), "
                             "reset (client RST), close (client FIN); default api=0.5,reset=0.25,close=0.25")
    parser.add_argument("--reset-after-hangup", type=float, default=0.5, metavar="P",
                        help="chance a leg answers our 00 00 00 with a reset rather than a clean close; default 0.5")
    parser.add_argument("--faults", type=float, default=0.0, metavar="P",
                        help="share of churned calls that end with a random fault instead; default 0")
    parser.add_argument("--fault-kinds", default=",".join(FAULT_KINDS),
                        help=f"faults to draw from; default {','.join(FAULT_KINDS)}")
    parser.add_argument("--join-delay", type=float, default=0.2,
                        help="the resident leg of a churned call joins up to this many seconds after the "
                             "visitor; default 0.2")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes; default 1")
    parser.add_argument("--spread", action="store_true",
                        help=f"spread the legs' send times over the 20 ms in {common.SPREAD_SLOTS} slots (real "
                             "channels are not phase-aligned) instead of one shared tick")
    parser.add_argument("--late-ms", type=float, default=20.0,
                        help="a bridged frame later than this counts as late; default 20")
    parser.add_argument("--server-args", default="",
                        help='extra twistd audiohangup options, one string, e.g. "--idle-timeout 5"')
    parser.add_argument("--sample-every", type=float, default=0.0, metavar="SECONDS",
                        help="seconds between RSS/fd/CPU samples; default 2, or 5 for runs over 120 s")
    parser.add_argument("--leak-wait", type=float, default=15.0,
                        help="seconds to wait after the run for the server to be back to idle; default 15")
    parser.add_argument("--server-log", metavar="FILE", help="write the server's log to FILE")
    parser.add_argument("--py-spy", metavar="FILE",
                        help="record the server with py-spy (500 Hz, --nonblocking, raw collapsed stacks) for the first "
                             "20 s of the window into FILE; it slows the server, so not for the figures")
    parser.add_argument("--seed", type=int, default=1, help="random seed; default 1")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the machine to be idle; default 0")
    parser.add_argument("--idle-stretch", type=float, default=2.0, metavar="SECONDS",
                        help="with --wait-idle, how long the machine must stay idle; default 2")
    common.add_worker_option(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if not 0 <= args.sessions <= 5000:
        parser.error("--sessions must be between 0 and 5000")
    if not 1 <= args.seconds <= 7200:
        parser.error("--seconds must be between 1 and 7200")
    if not 0 <= args.warmup <= 120 or not 0.1 <= args.drain <= 30:
        parser.error("--warmup must be within 0..120 and --drain within 0.1..30")
    if not 0 <= args.churn <= 500:
        parser.error("--churn must be within 0..500 calls per second")
    if args.churn * (args.warmup + args.seconds) > 1_000_000:
        parser.error("--churn times the run's length must stay under 1,000,000 calls")
    if not 0 <= args.faults <= 1 or not 0 <= args.reset_after_hangup <= 1:
        parser.error("--faults and --reset-after-hangup are probabilities (0..1)")
    if not 0 <= args.join_delay <= args.lifetime[0] / 2:
        parser.error("--join-delay must be within 0 and half the shortest --lifetime")
    if not 1 <= args.client_procs <= 64:
        parser.error("--client-procs must be between 1 and 64")
    if args.sessions == 0 and args.churn == 0:
        parser.error("nothing to do: give --sessions or --churn")
    if (not 0 <= args.wait_idle <= 3600 or not 0 <= args.sample_every <= 600 or not 1 <= args.leak_wait <= 300
            or not 0.5 <= args.idle_stretch <= 300):
        parser.error("--wait-idle, --sample-every or --leak-wait out of range")
    try:
        parse_weights(args.mix, MIX_KINDS, "--mix")
    except ValueError as error:
        parser.error(str(error))
    return args


def suspect(result: dict[str, Any]) -> str | None:
    """A warning when other processes took enough of the machine to make the numbers suspect."""
    if result["noisy"]:
        return (f"warning: other processes used about {result['machine']['other_cpu_percent']:.0f}% of a core "
                f"(max sample {result['machine']['other_cpu_percent_max_sample']}%) during the window; "
                "the numbers are suspect")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return common.run_script(args, worker_main, orchestrate, "the server's CPU, memory and descriptors", suspect)


if __name__ == "__main__":
    sys.exit(main())
