#!/usr/bin/env python3
"""
What a 20 ms frame costs to convert, per candidate library, so the choice made
in ``audiohangup/codecs.py`` is written down with numbers.

Candidates (each one a G.711 implementation plus a streaming resampler, state
kept between frames):

  - ``audioop+soxr``: audioop's G.711 (stdlib, or audioop-lts on 3.13+) and
    python-soxr's ``ResampleStream`` with its default fixed-rate HQ engine;
  - ``audioop+soxr-vr``: the same with ``vr=True``, libsoxr's variable-rate
    engine, used here at a fixed ratio;
  - ``audioop+libsamplerate``: python-samplerate's ``Resampler``, ``sinc_medium``
    (``sinc_fastest`` is out: -8.8 dB at 3.4 kHz, inside the telephone band);
  - ``audioop.ratecv``: audioop alone, its linear interpolator (no
    anti-aliasing filter: a 5 kHz tone taken from 48 kHz to 8 kHz comes out at
    3 kHz at full level);
  - ``numpy-g711+soxr-vr``: G.711 by numpy look-up tables built from the
    ITU-T G.711 segment formulas, to compare with audioop's C code;
  - ``audiohangup.codecs``: the module itself, as it stands.

For each candidate and each pair it prints the median cost of one call in
microseconds (``timeit``, median of the repeats, after a warm-up that fills
the resampler), then, for the same runs, the most audio the resampler held
back at once while fed 20 ms frames (ms of output not yet given back): the
latency a live call pays. A candidate whose package is not installed is
skipped with a line saying so.

Run from the repository root (the repository is put first on ``sys.path``, so
this measures the working tree, not what ``pip install .`` last installed)::

    python bench/codecs.py [--repeat 7] [--number 2000]

A benchmark, not a test: the test suite never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiohangup.audio import FORMATS, FRAME_SECONDS, AudioFormat

Convert = Callable[[bytes], bytes]
#: (source, target) format names: the pairs a media stream and a bridge need.
PAIRS = [
    ("ulaw", "slin16"),
    ("slin16", "ulaw"),
    ("ulaw", "slin"),
    ("slin48", "ulaw"),
    ("slin44", "ulaw"),
    ("alaw", "slin"),
]
WARMUP_FRAMES = 50
LATENCY_FRAMES = 100


def optional(name: str) -> Any:
    """The module, or None when it is not installed (audioop's own DeprecationWarning muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module(name)
        except ImportError:
            return None


audioop = optional("audioop")
np = optional("numpy")
soxr = optional("soxr")
samplerate = optional("samplerate")


# ---------------------------------------------------------------------------
# G.711 implementations: bytes of fmt <-> 16-bit little-endian PCM.
# ---------------------------------------------------------------------------


class AudioopG711:
    """audioop's C code (Sun's g711.c); native byte order, little-endian here."""

    def decode(self, payload: bytes, fmt: AudioFormat) -> bytes:
        assert audioop is not None
        if fmt.name == "ulaw":
            return bytes(audioop.ulaw2lin(payload, 2))
        if fmt.name == "alaw":
            return bytes(audioop.alaw2lin(payload, 2))
        return payload

    def encode(self, pcm: bytes, fmt: AudioFormat) -> bytes:
        assert audioop is not None
        if fmt.name == "ulaw":
            return bytes(audioop.lin2ulaw(pcm, 2))
        if fmt.name == "alaw":
            return bytes(audioop.lin2alaw(pcm, 2))
        return pcm


class NumpyG711:
    """Look-up tables (256 entries to decode, 65536 to encode) built with numpy from the G.711 formulas."""

    def __init__(self) -> None:
        assert np is not None
        codes = np.arange(256, dtype=np.int32)
        linear = np.arange(-32768, 32768, dtype=np.int32)
        self.to_pcm = {"ulaw": self._ulaw_decode(codes), "alaw": self._alaw_decode(codes)}
        # Indexed by the sample's bits read as uint16: entry i encodes int16(i).
        order = np.argsort(linear.astype(np.int16).view(np.uint16))
        self.from_pcm = {
            "ulaw": self._ulaw_encode(linear)[order].astype(np.uint8),
            "alaw": self._alaw_encode(linear)[order].astype(np.uint8),
        }

    @staticmethod
    def _ulaw_decode(codes: Any) -> Any:
        u = ~codes & 0xFF
        t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        return np.where(u & 0x80, 0x84 - t, t - 0x84).astype("<i2")

    @staticmethod
    def _alaw_decode(codes: Any) -> Any:
        a = codes ^ 0x55
        seg = (a & 0x70) >> 4
        t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
        t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
        return np.where(a & 0x80, t, -t).astype("<i2")

    @staticmethod
    def _segment(value: Any, ends: list[int]) -> Any:
        return np.searchsorted(np.array(ends), value, side="left")

    @classmethod
    def _ulaw_encode(cls, linear: Any) -> Any:
        v = linear >> 2
        mask = np.where(v < 0, 0x7F, 0xFF)
        v = np.minimum(np.abs(v), 8159) + 33
        seg = cls._segment(v, [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
        code = (seg << 4) | ((v >> (seg + 1)) & 0x0F)
        return np.where(seg >= 8, 0x7F, code) ^ mask

    @classmethod
    def _alaw_encode(cls, linear: Any) -> Any:
        v = linear >> 3
        mask = np.where(v >= 0, 0xD5, 0x55)
        v = np.where(v >= 0, v, -v - 1)
        seg = cls._segment(v, [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
        code = (seg << 4) | ((v >> np.where(seg < 2, 1, seg)) & 0x0F)
        return np.where(seg >= 8, 0x7F, code) ^ mask

    def decode(self, payload: bytes, fmt: AudioFormat) -> bytes:
        table = self.to_pcm.get(fmt.name)
        return payload if table is None else bytes(table[np.frombuffer(payload, np.uint8)].tobytes())

    def encode(self, pcm: bytes, fmt: AudioFormat) -> bytes:
        table = self.from_pcm.get(fmt.name)
        return pcm if table is None else bytes(table[np.frombuffer(pcm, "<u2")].tobytes())


# ---------------------------------------------------------------------------
# Streaming resamplers: 16-bit PCM at one rate -> 16-bit PCM at another.
# ---------------------------------------------------------------------------


def float_pipeline(process: Callable[[Any], Any]) -> Convert:
    """int16 bytes -> float32 (unscaled: the filters are linear) -> process -> rounded, clipped int16 bytes."""
    assert np is not None

    def convert(pcm: bytes) -> bytes:
        y = process(np.frombuffer(pcm, "<i2").astype(np.float32))
        np.rint(y, out=y)
        np.clip(y, -32768, 32767, out=y)
        return bytes(y.astype("<i2").tobytes())

    return convert


def soxr_resampler(vr: bool) -> Callable[[int, int], Convert]:
    def make(source: int, target: int) -> Convert:
        assert soxr is not None
        stream = soxr.ResampleStream(source, target, 1, dtype="float32", quality="HQ", vr=vr)
        return float_pipeline(stream.resample_chunk)

    return make


def libsamplerate_resampler(source: int, target: int) -> Convert:
    assert samplerate is not None
    resampler = samplerate.Resampler("sinc_medium", 1)
    ratio = target / source
    return float_pipeline(lambda x: resampler.process(x, ratio))


def ratecv_resampler(source: int, target: int) -> Convert:
    assert audioop is not None
    state: Any = None

    def convert(pcm: bytes) -> bytes:
        nonlocal state
        out, state = audioop.ratecv(pcm, 2, 1, source, target, state)
        return bytes(out)

    return convert


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


def pipeline(g711: Any, resampler: Callable[[int, int], Convert]) -> Callable[[AudioFormat, AudioFormat], Convert]:
    """decode, resample when the rates differ, encode: what a candidate does to one frame."""

    def make(source: AudioFormat, target: AudioFormat) -> Convert:
        if source.rate == target.rate:
            return lambda payload: g711.encode(g711.decode(payload, source), target)
        resample = resampler(source.rate, target.rate)
        return lambda payload: g711.encode(resample(g711.decode(payload, source)), target)

    return make


def module_candidate(source: AudioFormat, target: AudioFormat) -> Convert:
    from audiohangup.codecs import Transcoder

    return Transcoder(source, target).convert


def candidates() -> list[tuple[str, list[str], Callable[[], Callable[[AudioFormat, AudioFormat], Convert]]]]:
    """(name, modules it needs, factory) for every candidate."""
    return [
        ("audioop+soxr", ["audioop", "numpy", "soxr"], lambda: pipeline(AudioopG711(), soxr_resampler(vr=False))),
        ("audioop+soxr-vr", ["audioop", "numpy", "soxr"], lambda: pipeline(AudioopG711(), soxr_resampler(vr=True))),
        ("audioop+libsamplerate", ["audioop", "numpy", "samplerate"], lambda: pipeline(AudioopG711(), libsamplerate_resampler)),
        ("audioop.ratecv", ["audioop"], lambda: pipeline(AudioopG711(), ratecv_resampler)),
        ("numpy-g711+soxr-vr", ["numpy", "soxr"], lambda: pipeline(NumpyG711(), soxr_resampler(vr=True))),
        ("audiohangup.codecs", ["audiohangup.codecs"], lambda: module_candidate),
    ]


def test_frame(fmt: AudioFormat, index: int) -> bytes:
    """Frame number index of a 440 Hz + 2.5 kHz signal at -10 dBFS, in fmt, made with audioop's codec."""
    import math

    n = fmt.frame_bytes // fmt.sample_bytes
    start = index * n
    samples = [
        round(
            6000 * math.sin(2 * math.pi * 440 * (start + i) / fmt.rate) + 3000 * math.sin(2 * math.pi * 2500 * (start + i) / fmt.rate)
        )
        for i in range(n)
    ]
    pcm = b"".join(s.to_bytes(2, "little", signed=True) for s in samples)
    if fmt.sample_bytes == 2:
        return pcm
    assert audioop is not None, "the test frames of u-law and A-law are made with audioop"
    return AudioopG711().encode(pcm, fmt)


def measure(
    make: Callable[[AudioFormat, AudioFormat], Convert], source: AudioFormat, target: AudioFormat, args: argparse.Namespace
) -> tuple[float, float]:
    """(median microseconds per call, most output held back at once in ms) of one pair."""
    convert = make(source, target)
    frames = [test_frame(source, i) for i in range(LATENCY_FRAMES)]
    given = 0
    held_ms = 0.0
    for i, frame in enumerate(frames):
        given += len(convert(frame)) // target.sample_bytes
        expected = (i + 1) * len(frame) // source.sample_bytes * target.rate / source.rate
        held_ms = max(held_ms, (expected - given) / target.rate * 1000)
    frame = frames[-1]
    runs = timeit.repeat(lambda: convert(frame), number=args.number, repeat=args.repeat)
    return statistics.median(runs) / args.number * 1e6, held_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timeit repeats; the median is reported (default 7)")
    parser.add_argument("--number", type=int, default=2000, help="calls per repeat (default 2000)")
    args = parser.parse_args()

    print(f"Python {platform.python_version()} on {platform.machine()}; {FRAME_SECONDS * 1000:.0f} ms frames")
    versions = {name: getattr(optional(name), "__version__", "stdlib") for name in ("audioop", "numpy", "soxr", "samplerate")}
    print("modules: " + ", ".join(f"{name} {version if optional(name) else 'not installed'}" for name, version in versions.items()))
    labels = [f"{s}->{t}" for s, t in PAIRS]
    width = max(len(label) for label in labels) + 2
    header = f"{'candidate':24}" + "".join(f"{label:>{width}}" for label in labels)
    costs: list[str] = []
    latencies: list[str] = []
    for name, needs, factory in candidates():
        missing = [module for module in needs if optional(module) is None]
        if missing:
            costs.append(f"{name:24}skipped: {', '.join(missing)} not installed")
            continue
        make = factory()
        cost_row = f"{name:24}"
        held_row = f"{name:24}"
        for source_name, target_name in PAIRS:
            us, held = measure(make, FORMATS[source_name], FORMATS[target_name], args)
            cost_row += f"{us:>{width}.1f}"
            held_row += f"{held:>{width}.1f}"
        costs.append(cost_row)
        latencies.append(held_row)
    print(f"\nCost per 20 ms frame, microseconds (median of {args.repeat} x {args.number} calls)")
    print(header)
    print("\n".join(costs))
    print("\nMost output held back at once while fed 20 ms frames, ms (latency)")
    print(header)
    print("\n".join(latencies))


if __name__ == "__main__":
    main()
