"""
Tests for L{audiohangup.codecs}: G.711 and resampling between the formats
AudioSocket carries.

Covered here, with no sockets and no reactor:

  - G.711 against a reference written out here from the ITU-T G.711 segment
    tables (as Sun's g711.c, the code audioop carries, implements them), over
    every code and every 16-bit value, and against audioop where it can be
    imported; known values (u-law 0xFF and A-law 0xD5 are silence), round
    trips, little-endian output, slin passed through untouched;
  - a 1 kHz tone converted 20 ms at a time (u-law 8 kHz to slin16 and back,
    and to and from 44.1 kHz, whose frame is 882 samples): its spectral peak,
    the number of samples overall, the latency the resampler reports, no
    image or alias where a resampler without a proper filter leaves one;
  - frame by frame equals the whole signal at once (no click at a boundary),
    a steady amount out per frame, full-scale overshoot clipped, flush and a
    new stream after it;
  - Transcoder shortcuts (same format: the same object back; same rate: no
    resampler), ValueError for an odd number of bytes of 16-bit audio or a
    format it has no codec for, and no DeprecationWarning from the import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from audiohangup.audio import FORMATS, AudioFormat
from audiohangup.codecs import Transcoder, decode, encode, mix
from audiohangup.wire import Kind

ULAW = FORMATS["ulaw"]
ALAW = FORMATS["alaw"]
SLIN = FORMATS["slin"]
SLIN16 = FORMATS["slin16"]
SLIN44 = FORMATS["slin44"]
SLIN48 = FORMATS["slin48"]

Samples = npt.NDArray[np.int16]
#: The RMS of the test tones, 8000 at their peak.
TONE_RMS = 8000 / 2**0.5


# ---------------------------------------------------------------------------
# G.711 reference, one value at a time, from the standard's segment tables.
# ---------------------------------------------------------------------------

#: Ends of the 8 segments, u-law on biased 14-bit magnitudes, A-law on 13-bit ones.
ULAW_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
ALAW_SEGMENT_ENDS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def segment(magnitude: int, ends: tuple[int, ...]) -> int:
    return next((i for i, end in enumerate(ends) if magnitude <= end), len(ends))


def reference_lin2ulaw(sample: int) -> int:
    value = sample >> 2  # 14 significant bits
    mask = 0x7F if value < 0 else 0xFF
    value = min(abs(value), 8159) + 33  # clip, then the bias
    seg = segment(value, ULAW_SEGMENT_ENDS)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((value >> (seg + 1)) & 0x0F)) ^ mask


def reference_ulaw2lin(code: int) -> int:
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)) - 0x84
    return -magnitude if code & 0x80 else magnitude


def reference_lin2alaw(sample: int) -> int:
    value = sample >> 3  # 13 significant bits
    if value >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        value = -value - 1
    seg = segment(value, ALAW_SEGMENT_ENDS)
    if seg >= 8:
        return 0x7F ^ mask
    mantissa = (value >> (1 if seg < 2 else seg)) & 0x0F
    return ((seg << 4) | mantissa) ^ mask


def reference_alaw2lin(code: int) -> int:
    code ^= 0x55
    seg = (code & 0x70) >> 4
    magnitude = ((code & 0x0F) << 4) + (8 if seg == 0 else 0x108)
    if seg > 1:
        magnitude <<= seg - 1
    return magnitude if code & 0x80 else -magnitude


ALL_CODES = bytes(range(256))
ALL_SAMPLES = list(range(-32768, 32768))
ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()


def pcm(*samples: int) -> bytes:
    return np.array(samples, dtype="<i2").tobytes()


def samples_of(data: bytes) -> Samples:
    return np.frombuffer(data, "<i2")


class G711Tests(SynchronousTestCase):
    def test_ulaw_decode_every_code(self) -> None:
        self.assertEqual(samples_of(decode(ALL_CODES, ULAW)).tolist(), [reference_ulaw2lin(c) for c in ALL_CODES])

    def test_alaw_decode_every_code(self) -> None:
        self.assertEqual(samples_of(decode(ALL_CODES, ALAW)).tolist(), [reference_alaw2lin(c) for c in ALL_CODES])

    def test_ulaw_encode_every_sample(self) -> None:
        self.assertEqual(list(encode(ALL_PCM, ULAW)), [reference_lin2ulaw(s) for s in ALL_SAMPLES])

    def test_alaw_encode_every_sample(self) -> None:
        self.assertEqual(list(encode(ALL_PCM, ALAW)), [reference_lin2alaw(s) for s in ALL_SAMPLES])

    def test_same_as_audioop(self) -> None:
        """Bit for bit what audioop (stdlib, or audioop-lts on 3.13+) gives, in little-endian order."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import audioop
            except ImportError:
                raise SkipTest("audioop is not importable (Python 3.13+ without audioop-lts)") from None
        native = ALL_PCM if sys.byteorder == "little" else audioop.byteswap(ALL_PCM, 2)
        self.assertEqual(encode(ALL_PCM, ULAW), audioop.lin2ulaw(native, 2))
        self.assertEqual(encode(ALL_PCM, ALAW), audioop.lin2alaw(native, 2))
        self.assertEqual(samples_of(decode(ALL_CODES, ULAW)).tolist(), list(samples_of(audioop.ulaw2lin(ALL_CODES, 2))))
        self.assertEqual(samples_of(decode(ALL_CODES, ALAW)).tolist(), list(samples_of(audioop.alaw2lin(ALL_CODES, 2))))

    def test_known_values(self) -> None:
        """Silence, the extremes, and little-endian byte order."""
        self.assertEqual(decode(b"\xff\x7f", ULAW), pcm(0, 0))  # u-law has two zeros
        self.assertEqual(decode(b"\x80\x00", ULAW), b"\x7c\x7d\x84\x82")  # +32124, -32124
        self.assertEqual(decode(b"\xd5\x55", ALAW), pcm(8, -8))  # A-law has no zero
        self.assertEqual(decode(b"\xaa\x2a", ALAW), pcm(32256, -32256))
        self.assertEqual(encode(pcm(0, 32767, -32768), ULAW), b"\xff\x80\x00")
        self.assertEqual(encode(pcm(0, 32767, -32768), ALAW), b"\xd5\xaa\x2a")

    def test_silence(self) -> None:
        """Zero samples encode to each format's silence byte, the one its silence frames are made of."""
        for fmt in (ULAW, ALAW):
            zeros = bytes(2 * 160)
            self.assertEqual(encode(zeros, fmt), bytes([fmt.silence_byte]) * 160)
            self.assertEqual(set(encode(decode(bytes([fmt.silence_byte]) * 160, fmt), fmt)), {fmt.silence_byte})

    def test_code_round_trip(self) -> None:
        """Every code decodes to a value that encodes back to it; u-law's negative zero 0x7F comes back as 0xFF."""
        self.assertEqual(encode(decode(ALL_CODES, ALAW), ALAW), ALL_CODES)
        expected = ALL_CODES.replace(b"\x7f", b"\xff")
        self.assertEqual(encode(decode(ALL_CODES, ULAW), ULAW), expected)

    def test_sample_round_trip(self) -> None:
        """A sample comes back within half its segment's step (G.711 rounds to the middle of a step)."""
        original = samples_of(ALL_PCM).astype(np.int32)
        for fmt, worst in ((ULAW, 1024), (ALAW, 1024)):
            back = samples_of(decode(encode(ALL_PCM, fmt), fmt)).astype(np.int32)
            error = np.abs(back - original)
            self.assertLessEqual(int(error.max()), worst, fmt.name)
            # Small samples are fine-grained: the first segments' steps are a few units.
            self.assertLessEqual(int(error[32768 - 64 : 32768 + 64].max()), 8, fmt.name)

    def test_slin_passes_through(self) -> None:
        data = pcm(1, -2, 3)
        self.assertIs(decode(data, SLIN16), data)
        self.assertIs(encode(data, SLIN16), data)

    def test_odd_bytes(self) -> None:
        with self.assertRaisesRegex(ValueError, "3 bytes.*even"):
            decode(b"\x00\x00\x00", SLIN16)
        with self.assertRaisesRegex(ValueError, "1 bytes.*even"):
            encode(b"\x00", ULAW)

    def test_unknown_format(self) -> None:
        gsm = AudioFormat("gsm", Kind.SLIN, 8000, 1, 0x00, "audio/GSM")
        with self.assertRaisesRegex(ValueError, "gsm"):
            decode(b"\x00", gsm)
        with self.assertRaisesRegex(ValueError, "gsm"):
            encode(b"\x00\x00", gsm)
        with self.assertRaisesRegex(ValueError, "gsm"):
            Transcoder(ULAW, gsm)


