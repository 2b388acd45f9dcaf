#!/usr/bin/env python3
"""
Bridge benchmark for audiohangup: N bridged sessions over loopback.

Starts ``twistd -n audiohangup`` on ephemeral loopback ports, opens one visitor
and one resident leg per session (same UUID), sends 20 ms slin frames from
each leg, paced drift-free, and measures on the other leg of the same session
how long a bridged frame took (receive time - send time, both
``time.monotonic()`` on this machine). It also counts the frames every leg
receives (bridged and the server's paced silence), the jitter of silence-only
legs (``--one-way``), the server's CPU share and memory, and the client's own
CPU share, and prints one JSON object on stdout. Progress goes to stderr.

The client legs run in ``--client-procs`` worker processes (default 1), each
a Twisted reactor that owns whole sessions; the orchestrating process only
starts and stops things, samples ``/proc`` and adds up the workers' results.

A benchmark, not a test: the test suite never imports it. It talks only to
127.0.0.1, and every step is bounded in time; the server is always stopped
with SIGTERM (then SIGKILL if it lingers), even on error.

Run from the repository root after ``pip install .``::

    python bench/bridge.py --sessions 100 --seconds 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

FRAME_SECONDS = 0.020
PAYLOAD_BYTES = 320
#: Bridged payload: magic, session index, role (0 visitor, 1 resident), sequence, send time.
STAMP = struct.Struct("!4sIB3xId")
MAGIC = b"AHB\x01"
PADDING = b"\x00" * (PAYLOAD_BYTES - STAMP.size)
SILENCE_PAYLOAD = b"\x00" * PAYLOAD_BYTES
ROLES = ("visitor", "resident")
LOOPBACK = "tcp:0:interface=127.0.0.1"
LISTENING = re.compile(r"\b(audiosocket-visitor|audiosocket-resident|http) listening on 127\.0\.0\.1:(\d+)\s*$")
LEG_ENDED = re.compile(r" leg ended: (\w+) ")
#: Slots per 20 ms with --spread: legs start their frames in 1 ms steps.
SPREAD_SLOTS = 20

SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 15.0
READY_TIMEOUT = 60.0
#: Connections a worker has in progress at once: the server's listen backlog is 50.
CONNECT_CONCURRENCY = 32


def log(message: str) -> None:
    print(f"[bridge {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values_us: list[int]) -> dict[str, Any]:
    values = sorted(values_us)
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v / 1000.0, 3)
    return {
        "p50": ms(percentile(values, 0.50)),
        "p99": ms(percentile(values, 0.99)),
        "max": ms(values[-1] if values else None),
        "mean": ms(sum(values) / len(values) if values else None),
        "samples": len(values),
    }


# ---------------------------------------------------------------------------
# Worker: the client legs of some sessions, on one Twisted reactor.
# ---------------------------------------------------------------------------


def worker_main(config_path: str, result_path: str) -> int:
    with open(config_path) as f:
        cfg = json.load(f)

    from twisted.internet import reactor
    from twisted.internet.defer import DeferredSemaphore, gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from audiohangup.wire import Kind, encode, encode_uuid

    monotonic = time.monotonic
    stamp_pack = STAMP.pack
    stamp_unpack = STAMP.unpack_from
    header_unpack = struct.Struct("!BH").unpack_from
    slin = int(Kind.SLIN)
    one_way: bool = cfg["one_way"]
    drain: float = cfg["drain"]

    class Run:
        def __init__(self) -> None:
            self.legs: list[Leg] = []
            self.phase = "setup"  # setup, ready, running, closing, done
            self.start = self.t0 = self.t1 = math.inf
            self.latencies_us: list[int] = []
            self.tick_lag_us: list[int] = []
            self.tick_us: list[int] = []
            self.cpu0: tuple[float, float] | None = None
            self.cpu1: tuple[float, float] | None = None
            self.errors: list[str] = []
            self.lost_early: Counter[str] = Counter()
            self.k = 0
            self.groups: list[list[Leg]] = []
            self.slot = FRAME_SECONDS
            self.closed = 0
            self.finished = False

        # setup

        def connect_all(self) -> None:
            semaphore = DeferredSemaphore(CONNECT_CONCURRENCY)
            waits = []
            for index, call_id in cfg["sessions"]:
                for role_id, port in enumerate((cfg["visitor_port"], cfg["resident_port"])):
                    leg = Leg(self, index, role_id, uuid.UUID(call_id))
                    self.legs.append(leg)
                    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
                    waits.append(semaphore.run(connectProtocol, endpoint, leg))
            gatherResults(waits, consumeErrors=True).addErrback(
                lambda failure: self.fail(f"connect failed: {failure.value!r}")
            )

        def leg_heard(self) -> None:
            if self.phase == "setup" and all(leg.heard for leg in self.legs):
                self.phase = "ready"
                print("READY", flush=True)

        def go(self, start: float) -> None:
            if self.phase != "ready":
                self.fail(f"GO in phase {self.phase}")
                return
            self.phase = "running"
            self.start = start
            self.t0 = start + cfg["warmup"]
            self.t1 = self.t0 + cfg["seconds"]
            senders = [leg for leg in self.legs if not (one_way and leg.role_id == 1)]
            slots = SPREAD_SLOTS if cfg["spread"] else 1
            self.slot = FRAME_SECONDS / slots
            self.groups = [senders[i::slots] for i in range(slots)]
            now = monotonic()
            reactor.callLater(max(0.0, self.t0 - now), self.sample_cpu, 0)
            reactor.callLater(max(0.0, self.t1 - now), self.sample_cpu, 1)
            reactor.callLater(max(0.0, self.t1 + drain - now), self.close_all)
            reactor.callLater(max(0.0, start - now), self.tick)

        def sample_cpu(self, which: int) -> None:
            times = os.times()
            sample = (monotonic(), times.user + times.system)
            if which == 0:
                self.cpu0 = sample
            else:
                self.cpu1 = sample

        # sending: one chain of absolute deadlines, so no drift; a late client
        # catches up (frames go out late and bunched, their stamps say when).

        def tick(self) -> None:
            if self.phase != "running":
                return
            begin = monotonic()
            deadline = self.start + self.k * self.slot
            if self.t0 <= deadline < self.t1:
                self.tick_lag_us.append(int((begin - deadline) * 1e6))
            t0, t1 = self.t0, self.t1
            for leg in self.groups[self.k % len(self.groups)]:
                if leg.gone:
                    continue
                sent = monotonic()
                leg.send(encode(slin, stamp_pack(MAGIC, leg.index, leg.role_id, leg.seq, sent) + PADDING))
                leg.seq += 1
                if t0 <= sent < t1:
                    leg.sent_window += 1
            end = monotonic()
            if self.t0 <= deadline < self.t1:
                self.tick_us.append(int((end - begin) * 1e6))
            self.k += 1
            following = self.start + self.k * self.slot
            if following < self.t1 and end < self.t1 + drain:
                reactor.callLater(max(0.0, following - end), self.tick)

        # ending

        def close_all(self) -> None:
            if self.phase != "running":
                return
            self.phase = "closing"
            for leg in self.legs:
                if leg.transport is not None and not leg.gone:
                    leg.transport.loseConnection()
            reactor.callLater(5.0, self.finish)
            self.check_closed()

        def leg_lost(self, leg: Leg, reason: Any) -> None:
            self.closed += 1
            if self.phase in ("setup", "ready", "running"):
                self.lost_early[type(reason.value).__name__] += 1
                if self.phase != "running":
                    self.fail(f"leg {leg.index}/{ROLES[leg.role_id]} lost before the run: {reason.value!r}")
            self.check_closed()

        def check_closed(self) -> None:
            if self.phase == "closing" and self.closed >= len(self.legs):
                self.finish()

        def fail(self, message: str) -> None:
            self.errors.append(message)
            print(f"FAIL {message}", flush=True)
            self.finish()

        def finish(self) -> None:
            if self.finished:
                return
            self.finished = True
            self.phase = "done"
            try:
                self.write_result()
            finally:
                reactor.callLater(0, reactor.stop)

        def write_result(self) -> None:
            by_role = {role: {"bridged": 0, "silence": 0, "other": 0} for role in ROLES}
            jitter_us: list[int] = []
            jitter_legs = 0
            counts = Counter()
            for leg in self.legs:
                role = by_role[ROLES[leg.role_id]]
                role["bridged"] += leg.rx_bridged
                role["silence"] += leg.rx_silence
                role["other"] += leg.rx_other
                counts["sent_window"] += leg.sent_window
                counts["bridged_received_window"] += leg.rx_bridged_window
                counts["misrouted"] += leg.misrouted
                counts["out_of_order"] += leg.out_of_order
                counts["hangups"] += leg.hangups
                counts["received_after_drain"] += leg.rx_bridged_late
                counts["buffered_writes"] += leg.buffered_writes
                if leg.rx_silence and not leg.rx_bridged and not leg.rx_other:
                    jitter_legs += 1
                    jitter_us.extend(leg.jitter_us)
            cpu = None
            if self.cpu0 and self.cpu1 and self.cpu1[0] > self.cpu0[0]:
                cpu = {"cpu_s": self.cpu1[1] - self.cpu0[1], "wall_s": self.cpu1[0] - self.cpu0[0]}
            result = {
                "legs": len(self.legs),
                "errors": self.errors,
                "lost_early": dict(self.lost_early),
                "latencies_us": self.latencies_us,
                "jitter_us": jitter_us,
                "jitter_legs": jitter_legs,
                "received_window_by_role": by_role,
                "counts": dict(counts),
                "tick_lag_us": self.tick_lag_us,
                "tick_us": self.tick_us,
                "cpu": cpu,
            }
            with open(result_path, "w") as f:
                json.dump(result, f)

    class Leg(Protocol):
        def __init__(self, run: Run, index: int, role_id: int, call_id: uuid.UUID) -> None:
            self.run = run
            self.index = index
            self.role_id = role_id
            self.peer_role = 1 - role_id
            self.call_id = call_id
            self.transport = None
            self.buffer = b""
            self.socket: Any = None
            self.buffered_writes = 0
            self.heard = False
            self.gone = False
            self.seq = 0
            self.last_seq = -1
            self.sent_window = 0
            # received in the window (by receive time)
            self.rx_bridged = 0
            self.rx_silence = 0
            self.rx_other = 0
            # bridged frames sent in the window (by send stamp) that arrived
            self.rx_bridged_window = 0
            self.rx_bridged_late = 0
            self.misrouted = 0
            self.out_of_order = 0
            self.hangups = 0
            self.previous_silence: float | None = None
            self.jitter_us: list[int] = []

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.socket = self.transport.getHandle()
            self.transport.write(encode_uuid(self.call_id))

        def send(self, data: bytes) -> None:
            """
            Write a frame to the kernel now, as Asterisk does, so its stamp is
            the time it left: C{transport.write} would only buffer it until the
            reactor's next write pass (after every other leg of the tick). Once
            a send is short, the leg keeps to C{transport.write}, in order.
            """
            if self.buffered_writes:
                self.buffered_writes += 1
                self.transport.write(data)
                return
            try:
                written = self.socket.send(data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # the connection is going; connectionLost tells
            if written < len(data):
                self.buffered_writes += 1
                self.transport.write(data[written:])

        def dataReceived(self, data: bytes) -> None:
            now = monotonic()
            run = self.run
            t0, t1 = run.t0, run.t1
            in_window = t0 <= now < t1
            buffer = self.buffer + data if self.buffer else data
            end = len(buffer)
            offset = 0
            while end - offset >= 3:
                kind, length = header_unpack(buffer, offset)
                start = offset + 3
                stop = start + length
                if stop > end:
                    break
                offset = stop
                if kind == slin and length == PAYLOAD_BYTES and buffer[start:start + 4] == MAGIC:
                    self.previous_silence = None
                    _, index, role_id, seq, sent = stamp_unpack(buffer, start)
                    if index != self.index or role_id != self.peer_role:
                        self.misrouted += 1
                        continue
                    if seq <= self.last_seq:
                        self.out_of_order += 1
                    self.last_seq = seq
                    if in_window:
                        self.rx_bridged += 1
                    if t0 <= sent < t1:
                        self.rx_bridged_window += 1
                        run.latencies_us.append(int((now - sent) * 1e6))
                        if run.phase == "closing":
                            self.rx_bridged_late += 1
                elif kind == slin and buffer[start:stop] == SILENCE_PAYLOAD:
                    if in_window:
                        self.rx_silence += 1
                        previous = self.previous_silence
                        if previous is not None and previous >= t0:
                            self.jitter_us.append(int(abs(now - previous - FRAME_SECONDS) * 1e6))
                    self.previous_silence = now
                elif kind == 0x00:
                    if run.phase == "running":
                        self.hangups += 1
                    self.previous_silence = None
                else:
                    self.previous_silence = None
                    if in_window:
                        self.rx_other += 1
            self.buffer = buffer[offset:] if offset < end else b""
            if not self.heard and offset:
                self.heard = True
                run.leg_heard()

        def connectionLost(self, reason: Any) -> None:
            self.gone = True
            self.run.leg_lost(self, reason)

    run = Run()

    def read_commands() -> None:
        for line in sys.stdin:
            parts = line.split()
            if parts and parts[0] == "GO":
                reactor.callFromThread(run.go, float(parts[1]))
                return
        reactor.callFromThread(run.fail, "the orchestrator closed stdin before GO")

    reactor.callWhenRunning(run.connect_all)
    reactor.callLater(cfg["budget"], lambda: run.fail(f"worker budget of {cfg['budget']:.0f} s exceeded"))
    reactor.callLater(READY_TIMEOUT, lambda: run.phase == "setup" and run.fail(
        f"not every leg heard from the server within {READY_TIMEOUT:.0f} s "
        f"({sum(leg.heard for leg in run.legs)}/{len(run.legs)})"
    ))
    threading.Thread(target=read_commands, daemon=True).start()
    reactor.run()
    return 1 if run.errors else 0


# ---------------------------------------------------------------------------
# Orchestrator: server, workers, /proc sampling, the JSON report.
# ---------------------------------------------------------------------------


class Server:
    """``twistd -n audiohangup`` as a child process whose log is kept."""

    def __init__(self) -> None:
        self.twistd = Path(sys.executable).with_name("twistd")
        if not self.twistd.is_file():
            raise SystemExit(f"no twistd script next to {sys.executable}: pip install . first")
        self.argv = [
            str(self.twistd), "-n", "--pidfile=", "audiohangup",
            "--visitor", LOOPBACK, "--resident", LOOPBACK, "--http", LOOPBACK,
        ]
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.listening = threading.Event()
        self.process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Its own working directory: the call records file goes there, not into the checkout.
        self.workdir = tempfile.mkdtemp(prefix="audiohangup-bench-")
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, cwd=self.workdir,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self.listening.wait(SERVER_START_TIMEOUT):
            raise RuntimeError(
                f"server not listening within {SERVER_START_TIMEOUT:.0f} s; log tail:\n" + self.tail()
            )
        log(f"server pid {self.process.pid} listening: {self.ports}")

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self.lines.append(line)
            match = LISTENING.search(line)
            if match:
                self.ports[match.group(1)] = int(match.group(2))
                if len(self.ports) == 3:
                    self.listening.set()

    def tail(self, count: int = 30) -> str:
        with self._lock:
            return "\n".join(self.lines[-count:])

    def log_lines(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads), in seconds."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int | None:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.ports['http']}/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if it lingers; return the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log("server ignored SIGTERM: killing it")
                process.kill()
                process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return process.returncode


class Worker:
    def __init__(self, number: int, config: dict[str, Any], directory: str) -> None:
        self.number = number
        self.config_path = os.path.join(directory, f"worker{number}.json")
        self.result_path = os.path.join(directory, f"result{number}.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", self.config_path, self.result_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.messages: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.messages.put(line.strip())
        self.messages.put("EOF")

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"worker {self.number} not ready in time") from None
            if message == "READY":
                return
            if message.startswith("FAIL") or message == "EOF":
                raise RuntimeError(f"worker {self.number}: {message}")

    def go(self, start: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"GO {start!r}\n")
        self.process.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"worker {self.number} did not end in time") from None
        with open(self.result_path) as f:
            return json.load(f)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def sleep_until(moment: float) -> None:
    while (left := moment - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def machine_busy_seconds(interrupts: bool = False) -> float:
    """
    CPU seconds the whole machine spent busy, all cores: user, nice, system and
    steal; or, with C{interrupts}, in irq and softirq (loopback TCP's own work,
    which no process is charged for).
    """
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    ticks = irq + softirq if interrupts else user + nice + system + steal
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def probe_wakeups(until: float, period: float = 0.010) -> list[int]:
    """
    Sleep in 10 ms steps until C{until} and return how late each wake-up was,
    in microseconds: a third process's view of how long a runnable process
    waits for a CPU. On a VM whose host is busy this shows stalls that no
    CPU counter of the guest does (steal time often reads 0).
    """
    delays = []
    while (now := time.monotonic()) + period < until:
        time.sleep(period)
        delays.append(int((time.monotonic() - now - period) * 1e6))
    sleep_until(until)
    return delays


def wait_idle(limit: float, busy_below: float = 10.0, stretch: float = 2.0) -> None:
    """
    Wait, at most C{limit} seconds, for C{stretch} seconds in which the whole
    machine is busy less than C{busy_below} percent of one core.
    """
    deadline = time.monotonic() + limit
    while True:
        busy0, wall0 = machine_busy_seconds(), time.monotonic()
        time.sleep(stretch)
        busy = 100.0 * (machine_busy_seconds() - busy0) / (time.monotonic() - wall0)
        if busy < busy_below:
            return
        if time.monotonic() >= deadline:
            log(f"machine still {busy:.0f}% busy after waiting {limit:g} s: measuring anyway")
            return
        log(f"machine {busy:.0f}% busy: waiting for it to be idle")


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    if args.wait_idle:
        wait_idle(args.wait_idle)
    server = Server()
    workers: list[Worker] = []
    try:
        server.start()
        sessions = [(index, str(uuid.uuid4())) for index in range(args.sessions)]
        run_length = args.warmup + args.seconds + args.drain
        with tempfile.TemporaryDirectory(prefix="bench-bridge-") as directory:
            for number in range(args.client_procs):
                mine = sessions[number::args.client_procs]
                if not mine:
                    continue
                workers.append(Worker(number, {
                    "sessions": mine,
                    "visitor_port": server.ports["audiosocket-visitor"],
                    "resident_port": server.ports["audiosocket-resident"],
                    "warmup": args.warmup,
                    "seconds": args.seconds,
                    "drain": args.drain,
                    "one_way": args.one_way,
                    "spread": args.spread,
                    "budget": READY_TIMEOUT + 30.0 + run_length + 15.0,
                }, directory))
            deadline = time.monotonic() + READY_TIMEOUT
            for worker in workers:
                worker.wait_ready(deadline)
            health = server.health()
            if health.get("legs") != 2 * args.sessions:
                raise RuntimeError(f"server reports {health.get('legs')} legs, not {2 * args.sessions}")
            log(f"{2 * args.sessions} legs live in {len(workers)} client process(es): "
                f"{args.warmup:g} s warm-up, {args.seconds:g} s measured")
            start = time.monotonic() + 0.2
            for worker in workers:
                worker.go(start)
            t0 = start + args.warmup
            t1 = t0 + args.seconds
            sleep_until(t0)
            cpu0, wall0, own0 = server.cpu_seconds(), time.monotonic(), own_cpu()
            busy0, irq0 = machine_busy_seconds(), machine_busy_seconds(interrupts=True)
            wakeup_delays = probe_wakeups(t1)
            cpu1, wall1, own1 = server.cpu_seconds(), time.monotonic(), own_cpu()
            busy1, irq1 = machine_busy_seconds(), machine_busy_seconds(interrupts=True)
            rss = server.rss_kib()
            server_died = server.process.poll() if server.process is not None else None
            results = [worker.result(args.drain + 30.0) for worker in workers]
        # Give the server a moment to log every leg's end before stopping it.
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            if sum(1 for line in server.log_lines() if LEG_ENDED.search(line)) >= 2 * args.sessions:
                break
            time.sleep(0.05)
    finally:
        for worker in workers:
            worker.stop()
        exit_code = server.stop()
        log(f"server stopped, exit code {exit_code}")
    errors = [error for result in results for error in result["errors"]]
    if errors:
        raise RuntimeError("; ".join(errors))
    wall = wall1 - wall0
    machine = {
        "busy_percent": round(100.0 * (busy1 - busy0) / wall, 1),
        "interrupts_percent": round(100.0 * (irq1 - irq0) / wall, 1),
        "orchestrator_cpu_percent": round(100.0 * (own1 - own0) / wall, 1),
        "wakeup_delays_us": wakeup_delays,
    }
    problems = []
    if server_died is not None:
        problems.append(f"the server exited during the run (code {server_died}); log tail:\n{server.tail(10)}")
    result = report(args, server, results, health, (cpu1 - cpu0) / wall, rss, exit_code, machine)
    if result["client"]["legs_lost_during_run"]:
        problems.append(f"legs lost during the run: {result['client']['legs_lost_during_run']}")
    if result["bridged_frames"]["lost"] or result["bridged_frames"]["misrouted"]:
        problems.append("bridged frames lost or misrouted")
    result["problems"] = problems
    return result


def report(
    args: argparse.Namespace,
    server: Server,
    results: list[dict[str, Any]],
    health: dict[str, Any],
    server_cpu_share: float,
    rss_kib: int | None,
    exit_code: int | None,
    machine: dict[str, Any],
) -> dict[str, Any]:
    legs = sum(result["legs"] for result in results)
    counts: Counter[str] = Counter()
    by_role = {role: Counter() for role in ROLES}
    latencies: list[int] = []
    jitter: list[int] = []
    jitter_legs = 0
    tick_lag: list[int] = []
    tick: list[int] = []
    lost_early: Counter[str] = Counter()
    client_cpu = []
    for result in results:
        counts.update(result["counts"])
        for role in ROLES:
            by_role[role].update(result["received_window_by_role"][role])
        latencies.extend(result["latencies_us"])
        jitter.extend(result["jitter_us"])
        jitter_legs += result["jitter_legs"]
        tick_lag.extend(result["tick_lag_us"])
        tick.extend(result["tick_us"])
        lost_early.update(result["lost_early"])
        cpu = result["cpu"]
        client_cpu.append(round(100.0 * cpu["cpu_s"] / cpu["wall_s"], 1) if cpu else None)
    seconds = args.seconds
    received_total = sum(by_role[role]["bridged"] + by_role[role]["silence"] for role in ROLES)
    role_legs = legs // 2

    def per_leg(role: str, what: str) -> float:
        return round(by_role[role][what] / role_legs / seconds, 2) if role_legs else 0.0

    # What the machine spent beyond this benchmark's processes: other work
    # on the same cores (a test run, a build) makes a run's numbers suspect.
    # A process's stime includes the loopback softirq work done on its behalf,
    # which /proc/stat books as softirq: hence busy + interrupts - ours. The
    # two clocks are counted differently (ticks against exact runtime), so
    # this is an estimate, good to about +-15 points.
    other_exclusions = 100.0 * server_cpu_share + sum(c for c in client_cpu if c is not None)
    other_exclusions += machine["orchestrator_cpu_percent"]
    lines = server.log_lines()
    ends = Counter(match.group(1) for line in lines if (match := LEG_ENDED.search(line)))
    troubles = [line for line in lines if "Traceback" in line or "Unhandled" in line or " failed" in line]
    lag = summary_ms(tick_lag)
    sent = counts["sent_window"]
    sending_legs = legs // 2 if args.one_way else legs
    expected = round(sending_legs * seconds / FRAME_SECONDS)
    received = counts["bridged_received_window"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "busy_percent": machine["busy_percent"],
            "interrupts_percent": machine["interrupts_percent"],
            "other_cpu_percent": round(
                machine["busy_percent"] + machine["interrupts_percent"] - other_exclusions, 1
            ),
            "wakeup_delay_ms": {
                k: v for k, v in summary_ms(machine["wakeup_delays_us"]).items() if k in ("p50", "p99", "max")
            },
        },
        "sessions": args.sessions,
        "legs": legs,
        "seconds": seconds,
        "warmup": args.warmup,
        "one_way": args.one_way,
        "spread": args.spread,
        "client_procs": len(results),
        "bridged_latency_ms": summary_ms(latencies),
        "bridged_frames": {
            "sent": sent,
            "sent_of_schedule": round(sent / expected, 4) if expected else None,
            "received": received,
            "lost": sent - received,
            "received_after_drain": counts["received_after_drain"],
            "misrouted": counts["misrouted"],
            "out_of_order": counts["out_of_order"],
        },
        "frames_received_per_s": {
            "total": round(received_total / seconds, 1),
            "per_leg": round(received_total / legs / seconds, 2) if legs else 0.0,
            "per_leg_by_role": {
                role: {"bridged": per_leg(role, "bridged"), "silence": per_leg(role, "silence")}
                for role in ROLES
            },
            "other_frames": sum(by_role[role]["other"] for role in ROLES),
            "hangup_frames": counts["hangups"],
        },
        "pacing_jitter_ms": (
            dict(summary_ms(jitter), legs=jitter_legs) if jitter_legs else None
        ),
        "server": {
            "pid": server.pid,
            "cpu_percent": round(100.0 * server_cpu_share, 1),
            "rss_mib": round(rss_kib / 1024.0, 1) if rss_kib is not None else None,
            "health_legs_before_run": health.get("legs"),
            "legs_ended": dict(ends),
            "log_trouble_lines": len(troubles),
            "orderly_shutdown": any("Server Shut Down." in line for line in lines),
            "exit_code": exit_code,
        },
        "client": {
            "cpu_percent": round(sum(c for c in client_cpu if c is not None), 1),
            "cpu_percent_per_process": client_cpu,
            "tick_lag_ms": {"p50": lag["p50"], "p99": lag["p99"], "max": lag["max"]},
            "tick_ms_p99": summary_ms(tick)["p99"],
            "buffered_writes": counts["buffered_writes"],
            "legs_lost_during_run": dict(lost_early),
        },
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bridge latency, pacing and cost of audiohangup with N sessions over loopback.",
    )
    parser.add_argument("--sessions", type=int, default=100, help="bridged sessions (2 legs each); default 100")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds after the warm-up; default 10")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of sending before measuring; default 1")
    parser.add_argument("--drain", type=float, default=1.0,
                        help="seconds to wait for frames in flight after the window; default 1")
    parser.add_argument("--one-way", action="store_true",
                        help="only visitor legs send: resident legs get bridged audio, visitor legs only silence")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="client processes the sessions are spread over; default 1")
    parser.add_argument("--spread", action="store_true",
                        help=f"spread the legs' send times over the 20 ms in {SPREAD_SLOTS} slots "
                             "instead of sending every leg's frame on one shared tick")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the machine to be idle (under 10%% of a core "
                             "for 2 s); default 0, no wait")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if not 1 <= args.sessions <= 5000:
        parser.error("--sessions must be between 1 and 5000")
    if not 0.1 <= args.seconds <= 600:
        parser.error("--seconds must be between 0.1 and 600")
    if not 0 <= args.warmup <= 60 or not 0.1 <= args.drain <= 30:
        parser.error("--warmup must be within 0..60 and --drain within 0.1..30")
    if not 0 <= args.wait_idle <= 3600:
        parser.error("--wait-idle must be within 0..3600")
    if not 1 <= args.client_procs <= 64:
        parser.error("--client-procs must be between 1 and 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker_main(*args.worker)
    if not os.path.exists("/proc/self/stat"):
        raise SystemExit("needs Linux /proc for the server's CPU and memory")

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        result = orchestrate(args)
    except (RuntimeError, OSError) as error:
        log(f"failed: {error}")
        return 1
    other = result["machine"]["other_cpu_percent"]
    if other > 20:
        log(f"warning: other processes used about {other:.0f}% of a core during the window; "
            "the numbers are suspect")
    print(json.dumps(result, indent=2))
    for problem in result["problems"]:
        log(f"problem: {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
