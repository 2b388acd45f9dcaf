#!/usr/bin/env python3
"""
The floor of a call split across two processes: the same bridge, local and
split, with nothing of audiohangup in it.

``bench/link.py`` finds a split session costing 2.2-2.5 times a local one
when frames arrive spread over the 20 ms, 1.7 times when they come in one
burst. This script asks whether that is audiohangup's or the shape's: it
bridges N sessions of two legs with the least a Python server can do (a bare
``select.epoll`` loop, ``--loop bare``), with Twisted's reactor and nothing
else (``--loop twisted``: a reader per socket), or with the reactor and
audiohangup's relay reading the sockets in one pass (``--loop relay``, as the
server does), two ways:

- ``local``: one process reads each session's visitor socket and writes its
  resident socket, and the other way round;
- ``split``: process a holds the visitors, process b the residents, and one
  TCP connection per session between them carries each frame across (one
  ``send`` and one ``recv`` more per frame on each side, as the media link).

A load process sends every leg a 323-byte frame every millisecond burst
(``--sessions`` sessions per burst, both legs of a session in the same
burst, as ``bench/link.py`` spreads its sessions over 1 ms steps), reads what
comes back, and checks it all arrived. The servers are pinned on
``--server-cpu`` (both of them, as in ``bench/link.py``), the load on
``--load-cpu``. It prints, per loop and mode, the servers' CPU per bridged
frame and their context switches per burst, then the split/local ratio::

    python bench/wakeups.py                        # --sessions 3 --bursts 5000, every loop
    python bench/wakeups.py --sessions 1 --loop bare

A benchmark, not a test: loopback only, every child bounded and killed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

FRAME = bytes([0x10, 0x01, 0x40]) + bytes(320)
READ_SIZE = 65536


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def switches() -> int:
    total = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


# ---------------------------------------------------------------------------
# The servers: a table of "bytes from this socket go to that one"
# ---------------------------------------------------------------------------


def serve(
    loop: str, listener: socket.socket, accepts: int, links: list[int], link_port: int,
    routes: list[tuple[int, int]], expected: int, report: str,
) -> None:
    """
    Take C{accepts} connections (each says its slot in its first byte) and
    connect one to C{link_port} for each slot of C{links} (saying it); then
    forward bytes from slot i to slot j for each (i, j) of C{routes} until
    C{expected} bytes went through, and write CPU and switches to C{report}.
    """
    slots: dict[int, socket.socket] = {}
    for index in links:
        sock = socket.create_connection(("127.0.0.1", link_port))
        sock.sendall(bytes([index]))
        slots[index] = sock
    for _ in range(accepts):
        conn, _ = listener.accept()
        slots[conn.recv(1)[0]] = conn
    for sock in slots.values():
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    table = {slots[i].fileno(): (slots[i], slots[j]) for i, j in routes}
    state: dict[str, float] = {"moved": 0, "cpu0": 0.0, "sw0": 0}

    def started() -> None:
        if not state["cpu0"]:
            state["cpu0"], state["sw0"] = time.process_time(), switches()

    def finish() -> None:
        with open(report, "w") as out:
            json.dump({"cpu": time.process_time() - state["cpu0"], "switches": switches() - state["sw0"]}, out)

    if loop == "bare":
        poller = select.epoll()
        for fd in table:
            poller.register(fd, select.EPOLLIN)
        ready(report)
        while state["moved"] < expected:
            for fd, _ in poller.poll():
                started()
                source, target = table[fd]
                data = source.recv(READ_SIZE)
                target.send(data)
                state["moved"] += len(data)
        finish()
        return

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    class Reader:
        def __init__(self, source: socket.socket, target: socket.socket) -> None:
            self.source, self.target = source, target

        def fileno(self) -> int:
            return self.source.fileno()

        def logPrefix(self) -> str:
            return "bridge"

        def doRead(self) -> None:
            started()
            data = self.source.recv(READ_SIZE)
            self.target.send(data)
            state["moved"] += len(data)
            if state["moved"] >= expected:
                finish()
                reactor.stop()  # type: ignore[attr-defined]

        def connectionLost(self, reason: object) -> None:
            pass

    if loop == "relay":
        # audiohangup's relay (its one epoll pass) reads the sockets, one reader of the reactor.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from audiohangup.relay import Relay

        class Held:
            """
            What the relay asks of a transport: the socket, reading paused (the
            relay reads), and a last read when the other end closed (the other
            server, done first): what is left goes on.
            """

            def __init__(self, sock: socket.socket, leg: Forward) -> None:
                self.sock, self.leg = sock, leg

            def doRead(self) -> object:
                data = self.sock.recv(READ_SIZE)
                if data:
                    self.leg.dataReceived(data)
                return None

            def readConnectionLost(self, reason: object) -> None:
                pass

            def getHandle(self) -> socket.socket:
                return self.sock

            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

            def fileno(self) -> int:
                return self.sock.fileno()

            def connectionLost(self, reason: object) -> None:
                pass

        class Forward:
            def __init__(self, target: socket.socket) -> None:
                self.target = target

            def dataReceived(self, data: bytes) -> None:
                started()
                self.target.send(data)
                state["moved"] += len(data)
                if state["moved"] >= expected:
                    finish()
                    relay.stopService()
                    reactor.stop()  # type: ignore[attr-defined]

        relay = Relay(reactor)  # type: ignore[arg-type]
        relay.startService()
        for source, target in table.values():
            forward = Forward(target)
            relay.adopt(forward, Held(source, forward))  # type: ignore[arg-type]
    else:
        for source, target in table.values():
            reactor.addReader(Reader(source, target))  # type: ignore[attr-defined]
    reactor.callWhenRunning(ready, report)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def ready(report: str) -> None:
    """Tell the load this server serves: no frame is sent before (a backlog would batch the first bursts)."""
    with open(report + ".ready", "w"):
        pass


# ---------------------------------------------------------------------------
# One run: the servers as child processes, and the load
# ---------------------------------------------------------------------------


def connect(port: int, index: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(bytes([index]))
    return sock


def run(loop: str, mode: str, sessions: int, bursts: int, server_cpu: int | None) -> dict[str, Any]:
    """Bridge C{sessions} sessions for C{bursts} bursts a millisecond apart; the servers' CPU and switches."""
    count = 2 if mode == "split" else 1
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=4 * sessions + 8) for _ in range(count)]
    ports = [listener.getsockname()[1] for listener in listeners]
    expected = 2 * sessions * len(FRAME) * bursts
    children: list[tuple[subprocess.Popen[bytes], str]] = []

    def child(which: int, accepts: int, links: list[int], routes: list[tuple[int, int]]) -> None:
        report = f"/tmp/bench-wakeups-{os.getpid()}-{which}.json"
        argv = [sys.executable, os.path.abspath(__file__), "--serve", loop,
                "--listener-fd", str(listeners[which].fileno()), "--accepts", str(accepts),
                "--links", json.dumps(links), "--link-port", str(ports[-1]), "--routes", json.dumps(routes),
                "--expected", str(expected), "--report", report]
        prefix = ["taskset", "-c", str(server_cpu)] if server_cpu is not None else []
        children.append((subprocess.Popen(prefix + argv, pass_fds=[listeners[which].fileno()]), report))

    if mode == "local":
        # Session k: its visitor is slot 2k, its resident 2k+1, both here.
        routes = [(2 * k, 2 * k + 1) for k in range(sessions)] + [(2 * k + 1, 2 * k) for k in range(sessions)]
        child(0, 2 * sessions, [], routes)
        legs = [connect(ports[0], index) for index in range(2 * sessions)]
        visitors, residents = legs[0::2], legs[1::2]
    else:
        # Session k: its visitor is slot k on a, its resident slot k on b, its link slot sessions + k on both.
        routes = [(k, sessions + k) for k in range(sessions)] + [(sessions + k, k) for k in range(sessions)]
        child(1, 2 * sessions, [], routes)
        child(0, sessions, [sessions + k for k in range(sessions)], routes)
        visitors = [connect(ports[0], k) for k in range(sessions)]
        residents = [connect(ports[1], k) for k in range(sessions)]
    legs = visitors + residents
    for sock in legs:
        sock.setblocking(False)
    received = 0

    def drain() -> None:
        nonlocal received
        for sock in legs:
            try:
                received += len(sock.recv(READ_SIZE))
            except BlockingIOError:
                pass

    limit = time.monotonic() + 30
    while not all(os.path.exists(report + ".ready") for _, report in children):
        if time.monotonic() > limit:
            raise SystemExit(f"a {loop} {mode} server did not start within 30 s")
        time.sleep(0.01)
    start = time.monotonic()
    for burst in range(bursts):
        for visitor, resident in zip(visitors, residents, strict=True):
            visitor.send(FRAME)
            resident.send(FRAME)
        deadline = start + (burst + 1) * 0.001
        while True:
            drain()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.0003))
    limit = time.monotonic() + 10
    while received < expected and time.monotonic() < limit:
        drain()
        time.sleep(0.001)
    results = []
    for process, report in children:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise SystemExit(
                f"a {loop} {mode} server did not finish: {received} of {expected} bytes came back"
            ) from None
        with open(report) as source:
            results.append(json.load(source))
        os.unlink(report)
        os.unlink(report + ".ready")
    for sock in legs:
        sock.close()
    frames = 2 * sessions * bursts
    return {
        "loop": loop, "mode": mode, "sessions": sessions, "bursts": bursts, "lost_bytes": expected - received,
        "cpu_us_per_frame": round(sum(result["cpu"] for result in results) / frames * 1e6, 2),
        "switches_per_burst": round(sum(result["switches"] for result in results) / bursts, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=3, help="sessions per 1 ms burst; default 3")
    parser.add_argument("--bursts", type=int, default=5000, help="bursts, one a millisecond; default 5000")
    parser.add_argument("--loop", choices=("bare", "twisted", "relay", "all"), default="all",
                        help="bare epoll, Twisted's reactor, or it with audiohangup's relay; default all")
    parser.add_argument("--rounds", type=int, default=3, help="local then split, this many times; default 3")
    parser.add_argument("--server-cpu", type=int, default=1, help="core of the servers; default 1")
    parser.add_argument("--load-cpu", type=int, default=0, help="core of the load (this process); default 0")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    # A server child's own arguments.
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--listener-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--accepts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--links", help=argparse.SUPPRESS)
    parser.add_argument("--link-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--routes", help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.sessions <= 100:
        parser.error("--sessions: 1 to 100 (a connection says its slot in one byte)")
    if args.serve:
        listener = socket.socket(fileno=args.listener_fd)
        serve(args.serve, listener, args.accepts, json.loads(args.links), args.link_port,
              [tuple(pair) for pair in json.loads(args.routes)], args.expected, args.report)
        return 0
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    pinned = not args.no_pin and shutil.which("taskset") is not None \
        and {args.server_cpu, args.load_cpu} <= allowed and args.server_cpu != args.load_cpu
    if pinned:
        pin(args.load_cpu)
    server_cpu = args.server_cpu if pinned else None
    loops = ("bare", "twisted", "relay") if args.loop == "all" else (args.loop,)
    rows = []
    for loop in loops:
        for _ in range(args.rounds):
            for mode in ("local", "split"):
                rows.append(run(loop, mode, args.sessions, args.bursts, server_cpu))
    print(f"{args.sessions} session(s) a burst, {args.bursts} bursts 1 ms apart, {args.rounds} round(s); "
          + (f"servers on core {args.server_cpu}, load on core {args.load_cpu}" if pinned else
             "nothing pinned (--no-pin, or no taskset, or not two distinct usable cores)"))
    print()
    print("=======  =====  ================  ==================  ==========")
    print("loop     mode   CPU us per frame  switches per burst  lost bytes")
    print("=======  =====  ================  ==================  ==========")
    for row in rows:
        print(f"{row['loop']:<7}  {row['mode']:<5}  {row['cpu_us_per_frame']:<16}  "
              f"{row['switches_per_burst']:<18}  {row['lost_bytes']}")
    print("=======  =====  ================  ==================  ==========")
    print()
    summary = {}
    for loop in loops:
        local = [row["cpu_us_per_frame"] for row in rows if row["loop"] == loop and row["mode"] == "local"]
        split = [row["cpu_us_per_frame"] for row in rows if row["loop"] == loop and row["mode"] == "split"]
        ratios = [there / here for there, here in zip(split, local, strict=True)]
        summary[loop] = round(statistics.median(ratios), 2)
        print(f"{loop}: split/local CPU per frame {summary[loop]} (median of rounds {[round(r, 2) for r in ratios]})")
    print(json.dumps({"command": "python bench/wakeups.py " + " ".join(sys.argv[1:]), "rows": rows,
                      "split_to_local": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
