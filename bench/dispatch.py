"""
What Twisted's reactor adds to every read, apart from audiohangup: CPU per
read of one 323-byte frame (with its send) through a bare epoll loop, and
through Twisted's epoll reactor with a protocol that does nothing.

    python bench/dispatch.py        # prints both, three times each
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time

PAIRS = 200
ROUNDS = 2000
FRAME = b"\x10\x01\x40" + bytes(320)


def socket_pairs() -> list[tuple[socket.socket, socket.socket]]:
    pairs = [socket.socketpair() for _ in range(PAIRS)]
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    return pairs


def bare() -> float:
    """CPU µs per read: each round writes a frame on every pair and reads them all back through epoll."""
    pairs = socket_pairs()
    poller = select.epoll()
    readers = {b.fileno(): b for _, b in pairs}
    for fd in readers:
        poller.register(fd, select.EPOLLIN)
    began = time.process_time()
    for _ in range(ROUNDS):
        for a, _ in pairs:
            a.send(FRAME)
        waiting = PAIRS
        while waiting:
            for fd, _ in poller.poll():
                readers[fd].recv(65536)
                waiting -= 1
    return (time.process_time() - began) / (ROUNDS * PAIRS) * 1e6


def twisted() -> float:
    """The same rounds, the reading ends adopted by Twisted's epoll reactor with a protocol that does nothing."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    reads = [0]

    class Sink(Protocol):
        def dataReceived(self, data: bytes) -> None:
            reads[0] += 1

    pairs = socket_pairs()
    factory = Factory.forProtocol(Sink)
    for _, b in pairs:
        reactor.adoptStreamConnection(b.fileno(), socket.AF_UNIX, factory)  # type: ignore[attr-defined]
    result: list[float] = []

    def run() -> None:
        began = time.process_time()
        for _ in range(ROUNDS):
            for a, _ in pairs:
                a.send(FRAME)
            target = reads[0] + PAIRS
            while reads[0] < target:
                reactor.iterate(0)  # type: ignore[attr-defined]
        result.append((time.process_time() - began) / (ROUNDS * PAIRS) * 1e6)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return result[0]


def main() -> None:
    if len(sys.argv) > 1:
        print(f"{bare() if sys.argv[1] == 'bare' else twisted():.2f}")
        return
    for _ in range(3):  # each in a fresh process: the reactor installs once
        for kind in ("bare", "twisted"):
            out = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True, check=True)
            print(f"{kind:8} {out.stdout.strip()} µs of CPU per read")


if __name__ == "__main__":
    main()
