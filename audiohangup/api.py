# -*- test-case-name: tests.test_api -*-
"""
The HTTP control API: a Klein app on the same reactor and registry as the
AudioSocket listeners, so a hangup request writes C{00 00 00} on the leg's own
transport. JSON in, JSON out, every error as C{{"error": {"code", "message"}}}.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from audiohangup.access import AuthThrottle, IPNetwork, Scope, Tokens, source_key
from audiohangup.audio import AudioFormat
from audiohangup.cluster.forward import (
    CAUSE,
    FORWARDABLE_CAUSES,
    FORWARDED_BY,
    MAX_WAV_BYTES,
    SIGNATURE,
    Cluster,
    OwnerAnswerTooLarge,
    OwnerUnreachable,
)
from audiohangup.errors import ApiError
from audiohangup.events import RecentLegs
from audiohangup.interfaces import ILeg
from audiohangup.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from audiohangup.metrics import Metrics
from audiohangup.protocol import LegSettings
from audiohangup.reasons import HangupCause, Role
from audiohangup.recording import Recorder, RecorderStopped
from audiohangup.records import BadQuery, CallRecords
from audiohangup.registry import Registry
from audiohangup.streams.manager import StreamConfig, Streams, check_fields, check_url
from audiohangup.streams.stream import MediaStream

if TYPE_CHECKING:
    from audiohangup.cluster.directory import LegEntry

#: The largest JSON body the API reads; its bodies are a few dozen bytes.
MAX_BODY = 64 * 1024

Handler = TypeVar("Handler", bound=Callable[..., Any])


def parse_call_id(text: str) -> str:
    """The canonical lowercase form of a call id, or a 400."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ApiError(400, "bad_call_id", f"call id {text!r} is not a UUID") from None


def parse_role(value: object) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise ApiError(400, "bad_role", f"role {value!r} is not one of {roles}") from None


