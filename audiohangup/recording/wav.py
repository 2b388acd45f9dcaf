# -*- test-case-name: tests.test_recording -*-
"""
The WAV format a recording is written in: a canonical 44-byte header, then
16-bit PCM, interleaved.

A header says its sizes only once the recording stops; until then (and in a
file a crash left) they say nothing. The file's own size is the truth: what
it holds is read from it (L{wav_data_bytes}), and L{repair} writes it into
the header of a file a crash cut short. Nothing here knows the reactor.
"""

from __future__ import annotations

import os
import struct

from audiohangup.recording.layout import DAY, WAV_NAME, open_in_folder

HEADER_BYTES = 44


def wav_header(rate: int, data_bytes: int, channels: int = 2) -> bytes:
    """A canonical 44-byte RIFF/WAVE header for 16-bit PCM."""
    block = channels * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels, rate, rate * block, block, 16,
        b"data", data_bytes,
    )


def wav_data_bytes(size: int, channels: int = 2) -> int:
    """The whole samples a WAV file of C{size} bytes holds, in bytes, whatever its header says."""
    data = size - HEADER_BYTES
    return max(0, data - data % (channels * 2))


def wav_rate(header: bytes) -> int | None:
    """The sample rate a WAV header says, or None if C{header} is not a whole one (a file a crash cut short)."""
    if len(header) < HEADER_BYTES or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    rate: int = struct.unpack_from("<I", header, 24)[0]
    return rate or None


def repair(path: str, rate: int = 0) -> float | None:
    """
    Rewrite a WAV header whose sizes disagree with the file (a recording a
    crash cut short): return the seconds of audio it holds, or None if the
    header was right. A partial last sample is cut off; a file cut within
    its header holds no audio and becomes an empty WAV at C{rate} (if given).
    A link is not followed (an OSError).
    """
    with os.fdopen(open_in_folder(path, os.O_RDWR), "r+b") as file:
        header = file.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES and rate:
            file.seek(0)
            file.write(wav_header(rate, 0))
            file.truncate(HEADER_BYTES)
            return 0.0
        header_rate = wav_rate(header)
        if header_rate is None:
            return None
        data = wav_data_bytes(os.fstat(file.fileno()).st_size)
        if struct.unpack_from("<I", header, 40)[0] == data and struct.unpack_from("<I", header, 4)[0] == 36 + data:
            return None
        file.seek(0)
        file.write(wav_header(header_rate, data))
        file.truncate(HEADER_BYTES + data)
    return data / (header_rate * 4)


def recording_sizes(directory: str, names: list[str]) -> dict[str, tuple[int, float]]:
    """
    The size in bytes and the seconds of audio of each named recording
    (C{DAY/<call id>.wav}), read from the file, not its header (a live one's
    says nothing yet). A name that is not a recording's, a link, or a file
    gone is left out.
    """
    found: dict[str, tuple[int, float]] = {}
    for name in names:
        day, _, file = name.partition("/")
        if not (DAY.match(day) and WAV_NAME.match(file)):
            continue
        try:
            fd = open_in_folder(os.path.join(directory, day, file), os.O_RDONLY)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            rate = wav_rate(handle.read(HEADER_BYTES))
        found[name] = (size, round(wav_data_bytes(size) / (rate * 4), 3) if rate else 0.0)
    return found
