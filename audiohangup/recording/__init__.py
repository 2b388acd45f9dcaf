# -*- test-case-name: tests.test_recording -*-
"""
Call recording: one stereo WAV per call, visitor left, resident right.

From the file up: L{wav} (the format, and the repair of a file a crash cut
short), L{layout} (the record directory: day folders, names, the owner's
only, no link followed), L{writer} (the writer thread: ticks converted and
appended), L{recorder} (the taps on the legs, the 20 ms timeline, the
recorder's life and its prune); the HTTP API serves a recording as
C{audio/wav} (C{audiohangup.http.wav}). The first two know neither the reactor nor a leg.

What the rest of the package uses is here, so C{from audiohangup.recording
import Recorder} goes on working.
"""

from audiohangup.recording.recorder import (
    MAX_AHEAD_TICKS,
    AlreadyRecording,
    CallRecording,
    FoundRecording,
    Mix,
    NotRecording,
    Recorder,
    RecorderStopped,
    RecordingConfig,
    RecordingOff,
)
from audiohangup.recording.wav import HEADER_BYTES, repair, wav_data_bytes, wav_header, wav_rate

__all__ = [
    "HEADER_BYTES",
    "MAX_AHEAD_TICKS",
    "AlreadyRecording",
    "CallRecording",
    "FoundRecording",
    "Mix",
    "NotRecording",
    "Recorder",
    "RecorderStopped",
    "RecordingConfig",
    "RecordingOff",
    "repair",
    "wav_data_bytes",
    "wav_header",
    "wav_rate",
]
