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
cannot mark its own hangup as a session's end. What is signed is the
request target exactly as it goes on the wire (treq and Twisted's agent
percent-encode some characters and drop an empty query or a fragment), so the
owner checks the bytes it receives.

An owner's answer is read through a L{BoundedPool} (its head bounded) and up
to L{MAX_ANSWER_BYTES}: a broken or hostile peer cannot grow this instance's
memory without bound; past either the request fails with L{OwnerUnreachable}.
A recording (a WAV) is not read whole: L{Forwarder.passOn} pipes it as it
comes, under backpressure, up to L{MAX_WAV_BYTES}.

Every route that may reach another instance goes through one L{Forwarder}:
it finds where the legs a request names are, sends the request on, and gives
back the owners' answers (L{Reply}) or passes one on as the request's own.
What the routes make of a failure (its status and code) is theirs to say.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import treq
from hyperlink import EncodedURL
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone
from twisted.web.http import PotentialDataLoss, Request
from twisted.web.iweb import IRequest
from zope.interface import implementer

from audiohangup.cluster.directory import DirectoryUnavailable
from audiohangup.events import LegObserver
from audiohangup.httpclient import BoundedPool
from audiohangup.interfaces import ILegObserver, IReactor
from audiohangup.lifecycle import Part, within
from audiohangup.reasons import HangupCause, Role
from audiohangup.webhooks import sign, verify

if TYPE_CHECKING:
    from audiohangup.cluster.directory import CallDirectory, LegEntry
    from audiohangup.interfaces import IServerLeg

FORWARDED_BY = "X-Audiohangup-Forwarded-By"
#: On a forwarded hangup: the cause to record (C{session} when a session ends across instances).
CAUSE = "X-Audiohangup-Cause"
FORWARDABLE_CAUSES = {HangupCause.API.value, HangupCause.SESSION.value}
#: C{t=<unix seconds>,sha256=<hex>}, as a webhook's signature, over L{_forwarded_fields}.
SIGNATURE = "X-Audiohangup-Forwarded-Signature"
#: Bytes of a forwarded JSON answer read at most. The largest real one (the
#: streams opened on a call's legs, one call's view) is a few KiB: GET
#: /calls?scope=cluster, the one listing that grows with the cluster, is read
#: from Redis, never forwarded.
MAX_ANSWER_BYTES = 64 * 1024
#: Bytes of a forwarded recording passed on at most: a WAV's sizes are 32-bit.
MAX_WAV_BYTES = 2**32 - 1
#: On an owner's answer passed on: which instance gave it.
ANSWERED_BY = "x-audiohangup-answered-by"


def _forwarded_fields(instance_id: str, method: bytes, path: bytes, cause: str, body: bytes) -> bytes:
    """What a forwarding signature covers: all a replay could otherwise change."""
    return b"\n".join(
        [instance_id.encode(), method, path, cause.encode(), hashlib.sha256(body).hexdigest().encode()]
    )


def wire_target(url: str, path: bytes) -> tuple[EncodedURL, bytes]:
    """
    The URL treq is given for C{path} at C{url}, and the request target it
    sends (what the owner sees as C{request.uri}): treq encodes the URL with
    hyperlink, the agent sends its origin form.
    """
    target = EncodedURL.from_text(url.rstrip("/") + path.decode("latin-1"))
    return target, URI.fromBytes(target.to_uri().to_text().encode("ascii")).originForm


class OwnerUnreachable(Exception):
    """The instance that owns a leg did not answer."""

    def __init__(self, instance_id: str, url: str, why: str) -> None:
        super().__init__(f"instance {instance_id} at {url} did not answer: {why}")
        self.instance_id = instance_id
        self.url = url


class OwnerAnswerTooLarge(OwnerUnreachable):
    """The instance that owns a leg answered with more than this instance reads."""

    def __init__(self, instance_id: str, url: str, why: str) -> None:
        Exception.__init__(self, f"instance {instance_id} at {url} answered too much: {why}")
        self.instance_id = instance_id
        self.url = url


class AnswerTooLarge(Exception):
    """A response body passed its bound."""


