# -*- test-case-name: tests.test_codecs -*-
"""
Conversions between the formats AudioSocket carries: G.711 (u-law, A-law) and
16-bit linear PCM at any of the slin rates. Pure code, no I/O.

G.711 is C{audioop}'s C code (Sun's reference g711.c, bit-exact to ITU-T
G.711): the stdlib module up to Python 3.12, the C{audioop-lts} package, the
same code, from 3.13 on. Resampling is libsoxr through python-soxr, run with
its variable-rate engine at a fixed ratio: the default engine works in large
FFT blocks and, fed 20 ms frames, gives nothing back for up to 5 frames and
then 100 ms at once (60 to 160 ms held back), where the variable-rate one
gives back a steady 20 ms per 20 ms after a fixed 15 to 30 ms, with the same
stop-band (about -100 dB) and a flat telephone band. C{bench/codecs.py}
measures the candidates and the costs.
"""

from __future__ import annotations

import sys
import warnings
from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

from audiohangup.audio import AudioFormat

with warnings.catch_warnings():
    # Python 3.11 and 3.12 warn at this import that audioop goes in 3.13,
    # where the audioop-lts package provides the same module: nothing to act
    # on, and a warning here would fail every importer run with -W error.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["Transcoder", "decode", "encode", "mix"]

#: audioop works in the machine's byte order; AudioSocket's slin is little-endian.
_SWAP: Final = sys.byteorder != "little"

_DECODERS: Final = {"ulaw": audioop.ulaw2lin, "alaw": audioop.alaw2lin}
_ENCODERS: Final = {"ulaw": audioop.lin2ulaw, "alaw": audioop.lin2alaw}


def _check(fmt: AudioFormat, data: bytes, what: str, linear: bool = False) -> None:
    """C{data} is raw samples of C{fmt}, or with C{linear} the 16-bit PCM C{fmt} is made from."""
    if fmt.sample_bytes != 2 and fmt.name not in _DECODERS:
        raise ValueError(f"no codec for {fmt.name!r}, a {fmt.sample_bytes}-byte format")
    if (linear or fmt.sample_bytes == 2) and len(data) % 2:
        raise ValueError(f"{what} has {len(data)} bytes: 16-bit audio needs an even number")


def decode(payload: bytes, fmt: AudioFormat) -> bytes:
    """
    Raw samples of C{fmt} to signed 16-bit little-endian PCM at C{fmt.rate}:
    the one form every other conversion starts from. slin comes back as is.
    """
    _check(fmt, payload, "payload")
    if fmt.sample_bytes == 2:
        return payload
    pcm = _DECODERS[fmt.name](payload, 2)
    return audioop.byteswap(pcm, 2) if _SWAP else pcm


def encode(pcm: bytes, fmt: AudioFormat) -> bytes:
    """The reverse of L{decode}: 16-bit little-endian PCM at C{fmt.rate} to raw samples of C{fmt}."""
    _check(fmt, pcm, "PCM", linear=True)
    if fmt.sample_bytes == 2:
        return pcm
    return _ENCODERS[fmt.name](audioop.byteswap(pcm, 2) if _SWAP else pcm, 2)


class Transcoder:
    """
    One direction of one stream, C{source} to C{target}, a frame at a time.

    The resampler keeps its filter's history between calls, so a stream of
    frames converts as one continuous signal, with no click at the frame
    boundaries; it therefore belongs to one stream and one direction.

    With resampling, what comes back per call varies: nothing or part of a
    frame at first (see L{delay}), then a steady amount that may still differ
    by a sample where the rates do not divide (44.1 kHz). The caller
    accumulates the output and cuts its own frames (L{AudioFormat.frames}).
    """

    def __init__(self, source: AudioFormat, target: AudioFormat) -> None:
        _check(source, b"", "source")
        _check(target, b"", "target")
        self.source = source
        self.target = target
        self._identity = source == target
        self._stream: soxr.ResampleStream | None = None
        self._taken = 0  # source samples given to the resampler
        self._half = b""  # the odd byte of a 16-bit source, held for the next payload
        self._given = 0  # target samples it gave back
        if source.rate != target.rate:
            # float32, not int16: soxr dithers int16 output (silence would
            # come back as +-1 noise, and chunking would change the result).
            self._stream = soxr.ResampleStream(source.rate, target.rate, 1, dtype="float32", quality="HQ", vr=True)

    @property
    def delay(self) -> float:
        """
        Seconds of audio taken in and not yet given back: the latency the
        resampler adds (about 30 ms 8 to 16 kHz, 15 ms 16 to 8 kHz), 0 without
        one. Counted here: soxr's own figure is a constant in this engine.
        """
        return self._taken / self.source.rate - self._given / self.target.rate

    def convert(self, payload: bytes) -> bytes:
        """
        Raw samples of C{source} to raw samples of C{target}. A 16-bit payload
        of odd length (Asterisk accepts one and carries the byte) is not an
        error: its last byte waits for the next payload, as in a byte stream.
        """
        if self.source.sample_bytes == 2 and (self._half or len(payload) % 2):
            payload = self._half + payload
            cut = len(payload) - len(payload) % 2
            payload, self._half = payload[:cut], payload[cut:]
        if self._identity:
            return payload
        pcm = decode(payload, self.source)
        if self._stream is not None:
            pcm = self._resample(pcm, last=False)
        return encode(pcm, self.target)

    def flush(self) -> bytes:
        """
        At the end of the stream, what the resampler still holds, as raw
        samples of C{target}; the transcoder then starts a new stream.
        """
        self._half = b""  # half a sample is no sound
        if self._stream is None:
            return b""
        tail = encode(self._resample(b"", last=True), self.target)
        self._stream.clear()
        self._taken = self._given = 0
        return tail

    def _resample(self, pcm: bytes, last: bool) -> bytes:
        assert self._stream is not None
        samples = np.frombuffer(pcm, "<i2").astype(np.float32)  # soxr is linear: no need to scale to [-1, 1)
        out: npt.NDArray[np.float32] = self._stream.resample_chunk(samples, last=last)
        np.rint(out, out=out)
        np.clip(out, -32768, 32767, out=out)  # the filter overshoots near full scale
        self._taken += len(samples)
        self._given += len(out)
        return out.astype("<i2").tobytes()


def mix(first: bytes, second: bytes, fmt: AudioFormat) -> bytes:
    """
    Two payloads of C{fmt}, of one length, summed sample by sample and
    saturated at the 16-bit limits (a clip, never a wrap-around's crack):
    slin as is, G.711 through linear PCM and back.
    """
    one, other = decode(first, fmt), decode(second, fmt)
    if _SWAP:
        summed = audioop.byteswap(audioop.add(audioop.byteswap(one, 2), audioop.byteswap(other, 2), 2), 2)
    else:
        summed = audioop.add(one, other, 2)
    return encode(summed, fmt)