def _requires(scope: Scope) -> Callable[[Handler], Handler]:
    """A route that needs a token of C{scope} (or wider), when the server has tokens."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def check(self: ControlAPI, request: IRequest, *args: Any, **kwargs: Any) -> Any:
            self.authorize(request, scope)
            self.check_forwarded(request)
            return handler(self, request, *args, **kwargs)

        return cast(Handler, check)

    return decorate


_read = _requires(Scope.READ)
_control = _requires(Scope.CONTROL)


class ControlAPI:
    """Routes over one L{Registry}; C{app.resource()} is what the Site serves."""

    app = Klein()
    # /calls/ID//hangup is a 404, not a redirect (which could not name its target).
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(
        self,
        registry: Registry,
        *,
        api_token: str | None = None,
        settings: LegSettings | None = None,
        metrics: Metrics | None = None,
        recent: RecentLegs | None = None,
        records: CallRecords | None = None,
        cluster: Cluster | None = None,
        tokens: Tokens | None = None,
        throttle: AuthThrottle | None = None,
        trusted_proxies: tuple[IPNetwork, ...] = (),
        clock: IReactorTime | None = None,
        streams: Streams | None = None,
        formats: dict[Role, AudioFormat] | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings or LegSettings()
        #: The format each role's legs carry (--visitor-audio, --resident-audio).
        self.formats = formats or dict.fromkeys(Role, self.settings.audio)
        self.recorder = recorder
        self.metrics = metrics
        self.recent = recent
        self.records = records
        self.cluster = cluster
        #: Every token the API takes; replaced whole when the tokens file is re-read.
        self.tokens = (tokens or Tokens()) + Tokens([(Scope.CONTROL, api_token)] if api_token else [])
        self.throttle = throttle if throttle is not None else AuthThrottle()
        #: Proxies whose X-Forwarded-For names the client the throttle counts (--trusted-proxies).
        self.trusted_proxies = trusted_proxies
        self.clock = clock if clock is not None else _wall_clock()
        self.streams = streams if streams is not None else Streams(StreamConfig(), cast(Any, self.clock))

    def authorize(self, request: IRequest, needed: Scope) -> None:
        """
        Nothing to check when the server has no token (loopback, or
        --insecure-http); else a token of C{needed} scope or wider, 401
        without one (counted against the address), 403 with one too narrow.
        """
        tokens = self.tokens
        if not tokens:
            return
        scheme, _, given = (_header(request, "authorization") or "").partition(" ")
        scope = tokens.scope_of(given.strip()) if scheme.lower() == "bearer" else None
        if scope is None:
            source = self.throttle_source(request)
            if source is not None:
                self.throttle.failed(source, self.clock.seconds())
            request.setHeader("www-authenticate", 'Bearer realm="audiohangup"')
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")
        if not scope.covers(needed):
            raise ApiError(403, "forbidden", f"this route needs a {needed} token; the one given has {scope} scope")

    def throttle_source(self, request: IRequest) -> str | None:
        """
        What failed authentications are counted against (L{source_key}); None
        for a UNIX socket's client, never throttled: the socket's file mode
        already says who may connect, and every client there has one address.
        """
        host = getattr(request.getClientAddress(), "host", None)
        if not isinstance(host, str):
            return None
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        return source_key(host, [value.decode("latin-1") for value in forwarded], self.trusted_proxies)

    def check_forwarded(self, request: IRequest) -> None:
        """
        A request that says another instance forwarded it must prove it (a
        signature under --api-token): else a client could pass its hangup off
        as a session's end, or keep it from reaching the owner. 403 if not.
        """
        by = _header(request, FORWARDED_BY)
        if by is None:
            return
        if self.cluster is None:
            raise ApiError(403, "bad_forwarding", f"{FORWARDED_BY}: this instance runs alone (no --redis)")
        request.content.seek(0)
        body = request.content.read()
        request.content.seek(0)
        if not self.cluster.verified(
            by, _header(request, SIGNATURE), request.method, request.uri, _header(request, CAUSE) or "", body
        ):
            raise ApiError(
                403, "bad_forwarding",
                f"{FORWARDED_BY} is taken only from another instance of this cluster, signed with its --api-token",
            )

    # Routes

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "ok", "legs": len(self.registry)})

    @app.route("/metrics", methods=["GET"])
    @_read
    def metrics_text(self, request: IRequest) -> bytes:
        """Prometheus text format."""
        if self.metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        request.setHeader("content-type", METRICS_CONTENT_TYPE)
        return self.metrics.render()

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        """The live calls page. It holds no data: what it shows comes from the protected JSON routes."""
        return _static(request, "index.html")

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        return _static(request, name)

    @app.route("/legs/ended", methods=["GET"])
    @_read
    def ended_legs(self, request: IRequest) -> bytes:
        """The legs that ended last, newest first (in memory, for the live page)."""
        limit = _int(request, "limit", default=20, low=1, high=100)
        legs = self.recent.latest(limit) if self.recent is not None else []
        return _json(request, 200, {"legs": legs})

    @app.route("/records", methods=["GET"])
    @_read
    async def call_records(self, request: IRequest) -> bytes:
        """Call records, newest first, filtered and paged with an opaque cursor."""
        if self.records is None:
            raise ApiError(404, "records_off", "call records are off (--records none)")
        query = {
            name: _query(request, name) for name in ("call_id", "role", "reason", "cursor")
        }
        if query["call_id"] is not None:
            query["call_id"] = parse_call_id(query["call_id"])
        try:
            page = await self.records.query(
                **query,
                since=_instant(request, "since"),
                until=_instant(request, "until"),
                limit=_int(request, "limit", default=50, low=1, high=500),
            )
        except BadQuery as error:
            raise ApiError(400, "bad_query", str(error)) from None
        except RuntimeError as error:  # the store is not open: it failed to open, or is closing
            raise ApiError(503, "records_unavailable", f"call records cannot be read now: {error}") from None
        return _json(request, 200, page)

    @app.route("/calls", methods=["GET"])
    @_read
    async def calls(self, request: IRequest) -> bytes:
        """Live calls: this instance's (C{scope=local}), or every instance's (C{scope=cluster})."""
        scope = _query(request, "scope") or "local"
        if scope == "local":
            calls = [_call_view(call_id, legs) for call_id, legs in self.registry.calls().items()]
            return _json(request, 200, {"calls": calls})
        if scope != "cluster":
            raise ApiError(400, "bad_scope", f"scope must be local or cluster, not {scope!r}")
        if self.cluster is None:
            raise ApiError(404, "cluster_off", "this instance runs alone (no --redis)")
        from audiohangup.cluster.directory import DirectoryUnavailable

        try:
            entries = await self.cluster.directory.legs()
        except DirectoryUnavailable as error:
            raise _redis_unavailable(error) from None
        grouped: dict[str, list[dict[str, Any]]] = {}
        for entry in sorted(entries, key=lambda e: (e.call_id, _ROLE_ORDER.get(e.role, 9))):
            leg = asdict(entry)
            grouped.setdefault(leg.pop("call_id"), []).append(leg)
        return _json(request, 200, {"calls": [{"call_id": c, "legs": legs} for c, legs in grouped.items()]})

    @app.route("/calls/<string:call_id>", methods=["GET"])
    @_read
    def call(self, request: IRequest, call_id: str) -> bytes:
        call_id = parse_call_id(call_id)
        legs = self.registry.call(call_id)
        if not legs:
            raise _unknown_call(call_id)
        return _json(request, 200, _call_view(call_id, legs))

    @app.route("/calls/<string:call_id>/hangup", methods=["POST"])
    @_control
    def hangup_call(self, request: IRequest, call_id: str) -> Awaitable[bytes]:
        call_id = parse_call_id(call_id)
        body = _read_json(request, allowed={"role"}, required=False)
        role = _query(request, "role")
        if "role" in body:
            if role is not None and role != body["role"]:
                raise ApiError(400, "bad_role", "the query and the body name different roles")
            return self._hangup(request, call_id, parse_role(body["role"]))
        return self._hangup(request, call_id, None if role is None else parse_role(role))

    @app.route("/api/hangup", methods=["POST"])
    @_control
    def api_hangup(self, request: IRequest) -> Awaitable[bytes]:
        body = _read_json(request, allowed={"call_id", "role"}, required=True)
        if not isinstance(body.get("call_id"), str):
            raise ApiError(400, "bad_call_id", "the body needs a string 'call_id'")
        call_id = parse_call_id(body["call_id"])
        return self._hangup(request, call_id, parse_role(body.get("role", Role.VISITOR.value)))

    @app.route("/calls/<string:call_id>/play", methods=["POST"])
    @_control
    def play(self, request: IRequest, call_id: str) -> bytes:
        """Queue raw audio in the legs' format; the pacer plays it, 20 ms a frame."""
        call_id = parse_call_id(call_id)
        role = _optional_role(request)
        formats = {self.formats[target] for target in ([role] if role is not None else Role)}
        if len(formats) > 1:
            raise ApiError(400, "mixed_formats", "the roles' legs carry different formats: name a role")
        audio = self._audio_body(request, formats.pop())  # checked before the call is looked up
        legs = self._live_legs(call_id, role)
        answers = []
        for leg in legs:
            dropped = leg.play(audio)
            answers.append({"role": leg.role, "queued_ms": leg.queued_ms, "dropped_frames": dropped})
        return _json(request, 200, {"call_id": call_id, "legs": answers})

    def _audio_body(self, request: IRequest, fmt: AudioFormat) -> bytes:
        media, params = _content_type(request)
        if fmt.sample_bytes == 2:
            if media != "audio/l16":
                raise ApiError(400, "bad_content_type", f"send the audio as {fmt.content_type}, not {media or 'nothing'}")
            if params.get("rate") != str(fmt.rate):
                raise ApiError(
                    400, "wrong_rate",
                    f"the legs carry {fmt.rate} Hz audio; the body says rate={params.get('rate', 'nothing')}",
                )
            if params.get("channels", "1") != "1":
                raise ApiError(400, "wrong_channels", "the legs carry mono audio")
        elif media not in _G711_TYPES[fmt.name]:
            raise ApiError(400, "bad_content_type", f"send the audio as {fmt.content_type}, not {media or 'nothing'}")
        limit = self.settings.max_queue_frames * fmt.frame_bytes
        audio = request.content.read(limit + 1) if request.content is not None else b""
        if len(audio) > limit:
            raise ApiError(
                413, "audio_too_long",
                f"the body holds more than the {self.settings.max_queue_ms} ms a leg's queue "
                "holds (raise --max-queue-ms for longer prompts)",
            )
        if not audio:
            raise ApiError(400, "empty_audio", "the body holds no audio")
        if len(audio) % fmt.sample_bytes:
            raise ApiError(400, "bad_audio_length", f"{len(audio)} bytes is not a whole number of 16-bit samples")
        return audio

    def _live_legs(self, call_id: str, role: Role | None) -> list[ILeg]:
        """The call's legs, or one role's; 404 when there are none."""
        legs = self.registry.call(call_id)
        if not legs:
            raise _unknown_call(call_id)
        if role is not None:
            legs = [leg for leg in legs if leg.role is role]
            if not legs:
                raise ApiError(404, "no_live_leg", f"call {call_id} has no live {role} leg")
        return legs

    async def _hangup(self, request: IRequest, call_id: str, role: Role | None) -> bytes:
        wait = _flag(request, "wait")
        after_playout = _flag(request, "after_playout")
        cause = _cause(request)
        held = self.registry.call(call_id)
        mine = held if role is None else [leg for leg in held if leg.role is role]
        remote = await self._remoteOwners(request, call_id, role, held, mine)
        if role is not None and remote:
            # Not held here: the owner answers, and its answer is ours.
            return await self._relay(request, remote[role.value], request.uri)
        if not mine and not remote:
            self._live_legs(call_id, role)  # raises the right 404
        answers: list[dict[str, Any]] = []
        gone = []
        for leg in mine:
            if not leg.live:
                result = "already_closing"
            elif after_playout and leg.queue:
                result = "hangup_after_playout"
            else:
                result = "hangup_sent"
            gone.append(leg.hangupAfterPlayout(cause) if after_playout else leg.hangup(cause))
            answers.append({"role": leg.role, "result": result})
        # The other instances' legs go at the same time as ours, not after them.
        forwarded = [
            (name, Deferred.fromCoroutine(self._forward(request, entry, _with_query(request.uri, role=name))))
            for name, entry in sorted(remote.items(), key=lambda item: _ROLE_ORDER[item[0]])
        ]
        if wait:
            reasons = await gatherResults(gone)
            for answer, reason in zip(answers, reasons):
                answer["reason"] = reason
        for name, answered in forwarded:
            try:
                status, body = await answered
            except ApiError as error:  # the owner did not answer: say so for its leg
                answers.append({"role": name, "result": "error", "status": error.status, "message": error.message})
                continue
            if status == 200:
                answers.extend(json.loads(body).get("legs", []))
            else:
                answers.append({"role": name, "result": "error", "status": status})
        if not answers:
            raise _unknown_call(call_id)
        return _json(request, 200, {"call_id": call_id, "legs": answers})

    async def _remoteOwners(
        self,
        request: IRequest,
        call_id: str,
        role: Role | None,
        held: list[ILeg],
        mine: list[ILeg],
    ) -> dict[str, LegEntry]:
        """
        The owners, on other instances, of the legs this request names and
        this instance does not hold. Redis is only asked when that can matter,
        and a hangup of legs held here works without it.
        """
        from audiohangup.cluster.directory import DirectoryUnavailable

        if self.cluster is None or _forwarded(request):
            return {}
        local_roles = {leg.role.value for leg in held}
        if (role is not None and mine) or (role is None and len(local_roles) == len(Role)):
            return {}
        try:
            owners = await self.cluster.directory.owners(call_id)
        except DirectoryUnavailable as error:
            if mine:
                return {}  # hang up what is here; the rest cannot be found now
            raise _redis_unavailable(error) from None
        return {
            name: entry
            for name, entry in owners.items()
            if entry.instance_id != self.cluster.instance_id
            and name not in local_roles
            and (role is None or name == role.value)
        }

    async def _forward(self, request: IRequest, entry: LegEntry, path: bytes) -> tuple[int, bytes]:
        response = await self._send(request, entry, path)
        return response.code, await self._readAnswer(response, entry)

    async def _readAnswer(self, response: Any, entry: LegEntry) -> bytes:
        """An owner's answer, read whole (bounded); a 502 ApiError if it broke off or passed the bound."""
        assert self.cluster is not None
        try:
            return await self.cluster.read(response, entry.instance_id, entry.url)
        except OwnerUnreachable as error:
            raise _owner_error(error) from None

    async def _send(self, request: IRequest, entry: LegEntry, path: bytes) -> Any:
        """The owner's response to this request, its body yet to read; a 502 ApiError if it did not answer."""
        assert self.cluster is not None
        request.content.seek(0)
        headers = {
            name: value
            for name in ("Authorization", "Content-Type")
            if (value := _header(request, name.lower())) is not None
        }
        try:
            return await self.cluster.send(
                entry.url, entry.instance_id, request.method, path, request.content.read(), headers
            )
        except OwnerUnreachable as error:
            raise _owner_error(error) from None

    async def _relayRecording(self, request: IRequest, entry: LegEntry) -> bytes:
        """The owner's WAV, passed on as it comes (a recording can be far larger than any answer read whole)."""
        assert self.cluster is not None
        response = await self._send(request, entry, request.uri)
        if response.code != 200:
            return self._answered(request, entry, response.code, await self._readAnswer(response, entry))
        length = response.length if isinstance(response.length, int) else None
        if length is not None and length > MAX_WAV_BYTES:
            response.deliverBody(_Discard())
            raise _owner_error(OwnerAnswerTooLarge(
                entry.instance_id, entry.url, f"a recording of {length} bytes, over {MAX_WAV_BYTES}"
            ))
        request.setHeader("x-audiohangup-answered-by", entry.instance_id)
        request.setHeader("content-type", "audio/wav")
        if length is not None:
            request.setHeader("content-length", str(length))
        try:
            await self.cluster.pipe(response, cast(Request, request), entry.instance_id, entry.url)
        except OwnerUnreachable as error:
            # Part of the WAV is out: the only honest end is a cut connection.
            self.log.warn("recording from instance {instance} cut short: {error}",
                          instance=entry.instance_id, error=str(error))
            request.channel.transport.abortConnection()  # type: ignore[attr-defined]
        return b""

    async def _relay(self, request: IRequest, entry: LegEntry, path: bytes) -> bytes:
        return self._answered(request, entry, *await self._forward(request, entry, path))

    @staticmethod
    def _answered(request: IRequest, entry: LegEntry, status: int, body: bytes) -> bytes:
        """The owner's JSON answer as this request's, saying who answered."""
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        request.setHeader("x-audiohangup-answered-by", entry.instance_id)
        return body

    # Media streams

    @app.route("/calls/<string:call_id>/streams", methods=["POST"])
    @_control
    async def open_streams(self, request: IRequest, call_id: str) -> bytes:
        """Stream one role's leg (or every live leg) to an application over WebSocket."""
        call_id = parse_call_id(call_id)
        body = _read_json(
            request, allowed={"url", "role", "protocol", "mode", "parameters", "headers"}, required=True
        )
        role = _body_or_query_role(request, body)
        protocol, mode = body.get("protocol"), body.get("mode")
        for name, value in (("protocol", protocol), ("mode", mode)):
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"bad_{name}", f"{name} must be a string")
        url = check_url(body.get("url"))
        parameters = check_fields(body.get("parameters"), "parameters")
        headers = self.streams.check_headers(check_fields(body.get("headers"), "headers"))
        held = self.registry.call(call_id)
        mine = [leg for leg in held if role is None or leg.role is role]
        remote = await self._remoteOwners(request, call_id, role, held, mine)
        if role is not None and remote:
            return await self._relay(request, remote[role.value], request.uri)
        if not mine and not remote:
            self._live_legs(call_id, role)  # raises the right 404
        mine = [leg for leg in mine if leg.live]
        for leg in mine:  # all or none: check every leg before opening one
            self.streams.check(leg, url, protocol, mode)
        opened = [
            self.streams.open(leg, url, protocol=protocol, mode=mode, parameters=parameters, headers=headers)
            for leg in mine
        ]
        answers = [_opened_view(stream) for stream in opened]
        refused: list[dict[str, Any]] = []  # what an owner answered instead, per role
        for name, entry in sorted(remote.items(), key=lambda item: _ROLE_ORDER[item[0]]):
            try:
                status, answer = await self._forward(request, entry, _with_query(request.uri, role=name))
            except ApiError as error:  # the owner did not answer
                refused.append({"role": name, "status": error.status, "error": error.body()})
                continue
            if status == 201:
                answers.extend(json.loads(answer).get("streams", []))
            else:
                refused.append({"role": name, "status": status, "error": _error_of(answer, status)})
        if not answers:
            if refused:  # the owner's own refusal (409, 400, 502...), not a misleading 404
                first = refused[0]
                return _json(request, first["status"], {"error": first["error"]})
            raise ApiError(404, "no_live_leg", f"call {call_id} has no live leg to stream")
        # Some legs streamed: their ids must reach the caller, with what the other legs answered.
        return _json(request, 201, {"call_id": call_id, "streams": answers, **({"errors": refused} if refused else {})})

    @app.route("/calls/<string:call_id>/streams/<string:stream_id>", methods=["DELETE"])
    @_control
    async def close_stream(self, request: IRequest, call_id: str, stream_id: str) -> bytes:
        """End one stream: C{stop}, then a close with code 1000; the leg stays up."""
        call_id = parse_call_id(call_id)
        stream = self.streams.find(call_id, stream_id)
        if stream is not None:
            stream.stop("deleted through the API")
            return _json(request, 200, {"call_id": call_id, "stream": {**stream.snapshot(), "role": stream.leg.role}})
        if self.cluster is not None and not _forwarded(request):
            from audiohangup.cluster.directory import DirectoryUnavailable

            try:
                owners = await self.cluster.directory.owners(call_id)
            except DirectoryUnavailable as error:
                raise _redis_unavailable(error) from None
            seen = {self.cluster.instance_id}
            for entry in owners.values():
                if entry.instance_id in seen:
                    continue
                seen.add(entry.instance_id)
                status, answer = await self._forward(request, entry, request.uri)
                if status == 200:
                    request.setHeader("x-audiohangup-answered-by", entry.instance_id)
                    return _json(request, 200, json.loads(answer))
        raise ApiError(404, "unknown_stream", f"call {call_id} has no stream {stream_id} open")

    # Recordings

    @app.route("/calls/<string:call_id>/recording", methods=["POST"])
    @_control
    async def start_recording(self, request: IRequest, call_id: str) -> bytes:
        """Record a live call from now on (with --record, every call is recorded already: 409)."""
        call_id = parse_call_id(call_id)
        legs = [leg for leg in self.registry.call(call_id) if leg.live]
        if not legs:
            return await self._atOwner(request, call_id)
        recording = self._recorder().begin(call_id, legs)
        return _json(request, 201, {"call_id": call_id, "recording": recording.summary()})

    @app.route("/calls/<string:call_id>/recording", methods=["DELETE"])
    @_control
    async def stop_recording(self, request: IRequest, call_id: str) -> bytes:
        """Stop a call's recording; the answer comes once its file is complete."""
        call_id = parse_call_id(call_id)
        recorder = self._recorder()
        recording = recorder.active.get(call_id)
        if recording is None:
            if not self.registry.call(call_id):
                return await self._atOwner(request, call_id)
            raise ApiError(404, "not_recording", f"call {call_id} is not being recorded")
        await recorder.finish(call_id)
        return _json(request, 200, {"call_id": call_id, "recording": recording.summary()})

    @app.route("/calls/<string:call_id>/recording", methods=["GET"])
    @_read
    async def get_recording(self, request: IRequest, call_id: str) -> Any:
        """The call's WAV file, during the call (what is written so far) and after it."""
        call_id = parse_call_id(call_id)
        try:
            resource = await self._recorder().find(call_id)
        except RecorderStopped as error:  # its lookups' thread is going: the file may well be there
            raise ApiError(503, "shutting_down", str(error)) from None
        if resource is None:
            if not self.registry.call(call_id):
                return await self._atOwner(request, call_id, what="recording")
            raise ApiError(404, "no_recording", f"call {call_id} has no recording")
        return resource

    def _recorder(self) -> Recorder:
        if self.recorder is None:
            raise ApiError(404, "recording_off", "recording is off")
        return self.recorder

    async def _atOwner(self, request: IRequest, call_id: str, what: str = "call") -> bytes:
        """A call not held here: its owner's answer, in a cluster; else 404."""
        if self.cluster is not None and not _forwarded(request):
            from audiohangup.cluster.directory import DirectoryUnavailable

            try:
                owners = await self.cluster.directory.owners(call_id)
            except DirectoryUnavailable as error:
                raise _redis_unavailable(error) from None
            for entry in owners.values():
                if entry.instance_id != self.cluster.instance_id:
                    if what == "recording" and request.method == b"GET":
                        return await self._relayRecording(request, entry)  # a WAV, passed on as it comes
                    return await self._relay(request, entry, request.uri)
        if what == "recording":
            raise ApiError(404, "no_recording", f"call {call_id} has no recording here")
        raise _unknown_call(call_id)

    @app.route("/instances", methods=["GET"])
    @_read
    async def instances(self, request: IRequest) -> bytes:
        """The live instances of the cluster, from the directory."""
        if self.cluster is None:
            raise ApiError(404, "cluster_off", "this instance runs alone (no --redis)")
        from audiohangup.cluster.directory import DirectoryUnavailable

        try:
            found = await self.cluster.directory.instances()
        except DirectoryUnavailable as error:
            raise _redis_unavailable(error) from None
        return _json(request, 200, {"instances": [asdict(instance) for instance in found]})

    # Errors: declaration order is the order Klein tries them in.

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return json_error(request, error.status, error.code, error.message)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        status = error.code or 500
        if status == 405:
            allowed = getattr(error, "valid_methods", None) or []
            request.setHeader("allow", ", ".join(sorted(allowed)))
            message = f"{request.method.decode()} is not allowed here"
        elif status == 404:
            message = f"no route for {request.path.decode(errors='replace')}"
        else:
            message = error.description or error.name
        return json_error(request, status, error.name.lower().replace(" ", "_"), message)

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "{method} {path} failed", failure=failure,
            method=request.method.decode(), path=request.path.decode(errors="replace"),
        )
        return json_error(request, 500, "internal_error", "the server failed; see its log")


