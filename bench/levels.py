#!/usr/bin/env python3
"""
What the live page's level meters and the last hour's buckets cost, in
process, without the load's noise: one sample of every leg's levels
(L{audiohangup.levels.Levels.sample}) over 200 calls' 400 real protocol legs,
each with a new frame each way (with ``bridged``: what one leg receives is
what the other is sent, as in a bridge, the same bytes measured once), and
one leg through the hour's buckets (started and ended). The sampler runs 5
times a second, so a tick's milliseconds times 5 is its share of a core.

Run from the repository root::

    python bench/levels.py
    python bench/levels.py bridged
"""

import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working tree
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from audiohangup.audio import LegSettings
from audiohangup.hour import Hour
from audiohangup.levels import Levels
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, Role
from audiohangup.registry import Registry
from audiohangup.wire import Kind, encode_frame, encode_uuid

clock = Clock()
registry = Registry()
pacer = Pacer(clock)
legs = []
for _ in range(200):
    call = uuid.uuid4()
    for role in Role:
        leg = AudioSocketProtocol(role, registry, LegSettings(), clock, pacer)
        leg.makeConnection(StringTransport())
        leg.dataReceived(encode_uuid(call))
        legs.append(leg)
levels = Levels(clock)
frames = [encode_frame(Kind.SLIN, os.urandom(320)) for _ in range(800)]
BRIDGED = len(sys.argv) > 1
ticks = 200
spent = 0.0
for t in range(ticks):
    for i, leg in enumerate(legs):  # a new frame each way on every leg (worst case: nothing shared)
        leg.last_in = frames[(i + t) % 800]
        leg.last_out = frames[((i ^ 1) + t) % 800] if BRIDGED else frames[(i + t + 400) % 800]
    start = time.perf_counter()
    levels.sample(registry)
    spent += time.perf_counter() - start
per_tick = spent / ticks
print(f"Levels.sample over {len(legs)} legs: {per_tick*1e3:.2f} ms a tick, x5/s = {per_tick*5*100:.2f} % of a core")
hour = Hour(clock, lambda: len(registry))


class Ended:
    close_reason = CloseReason.HANGUP_CLEAN
    hangup_to_close_ms = 3.0
    call_id = "x"


start = time.perf_counter()
for _ in range(100000):
    hour.legStarted(Ended())  # type: ignore[arg-type]
    hour.legEnded(Ended())  # type: ignore[arg-type]
print(f"Hour: {(time.perf_counter()-start)/100000*1e6:.2f} us per leg (started + ended)")