def _why(error: BaseException) -> str:
    """What went wrong, from inside Twisted's C{ResponseFailed} and its kin (they hold a list of failures)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_why(reason.value) for reason in reasons)
    return str(error) or type(error).__name__


async def _owned(done: Deferred[Any], instance_id: str, url: str) -> Any:
    """What reading an owner's answer gave, its failure as L{OwnerAnswerTooLarge} or L{OwnerUnreachable}."""
    try:
        return await done
    except AnswerTooLarge as error:
        raise OwnerAnswerTooLarge(instance_id, url, str(error)) from None
    except Exception as error:
        raise OwnerUnreachable(instance_id, url, _why(error)) from None


class _Collect(Protocol):
    """A response body, read up to a bound: past it the connection is dropped, and C{done} fails."""

    transport: Any

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self.limit, self.done = limit, done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            self.done.errback(AnswerTooLarge(f"its body passed {self.limit} bytes"))
            return
        self.deliver(data)

    def deliver(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.result())
        else:
            self.done.errback(reason)

    def result(self) -> Any:
        return b"".join(self.parts)


class _Pipe(_Collect):
    """A response body written on to a request as it comes, the request's client pacing the owner."""

    def __init__(self, request: Request, limit: int, done: Deferred[None]) -> None:
        super().__init__(limit, cast("Deferred[bytes]", done))
        self.request = request

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        # A client that goes away stops the owner's answer too.
        self.request.notifyFinish().addErrback(lambda _: self.transport.stopProducing())

    def deliver(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.request.unregisterProducer()
        super().connectionLost(reason)

    def result(self) -> None:
        return None


@implementer(ILegObserver)
class Cluster(Part, LegObserver):
    """This instance's link to the others: forwarding, and ending sessions across instances."""

    name = "cluster"

    log = Logger()

    def __init__(
        self,
        directory: CallDirectory,
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
        self.pool = BoundedPool(reactor, persistent=True)
        self._pending: set[Deferred[Any]] = set()

    @property
    def instance_id(self) -> str:
        return self.directory.instance_id

    async def forward(
        self, url: str, instance_id: str, method: bytes, path: bytes, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """Send a request on to another instance; its status and body, or L{OwnerUnreachable}."""
        response = await self.send(url, instance_id, method, path, body, headers)
        return response.code, await self.read(response, instance_id, url)

    async def send(
        self, url: str, instance_id: str, method: bytes, path: bytes, body: bytes, headers: dict[str, str]
    ) -> Any:
        """Send a request on to another instance; its response, whose body is yet to read, or L{OwnerUnreachable}."""
        sent: dict[bytes | str, bytes | str] = {name: value for name, value in headers.items()}
        sent[FORWARDED_BY] = self.instance_id
        try:
            target, uri = wire_target(url, path)
        except ValueError as error:  # hyperlink's URLParseError: a URL the directory should not hold
            raise OwnerUnreachable(instance_id, url, f"cannot make a URL of it: {error}") from None
        if self.api_token:
            fields = _forwarded_fields(self.instance_id, method, uri, headers.get(CAUSE, ""), body)
            sent[SIGNATURE] = sign(self.api_token, fields, int(self.reactor.seconds()))
        try:
            return await treq.request(
                method.decode(), target, data=body or None, headers=sent, timeout=self.timeout,
                pool=self.pool, reactor=self.reactor, allow_redirects=False,
            )
        except Exception as error:  # treq reports many failure types; all mean "no answer"
            raise OwnerUnreachable(instance_id, url, _why(error)) from None

    async def read(self, response: Any, instance_id: str, url: str) -> bytes:
        """An owner's answer, up to L{MAX_ANSWER_BYTES} within the timeout; L{OwnerUnreachable} if not."""
        collector = _Collect(MAX_ANSWER_BYTES, Deferred(lambda _: collector.transport.stopProducing()))
        response.deliverBody(collector)
        # Within the forwarding timeout: an owner that trickles its answer holds this request no longer.
        collector.done.addTimeout(self.timeout, self.reactor)
        body: bytes = await _owned(collector.done, instance_id, url)
        return body

    async def pipe(self, response: Any, request: Request, instance_id: str, url: str) -> None:
        """
        Pass an owner's recording on to C{request} as it comes, under
        backpressure, up to L{MAX_WAV_BYTES}; L{OwnerUnreachable} if it breaks
        off or passes that (what was passed on is then cut short).
        """
        done: Deferred[None] = Deferred()
        response.deliverBody(_Pipe(request, MAX_WAV_BYTES, done))
        await _owned(done, instance_id, url)

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
        if self._pending and not await within(
            DeferredList(list(self._pending), consumeErrors=True), self.timeout, self.reactor
        ):
            self.log.warn("{count} session ends to other instances not delivered", count=len(self._pending))
        await self.pool.closeCachedConnections()

    # ILegObserver: a leg that ends takes its session's legs on other instances with it.

    def legEnded(self, leg: IServerLeg) -> None:
        if not self.end_with_leg or leg.call_id is None:
            return
        if leg.hangup_cause in (HangupCause.REPLACED, HangupCause.SESSION):
            return  # replaced: the call goes on; session: the end came from elsewhere
        ending: Deferred[None] = Deferred.fromCoroutine(self._endRemoteLegs(leg.call_id, leg.role.value))
        self._pending.add(ending)
        ending.addBoth(lambda _: self._pending.discard(ending))

    async def _endRemoteLegs(self, call_id: str, role: str) -> None:
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


# Forwarding a request to the instances that hold its legs


def _header(request: IRequest, name: str) -> str | None:
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    return values[-1].decode("latin-1") if values else None


def forwarded(request: IRequest) -> bool:
    """Whether a request says another instance forwarded it (L{Forwarder.proven} checks that one did)."""
    return _header(request, FORWARDED_BY) is not None


def forwarded_cause(request: IRequest) -> HangupCause:
    """API, unless another instance forwarded the hangup with its own cause (session)."""
    given = _header(request, CAUSE)
    if given is not None and forwarded(request) and given in FORWARDABLE_CAUSES:
        return HangupCause(given)
    return HangupCause.API


def _with_query(uri: bytes, **params: str) -> bytes:
    """The request's path and query with some parameters set."""
    parts = urlsplit(uri.decode("latin-1"))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += list(params.items())
    return urlunsplit(("", "", parts.path, urlencode(query), "")).encode("latin-1")


#: Roles in their order (visitor first): how the legs of a call are listed and answered.
ROLE_ORDER = {role.value: index for index, role in enumerate(Role)}


class _Discard(Protocol):
    """Drops a response body that will not be read (the connection goes with it)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@dataclass(frozen=True)
class Reply:
    """What the owner of one role's leg answered a forwarded request, read whole; or why it did not (C{failure})."""

    role: str
    instance_id: str
    status: int = 0
    body: bytes = b""
    failure: OwnerUnreachable | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The C{error} object of the owner's answer, or one that says what came back."""
        try:
            error = json.loads(self.body)["error"]
            if isinstance(error, dict):
                return error
        except (ValueError, KeyError, TypeError):
            pass
        return {"code": "owner_error", "message": f"the owner answered {self.status}"}


class Forwarder:
    """
    The one way a route reaches another instance: where the legs a request
    names are (L{elsewhere}), the request sent on to their owners (L{ask},
    L{toEach}), or an owner's answer passed on as the request's own
    (L{passOn}). Without a cluster, every leg is here or nowhere.
    """

    log = Logger()

    def __init__(self, cluster: Cluster | None) -> None:
        self.cluster = cluster

    def proven(self, request: IRequest) -> bool:
        """Whether another instance of this cluster forwarded this request, as it says (L{Cluster.verified})."""
        by = _header(request, FORWARDED_BY)
        if self.cluster is None or by is None:
            return False
        request.content.seek(0)
        body = request.content.read()
        request.content.seek(0)
        return self.cluster.verified(
            by, _header(request, SIGNATURE), request.method, request.uri, _header(request, CAUSE) or "", body
        )

    async def elsewhere(
        self, request: IRequest, call_id: str, role: Role | None = None, held: Iterable[IServerLeg] = ()
    ) -> dict[str, LegEntry]:
        """
        The legs the request names (C{role}'s, or every role's) that are on
        other instances, role -> entry; C{held} are the call's legs here. The
        directory is only asked when that can matter: never for a forwarded
        request (an instance never forwards one again), nor when every named
        leg is here. When it cannot be asked, a request for legs held here
        goes on with those; else L{DirectoryUnavailable}.
        """
        cluster = self.cluster
        if cluster is None or forwarded(request):
            return {}
        here = {leg.role.value for leg in held}
        named_here = role.value in here if role is not None else bool(here)
        if (role is not None and named_here) or (role is None and len(here) == len(Role)):
            return {}
        try:
            owners = await cluster.directory.owners(call_id)
        except DirectoryUnavailable:
            if named_here:
                return {}  # what is here goes on; the rest cannot be found now
            raise
        return {
            name: entry
            for name, entry in owners.items()
            if entry.instance_id != cluster.instance_id and name not in here and (role is None or name == role.value)
        }

    async def ask(self, request: IRequest, entry: LegEntry, path: bytes | None = None) -> tuple[int, bytes]:
        """The owner's answer to this request (at C{path}, else its own target), read whole; or L{OwnerUnreachable}."""
        response = await self._send(request, entry, request.uri if path is None else path)
        return response.code, await self._cluster().read(response, entry.instance_id, entry.url)

    def toEach(self, request: IRequest, owners: dict[str, LegEntry]) -> Deferred[list[Reply]]:
        """
        The request sent on to every owner at once, each for its own role's
        leg (C{?role=}), as soon as this is called; their replies in role order.
        """
        return gatherResults([
            Deferred.fromCoroutine(self._reply(request, name, entry))
            for name, entry in sorted(owners.items(), key=lambda item: ROLE_ORDER[item[0]])
        ], consumeErrors=True)

    async def _reply(self, request: IRequest, role: str, entry: LegEntry) -> Reply:
        try:
            status, body = await self.ask(request, entry, _with_query(request.uri, role=role))
        except OwnerUnreachable as failure:
            return Reply(role, entry.instance_id, failure=failure)
        return Reply(role, entry.instance_id, status, body)

    async def passOn(self, request: IRequest, entry: LegEntry, *, piped: bool = False) -> bytes:
        """
        The owner's answer as this request's, saying who answered. C{piped}:
        a recording, passed on as it comes when the owner has it (a WAV can be
        far larger than any answer read whole).
        """
        response = await self._send(request, entry, request.uri)
        if piped and response.code == 200:
            return await self._pipe(request, entry, response)
        body = await self._cluster().read(response, entry.instance_id, entry.url)
        request.setResponseCode(response.code)
        request.setHeader("content-type", "application/json")
        request.setHeader(ANSWERED_BY, entry.instance_id)
        return body

    async def _pipe(self, request: IRequest, entry: LegEntry, response: Any) -> bytes:
        length = response.length if isinstance(response.length, int) else None
        if length is not None and length > MAX_WAV_BYTES:
            response.deliverBody(_Discard())
            raise OwnerAnswerTooLarge(
                entry.instance_id, entry.url, f"a recording of {length} bytes, over {MAX_WAV_BYTES}"
            )
        request.setHeader(ANSWERED_BY, entry.instance_id)
        request.setHeader("content-type", "audio/wav")
        if length is not None:
            request.setHeader("content-length", str(length))
        try:
            await self._cluster().pipe(response, cast(Request, request), entry.instance_id, entry.url)
        except OwnerUnreachable as error:
            # Part of the WAV is out: the only honest end is a cut connection.
            self.log.warn("recording from instance {instance} cut short: {error}",
                          instance=entry.instance_id, error=str(error))
            request.channel.transport.abortConnection()  # type: ignore[attr-defined]
        return b""

    async def _send(self, request: IRequest, entry: LegEntry, path: bytes) -> Any:
        """The owner's response to this request, its body yet to read; or L{OwnerUnreachable}."""
        request.content.seek(0)
        headers = {
            name: value
            for name in ("Authorization", "Content-Type")
            if (value := _header(request, name.lower())) is not None
        }
        return await self._cluster().send(
            entry.url, entry.instance_id, request.method, path, request.content.read(), headers
        )

    def _cluster(self) -> Cluster:
        assert self.cluster is not None, "only a leg that elsewhere() found is forwarded to"
        return self.cluster