def _opened_view(stream: MediaStream) -> dict[str, Any]:
    return {
        "stream_id": stream.stream_id, "role": str(stream.leg.role), "url": stream.public_url,
        "protocol": stream.protocol.name, "mode": str(stream.mode),
    }


def _body_or_query_role(request: IRequest, body: dict[str, Any]) -> Role | None:
    role = _query(request, "role")
    if "role" in body:
        if role is not None and role != body["role"]:
            raise ApiError(400, "bad_role", "the query and the body name different roles")
        return parse_role(body["role"])
    return None if role is None else parse_role(role)


def _call_view(call_id: str, legs: list[ILeg]) -> dict[str, Any]:
    return {"call_id": call_id, "legs": [leg.snapshot() for leg in legs]}


_ROLE_ORDER = {role.value: index for index, role in enumerate(Role)}


def _header(request: IRequest, name: str) -> str | None:
    """A request header as text, whatever its bytes (latin-1 never fails to decode)."""
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    return values[-1].decode("latin-1") if values else None


def _owner_error(error: OwnerUnreachable) -> ApiError:
    """502, naming the owner: it did not answer, or answered more than is read."""
    code = "owner_answer_too_large" if isinstance(error, OwnerAnswerTooLarge) else "owner_unreachable"
    return ApiError(502, code, str(error))


