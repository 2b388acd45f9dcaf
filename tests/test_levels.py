"""
The legs' audio levels: one frame's dBFS (slin, G.711), and the sampler over
real L{AudioSocketProtocol}s on L{StringTransport}s with a L{Clock}: a leg
sending a tone reads far above a silent one, a leg that stops sending falls
to silence, voice is timed, and the API's view carries the numbers.
"""

from __future__ import annotations

import math
import struct
import uuid

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from audiohangup.audio import FORMATS, SLIN, LegSettings
from audiohangup.codecs import encode
from audiohangup.levels import MIN_DBFS, SAMPLE_INTERVAL, Levels, LevelSampler, frame_dbfs
from audiohangup.logs import iso_time
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import Role
from audiohangup.registry import Registry
from audiohangup.wire import Kind, encode_frame, encode_uuid


def tone(amplitude: float, hertz: float = 1000.0, samples: int = 160, rate: int = 8000) -> bytes:
    """One frame of a sine at C{amplitude} of full scale, 16-bit little-endian."""
    return b"".join(
        struct.pack("<h", round(amplitude * 32767 * math.sin(2 * math.pi * hertz * n / rate))) for n in range(samples)
    )


def test_full_scale_sine_is_minus_three() -> None:
    assert abs(frame_dbfs(tone(1.0), SLIN) - (-3.0)) < 0.1


def test_level_follows_amplitude() -> None:
    """A tenth of the amplitude is 20 dB lower."""
    assert abs(frame_dbfs(tone(0.1), SLIN) - (-23.0)) < 0.2


def test_silence_is_the_floor() -> None:
    assert frame_dbfs(b"\x00" * 320, SLIN) == MIN_DBFS
    assert frame_dbfs(b"\xff" * 160, FORMATS["ulaw"]) == MIN_DBFS


def test_g711_is_decoded_first() -> None:
    for name in ("ulaw", "alaw"):
        level = frame_dbfs(encode(tone(0.5), FORMATS[name]), FORMATS[name])
        assert abs(level - (-9.0)) < 0.3, (name, level)


def test_odd_bytes_are_not_an_error() -> None:
    assert frame_dbfs(tone(0.5)[:-1], SLIN) < 0


class Legs:
    """Real protocol legs of one call on a Clock, with a sampler."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry()
        self.pacer = Pacer(self.clock)
        self.levels = Levels(self.clock)
        self.sampler = LevelSampler(self.levels, lambda: self.registry, self.clock)
        self.registry.events.add(self.sampler)
        self.call_id = uuid.uuid4()

    def leg(self, role: Role) -> AudioSocketProtocol:
        leg = AudioSocketProtocol(role, self.registry, LegSettings(), self.clock, self.pacer)
        leg.makeConnection(StringTransport())
        leg.dataReceived(encode_uuid(self.call_id))
        return leg

    def tick(self) -> None:
        self.clock.advance(SAMPLE_INTERVAL)


def test_tone_reads_above_silence() -> None:
    """A leg sending a tone reads its level in, the other leg hears it out; a silent one reads the floor."""
    legs = Legs()
    talker, quiet = legs.leg(Role.VISITOR), legs.leg(Role.RESIDENT)
    assert legs.sampler.running
    for _ in range(5):
        talker.dataReceived(encode_frame(Kind.SLIN, tone(0.25)))
        quiet.dataReceived(encode_frame(Kind.SLIN, b"\x00" * 320))
        legs.tick()
    loud, silent = legs.levels.view(talker), legs.levels.view(quiet)
    assert abs(loud["level_in_dbfs"] - (-15.0)) < 0.3
    assert silent["level_in_dbfs"] == MIN_DBFS
    assert loud["voice_at"] == iso_time(legs.clock.seconds()) and silent["voice_at"] is None
    # Bridged: what the visitor says is what the resident is sent.
    assert abs(silent["level_out_dbfs"] - (-15.0)) < 0.3


def test_no_new_audio_falls_to_silence() -> None:
    """A leg that stops sending reads the floor once its last frame has left the window (about a second)."""
    legs = Legs()
    talker = legs.leg(Role.VISITOR)
    talker.dataReceived(encode_frame(Kind.SLIN, tone(0.25)))
    legs.tick()
    spoke = legs.clock.seconds()
    assert legs.levels.view(talker)["level_in_dbfs"] > -20
    for _ in range(5):
        legs.tick()
    view = legs.levels.view(talker)
    assert view["level_in_dbfs"] == MIN_DBFS
    assert view["voice_at"] == iso_time(spoke)


def test_unmeasured_leg_has_no_level() -> None:
    legs = Legs()
    leg = legs.leg(Role.VISITOR)
    assert legs.levels.view(leg) == {"level_in_dbfs": None, "level_out_dbfs": None, "voice_at": None}


def test_timer_stops_with_the_last_call() -> None:
    """The sampler's timer runs only while a leg lives: an idle server has none."""
    legs = Legs()
    leg = legs.leg(Role.VISITOR)
    leg.dataReceived(encode_frame(Kind.SLIN, tone(0.25)))
    legs.tick()
    assert len(legs.levels) == 1
    leg.connectionLost(Failure(ConnectionDone()))
    assert not legs.sampler.running
    assert len(legs.levels) == 0
