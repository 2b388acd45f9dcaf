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
The server wrapper, the workers' plumbing and the ``/proc`` helpers are in
``bench/common.py``, shared with ``bench/load.py``.

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
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

# This script's directory (sys.path[0] when it is run as a script) holds common.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Shared with bench/load.py: frame format, server wrapper, workers, /proc and machine-load helpers.
import common
from common import FRAME_SECONDS, MAGIC, PADDING, PAYLOAD_BYTES, ROLES, STAMP, log

SILENCE_PAYLOAD = b"\x00" * PAYLOAD_BYTES
READY_TIMEOUT = 60.0

common.set_log_name("bridge")


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

    from audiohangup.wire import Kind, encode_frame, encode_uuid

    monotonic = time.monotonic
    stamp_pack = STAMP.pack
    stamp_unpack = STAMP.unpack_from
    slin = int(Kind.SLIN)
    one_way: bool = cfg["one_way"]
    drain: float = cfg["drain"]

    class Run(common.WorkerRun):
        def __init__(self) -> None:
            super().__init__(cfg, reactor)
            self.legs: list[Leg] = []
            self.latencies_us: list[int] = []
            self.tick_lag_us: list[int] = []
            self.tick_us: list[int] = []
            self.lost_early: Counter[str] = Counter()
            self.k = 0
            self.groups: list[list[Leg]] = []
            self.slot = FRAME_SECONDS
            self.closed = 0

        # setup

        def connect_all(self) -> None:
            semaphore = DeferredSemaphore(common.CONNECT_CONCURRENCY)
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
                self.ready()

        def started(self, now: float) -> None:
            senders = [leg for leg in self.legs if not (one_way and leg.role_id == 1)]
            slots = common.SPREAD_SLOTS if cfg["spread"] else 1
            self.slot = FRAME_SECONDS / slots
            self.groups = [senders[i::slots] for i in range(slots)]
            reactor.callLater(max(0.0, self.start - now), self.tick)

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
                leg.send(encode_frame(slin, stamp_pack(MAGIC, leg.index, leg.role_id, leg.seq, sent) + PADDING))
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

        def close_calls(self) -> None:
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

        def shut_down(self) -> None:
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
                "cpu": self.cpu_used(),
            }
            with open(result_path, "w") as f:
                json.dump(result, f)

    class Leg(common.LegIO, Protocol):
        def __init__(self, run: Run, index: int, role_id: int, call_id: uuid.UUID) -> None:
            self.run = run
            self.index = index
            self.role_id = role_id
            self.peer_role = 1 - role_id
            self.call_id = call_id
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

        def dataReceived(self, data: bytes) -> None:
            now = monotonic()
            run = self.run
            t0, t1 = run.t0, run.t1
            in_window = t0 <= now < t1
            for kind, length, buffer, start in self.frames(data):
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
                elif kind == slin and buffer[start:start + length] == SILENCE_PAYLOAD:
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

        def heard_first_frame(self) -> None:
            self.run.leg_heard()

        def connectionLost(self, reason: Any) -> None:
            self.gone = True
            self.run.leg_lost(self, reason)

    run = Run()
    return run.serve(run.connect_all, READY_TIMEOUT, lambda: (
        f"not every leg heard from the server within {READY_TIMEOUT:.0f} s "
        f"({sum(leg.heard for leg in run.legs)}/{len(run.legs)})"
    ))


# ---------------------------------------------------------------------------
# Orchestrator: server, workers, /proc sampling, the JSON report.
# ---------------------------------------------------------------------------


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    if args.wait_idle:
        common.wait_idle(args.wait_idle)
    server = common.Server()
    workers: list[common.Worker] = []
    try:
        server.start()
        sessions = [(index, str(uuid.uuid4())) for index in range(args.sessions)]
        run_length = args.warmup + args.seconds + args.drain
        with tempfile.TemporaryDirectory(prefix="bench-bridge-") as directory:
            for number in range(args.client_procs):
                mine = sessions[number::args.client_procs]
                if not mine:
                    continue
                workers.append(common.Worker(os.path.abspath(__file__), number, {
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
            common.start_workers(workers, READY_TIMEOUT)
            health = server.health()
            if health.get("legs") != 2 * args.sessions:
                raise RuntimeError(f"server reports {health.get('legs')} legs, not {2 * args.sessions}")
            log(f"{2 * args.sessions} legs live in {len(workers)} client process(es): "
                f"{args.warmup:g} s warm-up, {args.seconds:g} s measured")
            start = common.go_workers(workers)
            t0 = start + args.warmup
            t1 = t0 + args.seconds
            common.sleep_until(t0)
            cpu0, wall0, own0 = server.cpu_seconds(), time.monotonic(), common.own_cpu()
            busy0, irq0 = common.machine_busy_seconds(), common.machine_busy_seconds(interrupts=True)
            wakeup_delays = common.probe_wakeups(t1)
            cpu1, wall1, own1 = server.cpu_seconds(), time.monotonic(), common.own_cpu()
            busy1, irq1 = common.machine_busy_seconds(), common.machine_busy_seconds(interrupts=True)
            rss = server.rss_kib()
            server_died = server.process.poll() if server.process is not None else None
            results = [worker.result(args.drain + 30.0) for worker in workers]
        # Give the server a moment to log every leg's end before stopping it.
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            if sum(1 for line in server.log_lines() if common.LEG_ENDED.search(line)) >= 2 * args.sessions:
                break
            time.sleep(0.05)
    finally:
        for worker in workers:
            worker.stop()
        exit_code = server.stop()
        log(f"server stopped, exit code {exit_code}")
    common.raise_worker_errors(results)
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
    server: common.Server,
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
    ends = Counter(match.group(1) for line in lines if (match := common.LEG_ENDED.search(line)))
    troubles = [line for line in lines if "Traceback" in line or "Unhandled" in line or " failed" in line]
    lag = common.summary_ms(tick_lag)
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
                k: v for k, v in common.summary_ms(machine["wakeup_delays_us"]).items() if k in ("p50", "p99", "max")
            },
        },
        "sessions": args.sessions,
        "legs": legs,
        "seconds": seconds,
        "warmup": args.warmup,
        "one_way": args.one_way,
        "spread": args.spread,
        "client_procs": len(results),
        "bridged_latency_ms": common.summary_ms(latencies),
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
            dict(common.summary_ms(jitter), legs=jitter_legs) if jitter_legs else None
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
            "tick_ms_p99": common.summary_ms(tick)["p99"],
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
                        help=f"spread the legs' send times over the 20 ms in {common.SPREAD_SLOTS} slots "
                             "instead of sending every leg's frame on one shared tick")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the machine to be idle (under 10%% of a core "
                             "for 2 s); default 0, no wait")
    common.add_worker_option(parser)
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


def suspect(result: dict[str, Any]) -> str | None:
    """A warning when other processes took enough of the machine to make the numbers suspect."""
    other = result["machine"]["other_cpu_percent"]
    if other > 20:
        return (f"warning: other processes used about {other:.0f}% of a core during the window; "
                "the numbers are suspect")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return common.run_script(args, worker_main, orchestrate, "the server's CPU and memory", suspect)


if __name__ == "__main__":
    sys.exit(main())
