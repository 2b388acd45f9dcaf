"""
Listening endpoints as the service builds them: a UNIX socket is 0660 unless
its endpoint string says otherwise (a UNIX API client counts as loopback and
is asked no token, so the socket file's mode is what guards it).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import pytest_twisted
from twisted.internet import reactor

from audiohangup.service import Config, build_service
from tests.conftest import LogCapture


@pytest_twisted.ensureDeferred
async def test_unix_sockets_are_0660_unless_the_endpoint_says(logs: LogCapture) -> None:
    folder = tempfile.mkdtemp(prefix="ah-")  # AF_UNIX paths fit in 107 bytes
    previous = os.umask(0o022)
    try:
        config = Config(
            visitor=f"unix:{folder}/visitor.sock", resident=f"unix:{folder}/resident.sock:lockfile=0",
            http=f"unix:{folder}/api.sock:mode=600", records="none",
        )
        service = build_service(config, reactor)
        service.privilegedStartService()
        service.startService()
        try:
            modes = {
                name: stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
                for name in ("visitor.sock", "resident.sock", "api.sock")
            }
        finally:
            await service.stopService()
    finally:
        os.umask(previous)
        shutil.rmtree(folder, ignore_errors=True)
    assert modes == {"visitor.sock": 0o660, "resident.sock": 0o660, "api.sock": 0o600}


@pytest_twisted.ensureDeferred
async def test_listening_fires_once_the_port_listens(logs: LogCapture) -> None:
    """What systemd's READY=1 waits for: before the start nothing has fired, after it every waiter has."""
    from twisted.internet.protocol import Factory

    from audiohangup.listeners import Listener, server_endpoint

    listener = Listener("http", server_endpoint(reactor, "tcp:0:interface=127.0.0.1"), Factory())
    before = listener.listening()
    assert not before.called
    listener.privilegedStartService()
    listener.startService()
    try:
        assert before.called
        assert listener.listening().called  # and at once for a port that listens already
    finally:
        await listener.stopService()
