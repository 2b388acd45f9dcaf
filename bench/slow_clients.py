"""
The slow-client attack of issue 19, measured: ``twistd -n audiohangup`` under
``prlimit --nofile=1024``, and about 1,020 clients on loopback (from
127.0.0.1 to 127.0.0.9) that each send a request head one byte at a time and
reconnect when the server closes them. Every few seconds a probe connects a
new call (a visitor and a resident leg), checks that the visitor's audio
reaches the resident, and asks ``GET /health``.

It is a benchmark, not a test: loopback only, bounded (``--seconds``), and it
stops its server and its clients by itself. The code measured is what
``PYTHONPATH`` (or the installed package) gives the ``twistd`` beside this
interpreter::

    PYTHONPATH=$PWD python bench/slow_clients.py --clients 1020 --seconds 30

One JSON object on stdout: the probes (bridged or not, /health's status and
latency, the server's open descriptors) and the attack's counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.python.failure import Failure

LISTENING = re.compile(rb"\b(audiosocket-visitor|audiosocket-resident|http) listening on 127\.0\.0\.1:(\d+)")
SOURCES = [f"127.0.0.{n}" for n in range(1, 10)]
HEAD = b"GET /calls HTTP/1.1\r\nHost: localhost\r\nX-Slow: "


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class Slow(Protocol):
    """One slow client: a byte of a never-ending head per drip."""

    def __init__(self, attack: Attack) -> None:
        self.attack = attack
        self.sent = 0
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self.attack.open.add(self)

    def drip(self) -> None:
        if self.open:
            self.transport.write(HEAD[self.sent : self.sent + 1] or b"a")
            self.sent += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        self.attack.open.discard(self)
        self.attack.closed_by_server += 1


class Attack:
    def __init__(self, port: int, clients: int, drip: float) -> None:
        self.port = port
        self.clients = clients
        self.open: set[Slow] = set()
        self.connects = 0
        self.failed_connects = 0
        self.closed_by_server = 0
        self.running = True
        self._drip = task.LoopingCall(lambda: [client.drip() for client in list(self.open)])
        self._drip.start(drip, now=False)

    async def keep_up(self) -> None:
        """Hold C{clients} connections: reconnect those the server closes, 64 attempts at a time."""
        while self.running:
            missing = self.clients - len(self.open)
            batch = []
            for index in range(min(missing, 64)):
                source = SOURCES[(self.connects + index) % len(SOURCES)]
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5, bindAddress=(source, 0))
                batch.append(connectProtocol(endpoint, Slow(self)))
            self.connects += len(batch)
            for attempt in batch:
                try:
                    await attempt
                except Exception:
                    self.failed_connects += 1
            await task.deferLater(reactor, 0.05 if batch else 0.2, lambda: None)

    def stop(self) -> None:
        self.running = False
        self._drip.stop()
        for client in list(self.open):
            client.transport.abortConnection()


class Leg(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False


async def wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.01, lambda: None)
    return True


async def probe_call(visitor_port: int, resident_port: int) -> dict[str, Any]:
    """A new call: both legs connect and send their UUID, the visitor's marked audio must reach the resident."""
    started = time.monotonic()
    call = uuid.uuid4().bytes
    legs = []
    try:
        for port in (visitor_port, resident_port):
            leg = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=3), Leg())
            leg.transport.write(struct.pack("!BH", 0x01, 16) + call)
            legs.append(leg)
    except Exception as error:
        return {"bridged": False, "error": type(error).__name__}
    visitor, resident = legs
    marker = b"\x5a\x5a" * 160
    frame = struct.pack("!BH", 0x10, 320) + marker
    sending = task.LoopingCall(lambda: visitor.transport.write(frame) if visitor.open else None)
    sending.start(0.02)
    bridged = await wait(lambda: marker in resident.received, 3.0)
    sending.stop()
    for leg in legs:
        if leg.open:
            leg.transport.loseConnection()
    result: dict[str, Any] = {"bridged": bridged}
    if bridged:
        result["seconds"] = round(time.monotonic() - started, 3)
    else:
        result["legs_open"] = [leg.open for leg in legs]
    return result


