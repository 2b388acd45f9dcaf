#!/usr/bin/env python3
"""
audiohangup beside the reference servers, under one load.

Runs ``twistd -n audiohangup`` (its defaults: records, metrics, the bridge
flow, the pacer) and the reference AudioSocket bridges of
``../shared/bench/peers`` (``raw_epoll.py``, ``asyncio_server.py``,
``go_server/``) under the same load from ``bench/load.py``: its worker
processes play the Asterisk legs, its histogram gives the bridge latency, its
``/proc`` readings the server's CPU over the window. Each run is one fresh
server process; with ``taskset`` the server is pinned to one core and the
load (this process and its workers) to the other, and the servers take turns
in every repeat (the order rotates), so that noise on the machine hits them
alike.

Two loads:

- held (default): ``--sessions`` bridged calls (2 legs each, 20 ms frames
  both ways, phases spread over the 20 ms) for ``--seconds`` after a
  warm-up. Reported: the server's CPU (% of a core) and per 100 sessions,
  user and kernel time, bridge latency p50/p99, frames lost, and each
  server's CPU over raw_epoll.py's in the same repeat;
- ``--churn``: ``--churn-rate`` calls a second, each bridged for
  ``--lifetime`` seconds and ended through ``POST /calls/{id}/hangup`` on one
  leg, both legs answering ``00 00 00`` with a reset. Reported: the server's
  CPU per call, user and kernel time, API request to ``00 00 00`` p99.

A reference that cannot run here (no Go toolchain, no aiohttp) is skipped
with a line that says so. The table goes to stdout, then one JSON line with
every run; progress goes to stderr. A benchmark, not a test: everything is
on 127.0.0.1 and every server is stopped (SIGTERM, then SIGKILL).

Run from the repository root::

    python bench/peers.py --seconds 5 --repeats 1
    python bench/peers.py --repeats 3 --asyncio-python /tmp/peers-venv/bin/python
    python bench/peers.py --repeats 3 --sessions 500
    python bench/peers.py --repeats 3 --churn
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# This script's directory (sys.path[0] when it is run as a script) holds common.py and load.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import load
from common import log

#: Where the reference servers live: ../shared/bench/peers beside the checkout.
PEERS_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peers"
#: The server every other one is compared with: the floor for CPython.
FLOOR = "raw_epoll"
SERVERS = ("audiohangup", "asyncio", "go", FLOOR)
#: Lines of audiohangup's log worth reporting (twistd's log levels).
LOG_TROUBLE = ("#warn]", "#error]", "#critical]")
GO_BUILD_TIMEOUT = 300.0

common.set_log_name("peers")


# ---------------------------------------------------------------------------
# The servers
# ---------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """
    Loopback ports nothing listens on, bound all at once so they differ: the
    reference servers take their ports on the command line, not port 0.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ReferenceServer(common.Server):
    """
    A reference server as load.py sees audiohangup: started with its three
    ports on the command line, ready once ``GET /calls`` answers (it logs no
    ``listening on`` line), its live legs counted from ``GET /calls`` (it has
    no ``/health``). Everything else (CPU, descriptors, stop) is common.Server's.
    """

    def __init__(self, argv: list[str], ports: list[int]) -> None:
        super().__init__()
        self.argv = argv
        self.ports = dict(zip(("audiosocket-visitor", "audiosocket-resident", "http"), ports))

    def start(self) -> None:
        threading.Thread(target=self._wait_api, daemon=True).start()
        super().start()

    def _wait_api(self) -> None:
        """Set C{listening} once the API answers: the leg ports are bound before it in every reference."""
        deadline = time.monotonic() + common.SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return
            if self.health_legs() is not None:
                self.listening.set()
                return
            time.sleep(0.1)

    def health_legs(self) -> int | None:
        """
        Live legs from C{GET /calls}: asyncio_server.py and go_server count
        them; raw_epoll.py lists call ids, each with both legs once a call is held.
        """
        try:
            body = json.loads(self.get("/calls", timeout=2.0))
        except (OSError, ValueError):
            return None
        if "count" in body:
            return int(body["count"])
        return 2 * len(body.get("calls", ()))