class _Discard(Protocol):
    """Drops a response body that will not be read (the connection goes with it)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _redis_unavailable(error: Exception) -> ApiError:
    return ApiError(503, "redis_unavailable", f"the call directory (Redis) is unreachable: {error}")


def _forwarded(request: IRequest) -> bool:
    return _header(request, FORWARDED_BY) is not None


def _cause(request: IRequest) -> HangupCause:
    """API, unless another instance forwarded the hangup with its own cause (session)."""
    given = _header(request, CAUSE)
    if given is not None and _forwarded(request) and given in FORWARDABLE_CAUSES:
        return HangupCause(given)
    return HangupCause.API


def _with_query(uri: bytes, **params: str) -> bytes:
    """The request's path and query with some parameters set."""
    parts = urlsplit(uri.decode("latin-1"))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += list(params.items())
    return urlunsplit(("", "", parts.path, urlencode(query), "")).encode("latin-1")


def _unknown_call(call_id: str) -> ApiError:
    return ApiError(404, "unknown_call", f"no live leg has call id {call_id}")


#: Reason phrases Twisted's table lacks (it would send "Unknown Status").
_PHRASES = {421: b"Misdirected Request"}


def _json(request: IRequest, status: int, body: object) -> bytes:
    request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader("content-type", "application/json")
    return json.dumps(body).encode() + b"\n"


