# -*- test-case-name: tests.test_cluster -*-
"""
Several instances behind one API: a control request for a leg this instance
does not hold is forwarded, with treq, to the instance the Redis directory
names as its owner, and a session whose legs landed on different instances
still ends together.

A forwarded request carries C{X-Audiohangup-Forwarded-By}: an instance never
forwards such a request again, so a stale directory entry cannot make two
instances bounce a request between them. It also carries
C{X-Audiohangup-Forwarded-Signature}, the HMAC under the instances' own
control token (--api-token) of who forwarded what, when and with which cause:
only a request that carries a good one is taken as forwarded, so a client
cannot mark its own hangup as a session's end.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import treq
from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from audiohangup.interfaces import ILegObserver, IReactor
from audiohangup.reasons import HangupCause
from audiohangup.webhooks import sign, verify

if TYPE_CHECKING:
    from audiohangup.directory import Directory
    from audiohangup.interfaces import ILeg

FORWARDED_BY = "X-Audiohangup-Forwarded-By"
#: On a forwarded hangup: the cause to record (C{session} when a session ends across instances).
CAUSE = "X-Audiohangup-Cause"
FORWARDABLE_CAUSES = {HangupCause.API.value, HangupCause.SESSION.value}
#: C{t=<unix seconds>,sha256=<hex>}, as a webhook's signature, over L{_forwarded_fields}.
SIGNATURE = "X-Audiohangup-Forwarded-Signature"


def _forwarded_fields(instance_id: str, method: bytes, path: bytes, cause: str, body: bytes) -> bytes:
    """What a forwarding signature covers: all a replay could otherwise change."""
    return b"\n".join(
        [instance_id.encode(), method, path, cause.encode(), hashlib.sha256(body).hexdigest().encode()]
    )


class OwnerUnreachable(Exception):
    """The instance that owns a leg did not answer."""

    def __init__(self, instance_id: str, url: str, why: str) -> None:
        super().__init__(f"instance {instance_id} at {url} did not answer: {why}")
        self.instance_id = instance_id
        self.url = url


@implementer(ILegObserver)
class Cluster:
    """This instance's link to the others: forwarding, and ending sessions across instances."""

    log = Logger()

    def __init__(
        self,
        directory: Directory,
        reactor: IReactor,
        *,
        api_token: str | None = None,
        end_with_leg: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self.directory = directory
        self.reactor = reactor
        self.api_token = api_token
        self.end_with_leg = end_with_leg
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self._pending: set[Deferred[Any]] = set()

    @property
    def instance_id(self) -> str:
        return self.directory.instance_id

    async def forward(
        self, url: str, instance_id: str, method: bytes, path: bytes, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """Send a request on to another instance; its status and body, or L{OwnerUnreachable}."""
        sent: dict[bytes | str, bytes | str] = {name: value for name, value in headers.items()}
        sent[FORWARDED_BY] = self.instance_id
        if self.api_token:
            fields = _forwarded_fields(self.instance_id, method, path, headers.get(CAUSE, ""), body)
            sent[SIGNATURE] = sign(self.api_token, fields, int(self.reactor.seconds()))
        target = url.rstrip("/") + path.decode("latin-1")
        try:
            response = await treq.request(
                method.decode(), target, data=body or None, headers=sent, timeout=self.timeout,
                pool=self.pool, reactor=self.reactor, allow_redirects=False,
            )
            content = await response.content()
        except Exception as error:  # treq reports many failure types; all mean "no answer"
            raise OwnerUnreachable(instance_id, url, str(error) or type(error).__name__) from None
        return response.code, content

    def verified(
        self, instance_id: str, signature: str | None, method: bytes, path: bytes, cause: str, body: bytes
    ) -> bool:
        """Whether another instance of this cluster forwarded this request, as it says (within 5 minutes)."""
        if not self.api_token:
            return False
        fields = _forwarded_fields(instance_id, method, path, cause, body)
        return verify(self.api_token, fields, signature, now=self.reactor.seconds())

    async def stop(self) -> None:
        """Let session ends under way reach the other instances (bounded), then close the pool."""
        if self._pending:
            waiting = DeferredList(list(self._pending), consumeErrors=True)
            waiting.addTimeout(self.timeout, self.reactor)
            try:
                await waiting
            except TimeoutError:
                self.log.warn("{count} session ends to other instances not delivered", count=len(self._pending))
        await self.pool.closeCachedConnections()

    # ILegObserver: a leg that ends takes its session's legs on other instances with it.

    def legStarted(self, leg: ILeg) -> None:
        pass

    def hangupSent(self, leg: ILeg, cause: HangupCause) -> None:
        pass

    def legEnded(self, leg: ILeg) -> None:
        if not self.end_with_leg or leg.call_id is None:
            return
        if leg.hangup_cause in (HangupCause.REPLACED, HangupCause.SESSION):
            return  # replaced: the call goes on; session: the end came from elsewhere
        ending: Deferred[None] = Deferred.fromCoroutine(self._endRemoteLegs(leg.call_id, leg.role.value))
        self._pending.add(ending)
        ending.addBoth(lambda _: self._pending.discard(ending))

    def callEnded(self, call_id: str) -> None:
        pass

    def connectionEnded(self, connection: ILeg) -> None:
        pass

    async def _endRemoteLegs(self, call_id: str, role: str) -> None:
        from audiohangup.directory import DirectoryUnavailable

        try:
            owners = await self.directory.owners(call_id)
        except DirectoryUnavailable as error:
            self.log.warn(
                "{call_id} {role} ended, but its session's legs on other instances cannot be "
                "found: {error}", call_id=call_id, role=role, error=str(error),
            )
            return
        for other_role, entry in owners.items():
            if other_role == role or entry.instance_id == self.instance_id:
                continue
            headers = {CAUSE: HangupCause.SESSION.value}
            if self.api_token:
                headers["Authorization"] = f"Bearer {self.api_token}"
            try:
                status, _ = await self.forward(
                    entry.url, entry.instance_id, b"POST",
                    f"/calls/{call_id}/hangup?role={other_role}".encode(), b"", headers,
                )
            except OwnerUnreachable as error:
                self.log.warn("{call_id} {role} session end not delivered: {error}",
                              call_id=call_id, role=other_role, error=str(error))
                continue
            self.log.info(
                "{call_id} {role} asked instance {instance} to hang up its {other} leg (cause session): {status}",
                call_id=call_id, role=role, instance=entry.instance_id, other=other_role, status=status,
            )
