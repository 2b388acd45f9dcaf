"""
The README's example stream app, run as a user would run it, against the
server: it greets, echoes and hangs up on #; and the README shows it whole.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted

from audiohangup.audio import FORMATS
from audiohangup.codecs import decode, encode
from audiohangup.streams.manager import StreamConfig
from audiohangup.wire import Kind
from audiohangup.wire import encode_frame as frame
from tests.conftest import LogCapture, until
from tests.fake_asterisk import connect
from tests.redis_server import free_port
from tests.twistd_child import REPOSITORY

EXAMPLE = REPOSITORY / "examples" / "greet_and_echo.py"
ULAW = FORMATS["ulaw"]


def test_the_readme_shows_the_example_whole() -> None:
    readme = (REPOSITORY / "README.rst").read_text()
    shown = "\n".join(line[4:] if line.strip() else "" for line in readme.splitlines())
    assert EXAMPLE.read_text().strip() in shown
    assert len(EXAMPLE.read_text().splitlines()) < 40


@pytest_twisted.ensureDeferred
async def test_the_example_app(make_server: Any, spawn: Any, tmp_path: Path, logs: LogCapture) -> None:
    greeting = b"".join(encode((1000 * n).to_bytes(2, "little") * 160, ULAW) for n in range(1, 11))  # 200 ms
    (tmp_path / "greeting.ulaw").write_bytes(greeting)
    port = free_port()
    app = spawn(sys.executable, str(EXAMPLE), str(port), str(tmp_path / "greeting.ulaw"))
    await until(lambda: app.ended is not None or "listening on" in app.output, 20, "the app to listen")
    assert app.ended is None, app.describe()
    server = await make_server(streams=StreamConfig(url=f"ws://127.0.0.1:{port}/"))
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="close")
    client.send_uuid(call_id)
    heard = lambda: [f.payload for f in client.frames if f.kind == Kind.SLIN and any(f.payload)]  # noqa: E731
    await until(lambda: len(heard()) >= 10, what="the greeting")
    assert heard()[:10] == [decode(greeting[i : i + 160], ULAW) for i in range(0, 1600, 160)]
    await until(lambda: "played greeted" in app.output, what="the mark after the greeting")
    spoken = (-2000).to_bytes(2, "little", signed=True) * 160
    client.send(frame(Kind.SLIN, spoken))
    await until(lambda: len(heard()) >= 11, what="the echo")
    assert heard()[10] == decode(encode(spoken, ULAW), ULAW)  # through μ-law and back
    client.send(frame(Kind.DTMF, b"#"))
    await client.closed
    assert client.ended_with_single_hangup()
    assert f"stream {call_id} visitor" in app.output
