#!/usr/bin/env python3
"""
Media-link benchmark: what a call split across two instances costs beside
the same call bridged on one.

Starts a ``redis-server`` on a free loopback port and two instances,
``twistd -n audiohangup --redis ... --instance-id a|b --advertise-url ...
--api-token ... --link tcp:0:interface=127.0.0.1``, then holds N bridged
sessions two ways, one after the other, on the same two servers:

- ``local``: both legs on instance a (a's own bridge);
- ``split``: the visitor on a, then (once b's directory lists it on a) the
  resident on b, so a is the session's home and b's leg crosses the link.

Fake Asterisk legs send 20 ms slin frames both ways, drift-free (sessions
spread over the 20 ms in 1 ms steps unless --no-spread), each
payload stamped with its send time (``time.monotonic()``); the other leg
measures receive time minus send time, so latency p50/p99 is given per
direction (visitor->resident, resident->visitor). Over the window the CPU of
both server processes (utime + stime from ``/proc``) is summed and divided by
sessions and seconds: CPU ms per session-second, and CPU us per bridged
frame (and the system part of it), with the servers' context switches per
frame: a split frame wakes two processes, not one. A split frame's extra
latency is that of the loopback hop plus the link's own work on both
instances; on a real network add one RTT/2 per direction.

On a shared machine the CPU per frame moves with the other work on it, both
modes alike: ``--rounds N`` runs local then split N times on the same
servers and gives the median of the rounds' ratios, and ``--wait-idle``
first waits for the machine to be idle.

The client legs run on one Twisted reactor in this process (they are not
measured). With two usable cores and taskset, the servers and Redis go on
--server-cpu and this process on --load-cpu. The servers import the
checkout this script is in (PYTHONPATH), not what ``pip install`` installed.

A benchmark, not a test: it talks only to 127.0.0.1, every step is bounded,
and every child is stopped (SIGTERM, then SIGKILL) even on error. It prints
a reST table, then one JSON line. Run from the repository root::

    python bench/link.py --sessions 50 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from common import FRAME_SECONDS, LOOPBACK, MAGIC, PADDING, STAMP, log

common.set_log_name("link")

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-link-token-0123456789"
MODES = ("local", "split")
DIRECTIONS = ("visitor->resident", "resident->visitor")
SETUP_TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# The children: Redis and two instances
# ---------------------------------------------------------------------------


def start_redis(prefix: list[str]) -> tuple[subprocess.Popen[bytes], int, str]:
    """A redis-server on a free loopback port, no persistence; waits until it answers PING."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("no redis-server on PATH")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-link-redis-")
    process = subprocess.Popen(
        [*prefix, executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", directory, "--logfile", ""],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import socket
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return process, port, directory
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not answer PING within 15 s")


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def instance(name: str, redis_port: int, prefix: list[str]) -> common.Server:
    """Instance C{name} of the cluster: its HTTP port is fixed first, so it can advertise it."""
    http = free_port()
    server = common.Server([
        "--http", f"tcp:{http}:interface=127.0.0.1", "--call-records", "none",
        "--redis", f"redis://127.0.0.1:{redis_port}", "--instance-id", name,
        "--advertise-url", f"http://127.0.0.1:{http}", "--api-token", TOKEN, "--link", LOOPBACK,
        # Every leg comes from 127.0.0.1 at once: past 32 still without their UUID, the oldest would be crowded out.
        "--max-pending-per-source", "1000",
    ])
    server.argv = prefix + server.argv
    return server


# ---------------------------------------------------------------------------
# The legs: one Twisted reactor in this process
# ---------------------------------------------------------------------------


def run_modes(a: common.Server, b: common.Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mode, one after the other, on one reactor run (a reactor cannot be restarted)."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome: dict[str, Any] = {}

    async def all_modes() -> list[dict[str, Any]]:
        from twisted.internet.task import deferLater

        log(f"idle: {args.idle:g} s")
        cpu0, wall0 = a.cpu_seconds() + b.cpu_seconds(), time.monotonic()
        await deferLater(reactor, args.idle)
        idle = (a.cpu_seconds() + b.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
        runs = [{"mode": "idle", "cpu_percent_both": round(100 * idle, 2)}]
        for number in range(1, args.rounds + 1):
            for mode in MODES:
                log(f"{mode}, round {number} of {args.rounds}: {args.sessions} sessions, {args.seconds:g} s window")
                run = await run_mode(mode, a, b, args)
                run["round"] = number
                cpu = run.pop("cpu_seconds") / run["window_s"] - idle
                run["cpu_ms_per_session_second_net_of_idle"] = round(1000 * cpu / args.sessions, 3)
                runs.append(run)
        return runs

    def done(result: Any) -> None:
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(all_modes()).addBoth(done))
    reactor.run(installSignalHandlers=False)
    result = outcome.get("result")
    if not isinstance(result, list):
        raise RuntimeError(f"{getattr(result, 'value', result)!r}")
    return result


async def run_mode(mode: str, a: common.Server, b: common.Server, args: argparse.Namespace) -> dict[str, Any]:
    """N sessions in C{mode}, a warm-up, the window: latencies per direction and both servers' CPU."""
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from audiohangup.wire import Kind, encode_frame, encode_uuid

    slin = int(Kind.SLIN)
    monotonic = time.monotonic
    state: dict[str, Any] = {"t0": float("inf"), "t1": float("inf"), "sending": True}
    latencies: dict[str, list[int]] = {d: [] for d in DIRECTIONS}
    counts = {"sent_window": 0, "received_window": 0, "misrouted": 0, "lost_legs": 0}

    class Leg(common.LegIO, Protocol):
        def __init__(self, index: int, role_id: int, call_id: uuid.UUID) -> None:
            self.index, self.role_id, self.call_id = index, role_id, call_id
            self.bridged = False
            self.seq = 0
            self.direction = DIRECTIONS[1 - role_id]  # what this leg hears

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.socket = self.transport.getHandle()
            self.transport.write(encode_uuid(self.call_id))

        def dataReceived(self, data: bytes) -> None:
            now = monotonic()
            for kind, _length, buffer, start in self.frames(data):
                if kind != slin or buffer[start:start + 4] != MAGIC:
                    continue
                _, index, role_id, _seq, sent = STAMP.unpack_from(buffer, start)
                if index != self.index or role_id == self.role_id:
                    counts["misrouted"] += 1
                    continue
                self.bridged = True
                if state["t0"] <= sent < state["t1"]:
                    counts["received_window"] += 1
                    latencies[self.direction].append(int((now - sent) * 1e6))

        def connectionLost(self, reason: Any) -> None:
            if state["sending"]:
                counts["lost_legs"] += 1

    sessions = [(i, uuid.uuid4()) for i in range(args.sessions)]
    visitors = [Leg(i, 0, call_id) for i, call_id in sessions]
    residents = [Leg(i, 1, call_id) for i, call_id in sessions]
    legs = visitors + residents
    resident_at = a if mode == "local" else b
    start = monotonic() + 0.1  # moved on when the residents are connected

    def connect(server: common.Server, role: str, group: list[Leg]) -> Any:
        port = server.ports[f"audiosocket-{role}"]
        return gatherResults([
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10), leg) for leg in group
        ], consumeErrors=True)

    def listed_on_a() -> bool:
        body = json.loads(b.get("/calls?scope=cluster", token=TOKEN))
        on_a = {call["call_id"] for call in body["calls"] for leg in call["legs"]
                if leg["role"] == "visitor" and leg["instance_id"] == "a"}
        return {str(call_id) for _, call_id in sessions} <= on_a

    slots = 1 if args.no_spread else common.SPREAD_SLOTS
    # --legs-apart: a session's resident sends half a frame after its visitor
    # (the two channels of a real call are paced by their own endpoints).
    shift = slots // 2 if args.legs_apart else 0
    groups = [[leg for leg in legs if (leg.index + leg.role_id * shift) % slots == slot] for slot in range(slots)]

    def tick(k: int) -> None:
        if not state["sending"]:
            return
        for leg in groups[k % slots]:
            if leg.transport is None:
                continue
            sent = monotonic()
            leg.send(encode_frame(slin, STAMP.pack(MAGIC, leg.index, leg.role_id, leg.seq, sent) + PADDING))
            leg.seq += 1
            if state["t0"] <= sent < state["t1"]:
                counts["sent_window"] += 1
        following = start + (k + 1) * FRAME_SECONDS / slots
        reactor.callLater(max(0.0, following - monotonic()), tick, k + 1)

    links_before = sum("linked from instance b to instance a" in line for line in b.log_lines())

    async def go() -> dict[str, Any]:
        await connect(a, "visitor", visitors)
        if mode == "split":
            deadline = monotonic() + SETUP_TIMEOUT
            while not await deferToThread(listed_on_a):
                if monotonic() > deadline:
                    raise RuntimeError("b's directory does not list every visitor on a")
                await deferLater(reactor, 0.05)
        await connect(resident_at, "resident", residents)
        nonlocal start
        start = monotonic() + 0.05
        reactor.callLater(max(0.0, start - monotonic()), tick, 0)
        deadline = monotonic() + SETUP_TIMEOUT
        while not all(leg.bridged for leg in legs):
            if monotonic() > deadline:
                raise RuntimeError(f"{sum(not leg.bridged for leg in legs)} legs never heard their peer")
            await deferLater(reactor, 0.05)
        await deferLater(reactor, args.warmup)
        cpu0 = [a.cpu_seconds(), b.cpu_seconds()]
        system0 = a.cpu_split()[1] + b.cpu_split()[1]
        switches0 = switches(a) + switches(b)
        state["t0"] = monotonic()
        state["t1"] = state["t0"] + args.seconds
        await deferLater(reactor, args.seconds)
        cpu1 = [a.cpu_seconds(), b.cpu_seconds()]
        system = a.cpu_split()[1] + b.cpu_split()[1] - system0
        switched = switches(a) + switches(b) - switches0
        wall = monotonic() - state["t0"]
        await deferLater(reactor, 0.5)  # the window's last frames arrive
        state["sending"] = False
        for leg in legs:
            if leg.transport is not None:
                leg.transport.loseConnection()
        await deferLater(reactor, 1.0)
        return {"wall": wall, "cpu_a": cpu1[0] - cpu0[0], "cpu_b": cpu1[1] - cpu0[1], "system": system,
                "switches": switched}

    result = await go()
    n, wall = args.sessions, result["wall"]
    cpu = result["cpu_a"] + result["cpu_b"]
    frames = counts["received_window"]
    return {
        "mode": mode,
        "sessions": n,
        "window_s": round(wall, 3),
        "latency_ms": {d: common.summary_ms(latencies[d]) for d in DIRECTIONS},
        "cpu_percent": {"a": round(100 * result["cpu_a"] / wall, 2), "b": round(100 * result["cpu_b"] / wall, 2)},
        "cpu_ms_per_session_second": round(1000 * cpu / wall / n, 3),
        "cpu_us_per_bridged_frame": round(1e6 * cpu / frames, 2) if frames else None,
        "cpu_seconds": cpu,
        "system_cpu_us_per_bridged_frame": round(1e6 * result["system"] / frames, 2) if frames else None,
        "context_switches_per_frame": round(result["switches"] / frames, 3) if frames else None,
        "links_made": sum("linked from instance b to instance a" in line for line in b.log_lines())
        - links_before,
        "frames": dict(counts, lost=counts["sent_window"] - counts["received_window"]),
    }


def switches(server: common.Server) -> int:
    """
    Context switches of the server's main thread so far, voluntary (a wait
    for the next bytes) and not: how often it was woken, which the split
    mode's two processes on one core multiply.
    """
    total = 0
    for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
        total += common.proc_status_value(server.pid, key) or 0
    return total


# ---------------------------------------------------------------------------
# Orchestration, the table, the command line
# ---------------------------------------------------------------------------


def pin(args: argparse.Namespace) -> tuple[list[str], str]:
    """taskset prefix for the children and a sentence saying what was pinned."""
    allowed = os.sched_getaffinity(0)
    if args.no_pin:
        return [], "not pinned (--no-pin)"
    if shutil.which("taskset") is None or not {args.server_cpu, args.load_cpu} <= allowed \
            or args.server_cpu == args.load_cpu:
        return [], f"not pinned: needs taskset and two distinct usable cores of {sorted(allowed)}"
    os.sched_setaffinity(0, {args.load_cpu})
    return (["taskset", "-c", str(args.server_cpu)],
            f"servers and redis on core {args.server_cpu}, legs on core {args.load_cpu}")


def table(runs: list[dict[str, Any]]) -> list[str]:
    header = ["mode", "round", "sessions", "v->r p50", "v->r p99", "r->v p50", "r->v p99", "CPU a %", "CPU b %",
              "CPU ms/sess-s", "net of idle", "CPU us/frame", "sys us/frame", "switches/frame", "lost"]
    rows = [header]
    for run in runs[1:]:
        lat = run["latency_ms"]
        rows.append([run["mode"], str(run["round"]), str(run["sessions"]),
                     f"{lat[DIRECTIONS[0]]['p50']:.3f}", f"{lat[DIRECTIONS[0]]['p99']:.3f}",
                     f"{lat[DIRECTIONS[1]]['p50']:.3f}", f"{lat[DIRECTIONS[1]]['p99']:.3f}",
                     f"{run['cpu_percent']['a']:.1f}", f"{run['cpu_percent']['b']:.1f}",
                     f"{run['cpu_ms_per_session_second']:.2f}", f"{run['cpu_ms_per_session_second_net_of_idle']:.2f}",
                     f"{run['cpu_us_per_bridged_frame']:.1f}", f"{run['system_cpu_us_per_bridged_frame']:.1f}",
                     f"{run['context_switches_per_frame']:.2f}",
                     str(run["frames"]["lost"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows[1:]]
    return lines + [rule]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A call split across two instances against a local bridge.")
    parser.add_argument("--sessions", type=int, default=50, help="bridged sessions per mode; default 50")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per mode; default 10")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of frames before the window; default 2")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle servers measured first; default 5")
    parser.add_argument("--no-spread", action="store_true",
                        help="every leg sends in the same instant; by default sessions start their frames in 1 ms "
                             "steps, as calls that began at different times do")
    parser.add_argument("--legs-apart", action="store_true",
                        help="a session's resident sends 10 ms after its visitor, as the two channels of a real call "
                             "are paced by their own endpoints; by default they send together, so one wake-up of a "
                             "local bridge serves both directions")
    parser.add_argument("--server-cpu", type=int, default=1, help="core of the servers and redis; default 1")
    parser.add_argument("--load-cpu", type=int, default=0, help="core of the legs (this process); default 0")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--rounds", type=int, default=1,
                        help="local then split, this many times on the same servers: the ratio of each round's "
                             "pair is less exposed to a shared machine's changing load; default 1")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the machine to be idle (under --idle-below %% of a core "
                             "for 2 s): other work on a shared machine ends up in both servers' CPU; default 0, no wait")
    parser.add_argument("--idle-below", type=float, default=10.0, metavar="PERCENT",
                        help="with --wait-idle, what counts as idle; default 10")
    args = parser.parse_args(argv)
    if args.legs_apart and args.no_spread:
        parser.error("--legs-apart and --no-spread exclude each other")
    if not 1 <= args.sessions <= 1000 or not 1 <= args.seconds <= 600:
        parser.error("--sessions must be within 1..1000 and --seconds within 1..600")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be within 1..20")
    if not 0 <= args.wait_idle <= 3600 or not 0 < args.idle_below <= 200:
        parser.error("--wait-idle must be within 0..3600 and --idle-below within 0..200")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.exists("/proc/self/stat"):
        raise SystemExit("needs Linux /proc for the servers' CPU")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if args.wait_idle:
        common.wait_idle(args.wait_idle, busy_below=args.idle_below)
    prefix, pinning = pin(args)
    redis, redis_port, redis_dir = start_redis(prefix)
    servers: list[common.Server] = []
    try:
        for name in ("a", "b"):
            server = instance(name, redis_port, prefix)
            server.start()
            servers.append(server)
        runs = run_modes(servers[0], servers[1], args)
    finally:
        for server in servers:
            server.stop()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(redis_dir, ignore_errors=True)
    idle = runs[0]
    pairs = [(runs[k], runs[k + 1]) for k in range(1, len(runs), 2)]
    net = "cpu_ms_per_session_second_net_of_idle"
    ratios = [round(split["cpu_ms_per_session_second"] / local["cpu_ms_per_session_second"], 2)
              for local, split in pairs]
    net_ratios = [round(split[net] / local[net], 2) for local, split in pairs if local[net] > 0]
    added = {q: {d: statistics.median(split["latency_ms"][d][q] - local["latency_ms"][d][q] for local, split in pairs)
                 for d in DIRECTIONS}
             for q in ("p50", "p99")}
    added = {q: {d: round(value, 3) for d, value in by.items()} for q, by in added.items()}
    p99 = added["p99"]
    switched = {mode: [run["context_switches_per_frame"] for run in runs[1:] if run["mode"] == mode] for mode in MODES}
    ratio = round(statistics.median(ratios), 2)
    net_ratio = round(statistics.median(net_ratios), 2) if net_ratios else None
    spread = "all at once" if args.no_spread else "sessions spread in 1 ms steps" + (
        ", a session's two legs 10 ms apart" if args.legs_apart else "")
    print(f"{args.sessions} session(s) per mode, 20 ms slin both ways ({spread}), {args.seconds:g} s window, "
          f"{args.rounds} round(s); {pinning}")
    print()
    for line in table(runs):
        print(line)
    print()
    print(f"split - local: p50 {added['p50'][DIRECTIONS[0]]} / {added['p50'][DIRECTIONS[1]]} ms, "
          f"p99 {p99[DIRECTIONS[0]]} / {p99[DIRECTIONS[1]]} ms (v->r / r->v); split/local CPU per session "
          f"{ratio} ({net_ratio} net of idle, both servers idle: {idle['cpu_percent_both']} % of a core)"
          + (f", median of rounds {ratios}" if len(pairs) > 1 else "")
          + f"; links made in split: {[split['links_made'] for _, split in pairs]}/{args.sessions}; context "
          f"switches per frame {switched['local']} local, {switched['split']} split")
    print(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/link.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "pinning": pinning,
        "runs": runs,
        "added_ms": added,
        "cpu_ratio_split_to_local": ratio,
        "cpu_ratio_split_to_local_net_of_idle": net_ratio,
        "cpu_ratios_by_round": ratios,
    }))
    return 1 if any(split["links_made"] != args.sessions for _, split in pairs) or any(
        run["frames"]["lost"] or run["frames"]["misrouted"] for run in runs[1:]) else 0

if __name__ == "__main__":
    sys.exit(main())
