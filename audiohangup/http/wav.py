# -*- test-case-name: tests.test_recording,tests.test_records_http -*-
"""
A recording served as C{audio/wav}, live or done: the answer's header is
made from what the file holds when it is asked for, as a live recording's
own header says nothing yet and a crash may have cut a file short.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from twisted.protocols.basic import FileSender
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from audiohangup.http.answers import json_error
from audiohangup.http.errors import ApiError
from audiohangup.recording.layout import open_in_folder
from audiohangup.recording.wav import HEADER_BYTES, wav_data_bytes, wav_header, wav_rate


class _Limited:
    """A file read up to C{limit} bytes: a recording still written grows past what the answer announced."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self.file = file
        self.left = limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.file.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.file.close()


class WavResource(Resource):
    """
    A recording as C{audio/wav}: a header true to what the file holds now
    (a live recording's own says nothing yet, a crash may have cut it short),
    then its data, streamed.
    """

    isLeaf = True

    def __init__(self, path: str, rate: int) -> None:
        super().__init__()
        self.path = path
        self.rate = rate  # for a file whose header is not there (yet): what the recorder writes

    def render_GET(self, request: Any) -> Any:
        try:
            file = os.fdopen(open_in_folder(self.path, os.O_RDONLY), "rb")  # closed when the transfer ends
        except FileNotFoundError:  # just started: nothing written yet
            request.setHeader(b"content-type", b"audio/wav")
            return wav_header(self.rate, 0)
        except OSError as error:  # a link put where the recording was since it was found: not followed
            message = f"{os.path.basename(self.path)} cannot be read: {error.strerror or error}"
            return json_error(request, ApiError(404, "no_recording", message))
        header = file.read(HEADER_BYTES)
        data = wav_data_bytes(os.fstat(file.fileno()).st_size)
        request.setHeader(b"content-type", b"audio/wav")
        request.setHeader(b"content-length", str(HEADER_BYTES + data).encode())
        request.write(wav_header(wav_rate(header) or self.rate, data))
        file.seek(HEADER_BYTES)
        limited = _Limited(file, data)
        done = FileSender().beginFileTransfer(limited, request)

        def finished(_: object) -> None:
            limited.close()
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

        done.addBoth(finished)
        return NOT_DONE_YET
