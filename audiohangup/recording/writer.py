# -*- test-case-name: tests.test_recording -*-
"""
The writer thread's side of a recording: a batch of 20 ms ticks in, each
channel converted to the file's format (G.711 decoded, resampled to the
file's rate), interleaved, appended to the WAV.

Only the recorder's writer thread calls into a L{WavFile}; the reactor only
hands it ticks (L{audiohangup.recording.recorder}). A write the disk takes
in part is undone, so the samples after it stay in step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from audiohangup.audio import FORMATS, FRAME_SECONDS, AudioFormat
from audiohangup.codecs import Transcoder
from audiohangup.reasons import Role
from audiohangup.recording.layout import create, make_folders
from audiohangup.recording.wav import wav_header

#: The recording's timeline moves in frames: a tick is one.
TICK = FRAME_SECONDS
#: The file's channels, left then right.
CHANNELS = (Role.VISITOR, Role.RESIDENT)


class _ChannelConverter:
    """One channel's audio to the file's format: its own resampler state, and the samples still due."""

    def __init__(self, rate: int) -> None:
        self.target = _slin_at(rate)
        self.per_tick = round(rate * TICK) * 2
        self._transcoder: Transcoder | None = None
        self._source: AudioFormat | None = None
        self._pending = b""
        self._primed = False

    def tick(self, payload: bytes, fmt: AudioFormat) -> bytes:
        """
        One tick of the file's samples for this channel (16-bit, mono), from
        one tick of C{payload} (the reactor files no more in a tick; a part
        filled one is padded with silence). A resampler gives a sample more
        or less from one call to the next and holds some back at the start:
        silence is written until half a tick more than a tick is waiting, and
        that lead absorbs the jitter.
        """
        if len(payload) < fmt.frame_bytes:  # the rest of a tick its leg left part-filled: silence
            payload += fmt.silence_frame[3 + len(payload) :]
        if self._transcoder is None or fmt != self._source:
            self._transcoder, self._source = Transcoder(fmt, self.target), fmt
        self._pending += self._transcoder.convert(payload)
        if not self._primed:
            if len(self._pending) < self.per_tick * 3 // 2:
                return bytes(self.per_tick)
            self._primed = True
        if len(self._pending) < self.per_tick:  # never in steady state: start the lead again
            self._pending, self._primed = self._pending + bytes(self.per_tick - len(self._pending)), False
        out, self._pending = self._pending[: self.per_tick], self._pending[self.per_tick :]
        return out


def _slin_at(rate: int) -> AudioFormat:
    for fmt in FORMATS.values():
        if fmt.sample_bytes == 2 and fmt.rate == rate:
            return fmt
    raise ValueError(f"no slin format at {rate} Hz")


@dataclass
class Tick:
    """What each channel got in one tick: a raw payload and its format, or None for silence."""

    payloads: dict[Role, tuple[bytes, AudioFormat] | None]


class WavFile:
    """A recording's file, written only by the writer thread."""

    def __init__(self, path: str, rate: int, silence: dict[Role, AudioFormat]) -> None:
        self.path = path
        self.rate = rate
        self.silence = silence
        self.channels = {role: _ChannelConverter(rate) for role in CHANNELS}
        self.file: BinaryIO | None = None
        self.headed = False
        self.data_bytes = 0

    def open(self) -> None:
        """Create the file (once) and write its header (until that is done)."""
        if self.file is None:
            make_folders(os.path.dirname(self.path))
            # Unbuffered: what a write returns is on its way to the disk, so the
            # header's count is what the file holds, even after a failed write.
            self.file = os.fdopen(create(self.path), "wb", buffering=0)
        if not self.headed:
            self._append(self.file, wav_header(self.rate, 0))  # sizes unknown yet: repaired if we crash
            self.headed = True

    @staticmethod
    def _append(file: BinaryIO, data: bytes) -> None:
        """All of C{data}, or an OSError with the file cut back to where it was."""
        start = file.tell()
        written = 0
        try:
            while written < len(data):
                written += file.write(data[written:]) or 0
        except OSError:
            if written:  # half a batch would shift every sample after it
                with contextlib.suppress(OSError):
                    file.truncate(start)
                file.seek(start)
            raise

    def write(self, ticks: list[Tick]) -> int:
        """Append C{ticks}: the bytes written."""
        self.open()
        assert self.file is not None
        columns = []
        for role in CHANNELS:
            converter = self.channels[role]
            quiet = self.silence[role]
            parts = []
            for tick in ticks:
                entry = tick.payloads[role]
                payload, fmt = entry if entry is not None else (quiet.silence_frame[3:], quiet)
                parts.append(converter.tick(payload, fmt))
            columns.append(np.frombuffer(b"".join(parts), dtype="<i2"))
        stereo = np.empty(len(columns[0]) * 2, dtype="<i2")
        stereo[0::2], stereo[1::2] = columns
        data = stereo.tobytes()
        self._append(self.file, data)
        self.data_bytes += len(data)
        return len(data)

    def close(self) -> int:
        """Complete the header and close; the bytes of audio written."""
        try:
            self.open()
            assert self.file is not None
            self.file.seek(0)
            self.file.write(wav_header(self.rate, self.data_bytes))
        finally:
            if self.file is not None:
                self.file.close()
        return self.data_bytes
