"""
What ``bench/bridge.py`` and ``bench/load.py`` share: the benchmark's frame
format, the ``twistd -n audiohangup`` child, the worker processes and their
GO handshake, ``/proc`` readers, machine-load helpers and the command-line
skeleton.

Both scripts run as ``python bench/<script>.py`` (also as their own worker
processes), so this directory is ``sys.path[0]`` and they import it as
``common``. Nothing here imports Twisted at module level: the orchestrating
process never needs a reactor, only the workers do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------
# The benchmark's audio: what a client stamps into a frame.
# ---------------------------------------------------------------------------

FRAME_SECONDS = 0.020
PAYLOAD_BYTES = 320
#: Bridged payload: magic, session index, role (0 visitor, 1 resident), sequence, send time.
STAMP = struct.Struct("!4sIB3xId")
MAGIC = b"AHB\x01"
PADDING = b"\x00" * (PAYLOAD_BYTES - STAMP.size)
#: An AudioSocket frame header: kind, payload length.
HEADER = struct.Struct("!BH")
ROLES = ("visitor", "resident")
#: Slots per 20 ms with --spread: legs start their frames in 1 ms steps.
SPREAD_SLOTS = 20
#: Connections a worker has in progress at once: the server's listen backlog is 50.
CONNECT_CONCURRENCY = 32

LOOPBACK = "tcp:0:interface=127.0.0.1"
LISTENING = re.compile(r"\b(audiosocket-visitor|audiosocket-resident|http) listening on 127\.0\.0\.1:(\d+)\s*$")
LEG_ENDED = re.compile(r" leg ended: (\w+) ")
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 15.0


# ---------------------------------------------------------------------------
# Progress and small numbers
# ---------------------------------------------------------------------------

_log_name = "bench"


def set_log_name(name: str) -> None:
    """Name the script in progress lines, so a log tells the two benchmarks apart."""
    global _log_name
    _log_name = name


def log(message: str) -> None:
    """A progress line on stderr: stdout carries only the JSON result (and a worker's READY/FAIL)."""
    print(f"[{_log_name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms_from_us(value: float | None) -> float | None:
    """Microseconds to milliseconds as reported: three decimals, None stays None."""
    return None if value is None else round(value / 1000.0, 3)


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values_us: list[int]) -> dict[str, Any]:
    """p50, p99, max, mean (ms) and sample count of exact microsecond values: one shape for every report."""
    values = sorted(values_us)
    return {
        "p50": ms_from_us(percentile(values, 0.50)),
        "p99": ms_from_us(percentile(values, 0.99)),
        "max": ms_from_us(values[-1] if values else None),
        "mean": ms_from_us(sum(values) / len(values) if values else None),
        "samples": len(values),
    }


# ---------------------------------------------------------------------------
# /proc readers and the machine's load
# ---------------------------------------------------------------------------


def proc_stat_fields(pid: int | str) -> list[str]:
    """
    The fields of C{/proc/<pid>/stat} after the command name (which may hold
    spaces and parentheses): index 1 is the ppid, 6 the flags, 11 utime, 12 stime.
    """
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = proc_stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_value(pid: int, key: str) -> int | None:
    """The number after C{key:} in C{/proc/<pid>/status} (VmRSS in KiB, Threads), or None."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


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
    """This process's CPU seconds: the orchestrator's (or a worker's) own share of the machine."""
    times = os.times()
    return times.user + times.system


def sleep_until(moment: float) -> None:
    """Sleep until a C{time.monotonic()} moment, in steps short enough to stay interruptible."""
    while (left := moment - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


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
    machine is busy less than C{busy_below} percent of one core: on a shared
    machine, other work would otherwise end up in the figures.
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


# ---------------------------------------------------------------------------
# Orchestrator side: the server and the worker processes
# ---------------------------------------------------------------------------


class Server:
    """
    ``twistd -n audiohangup`` as a child process whose log is kept: the
    benchmarks measure what ``pip install .`` last installed, on ephemeral
    loopback ports read from its ``listening on`` lines.
    """

    def __init__(self, extra_args: list[str] | None = None) -> None:
        self.twistd = Path(sys.executable).with_name("twistd")
        if not self.twistd.is_file():
            raise SystemExit(f"no twistd script next to {sys.executable}: pip install . first")
        self.argv = [
            str(self.twistd), "-n", "--pidfile=", "audiohangup",
            "--visitor", LOOPBACK, "--resident", LOOPBACK, "--http", LOOPBACK,
            # Every connection comes from 127.0.0.1, many at once: no per-source cap.
            "--max-pending-per-source", "0",
        ] + list(extra_args or [])
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
            self.line_read(line)

    def line_read(self, line: str) -> None:
        """A line of the log, kept: its three ``listening on`` lines give the ports and say it is ready."""
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
        return process_cpu_seconds(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        """utime and stime of the server process, in seconds."""
        fields = proc_stat_fields(self.pid)
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def rss_kib(self) -> int | None:
        return proc_status_value(self.pid, "VmRSS")

    def threads(self) -> int | None:
        return proc_status_value(self.pid, "Threads")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def get(self, path: str, token: str | None = None, timeout: float = 5.0) -> bytes:
        """The body of a GET on the server's HTTP port; raises on an error status."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['http']}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def health(self) -> dict[str, Any]:
        """C{GET /health}, raising if the server does not answer."""
        return json.loads(self.get("/health"))

    def health_legs(self) -> int | None:
        """The legs C{GET /health} reports, or None if it does not answer (sampling must go on)."""
        try:
            return json.loads(self.get("/health"))["legs"]
        except (OSError, ValueError, KeyError):
            return None

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
    """
    A client process (C{script --worker CONFIG RESULT}) seen from the
    orchestrator: its config goes in a file, READY/FAIL come on its stdout,
    GO goes on its stdin, its result comes back in a file.
    """

    def __init__(self, script: str, number: int, config: dict[str, Any], directory: str) -> None:
        self.number = number
        self.config_path = os.path.join(directory, f"worker{number}.json")
        self.result_path = os.path.join(directory, f"result{number}.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.process = subprocess.Popen(
            [sys.executable, script, "--worker", self.config_path, self.result_path],
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

    def cpu_seconds(self) -> float:
        """The worker's CPU seconds so far; NaN once it has gone (the caller keeps its last reading)."""
        try:
            return process_cpu_seconds(self.process.pid)
        except (OSError, IndexError):
            return math.nan

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


def start_workers(workers: list[Worker], ready_timeout: float) -> None:
    """Wait until every worker has all its legs heard from, sharing one deadline; raise if one does not."""
    deadline = time.monotonic() + ready_timeout
    for worker in workers:
        worker.wait_ready(deadline)


def go_workers(workers: list[Worker], delay: float = 0.2) -> float:
    """Give every worker the same start time, C{delay} from now (for GO to arrive); return it."""
    start = time.monotonic() + delay
    for worker in workers:
        worker.go(start)
    return start


def raise_worker_errors(results: list[dict[str, Any]]) -> None:
    """A worker that failed makes the run worthless: no report, exit status 1."""
    errors = [error for result in results for error in result["errors"]]
    if errors:
        raise RuntimeError("; ".join(errors))


# ---------------------------------------------------------------------------
# Worker side: the run's phases and the GO handshake, and a leg's socket I/O
# ---------------------------------------------------------------------------


class WorkerRun:
    """
    A worker's run on its reactor: phases setup, ready, running, closing, done;
    the window [t0, t1) the orchestrator's GO fixes; the worker's own CPU over
    it; and how a failure ends the run. A script subclasses it for its legs.
    """

    def __init__(self, cfg: dict[str, Any], reactor: Any) -> None:
        self.cfg = cfg
        self.reactor = reactor
        self.phase = "setup"  # setup, ready, running, closing, done
        self.start = self.t0 = self.t1 = math.inf
        self.errors: list[str] = []
        self.cpu0: tuple[float, float] | None = None
        self.cpu1: tuple[float, float] | None = None
        self.finished = False

    # for the subclass

    def started(self, now: float) -> None:
        """The window is set (GO came): start sending."""
        raise NotImplementedError

    def close_calls(self) -> None:
        """The window and the drain are over (phase closing): end the calls."""
        raise NotImplementedError

    def write_result(self) -> None:
        """The run's numbers, as JSON in the result file the orchestrator reads."""
        raise NotImplementedError

    def shut_down(self) -> None:
        """Stop the reactor (once the result is written)."""
        raise NotImplementedError

    # the handshake

    def ready(self) -> None:
        self.phase = "ready"
        print("READY", flush=True)

    def go(self, start: float) -> None:
        if self.phase != "ready":
            self.fail(f"GO in phase {self.phase}")
            return
        self.phase = "running"
        self.start = start
        self.t0 = start + self.cfg["warmup"]
        self.t1 = self.t0 + self.cfg["seconds"]
        now = time.monotonic()
        call_later = self.reactor.callLater
        call_later(max(0.0, self.t0 - now), self.sample_cpu, 0)
        call_later(max(0.0, self.t1 - now), self.sample_cpu, 1)
        call_later(max(0.0, self.t1 + self.cfg["drain"] - now), self.drained)
        self.started(now)

    def drained(self) -> None:
        """Scheduled by GO: whatever still arrives now is late, and the calls are ended once."""
        if self.phase != "running":
            return
        self.phase = "closing"
        self.close_calls()

    def sample_cpu(self, which: int) -> None:
        sample = (time.monotonic(), own_cpu())
        if which == 0:
            self.cpu0 = sample
        else:
            self.cpu1 = sample

    def cpu_used(self) -> dict[str, float] | None:
        """CPU and wall seconds over the window, for the orchestrator to add up; None if it never ran."""
        if self.cpu0 and self.cpu1 and self.cpu1[0] > self.cpu0[0]:
            return {"cpu_s": self.cpu1[1] - self.cpu0[1], "wall_s": self.cpu1[0] - self.cpu0[0]}
        return None

    # ending

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
            self.shut_down()

    def serve(self, begin: Callable[[], None], ready_timeout: float, not_ready: Callable[[], str]) -> int:
        """
        Run the reactor: C{begin} opens the legs, GO comes on stdin, and the
        run fails if the legs are not all heard within C{ready_timeout}
        (C{not_ready} says which) or the config's budget runs out.
        """
        reactor = self.reactor

        def read_commands() -> None:
            for line in sys.stdin:
                parts = line.split()
                if parts and parts[0] == "GO":
                    reactor.callFromThread(self.go, float(parts[1]))
                    return
            reactor.callFromThread(self.fail, "the orchestrator closed stdin before GO")

        def check_ready() -> None:
            if self.phase == "setup":
                self.fail(not_ready())

        budget = self.cfg["budget"]
        reactor.callWhenRunning(begin)
        reactor.callLater(budget, lambda: self.fail(f"worker budget of {budget:.0f} s exceeded"))
        reactor.callLater(ready_timeout, check_ready)
        threading.Thread(target=read_commands, daemon=True).start()
        reactor.run()
        return 1 if self.errors else 0


class LegIO:
    """
    A client leg's socket I/O, mixed into a Twisted C{Protocol}: frames go
    straight to the kernel, complete frames come out of what was read.
    C{connectionMade} must set C{self.socket} to C{transport.getHandle()}.
    """

    transport: Any = None
    socket: Any = None
    buffer = b""
    buffered_writes = 0
    heard = False

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
            self.fell_back_to_buffering()
            self.transport.write(data[written:])

    def fell_back_to_buffering(self) -> None:
        """The first short send of the leg (a script may count it)."""

    def frames(self, data: bytes) -> Iterator[tuple[int, int, bytes, int]]:
        """
        The complete frames in what was read, with what an earlier read left:
        (kind, payload length, buffer, payload offset), so the payload is not
        copied. A partial frame is kept for the next read; after the first
        read that held a complete frame, C{heard_first_frame()} is called.
        Leaving the loop early keeps nothing (the caller decides the rest).
        """
        buffer = self.buffer + data if self.buffer else data
        end = len(buffer)
        offset = 0
        header_unpack = HEADER.unpack_from
        while end - offset >= 3:
            kind, length = header_unpack(buffer, offset)
            start = offset + 3
            stop = start + length
            if stop > end:
                break
            offset = stop
            yield kind, length, buffer, start
        self.buffer = buffer[offset:] if offset < end else b""
        if not self.heard and offset:
            self.heard = True
            self.heard_first_frame()

    def heard_first_frame(self) -> None:
        """The server has spoken to this leg: it is live there."""


# ---------------------------------------------------------------------------
# The command line both scripts share
# ---------------------------------------------------------------------------


def add_worker_option(parser: argparse.ArgumentParser) -> None:
    """The hidden option a script's own worker processes are started with."""
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)


def run_script(
    args: argparse.Namespace,
    worker_main: Callable[[str, str], int],
    orchestrate: Callable[[argparse.Namespace], dict[str, Any]],
    needs: str,
    warning: Callable[[dict[str, Any]], str | None],
) -> int:
    """
    A benchmark's main: a worker runs its legs; the orchestrator (Linux only,
    for C{needs}) runs, prints the JSON result and returns 1 if the run could
    not be made (no JSON) or had problems. SIGTERM ends it through the
    C{finally} blocks, so the server is stopped.
    """
    if args.worker:
        return worker_main(*args.worker)
    if not os.path.exists("/proc/self/stat"):
        raise SystemExit(f"needs Linux /proc for {needs}")

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        result = orchestrate(args)
    except (RuntimeError, OSError) as error:
        log(f"failed: {error}")
        return 1
    suspect = warning(result)
    if suspect:
        log(suspect)
    print(json.dumps(result, indent=2))
    for problem in result["problems"]:
        log(f"problem: {problem}")
    return 1 if result["problems"] else 0


def cannot_import(python: str, modules: str) -> str | None:
    """Why C{python} cannot import C{modules} ("a, b"), or None if it can: a reference server's interpreter check."""
    try:
        check = subprocess.run([python, "-c", f"import {modules}"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{python} cannot be run: {error}"
    return None if check.returncode == 0 else f"{python} cannot import {modules}"