@dataclass
class Contender:
    """A server to measure: how to start a fresh one, and whether it writes audiohangup's log."""

    name: str
    make: Callable[[], common.Server]
    server_args: str = ""
    audiohangup: bool = False
    notes: list[str] = field(default_factory=list)


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """The command run on one core with taskset (as is when not pinning)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def audiohangup(args: argparse.Namespace) -> Contender:
    """twistd -n audiohangup on ephemeral loopback ports, its defaults plus --audiohangup-args."""

    def make() -> common.Server:
        server = common.Server(shlex.split(args.audiohangup_args))
        server.argv = pinned(server.argv, args.server_cpu)
        return server

    return Contender("audiohangup", make, server_args=args.audiohangup_args, audiohangup=True)


def reference(name: str, argv: list[str], cpu: int | None) -> Contender:
    """A reference server: its command line plus the three ports, fresh ones for every run."""

    def make() -> common.Server:
        ports = free_ports(3)
        flags = ["--visitor-port", str(ports[0]), "--resident-port", str(ports[1]), "--api-port", str(ports[2])]
        return ReferenceServer(pinned([*argv, *flags], cpu), ports)

    return Contender(name, make)


def find_asyncio(args: argparse.Namespace) -> Contender | str:
    """asyncio_server.py under an interpreter that has aiohttp, or why it is skipped."""
    script = args.peers_dir / "asyncio_server.py"
    if not script.is_file():
        return f"no {script}"
    python = args.asyncio_python or sys.executable
    why = common.cannot_import(python, "aiohttp")
    if why is not None:
        return f"{why} (give --asyncio-python, the python of a venv that has it)"
    return reference("asyncio", [python, str(script)], args.server_cpu)


def find_go(args: argparse.Namespace, workdir: str) -> Contender | str:
    """go_server: the binary given, or built from a copy of go_server/ (the peers folder may be read-only)."""
    if args.go_bin:
        if not os.access(args.go_bin, os.X_OK):
            return f"--go-bin {args.go_bin} is not an executable"
        return reference("go", [str(args.go_bin)], args.server_cpu)
    source = args.peers_dir / "go_server"
    if not source.is_dir():
        return f"no {source}"
    go = shutil.which("go")
    if go is None:
        return "no Go toolchain (go not on PATH; apt-get install golang-go, or give --go-bin)"
    copy = os.path.join(workdir, "go_server")
    os.mkdir(copy)
    for item in source.iterdir():
        if item.is_file():
            shutil.copyfile(item, os.path.join(copy, item.name))
    binary = os.path.join(copy, "go_server_bin")
    log(f"building go_server with {go}")
    try:
        built = subprocess.run([go, "build", "-o", binary, "."], cwd=copy, capture_output=True, text=True,
                               timeout=GO_BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"go build failed: {error}"
    if built.returncode != 0:
        return f"go build failed: {(built.stderr or built.stdout).strip()[-300:]}"
    return reference("go", [binary], args.server_cpu)


def contenders(args: argparse.Namespace, workdir: str) -> tuple[list[Contender], dict[str, str]]:
    """The servers asked for that can run here, and a reason for each that cannot."""
    found: list[Contender] = []
    skipped: dict[str, str] = {}
    for name in args.servers:
        if name == "audiohangup":
            entry: Contender | str = audiohangup(args)
        elif name == FLOOR:
            script = args.peers_dir / "raw_epoll.py"
            entry = reference(FLOOR, [sys.executable, str(script)], args.server_cpu) if script.is_file() \
                else f"no {script}"
        elif name == "asyncio":
            entry = find_asyncio(args)
        else:
            entry = find_go(args, workdir)
        if isinstance(entry, str):
            skipped[name] = entry
        else:
            found.append(entry)
    return found, skipped


# ---------------------------------------------------------------------------
# Pinning
# ---------------------------------------------------------------------------


def pin_cores(args: argparse.Namespace) -> str:
    """
    Put this process (and so the load workers it starts, which inherit its
    affinity) on --load-cpu; the servers go on --server-cpu through taskset.
    Pinning needs both cores and taskset; without them nothing is pinned, so
    that neither side gets a core the other may not use.
    """
    if args.no_pin:
        args.server_cpu = None
        return "not pinned (--no-pin)"
    allowed = os.sched_getaffinity(0)
    why = None
    if shutil.which("taskset") is None:
        why = "no taskset (util-linux)"
    elif not {args.server_cpu, args.load_cpu} <= allowed or args.server_cpu == args.load_cpu:
        why = f"cores {args.server_cpu} and {args.load_cpu} are not two of the usable {sorted(allowed)}"
    if why:
        args.server_cpu = None
        log(f"not pinning: {why}")
        return f"not pinned: {why}"
    os.sched_setaffinity(0, {args.load_cpu})
    return f"server on core {args.server_cpu} (taskset -c {args.server_cpu}), load on core {args.load_cpu}"


# ---------------------------------------------------------------------------
# One run, and what is kept of it
# ---------------------------------------------------------------------------


def load_argv(args: argparse.Namespace) -> list[str]:
    """bench/load.py's options for the load asked for; every server gets the same."""
    argv = ["--seconds", str(args.seconds), "--warmup", str(args.warmup), "--spread", "--seed", str(args.seed),
            "--leak-wait", "5"]
    if args.wait_idle:
        argv += ["--wait-idle", str(args.wait_idle)]
    if args.churn:
        argv += ["--sessions", "0", "--churn", str(args.churn_rate), "--lifetime", f"{args.lifetime}:{args.lifetime}",
                 "--mix", "api=1", "--reset-after-hangup", "1", "--join-delay", "0"]
    else:
        argv += ["--sessions", str(args.sessions)]
    return argv