async def probe_health(port: int) -> dict[str, Any]:
    import treq

    started = time.monotonic()
    try:
        response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False, timeout=3)
        await response.content()
    except Exception as error:
        return {"status": None, "error": type(error).__name__, "seconds": round(time.monotonic() - started, 3)}
    return {"status": response.code, "seconds": round(time.monotonic() - started, 3)}


def descriptors(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def main(arguments: argparse.Namespace) -> dict[str, Any]:
    twistd = str(Path(sys.executable).with_name("twistd"))
    argv = [
        "prlimit", f"--nofile={arguments.nofile}", twistd, "-n", "--pidfile=", "audiohangup",
        *(f"--{role}=tcp:0:interface=127.0.0.1" for role in ("visitor", "resident", "http")), "--call-records", "none",
        *arguments.server_options,
    ]
    workdir = tempfile.mkdtemp(prefix="ah-slow-")
    child = Child()
    process = reactor.spawnProcess(child, shutil.which("prlimit") or "prlimit", argv, env=dict(os.environ), path=workdir)
    result: dict[str, Any] = {"command": " ".join(argv[:5] + ["audiohangup", *arguments.server_options]), "probes": []}
    attack = None
    try:
        if not await wait(lambda: len(LISTENING.findall(child.output)) == 3, 30):
            raise SystemExit(f"the server did not listen: {child.output.decode(errors='replace')}")
        ports = {name.decode(): int(port) for name, port in LISTENING.findall(child.output)}
        result["descriptors_idle"] = descriptors(process.pid)
        attack = Attack(ports["http"], arguments.clients, arguments.drip)
        keeping = ensureDeferred(attack.keep_up())
        started = time.monotonic()
        while time.monotonic() - started < arguments.seconds:
            await task.deferLater(reactor, arguments.probe_every, lambda: None)
            probe = {
                "at": round(time.monotonic() - started, 1),
                "slow_clients_open": len(attack.open),
                "server_descriptors": descriptors(process.pid),
                "call": await probe_call(ports["audiosocket-visitor"], ports["audiosocket-resident"]),
                "health": await probe_health(ports["http"]),
            }
            result["probes"].append(probe)
            print(json.dumps(probe), file=sys.stderr, flush=True)
        attack.stop()
        await keeping
        result["attack"] = {
            "clients": arguments.clients, "connects": attack.connects, "failed_connects": attack.failed_connects,
            "closed_by_server": attack.closed_by_server,
        }
    finally:
        if attack is not None and attack.running:
            attack.stop()
        process.signalProcess("TERM")
        await child.ended
        text = child.output.decode(errors="replace")
        result["server_log"] = {
            "emfile": text.count("EMFILE"),
            "tracebacks": text.count("Traceback"),
            "warnings": [line.split("] ", 1)[-1][:300] for line in text.splitlines() if "#warn]" in line][:5],
        }
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1020)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--drip", type=float, default=1.0, help="seconds between a slow client's bytes")
    parser.add_argument("--probe-every", type=float, default=5.0)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("server_options", nargs="*", help="more options for the server, after --")
    arguments = parser.parse_args()
    if not 1 <= arguments.clients <= 5000 or not 1 <= arguments.seconds <= 300:
        parser.error("--clients 1..5000, --seconds 1..300")
    outcome: dict[str, Any] = {}

    def done(value: Any) -> None:
        outcome["value"] = value
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main(arguments)).addBoth(done))
    reactor.run()
    value = outcome.get("value")
    if isinstance(value, Failure):
        value.printTraceback()
        raise SystemExit(1)
    print(json.dumps(value, indent=1))


if __name__ == "__main__":
    run()
