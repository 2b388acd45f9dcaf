# -*- test-case-name: tests.test_localdirectory,tests.test_drain -*-
"""
The call directory of processes on one host, without Redis
(C{--local-directory DIR}): what two processes sharing their ports during an
upgrade (C{--reuse-port}, or systemd's sockets) need to find each other's
calls. It answers the queries of L{audiohangup.cluster.directory.Directory}
(C{owners}, C{link_of}, C{legs}, C{instances}), so the API's forwarding and
the media link work between them unchanged: a request for a call of the
draining process reaches it, and a call whose second leg lands on the new
process is bridged through the link to the first's.

One small JSON file per entry, written whole (a temporary file renamed over
it, so a reader never sees half of one), mode 0600 in a directory of mode
0700 (only the user the processes run as reads it):

C{DIR/instance.<instance_id>.json}
    Presence, as in Redis: C{instance_id}, C{url}, C{started_at},
    C{heartbeat}, C{link}, and C{expires} (Unix seconds): rewritten at every
    heartbeat, three heartbeats ahead. An instance whose presence has
    expired is gone, with every leg entry of it.
C{DIR/leg.<call_id>.<role>.json}
    One leg: C{call_id}, C{role}, C{instance_id}, C{url}, C{started_at},
    C{started}. Written when the leg starts (the newest leg of a (call id,
    role) claims the entry), removed when it ends if still this leg's. A leg
    entry has no expiry of its own: it is valid while its instance's
    presence is, so a heartbeat rewrites one file, not one per leg, and the
    entries of a crashed process go with its presence (and are removed by
    whoever next lists them).

Files, not SQLite: each write is one rename on a local file system (a
tmpfs such as C{/run} is best), readers take no lock, and there is no
journal to repair after a crash. It suits what it is for: two or three
processes on one host, hundreds of legs; a cluster of hosts has Redis.
"""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING, Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.cluster.directory import TTL_HEARTBEATS, DirectoryUnavailable, InstanceEntry, LegEntry
from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver, IRemoteLeg
from audiohangup.lifecycle import Part
from audiohangup.logs import iso_time
from audiohangup.reasons import Role

if TYPE_CHECKING:
    from audiohangup.interfaces import IServerLeg
    from audiohangup.registry import Registry

__all__ = ["LocalDirectory", "check_directory"]

_LEG_FIELDS = ("call_id", "role", "instance_id", "url", "started_at")