def _error_of(answer: bytes, status: int) -> dict[str, Any]:
    """The C{error} object of another instance's answer, or one that says what came back."""
    try:
        error = json.loads(answer)["error"]
        if isinstance(error, dict):
            return error
    except (ValueError, KeyError, TypeError):
        pass
    return {"code": "owner_error", "message": f"the owner answered {status}"}


def json_error(request: IRequest, status: int, code: str, message: str) -> bytes:
    return _json(request, status, {"error": {"code": code, "message": message}})


def _query(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode(), [])
    if len(values) > 1:
        raise ApiError(400, f"bad_{name}", f"query parameter {name!r} is given more than once")
    return values[0].decode("utf-8", errors="replace") if values else None


def _optional_role(request: IRequest) -> Role | None:
    role = _query(request, "role")
    return None if role is None else parse_role(role)


#: Media types accepted for 8-bit G.711 bodies.
_G711_TYPES = {"ulaw": ("audio/pcmu", "audio/basic"), "alaw": ("audio/pcma",)}


def _content_type(request: IRequest) -> tuple[str, dict[str, str]]:
    """The media type, lowercased, and its parameters (C{audio/L16;rate=8000})."""
    header = (_header(request, "content-type") or "").strip()
    media, *params = [part.strip() for part in header.split(";")]
    parsed = {}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key.strip().lower()] = value.strip().strip('"')
    return media.lower(), parsed


