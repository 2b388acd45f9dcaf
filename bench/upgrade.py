#!/usr/bin/env python3
"""
Upgrade benchmark: hand the ports over from a running process to a new one
while calls go on, and count what was lost.

Starts ``twistd -n audiohangup --reuse-port --local-directory DIR
--api-token ...`` (the old process) on fixed loopback ports, holds --hold
bridged calls on it, and starts --rate new calls a second for --seconds.
At a third of that time it starts a second process (the new one) with the
same options on the same ports, waits until it listens, and sends SIGTERM
to the old one, which drains. The held calls end over the next --hold-end
seconds; each new call lasts --call-seconds.

Every call ends by the API: ``POST /calls/{id}/hangup?wait=true`` on the
shared HTTP port, which either process takes (the kernel spreads the
connections); a call held by the other process is forwarded to it through
the local directory. A call is

- *refused* if a leg could not connect, or was closed before any audio came;
- *dropped* if a leg was hung up or closed before its hangup was asked for,
  or if its two legs did not hear each other (each leg sends a stamped frame
  every 100 ms, and must hear the other's);
- *answered* when its hangup request got a 200 naming both legs; the
  answers are counted by the process that held the call (from ``GET
  /calls?scope=cluster``, polled every second).

It prints these, and how long the old process took to exit after its last
call ended (from the answer to that call's hangup to the process's exit),
then one JSON line. Target: 0 dropped, 0 refused, every API request
answered. The client legs run on one Twisted reactor in this process. The
servers import the checkout this script is in (PYTHONPATH). Run from the
repository root::

    python bench/upgrade.py                 # 100 held, 10 new a second for 60 s
    python bench/upgrade.py --quick         # 20 held, 4 a second for 15 s
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from common import log

common.set_log_name("upgrade")

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-upgrade-token-0123456789"
#: A leg's stamp: magic, call number, role.
STAMP = struct.Struct("!4sIB")
MAGIC = b"UPG\x01"
SEND_EVERY = 0.1


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Process(common.Server):
    """One of the two processes on the shared ports."""

    def __init__(self, name: str, ports: dict[str, int], folder: str, prefix: list[str]) -> None:
        super().__init__()
        self.name = name
        self.exited_at: float | None = None
        self.argv = [*prefix, str(self.twistd), "-n", "--pidfile=", "audiohangup",
                     "--visitor", f"tcp:{ports['visitor']}:interface=127.0.0.1",
                     "--resident", f"tcp:{ports['resident']}:interface=127.0.0.1",
                     "--http", f"tcp:{ports['http']}:interface=127.0.0.1",
                     "--max-pending-per-source", "0", "--call-records", "none", "--close-timeout", "1",
                     "--reuse-port", "--on-stop", "drain", "--local-directory", folder,
                     "--api-token", TOKEN, "--instance-id", name]

    def watch_exit(self) -> None:
        def wait() -> None:
            assert self.process is not None
            self.process.wait()
            self.exited_at = time.monotonic()

        threading.Thread(target=wait, daemon=True).start()


class Call:
    """Both legs of one call, and what became of it."""

    def __init__(self, number: int, old: bool) -> None:
        self.number = number
        self.call_id = uuid.uuid4()
        self.held = old  # one of the calls held on the old process from the start
        self.legs: list[Any] = []
        self.ending = False  # its hangup was asked for
        self.refused = False
        self.dropped: str | None = None
        self.answered = False
        self.instance: str | None = None
        self.ended_at: float | None = None


def make_leg_class() -> Any:
    from twisted.internet.protocol import Protocol

    from audiohangup.wire import FrameDecoder, Kind, encode_frame, encode_uuid

    class Leg(Protocol):
        def __init__(self, call: Call, role: int) -> None:
            self.call = call
            self.role = role
            self.decoder = FrameDecoder()
            self.frames = 0
            self.heard_peer = 0
            self.got_hangup = False
            self.closed = False
            self.mine = encode_frame(Kind.SLIN, STAMP.pack(MAGIC, call.number, role).ljust(320, b"\x01"))
            self.peer = STAMP.pack(MAGIC, call.number, 1 - role)

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.transport.write(encode_uuid(self.call.call_id))

        def send(self) -> None:
            if not self.closed and not self.got_hangup:
                self.transport.write(self.mine)

        def dataReceived(self, data: bytes) -> None:
            for frame in self.decoder.feed(data):
                self.frames += 1
                if frame.kind == Kind.HANGUP:
                    self.got_hangup = True
                    if not self.call.ending and self.call.dropped is None:
                        self.call.dropped = "hung up before its end"
                    self.transport.loseConnection()
                    return
                if frame.payload[:STAMP.size] == self.peer:
                    self.heard_peer += 1

        def connectionLost(self, reason: Any) -> None:
            self.closed = True
            call = self.call
            if call.ending or self.got_hangup:
                return
            if self.frames == 0:
                call.refused = True
            elif call.dropped is None:
                call.dropped = f"closed before its end: {reason.getErrorMessage()}"

    return Leg


async def run(args: argparse.Namespace, old: Process, new: Process, ports: dict[str, int]) -> dict[str, Any]:
    import treq
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.task import LoopingCall, deferLater
    from twisted.internet.threads import deferToThread

    Leg = make_leg_class()
    calls: list[Call] = []
    live: list[Any] = []
    api = {"requests": 0, "answered": 0, "failed": 0, "by_instance": {}, "errors": []}
    started = time.monotonic()

    def sender() -> None:
        for leg in live:
            leg.send()

    sending = LoopingCall(sender)
    sending.start(SEND_EVERY, now=False)

    async def open_call(old_one: bool) -> Call:
        call = Call(len(calls), old_one)
        calls.append(call)
        for role, port in ((0, ports["visitor"]), (1, ports["resident"])):
            leg = Leg(call, role)
            try:
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), leg)
            except Exception as error:  # refused, timed out
                call.refused = True
                log(f"call {call.number}: {['visitor', 'resident'][role]} not connected: {error}")
                return call
            call.legs.append(leg)
            live.append(leg)
        return call

    async def end_call(call: Call) -> None:
        call.ending = True
        if call.refused or len(call.legs) < 2:
            return
        if not all(leg.heard_peer for leg in call.legs) and call.dropped is None:
            call.dropped = "its legs did not hear each other"
        api["requests"] += 1
        try:
            response = await treq.post(
                f"http://127.0.0.1:{ports['http']}/calls/{call.call_id}/hangup?wait=true",
                headers={"Authorization": f"Bearer {TOKEN}"}, persistent=False, timeout=15,
            )
            body = await response.json()
            roles = sorted(leg.get("role") for leg in body.get("legs", []))
            if response.code == 200 and roles == ["resident", "visitor"]:
                call.answered = True
                api["answered"] += 1
                by = api["by_instance"]
                by[call.instance or "?"] = by.get(call.instance or "?", 0) + 1
            else:
                api["failed"] += 1
                api["errors"].append(f"{response.code} {body}")
        except Exception as error:
            api["failed"] += 1
            api["errors"].append(repr(error))
        call.ended_at = time.monotonic()
        for leg in call.legs:
            if leg in live:
                live.remove(leg)

    async def poll_instances() -> None:
        try:
            response = await treq.get(
                f"http://127.0.0.1:{ports['http']}/calls?scope=cluster",
                headers={"Authorization": f"Bearer {TOKEN}"}, persistent=False, timeout=5,
            )
            body = await response.json()
        except Exception:
            return
        found = {c["call_id"]: c["legs"][0]["instance_id"] for c in body.get("calls", []) if c.get("legs")}
        for call in calls:
            if call.instance is None and str(call.call_id) in found:
                call.instance = found[str(call.call_id)]

    polling = LoopingCall(lambda: poll_instances())
    polling.start(1.0, now=False)

    log(f"holding {args.hold} calls on the old process")
    held = []
    for start in range(0, args.hold, 20):
        held += await DeferredList([
            Deferred.fromCoroutine(open_call(True))
            for _ in range(min(20, args.hold - start))
        ])
    held_calls = [result for ok, result in held if ok]
    await deferLater(reactor, 1.5)
    await poll_instances()

    endings = []
    handover_at = args.seconds / 3
    sigterm_at: float | None = None
    log(f"{args.rate:g} new calls a second for {args.seconds:g} s; hand-over at {handover_at:.0f} s")
    begun = time.monotonic()
    number = 0
    while time.monotonic() - begun < args.seconds:
        due = begun + number / args.rate
        if time.monotonic() < due:
            await deferLater(reactor, due - time.monotonic())
        if sigterm_at is None and time.monotonic() - begun >= handover_at:
            log("starting the new process on the same ports")
            await deferToThread(new.start)
            log(f"SIGTERM to the old process (pid {old.pid})")
            old.process.send_signal(15)  # type: ignore[union-attr]
            sigterm_at = time.monotonic()
            for call in held_calls:
                when = random.uniform(2.0, args.hold_end)
                endings.append(deferLater(reactor, when, lambda c=call: Deferred.fromCoroutine(end_call(c))))

        async def one() -> None:
            call = await open_call(False)
            await deferLater(reactor, args.call_seconds)
            await end_call(call)

        endings.append(Deferred.fromCoroutine(one()))
        number += 1
    log("waiting for the last calls to end")
    await DeferredList(endings)
    polling.stop()
    sending.stop()
    await deferLater(reactor, 0.5)
    old_calls = [c for c in calls if c.instance == "old"]
    last_old = max((c.ended_at for c in old_calls if c.ended_at), default=None)
    deadline = time.monotonic() + 30
    while old.exited_at is None and time.monotonic() < deadline:
        await deferLater(reactor, 0.05)
    return {
        "calls": len(calls),
        "held": len(held_calls),
        "new": len(calls) - len(held_calls),
        "on_old": len(old_calls),
        "on_new": sum(1 for c in calls if c.instance == "new"),
        "where_unknown": sum(1 for c in calls if c.instance is None),
        "refused": sum(1 for c in calls if c.refused),
        "dropped": sum(1 for c in calls if c.dropped and not c.refused),
        "drops": sorted({c.dropped for c in calls if c.dropped})[:5],
        "api": api,
        "old_exit_after_last_call_s": None if old.exited_at is None or last_old is None
        else round(old.exited_at - last_old, 3),
        "old_exit_after_sigterm_s": None if old.exited_at is None or sigterm_at is None
        else round(old.exited_at - sigterm_at, 3),
        "wall_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Hand the ports over to a new process while calls go on.")
    parser.add_argument("--hold", type=int, default=100, help="bridged calls held on the old process; default 100")
    parser.add_argument("--rate", type=float, default=10.0, help="new calls a second; default 10")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of new calls; default 60")
    parser.add_argument("--call-seconds", type=float, default=10.0, help="how long a new call lasts; default 10")
    parser.add_argument("--hold-end", type=float, default=20.0,
                        help="the held calls end within this many seconds of the SIGTERM; default 20")
    parser.add_argument("--quick", action="store_true", help="20 held, 4 new a second for 15 s, calls of 4 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.hold, args.rate, args.seconds, args.call_seconds, args.hold_end = 20, 4.0, 15.0, 4.0, 8.0
    if not 0 <= args.hold <= 1000 or not 0 < args.rate <= 100 or not 3 <= args.seconds <= 600:
        parser.error("--hold within 0..1000, --rate within 0..100, --seconds within 3..600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ports = {"visitor": free_port(), "resident": free_port(), "http": free_port()}
    folder = tempfile.mkdtemp(prefix="audiohangup-upgrade-")
    old, new = Process("old", ports, folder, []), Process("new", ports, folder, [])
    outcome: dict[str, Any] = {}
    try:
        old.start()
        old.watch_exit()
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        def done(result: Any) -> None:
            outcome["result"] = result
            reactor.stop()

        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run(args, old, new, ports)).addBoth(done))
        reactor.run(installSignalHandlers=False)
    finally:
        for process in (old, new):
            if process.process is not None:
                process.stop()
        shutil.rmtree(folder, ignore_errors=True)
    result = outcome.get("result")
    if not isinstance(result, dict):
        raise SystemExit(f"the benchmark failed: {getattr(result, 'value', result)!r}")
    api = result["api"]
    print(f"{result['held']} held + {result['new']} new calls ({args.rate:g}/s for {args.seconds:g} s); "
          f"on the old process {result['on_old']}, on the new {result['on_new']}, unknown {result['where_unknown']}")
    print(f"dropped {result['dropped']}, refused {result['refused']}; API hangups {api['requests']}: "
          f"answered {api['answered']} (by process {api['by_instance']}), failed {api['failed']}")
    print(f"old process exited {result['old_exit_after_last_call_s']} s after its last call ended "
          f"({result['old_exit_after_sigterm_s']} s after SIGTERM)")
    print(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/upgrade.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        **result, "api": dict(api, errors=api["errors"][:5]),
    }))
    return 0 if not result["dropped"] and not result["refused"] and not api["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