def check_directory(path: str) -> None:
    """ValueError naming what is wrong with C{path} as a local directory: it is made (0700) if missing."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{path} cannot be made: {error.strerror}") from None
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is not a directory")
    if info.st_mode & 0o022:
        raise ValueError(
            f"{path} is mode {stat.S_IMODE(info.st_mode):04o}: others could write entries that divert calls; "
            "chmod 700 (or 750)"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{path} is not writable")


def _safe(text: str) -> bool:
    """A call id or instance id that can be part of a file name (no separator, no dot-dot)."""
    return bool(text) and "/" not in text and "\0" not in text and not text.startswith(".")


@implementer(ILegObserver)
class LocalDirectory(Part, LegObserver):
    """
    This process's legs and presence in a directory of files shared by the
    processes of one host; see the module docstring. Same queries, same
    L{DirectoryUnavailable} when a file cannot be read or written.
    """

    name = "directory"
    log = Logger()

    def __init__(
        self, path: str, instance_id: str, advertise_url: str, registry: Registry, reactor: Any, *, heartbeat: float = 2.0
    ) -> None:
        if not _safe(instance_id) or any(c.isspace() for c in instance_id):
            raise ValueError(f"instance id {instance_id!r} must be a non-empty name without spaces or slashes")
        self.path = path
        self.instance_id = instance_id
        #: Where the other processes reach this one's API; set once its private listener listens, if not given.
        self.advertise_url = advertise_url
        self.registry = registry
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.ttl = TTL_HEARTBEATS * heartbeat
        self.started_at = ""
        #: Where the other processes reach this one's media link (C{host:port}), once it listens.
        self.link = ""
        self._running = False
        self._loop = LoopingCall(self._beat)
        self._loop.clock = reactor
        self._failing = False

    @property
    def available(self) -> bool:
        return self._running

    # Files

    def _file(self, kind: str, *names: str) -> str:
        return os.path.join(self.path, ".".join((kind, *names, "json")))

    def _write(self, target: str, entry: dict[str, Any]) -> None:
        temporary = f"{target}.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump(entry, out)
        os.replace(temporary, target)

    def _read(self, target: str) -> dict[str, Any] | None:
        try:
            with open(target) as entry:
                found = json.load(entry)
        except FileNotFoundError:
            return None  # none, or removed as it was listed
        except ValueError:
            return None  # not JSON: not an entry
        return found if isinstance(found, dict) else None

    def _guard(self, what: str, work: Any, *args: Any) -> Any:
        """C{work(*args)}; an OSError becomes L{DirectoryUnavailable} (queries) and is logged once per outage."""
        try:
            result = work(*args)
        except OSError as error:
            if not self._failing:
                self._failing = True
                self.log.warn(
                    "local call directory {path}: could not {what}: {error}; calls go on, look-ups fail until it works",
                    path=self.path, what=what, error=str(error),
                )
            raise DirectoryUnavailable(f"the local call directory {self.path} failed to {what}: {error}") from None
        if self._failing:
            self._failing = False
            self.log.info("local call directory {path} works again", path=self.path)
        return result

    # Life cycle

    def start(self) -> None:
        self._running = True
        self.started_at = iso_time(self.reactor.seconds())
        self._sweep()
        self._beat()
        self._loop.start(self.heartbeat, now=False)
        self.log.info(
            "local call directory {path}: instance {instance_id} registered", path=self.path, instance_id=self.instance_id
        )

    def stop(self) -> None:
        """Leave: the presence and the entries of this process's legs go."""
        if not self._running:
            return
        self._running = False
        if self._loop.running:
            self._loop.stop()
        try:
            for leg in self._live():
                self._remove(leg)
            os.unlink(self._file("instance", self.instance_id))
        except OSError as error:
            self.log.warn(
                "local call directory {path}: instance {instance_id} could not remove its entries ({error}); "
                "they are gone once its presence expires",
                path=self.path, instance_id=self.instance_id, error=str(error),
            )
            return
        self.log.info("local call directory {path}: instance {instance_id} left", path=self.path, instance_id=self.instance_id)

    def _sweep(self) -> None:
        """Remove the entries of an earlier run with this instance id, and those of instances gone."""
        try:
            self._legEntries(sweep=True, mine_too=True)
        except OSError:
            pass

    def _beat(self) -> None:
        if not self._running:
            return
        presence = {
            "instance_id": self.instance_id, "url": self.advertise_url, "started_at": self.started_at,
            "heartbeat": self.heartbeat, "link": self.link, "expires": self.reactor.seconds() + self.ttl,
        }
        try:
            self._guard("write its presence", self._write, self._file("instance", self.instance_id), presence)
        except DirectoryUnavailable:
            pass

    def _live(self) -> list[IServerLeg]:
        return [leg for leg in self.registry if leg.call_id is not None and not IRemoteLeg.providedBy(leg)]

    # ILegObserver

    def legStarted(self, leg: IServerLeg) -> None:
        call_id = leg.call_id
        if not self._running or call_id is None or IRemoteLeg.providedBy(leg) or not _safe(call_id):
            return
        entry = {
            "call_id": call_id, "role": leg.role.value, "instance_id": self.instance_id, "url": self.advertise_url,
            "started_at": iso_time(leg.connected_at), "started": f"{leg.connected_at:.6f}",
        }
        try:
            self._guard("register a leg", self._write, self._file("leg", call_id, leg.role.value), entry)
        except DirectoryUnavailable:
            pass

    def legEnded(self, leg: IServerLeg) -> None:
        if not self._running or leg.call_id is None or IRemoteLeg.providedBy(leg) or not _safe(leg.call_id):
            return
        current = self.registry.get(leg.call_id, leg.role)
        if current is not None and current is not leg:
            return  # replaced here: the entry is the new leg's
        try:
            self._guard("remove a leg", self._remove, leg)
        except DirectoryUnavailable:
            pass

    def _remove(self, leg: IServerLeg) -> None:
        assert leg.call_id is not None
        target = self._file("leg", leg.call_id, leg.role.value)
        entry = self._read(target)
        if entry is not None and entry.get("instance_id") == self.instance_id and entry.get("started") == f"{leg.connected_at:.6f}":
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass

    # Queries

    def _presence(self, instance_id: str) -> dict[str, Any] | None:
        """An instance's presence, or None if it is gone (no file, or expired)."""
        if not _safe(instance_id):
            return None
        found = self._read(self._file("instance", instance_id))
        if found is None or not isinstance(found.get("expires"), (int, float)):
            return None
        return found if found["expires"] >= self.reactor.seconds() else None

    def _entry(self, found: dict[str, Any] | None, live: dict[str, dict[str, Any] | None]) -> LegEntry | None:
        if found is None or not all(isinstance(found.get(name), str) for name in _LEG_FIELDS):
            return None
        owner = found["instance_id"]
        if owner not in live:
            live[owner] = self._presence(owner)
        if live[owner] is None:
            return None
        return LegEntry(*(found[name] for name in _LEG_FIELDS))

    def _ensure(self) -> None:
        if not self._running:
            raise DirectoryUnavailable("the local call directory is stopped")

    async def owners(self, call_id: str) -> dict[str, LegEntry]:
        """The live legs of C{call_id}, role -> entry."""
        self._ensure()

        def look() -> dict[str, LegEntry]:
            live: dict[str, dict[str, Any] | None] = {}
            found: dict[str, LegEntry] = {}
            if not _safe(call_id):
                return {}
            for role in Role:
                entry = self._entry(self._read(self._file("leg", call_id, role.value)), live)
                if entry is not None and entry.call_id == call_id and entry.role == role.value:
                    found[role.value] = entry
            return found

        result: dict[str, LegEntry] = self._guard("look up a call", look)
        return result

    async def link_of(self, instance_id: str) -> str | None:
        """Where C{instance_id}'s media link listens; "" without one; None if it is gone."""
        self._ensure()
        presence = self._guard("look up an instance", self._presence, instance_id)
        return None if presence is None else str(presence.get("link") or "")

    def _legEntries(self, *, sweep: bool = False, mine_too: bool = False) -> list[LegEntry]:
        live: dict[str, dict[str, Any] | None] = {}
        entries = []
        for name in sorted(os.listdir(self.path)):
            if not (name.startswith("leg.") and name.endswith(".json")):
                if sweep and name.endswith(".tmp") and name.rsplit(".", 2)[-2] == str(os.getpid()):
                    os.unlink(os.path.join(self.path, name))
                continue
            found = self._read(os.path.join(self.path, name))
            stale = mine_too and found is not None and found.get("instance_id") == self.instance_id
            entry = None if stale else self._entry(found, live)
            if entry is not None:
                entries.append(entry)
            elif sweep and found is not None:
                try:
                    os.unlink(os.path.join(self.path, name))  # its instance is gone (or it is an earlier run's)
                except FileNotFoundError:
                    pass
        return sorted(entries, key=lambda entry: (entry.call_id, entry.role))

    async def legs(self) -> list[LegEntry]:
        """Every live leg of the processes sharing the directory, by call id then role."""
        self._ensure()
        result: list[LegEntry] = self._guard("list the legs", self._legEntries)
        return result

    async def instances(self) -> list[InstanceEntry]:
        """The live instances, each with its number of legs."""
        self._ensure()

        def look() -> list[InstanceEntry]:
            counts: dict[str, int] = {}
            for entry in self._legEntries():
                counts[entry.instance_id] = counts.get(entry.instance_id, 0) + 1
            found = []
            for name in sorted(os.listdir(self.path)):
                if name.startswith("instance.") and name.endswith(".json"):
                    presence = self._presence(name[len("instance."):-len(".json")])
                    if presence is not None:
                        instance_id = str(presence.get("instance_id"))
                        found.append(InstanceEntry(
                            instance_id, str(presence.get("url")), str(presence.get("started_at")),
                            counts.get(instance_id, 0),
                        ))
            return found

        result: list[InstanceEntry] = self._guard("list the instances", look)
        return result