_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _static(request: IRequest, name: str) -> bytes:
    """A file of the live page, from the package; only the three files it has."""
    content_type = _STATIC_TYPES.get(name)
    if content_type is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    request.setHeader("content-type", content_type)
    request.setHeader("cache-control", "no-cache")
    # The page loads nothing from elsewhere, and nothing may make it.
    request.setHeader("content-security-policy", "default-src 'self'; frame-ancestors 'none'")
    return resources.files("audiohangup").joinpath("web").joinpath(name).read_bytes()


def _int(request: IRequest, name: str, *, default: int, low: int, high: int) -> int:
    value = _query(request, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ApiError(400, f"bad_{name}", f"query parameter {name!r} must be a whole number from {low} to {high}")
    return number


def _instant(request: IRequest, name: str) -> float | None:
    """A point in time as Unix seconds or ISO 8601 (naive means UTC)."""
    value = _query(request, name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"bad_{name}", f"{name} must be Unix seconds or an ISO 8601 time, not {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _flag(request: IRequest, name: str) -> bool:
    value = _query(request, name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ApiError(400, f"bad_{name}", f"query parameter {name!r} must be true or false, not {value!r}")


def _read_json(request: IRequest, *, allowed: set[str], required: bool) -> dict[str, Any]:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body exceeds {MAX_BODY} bytes")
    if not raw.strip():
        if required:
            raise ApiError(400, "bad_body", "a JSON object body is required")
        return {}
    media, _ = _content_type(request)
    if media and media != "application/json" and not media.endswith("+json"):
        raise ApiError(
            400, "bad_content_type", f"send the body as application/json, not {media}"
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {error!s:.200}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_body", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    return body


def _wall_clock() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)
