"""
What contrib/ ships, checked against the server as it runs: the systemd
units verify and the template's own command line serves under socket
activation; the alert rules pass their promtool unit tests; and every series
the rules and the Grafana dashboard name is one a running server's /metrics
exports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.conftest import until
from tests.redis_server import RedisServer, free_port
from tests.test_systemd import Notifications
from tests.twistd_child import (
    REPOSITORY,
    Spawn,
    assert_orderly_shutdown,
    assert_sigterm_exit,
    listening_ports,
    start_server,
    twistd_script,
)

CONTRIB = REPOSITORY / "contrib"
RULES = CONTRIB / "prometheus" / "audiohangup-rules.yml"
DASHBOARD = CONTRIB / "grafana" / "audiohangup.json"
TOKEN = "contrib-token-0123456789"

#: Series the rules name for the webhooks' SQLite outbox (shown even without --webhook).
OUTBOX_SERIES = {"audiohangup_webhook_outbox_events", "audiohangup_webhook_outbox_oldest_age_seconds"}

#: Made by Prometheus itself, not by the server.
PROMETHEUS_OWN = {"up"}

NAME = re.compile(r"\b(?:audiohangup|process)_[a-z0-9_]+\b|\bup\b(?=\{)")


def named_in_rules() -> set[str]:
    return set(NAME.findall(RULES.read_text()))


def named_in_dashboard() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    texts = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    texts += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return {name for text in texts for name in NAME.findall(text)}


def exported(text: str) -> set[str]:
    """The names a scrape shows: its samples', and its families' even without a sample yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return found


def test_the_units_verify_and_the_rules_pass_their_tests() -> None:
    """contrib/verify: systemd-analyze verify on the units, promtool check and test on the rules."""
    tool("systemd-analyze")
    tool("promtool")
    done = subprocess.run(
        [str(CONTRIB / "verify")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "systemd units: verified" in done.stdout
    assert "SUCCESS" in done.stdout


def test_the_dashboard_and_the_rules_name_series_of_the_server() -> None:
    """A typo in a name is caught here even where no server runs (names only; the scrape below has values)."""
    names = named_in_rules() | named_in_dashboard()
    assert "audiohangup_reactor_lag_seconds_bucket" in names
    assert OUTBOX_SERIES <= named_in_rules(), "webhook backlog and age are alerted on"


@pytest_twisted.ensureDeferred
async def test_every_series_of_the_rules_and_the_dashboard_is_exported(
    spawn: Spawn, redis_server: RedisServer
) -> None:
    """
    A server with the call directory (whose series exists only with --redis)
    exports every series the alert rules and the dashboard name.
    """
    http = free_port()
    _child, ports = await start_server(
        spawn, "--http", f"tcp:{http}:interface=127.0.0.1", "--api-token", TOKEN,
        "--redis", redis_server.url, "--instance-id", "a", "--advertise-url", f"http://127.0.0.1:{http}",
    )
    url = f"http://127.0.0.1:{ports['http']}/metrics"

    async def scrape() -> str:
        response = await treq.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, persistent=False, timeout=10)
        assert response.code == 200
        text: str = await response.text()
        return text

    text = await scrape()
    names = named_in_rules() | named_in_dashboard()
    missing = names - exported(text) - PROMETHEUS_OWN
    assert not missing, sorted(missing)
    assert {"process_open_fds", "process_max_fds", "audiohangup_directory_available"} <= exported(text)

    async def reachable() -> bool:
        return "\naudiohangup_directory_available 1.0\n" in await scrape()

    deadline = reactor.seconds() + 10
    while not await reachable():
        assert reactor.seconds() < deadline, "the directory never said it was reachable"
        await deferLater(reactor, 0.05)


# The template's command line, under socket activation


@pytest.fixture
def short() -> Iterator[Path]:
    """A short directory: a UNIX socket's path must fit in 107 bytes."""
    directory = tempfile.mkdtemp(prefix="ah-units-")
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory)


def exec_start(unit: Path, replacements: dict[str, str]) -> list[str]:
    """A unit's ExecStart=, its continuation lines joined and its specifiers replaced."""
    text = unit.read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    for old, new in replacements.items():
        line = line.replace(old, new)
    return shlex.split(line.removeprefix("ExecStart="))


def socket_names(directory: Path) -> list[tuple[str, str]]:
    """Each socket unit's (ListenStream=, FileDescriptorName=), in the order of the template's Sockets=."""
    template = (directory / "audiohangup@.service").read_text()
    [sockets] = [line for line in template.splitlines() if line.startswith("Sockets=")]
    found = []
    for name in sockets.removeprefix("Sockets=").split():
        fields = dict(
            line.split("=", 1) for line in (directory / name).read_text().splitlines() if "=" in line and not line.startswith("#")
        )
        found.append((fields["ListenStream"], fields["FileDescriptorName"]))
    return found


@pytest_twisted.ensureDeferred
async def test_the_template_serves_on_the_ports_systemd_hands_it(
    spawn: Spawn, short: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    audiohangup@.service's own command line, run as systemd would run it
    (systemd-socket-activate passes the socket units' ports by name, the
    credentials directory holds the tokens): the first connection starts it,
    it adopts the three ports, tells READY=1, answers on them, and stops on
    SIGTERM.
    """
    activate = tool("systemd-socket-activate")
    units = CONTRIB / "systemd"
    listen = socket_names(units)
    assert [name for _, name in listen] == ["visitor", "resident", "http"]
    ports = {name: free_port() for _, name in listen}
    credentials = short / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "tokens").write_text(f"control {TOKEN}\n")
    (credentials / "tokens").chmod(0o600)
    command = exec_start(units / "audiohangup@.service", {
        "/opt/audiohangup/bin/twistd": twistd_script(), "%d": str(credentials), "%S": str(short), "%i": "a",
    })
    (short / "audiohangup" / "a").mkdir(parents=True)
    notifications = Notifications()
    notify = reactor.listenUNIXDatagram(str(short / "notify"), notifications)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(short / "notify"))
        child = spawn(
            activate,
            *[f"--listen=127.0.0.1:{ports[name]}" for address, name in listen if address.startswith("127.0.0.1:")],
            f"--fdname={':'.join(name for _, name in listen)}",
            # It hands its child only the variables named (as systemd, Environment=): all of the test's.
            *[f"--setenv={name}" for name in sorted(os.environ)],
            *command,
        )
        await until(lambda: child.output.count("Listening on") == 3 or child.ended, 10.0, "the three ports")
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=5):
            pass  # the first connection starts the server, as systemd would
        try:
            await until(lambda: notifications.find("READY=1") or child.ended, 20.0, "READY=1")
        except AssertionError:
            raise AssertionError(f"no READY=1: {child.describe()}") from None
        assert notifications.find("READY=1"), child.describe()
        adopted = {"audiosocket-visitor": ports["visitor"], "audiosocket-resident": ports["resident"], "http": ports["http"]}
        assert listening_ports(child.log) == adopted, child.describe()
        response = await treq.get(
            f"http://127.0.0.1:{ports['http']}/calls", headers={"Authorization": f"Bearer {TOKEN}"},
            persistent=False, timeout=10,
        )
        assert response.code == 200, child.describe()
        assert (short / "audiohangup" / "a" / "audiohangup.sqlite3").exists()
        child.signal("TERM")
        ended = await child.exit()
        assert_sigterm_exit(child, ended)
        assert_orderly_shutdown(child)
        assert notifications.find("STOPPING=1"), notifications.messages
    finally:
        await notify.stopListening()