def reference_problems(result: dict[str, Any]) -> list[str]:
    """
    load.py's problems, less what a reference server cannot give: it logs no
    close reason, and its hangup answer has no per-leg result (load.py counts
    that as an API error even with status 200).
    """
    only_200 = set(result["hangup_latency_ms"]["api_status"]) <= {"200"}
    return [p for p in result["problems"]
            if not p.startswith("close reasons in the log")
            and not (only_200 and p.startswith("api_errors"))]


def summarize(contender: Contender, result: dict[str, Any], server: common.Server, args: argparse.Namespace
              ) -> dict[str, Any]:
    """The figures of one run that the comparison needs (the rest is in load.py's own report)."""
    srv = result["server"]
    latency = result["bridge_latency_ms"]
    run: dict[str, Any] = {
        "cpu_percent": srv["cpu_percent"],
        "user_percent": srv["cpu_percent_user"],
        "kernel_percent": srv["cpu_percent_system"],
        "rss_mib": srv["rss_mib"],
        "bridge_p50_ms": latency["p50"],
        "bridge_p99_ms": latency["p99"],
        "bridge_max_ms": latency["max"],
        "frames_received": result["frames"]["received_in_window"],
        "frames_lost": result["frames"]["lost"],
        "frames_late": result["frames"]["late"],
        "silence_inserted": result["frames"]["held_silence_inserted"],
        "misrouted": result["frames"]["misrouted"],
        "bytes_after_hangup": result["frames"]["bytes_after_hangup"],
        "client_cpu_percent": result["client"]["cpu_percent"],
        "client_tick_lag_p99_ms": result["client"]["tick_lag_ms"]["p99"],
        "other_cpu_percent": result["machine"]["other_cpu_percent"],
        "noisy": result["noisy"],
    }
    if args.churn:
        run["cpu_ms_per_call"] = round(srv["cpu_percent"] * 10.0 / args.churn_rate, 3)
        run["calls"] = result["churn"]["calls_done"]
        run["api_to_hangup_frame_p99_ms"] = result["hangup_latency_ms"]["api_to_hangup_frame"]["p99"]
    else:
        run["cpu_per_100_sessions"] = round(srv["cpu_percent"] * 100.0 / args.sessions, 2)
    if contender.audiohangup:
        run["problems"] = result["problems"]
        trouble = [line for line in server.log_lines() if any(level in line for level in LOG_TROUBLE)]
        run["log_warnings"] = len(trouble)
        run["log_warning_sample"] = trouble[:3]
        run["legs_ended_mismatch"] = srv["legs_ended_mismatch"]
    else:
        run["problems"] = reference_problems(result)
    return run