# ---------------------------------------------------------------------------
# Transcoding streams of 20 ms frames.
# ---------------------------------------------------------------------------


def tone(rate: int, frequency: float, seconds: float = 1.0, amplitude: float = 8000) -> Samples:
    t = np.arange(round(rate * seconds)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * frequency * t)).astype("<i2")


def in_format(samples: Samples, fmt: AudioFormat) -> bytes:
    return encode(samples.astype("<i2").tobytes(), fmt)


def frames_of(data: bytes, fmt: AudioFormat) -> list[bytes]:
    return [data[i : i + fmt.frame_bytes] for i in range(0, len(data), fmt.frame_bytes)]


def linear(data: bytes, fmt: AudioFormat) -> npt.NDArray[np.float64]:
    return samples_of(decode(data, fmt)).astype(np.float64)


def assertNear(case: SynchronousTestCase, actual: float, expected: float, tolerance: float, msg: object = None) -> None:
    """|actual - expected| <= tolerance (trial's assertAlmostEqual has no working delta)."""
    case.assertLessEqual(abs(actual - expected), tolerance, f"{actual!r} is not within {tolerance!r} of {expected!r}: {msg}")


def run(transcoder: Transcoder, frames: list[bytes]) -> tuple[list[bytes], bytes]:
    """What each frame gave, and what flush gave."""
    outputs = [transcoder.convert(frame) for frame in frames]
    return outputs, transcoder.flush()


