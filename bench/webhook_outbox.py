"""
What the webhook outbox costs: N events through L{audiohangup.webhooks.Webhooks}
to a receiver on loopback in this same process, with the outbox (a SQLite
file in a temporary directory) or without (memory only), and the memory the
events held take. Prints one JSON object per run. A benchmark, not a test:
nothing in tests/ imports it and CI does not run it.

    PYTHONPATH=. python bench/webhook_outbox.py --events 3000 --mode outbox
    PYTHONPATH=. python bench/webhook_outbox.py --events 3000 --mode memory
    PYTHONPATH=. python bench/webhook_outbox.py --held 50000

C{cpu_us_per_event} is the reactor thread's CPU (sender and receiver both:
they share it) over the events; the outbox's writer thread is not in it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any


def delivered(mode: str, events: int) -> dict[str, Any]:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.task import deferLater
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from audiohangup.outbox import Outbox
    from audiohangup.webhooks import Webhooks

    answered = [0]

    class Receiver(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            answered[0] += 1
            return b"ok"

    result: dict[str, Any] = {}

    async def run() -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Receiver()))
        with tempfile.TemporaryDirectory() as folder:
            outbox = Outbox(str(Path(folder) / "outbox.sqlite3"), reactor) if mode == "outbox" else None
            webhooks = Webhooks(
                [f"http://127.0.0.1:{port.getHost().port}/hook"], reactor, outbox=outbox,
                max_attempts=None if outbox else 5, max_queue=2 * events,
            )
            webhooks.startService()
            await deferLater(reactor, 0.1)  # the outbox open
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(events):
                webhooks.event("leg_started", str(uuid.uuid4()), "visitor", {})
            while answered[0] < events:
                await deferLater(reactor, 0.01)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            await webhooks.stop()
        await port.stopListening()
        result.update(
            mode=mode, events=events, seconds=round(wall, 3), events_per_second=round(events / wall),
            cpu_us_per_event=round(1e6 * cpu / events),
        )

    done: Deferred[None] = ensureDeferred(run())
    done.addErrback(lambda failure: result.update(error=failure.getErrorMessage()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    return result


def held(events: int) -> dict[str, Any]:
    """The memory N events held take (one receiver, five events per call), without a reactor running."""
    from types import SimpleNamespace

    from twisted.internet.testing import MemoryReactorClock

    from audiohangup.reasons import CloseReason, Role
    from audiohangup.webhooks import Webhooks

    webhooks = Webhooks(["http://127.0.0.1:9/hook"], MemoryReactorClock(), max_queue=events)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(events // 5):
        call = str(uuid.uuid4())
        legs = [SimpleNamespace(call_id=call, role=role, close_reason=None, hangup_cause=None) for role in Role]
        for leg in legs:
            webhooks.legStarted(leg)
        for leg in legs:
            leg.close_reason = CloseReason.PEER_CLOSED
            webhooks.legEnded(leg)
        webhooks.callEnded(call)
    used = tracemalloc.get_traced_memory()[0] - before
    return {"held": webhooks.pending, "bytes_per_event": round(used / webhooks.pending), "megabytes": round(used / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000, help="events delivered (default 3000)")
    parser.add_argument("--mode", choices=("outbox", "memory"), default="outbox")
    parser.add_argument("--held", type=int, help="instead: the memory this many held events take")
    args = parser.parse_args()
    print(json.dumps(held(args.held) if args.held else delivered(args.mode, args.events)))


if __name__ == "__main__":
    main()