def measure(contender: Contender, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh server of this contender under the load; a failed run is kept with its error."""
    load_args = load.parse_args([*load_argv(args), "--server-args", contender.server_args])
    server = contender.make()
    log(f"{contender.name}: {shlex.join(server.argv)}")
    try:
        result = load.orchestrate(load_args, server)
    except (RuntimeError, OSError) as error:
        log(f"{contender.name}: run failed: {error}")
        return {"error": str(error)}
    run = summarize(contender, result, server, args)
    for problem in run["problems"]:
        log(f"{contender.name}: problem: {problem}")
    return run


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run's CPU over the floor's in the same repeat: the one figure noise between repeats does not move."""
    floor = {run["repeat"]: run["cpu_percent"] for run in runs if run["server"] == FLOOR and "cpu_percent" in run}
    for run in runs:
        base = floor.get(run["repeat"])
        if base and "cpu_percent" in run:
            run["cpu_ratio_to_floor"] = round(run["cpu_percent"] / base, 2)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def span(values: list[Any], digits: int) -> str:
    """min-max of what the repeats gave (one value when they agree), '-' when none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def table(runs: list[dict[str, Any]], names: list[str], args: argparse.Namespace) -> list[str]:
    """
    One row per server, ranges over its clean runs (neither noisy nor failed), as noisy runs are
    discarded in docs/performance.rst; over every completed run, marked '*', when none was clean.
    """
    if args.churn:
        cost = ("CPU ms/call", "cpu_ms_per_call", 2)
        tail = ("API->00 p99", "api_to_hangup_frame_p99_ms", 1)
    else:
        cost = ("CPU/100 sess", "cpu_per_100_sessions", 1)
        tail = ("p50 ms", "bridge_p50_ms", 2)
    columns = [cost, ("CPU %", "cpu_percent", 1), ("user %", "user_percent", 1), ("kernel %", "kernel_percent", 1),
               tail, ("p99 ms", "bridge_p99_ms", 1), (f"x {FLOOR}", "cpu_ratio_to_floor", 2)]
    header = ["server"] + [title for title, _, _ in columns] + ["lost (all runs)", "clean runs"]
    rows = [header]
    for name in names:
        mine = [run for run in runs if run["server"] == name]
        good = [run for run in mine if "error" not in run]
        clean = [run for run in good if not run["noisy"]]
        kept, flag = (clean, "") if clean else (good, "*")
        row = [name + flag] + [span([run.get(key) for run in kept], digits) for _, key, digits in columns]
        row += [str(sum(run["frames_lost"] for run in good)), f"{len(clean)}/{len(mine)}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="audiohangup beside the reference servers of ../shared/bench/peers, under bench/load.py's load.",
    )
    parser.add_argument("--sessions", type=int, default=200, help="held bridged calls (2 legs each); default 200")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window; default 15")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the window; default 3")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every server; default 3")
    parser.add_argument("--churn", action="store_true",
                        help="the churn load instead of held calls: --churn-rate calls/s, each bridged for "
                             "--lifetime s and ended through the API, both legs answering with a reset")
    parser.add_argument("--churn-rate", type=float, default=100.0, help="with --churn: calls per second; default 100")
    parser.add_argument("--lifetime", type=float, default=1.0, help="with --churn: a call's seconds; default 1")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"which servers, comma-separated; default {','.join(SERVERS)}")
    parser.add_argument("--peers-dir", type=Path, default=PEERS_DIR, help=f"the reference servers; default {PEERS_DIR}")
    parser.add_argument("--asyncio-python", metavar="PYTHON",
                        help="interpreter with aiohttp for asyncio_server.py; default this one")
    parser.add_argument("--go-bin", metavar="FILE", help="a built go_server; default: build one with go if there is go")
    parser.add_argument("--audiohangup-args", default="",
                        help='extra twistd audiohangup options, one string, e.g. "--call-records none"')
    parser.add_argument("--server-cpu", type=int, default=1, help="core the servers run on; default 1")
    parser.add_argument("--load-cpu", type=int, default=0, help="core the load runs on; default 0")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--seed", type=int, default=1, help="load.py's random seed; default 1")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before every run, wait up to SECONDS for the machine to be idle; default 0")
    args = parser.parse_args(argv)
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown or not args.servers:
        parser.error(f"--servers: {', '.join(sorted(unknown)) or 'none'}: pick from {', '.join(SERVERS)}")
    if not 1 <= args.repeats <= 50 or not 1 <= args.sessions <= 5000:
        parser.error("--repeats must be within 1..50 and --sessions within 1..5000")
    if not 0.5 <= args.lifetime <= 600:
        parser.error("--lifetime must be within 0.5..600 seconds")
    load.parse_args(load_argv(args))  # load.py's own checks on what it will be given
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.exists("/proc/self/stat"):
        raise SystemExit("needs Linux /proc for the servers' CPU")

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    pinning = pin_cores(args)
    workdir = tempfile.mkdtemp(prefix="bench-peers-")
    runs: list[dict[str, Any]] = []
    try:
        found, skipped = contenders(args, workdir)
        for name, why in skipped.items():
            log(f"{name} skipped: {why}")
        if not found:
            log("no server to measure")
            return 1
        for repeat in range(args.repeats):
            shift = repeat % len(found)
            for position, contender in enumerate(found[shift:] + found[:shift]):
                log(f"repeat {repeat + 1}/{args.repeats}, {position + 1}/{len(found)}: {contender.name}")
                run = {"server": contender.name, "repeat": repeat, "position": position}
                run.update(measure(contender, args))
                runs.append(run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(runs)
    if args.churn:
        load_text = (f"churn: {args.churn_rate:g} calls/s, each {args.lifetime:g} s then API hangup, "
                     f"both legs reset; {args.seconds:g} s window")
    else:
        load_text = f"held: {args.sessions} sessions ({2 * args.sessions} legs), 20 ms both ways; {args.seconds:g} s window"
    print(f"{load_text}; {args.repeats} repeat(s), ranges min-max; {pinning}")
    for name, why in skipped.items():
        print(f"{name}: skipped, {why}")
    for line in table(runs, [c.name for c in found], args):
        print(line)
    print("ranges over the clean runs: a noisy run (other processes over 10 % of a core in the window) or a failed "
          "one is left out; * = no clean run, all runs shown; every run is in the JSON")
    print(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/peers.py " + shlex.join(sys.argv[1:]),
        "load": load_argv(args),
        "pinning": pinning,
        "skipped": skipped,
        "runs": runs,
    }))
    return 1 if any("error" in run or run["problems"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