def spectrum(signal: npt.NDArray[np.float64], rate: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Frequencies and magnitudes (dB relative to the strongest bin) of a Hann-windowed signal."""
    magnitudes = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    levels = 20 * np.log10(magnitudes / magnitudes.max() + 1e-12)
    return np.asarray(np.fft.rfftfreq(len(signal), 1 / rate), dtype=np.float64), np.asarray(levels, dtype=np.float64)


def peak(signal: npt.NDArray[np.float64], rate: int) -> float:
    frequencies, levels = spectrum(signal, rate)
    return float(frequencies[np.argmax(levels)])


def level_near(signal: npt.NDArray[np.float64], rate: int, frequency: float, width: float = 20) -> float:
    """The strongest bin within width Hz of frequency, dB relative to the strongest bin overall."""
    frequencies, levels = spectrum(signal, rate)
    return float(levels[np.abs(frequencies - frequency) <= width].max())


class ToneTests(SynchronousTestCase):
    """A 1 kHz tone, 50 frames of 20 ms, through the pairs a Twilio stream needs."""

    def convert_tone(self, source: AudioFormat, target: AudioFormat, frequency: float = 1000) -> tuple[list[bytes], bytes]:
        frames = frames_of(in_format(tone(source.rate, frequency), source), source)
        self.assertEqual(len(frames), 50)
        self.assertEqual({len(frame) for frame in frames}, {source.frame_bytes})
        transcoder = Transcoder(source, target)
        outputs = [transcoder.convert(frame) for frame in frames]
        # What came out before the flush, plus what the transcoder says it
        # still holds, is the whole second; the flush gives back exactly that.
        given = sum(len(out) for out in outputs) // target.sample_bytes
        held = transcoder.delay * target.rate
        self.assertGreater(held, 0)
        assertNear(self, given + held, target.rate, 1)
        tail = transcoder.flush()
        self.assertEqual(given + len(tail) // target.sample_bytes, target.rate)
        self.assertEqual(transcoder.delay, 0)
        return outputs, tail

    def check_tone(self, source: AudioFormat, target: AudioFormat) -> None:
        outputs, tail = self.convert_tone(source, target)
        signal = linear(b"".join(outputs) + tail, target)
        assertNear(self, peak(signal, target.rate), 1000, 10)
        # The level is kept: 8000 peak is about 5657 RMS (G.711 adds some noise).
        steady = signal[target.rate // 10 : -target.rate // 10]
        assertNear(self, float(np.sqrt(np.mean(steady**2))), TONE_RMS, 100)

    def test_ulaw8k_to_slin16(self) -> None:
        self.check_tone(ULAW, SLIN16)

    def test_slin16_to_ulaw8k(self) -> None:
        self.check_tone(SLIN16, ULAW)

    def test_ulaw8k_to_slin44(self) -> None:
        self.check_tone(ULAW, SLIN44)

    def test_slin44_to_ulaw8k(self) -> None:
        self.assertEqual(SLIN44.frame_bytes, 882 * 2)
        self.check_tone(SLIN44, ULAW)

    def test_slin48_to_alaw8k(self) -> None:
        self.check_tone(SLIN48, ALAW)

    def test_no_image_when_upsampling(self) -> None:
        """8 to 16 kHz: a 1 kHz tone leaves no image at 7 kHz (linear interpolation leaves one at -28 dB)."""
        outputs, tail = self.convert_tone(SLIN, SLIN16)
        signal = linear(b"".join(outputs) + tail, SLIN16)
        self.assertLess(level_near(signal[1600:-1600], 16000, 7000), -80)

    def test_no_alias_when_downsampling(self) -> None:
        """48 to 8 kHz: a 5 kHz tone is filtered out, not folded to 3 kHz (without a filter it comes out at full level)."""
        source = tone(48000, 5000)
        outputs, tail = run(Transcoder(SLIN48, SLIN), frames_of(source.tobytes(), SLIN48))
        signal = linear(b"".join(outputs) + tail, SLIN)
        self.assertLess(float(np.abs(signal[800:-800]).max()), 8000 * 10 ** (-60 / 20))

    def test_telephone_band_kept(self) -> None:
        """3.4 kHz, the top of the telephone band, keeps its level through 16 to 8 kHz and back."""
        down = Transcoder(SLIN16, SLIN)
        up = Transcoder(SLIN, SLIN16)
        frames = frames_of(tone(16000, 3400).tobytes(), SLIN16)
        middle = b"".join(down.convert(frame) for frame in frames) + down.flush()
        back = b"".join(up.convert(frame) for frame in frames_of(middle, SLIN)) + up.flush()
        steady = linear(back, SLIN16)[1600:-1600]
        assertNear(self, float(np.sqrt(np.mean(steady**2))), TONE_RMS, TONE_RMS * 0.03)


class StreamTests(SynchronousTestCase):
    """The resampler's state across frames."""

    def test_frames_equal_whole(self) -> None:
        """Frame by frame gives what the whole signal at once gives: no discontinuity at a frame boundary."""
        rng = np.random.default_rng(20)
        for source, target in ((SLIN, SLIN16), (SLIN16, SLIN), (SLIN44, SLIN), (SLIN, SLIN44), (SLIN48, SLIN)):
            signal = tone(source.rate, 440) // 2 + tone(source.rate, 1900) // 4 + rng.normal(0, 300, source.rate).astype("<i2")
            data = signal.tobytes()
            outputs, tail = run(Transcoder(source, target), frames_of(data, source))
            whole = Transcoder(source, target)
            at_once = whole.convert(data) + whole.flush()
            framed = b"".join(outputs) + tail
            self.assertEqual(len(framed), len(at_once), (source.name, target.name))
            difference = np.abs(linear(framed, target) - linear(at_once, target))
            self.assertLessEqual(float(difference.max()), 1, (source.name, target.name))

    def test_ulaw_frames_equal_whole(self) -> None:
        """The same through u-law on both sides, the Twilio direction."""
        data = in_format(tone(16000, 1000), SLIN16)
        outputs, tail = run(Transcoder(SLIN16, ULAW), frames_of(data, SLIN16))
        whole = Transcoder(SLIN16, ULAW)
        self.assertEqual(b"".join(outputs) + tail, whole.convert(data) + whole.flush())

    def test_steady_output(self) -> None:
        """After the first frames, every 20 ms in gives 20 ms out, within a sample: a live call needs no burst buffer."""
        for source, target in ((ULAW, SLIN16), (SLIN16, ULAW), (SLIN48, ULAW), (SLIN44, ULAW), (ULAW, SLIN44)):
            transcoder = Transcoder(source, target)
            frames = frames_of(in_format(tone(source.rate, 1000), source), source)
            sizes = [len(transcoder.convert(frame)) // target.sample_bytes for frame in frames]
            expected = target.frame_bytes // target.sample_bytes
            for size in sizes[3:]:
                assertNear(self, size, expected, 1, (source.name, target.name, sizes))

    def test_delay(self) -> None:
        """The latency reported is what went in and has not come out, and stays under 40 ms."""
        for source, target, most in ((ULAW, SLIN16, 0.040), (SLIN16, ULAW, 0.040), (SLIN48, ULAW, 0.040), (SLIN44, ULAW, 0.040)):
            transcoder = Transcoder(source, target)
            self.assertEqual(transcoder.delay, 0)
            taken = given = 0
            for frame in frames_of(in_format(tone(source.rate, 1000), source), source):
                given += len(transcoder.convert(frame)) // target.sample_bytes
                taken += len(frame) // source.sample_bytes
                assertNear(self, transcoder.delay, taken / source.rate - given / target.rate, 1e-9)
                self.assertLessEqual(transcoder.delay, most, (source.name, target.name))
            self.assertGreater(transcoder.delay, 0)

    def test_flush_starts_a_new_stream(self) -> None:
        """After flush the transcoder takes a new stream, converted as a fresh transcoder would."""
        frames = frames_of(in_format(tone(8000, 700), ULAW), ULAW)
        used = Transcoder(ULAW, SLIN16)
        run(used, frames[:10])
        second = run(used, frames)
        self.assertEqual(second, run(Transcoder(ULAW, SLIN16), frames))

    def test_clipped_not_wrapped(self) -> None:
        """A full-scale square wave overshoots in the filter: the overshoot is clipped, never wrapped to the other sign."""
        square = np.where(np.sin(2 * np.pi * 100 * np.arange(8000) / 8000) >= 0, np.int16(32767), np.int16(-32768)).astype("<i2")
        outputs, tail = run(Transcoder(SLIN, SLIN16), frames_of(square.tobytes(), SLIN))
        out = samples_of(b"".join(outputs) + tail).astype(np.int32)
        self.assertEqual(int(out.max()), 32767)
        self.assertEqual(int(out.min()), -32768)
        self.assertLess(int(np.abs(np.diff(out)).max()), 65535 // 2 + 16384)

    def test_silence_stays_silent(self) -> None:
        """Silence in, exact silence out, through resampling both ways (no dither noise for a far end's VAD)."""
        for source, target in ((ULAW, SLIN16), (SLIN16, ULAW), (SLIN, SLIN44), (SLIN48, ALAW)):
            transcoder = Transcoder(source, target)
            outputs, tail = run(transcoder, [bytes([source.silence_byte]) * source.frame_bytes] * 50)
            expected = encode(bytes(2), target) if target.sample_bytes == 1 else bytes(2)
            self.assertEqual(set(b"".join(outputs) + tail) - set(expected), set(), (source.name, target.name))

    def test_empty_payload(self) -> None:
        transcoder = Transcoder(ULAW, SLIN16)
        self.assertEqual(transcoder.convert(b""), b"")
        self.assertEqual(transcoder.flush(), b"")

    def test_odd_bytes_carried(self) -> None:
        """
        An odd-length 16-bit payload (Asterisk accepts one) is no error: its
        last byte waits for the next payload, so the samples stay aligned and
        the output is what the same bytes cut evenly give. The fuzzer found
        the ValueError this used to raise inside a mixed-format bridge.
        """
        data = in_format(tone(16000, 1000), SLIN16)[:6400]
        odd_cuts = [data[i : i + 321] for i in range(0, len(data), 321)]
        for target in (ULAW, SLIN, SLIN16):
            odd, even = Transcoder(SLIN16, target), Transcoder(SLIN16, target)
            self.assertEqual(
                b"".join(odd.convert(chunk) for chunk in odd_cuts) + odd.flush(),
                b"".join(even.convert(chunk) for chunk in frames_of(data, SLIN16)) + even.flush(),
                target.name,
            )
        same = Transcoder(SLIN16, SLIN16)
        self.assertEqual(same.convert(b"\x01\x02\x03"), b"\x01\x02")
        self.assertEqual(same.convert(b"\x04"), b"\x03\x04")
        self.assertEqual(same.convert(b"\x05"), b"")
        self.assertEqual(same.flush(), b"")
        self.assertEqual(same.convert(b"\x06\x07"), b"\x06\x07")  # a new stream: the held byte is gone


class MixTests(SynchronousTestCase):
    """C{--stream-audio mix}: two payloads summed with saturation, in the leg's own format."""

    def test_slinAtAnyRate(self) -> None:
        for name in ("slin", "slin16", "slin48"):
            fmt = FORMATS[name]
            count = fmt.frame_bytes // 2
            one = np.full(count, 20000, "<i2").tobytes()
            other = np.array([1000, -30000, 20000, -1] * (count // 4), "<i2").tobytes()
            summed = np.frombuffer(mix(one, other, fmt), "<i2")
            self.assertEqual(list(summed[:4]), [21000, -10000, 32767, 19999])  # 40000 clips, never wraps

    def test_g711ThroughLinear(self) -> None:
        for name in ("ulaw", "alaw"):
            fmt = FORMATS[name]
            one = encode(np.full(160, 8000, "<i2").tobytes(), fmt)
            other = encode(np.full(160, -3000, "<i2").tobytes(), fmt)
            summed = np.frombuffer(decode(mix(one, other, fmt), fmt), "<i2")
            self.assertEqual(len(mix(one, other, fmt)), 160)
            self.assertTrue(np.all(np.abs(summed - 5000) < 300), summed[:4])  # within G.711's step there
            silence = bytes([fmt.silence_byte]) * 160
            self.assertEqual(mix(one, silence, fmt), one)


class ShortcutTests(SynchronousTestCase):
    def test_same_format_same_object(self) -> None:
        for fmt in (ULAW, ALAW, SLIN, SLIN16, SLIN44):
            transcoder = Transcoder(fmt, fmt)
            payload = bytes(range(256)) * (fmt.frame_bytes // 256) + bytes(fmt.frame_bytes % 256)
            self.assertIs(transcoder.convert(payload), payload)
            self.assertEqual(transcoder.flush(), b"")
            self.assertEqual(transcoder.delay, 0)

    def test_same_rate_no_resampler(self) -> None:
        """u-law to A-law and to slin: sample for sample, the same as decode then encode, nothing held."""
        frames = frames_of(in_format(tone(8000, 1000), ULAW), ULAW)
        for target in (ALAW, SLIN):
            transcoder = Transcoder(ULAW, target)
            for frame in frames:
                self.assertEqual(transcoder.convert(frame), encode(decode(frame, ULAW), target))
                self.assertEqual(transcoder.delay, 0)
            self.assertEqual(transcoder.flush(), b"")
        self.assertEqual(Transcoder(SLIN, ALAW).convert(pcm(0, 8, -8)), b"\xd5\xd5\x55")


class ImportTests(SynchronousTestCase):
    def test_no_deprecation_warning(self) -> None:
        """Importing the module under -W error::DeprecationWarning works: audioop's own warning is muted at the import."""
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning", "-c", "import audiohangup.codecs"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
