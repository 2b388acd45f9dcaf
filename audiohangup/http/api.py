# -*- test-case-name: tests.test_api,tests.test_security,tests.test_cluster,tests.test_records_http,tests.test_listen -*-
"""
The HTTP control API: a Klein app on the same reactor and registry as the
AudioSocket listeners, so a hangup request writes C{00 00 00} on the leg's own
transport. JSON in, JSON out, every error as C{{"error": {"code", "message"}}}.

The routes only: what a request says is read by L{audiohangup.http.request},
a call held by another instance is reached through the one
L{audiohangup.cluster.Forwarder}, and what the domain refuses is answered
from the one table, L{audiohangup.http.errors.REFUSALS}.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar, cast

from klein import Klein
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from audiohangup.audio import AudioFormat, LegSettings
from audiohangup.cluster.directory import DirectoryUnavailable, LegEntry
from audiohangup.cluster.forward import (
    ANSWERED_BY,
    FORWARDED_BY,
    ROLE_ORDER,
    Cluster,
    Forwarder,
    Reply,
    forwarded,
    forwarded_cause,
)
from audiohangup.events import RecentLegs
from audiohangup.hour import Hour
from audiohangup.http.access import AuthThrottle, Scope, Tokens, fingerprint
from audiohangup.http.answers import json_answer, json_error, static_file
from audiohangup.http.errors import REFUSED, ApiError, refusal, unknown_call
from audiohangup.http.listen import ListenResource
from audiohangup.http.request import (
    flag,
    header,
    instant,
    parse_call_id,
    parse_role,
    query,
    read_audio,
    read_json,
    role_of,
    throttle_source,
    whole_number,
)
from audiohangup.http.wav import WavResource
from audiohangup.interfaces import IServerLeg
from audiohangup.levels import Levels
from audiohangup.logs import iso_time
from audiohangup.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from audiohangup.reasons import Role
from audiohangup.recording import NotRecording, Recorder
from audiohangup.records import CallRecords
from audiohangup.registry import Registry
from audiohangup.sources import IPNetwork
from audiohangup.streams.listen import TICKET_SECONDS, Listens, TooManyListeners
from audiohangup.streams.manager import Streams, check_fields, check_url
from audiohangup.streams.stream import MediaStream

Handler = TypeVar("Handler", bound=Callable[..., Any])


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
        metrics: CollectorRegistry | None = None,
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
        levels: Levels | None = None,
        hour: Hour | None = None,
        listens: Listens | None = None,
    ) -> None:
        self.registry = registry
        #: The live legs' audio levels, shown with each leg (None: not measured).
        self.levels = levels
        #: The last hour, minute by minute (GET /stats/hour; None: not kept).
        self.hour = hour
        #: Listen-ins (None: off), which the live page's listen buttons open.
        self.listens = listens
        self.settings = settings or LegSettings()
        #: The format each role's legs carry (--visitor-audio, --resident-audio).
        self.formats = formats or dict.fromkeys(Role, self.settings.audio)
        self.recorder = recorder
        self.metrics = metrics
        self.recent = recent
        self.records = records
        self.cluster = cluster
        #: How a route reaches a call's legs on other instances (none without a cluster).
        self.forwarder = Forwarder(cluster)
        #: Every token the API takes; replaced whole when the tokens file is re-read.
        self.tokens = (tokens or Tokens()) + Tokens([(Scope.CONTROL, api_token)] if api_token else [])
        self.throttle = throttle if throttle is not None else AuthThrottle()
        #: Proxies whose X-Forwarded-For names the client the throttle counts (--trusted-proxies).
        self.trusted_proxies = trusted_proxies
        self.clock = clock if clock is not None else _wall_clock()
        self.streams = streams

    def authorize(self, request: IRequest, needed: Scope) -> None:
        """
        Nothing to check when the server has no token (loopback, or
        --insecure-http); else a token of C{needed} scope or wider, 401
        without one (counted against the address), 403 with one too narrow.
        """
        tokens = self.tokens
        if not tokens:
            return
        scheme, _, given = (header(request, "authorization") or "").partition(" ")
        scope = tokens.scope_of(given.strip()) if scheme.lower() == "bearer" else None
        if scope is None:
            source = throttle_source(request, self.trusted_proxies)
            if source is not None:
                self.throttle.failed(source, self.clock.seconds())
            request.setHeader("www-authenticate", 'Bearer realm="audiohangup"')
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")
        if not scope.covers(needed):
            raise ApiError(403, "forbidden", f"this route needs a {needed} token; the one given has {scope} scope")

    def check_forwarded(self, request: IRequest) -> None:
        """
        A request that says another instance forwarded it must prove it (a
        signature under --api-token): else a client could pass its hangup off
        as a session's end, or keep it from reaching the owner. 403 if not.
        """
        if not forwarded(request):
            return
        if self.cluster is None:
            raise ApiError(403, "bad_forwarding", f"{FORWARDED_BY}: this instance runs alone (no --redis)")
        if not self.forwarder.proven(request):
            raise ApiError(
                403, "bad_forwarding",
                f"{FORWARDED_BY} is taken only from another instance of this cluster, signed with its --api-token",
            )

    # Routes

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return json_answer(request, 200, {"status": "ok", "legs": len(self.registry)})

    @app.route("/metrics", methods=["GET"])
    @_read
    def metrics_text(self, request: IRequest) -> bytes:
        """Prometheus text format."""
        if self.metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        request.setHeader("content-type", METRICS_CONTENT_TYPE)
        return generate_latest(self.metrics)

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        """The live calls page. It holds no data: what it shows comes from the protected JSON routes."""
        return static_file(request, "index.html")

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        return static_file(request, name)

    @app.route("/legs/ended", methods=["GET"])
    @_read
    def ended_legs(self, request: IRequest) -> bytes:
        """The legs that ended last, newest first (in memory, for the live page)."""
        limit = whole_number(request, "limit", default=20, low=1, high=100)
        legs = self.recent.latest(limit) if self.recent is not None else []
        return json_answer(request, 200, {"legs": legs})

    @app.route("/records", methods=["GET"])
    @_read
    async def call_records(self, request: IRequest) -> bytes:
        """Call records, newest first, filtered and paged with an opaque cursor."""
        if self.records is None:
            raise ApiError(404, "records_off", "call records are off (--call-records none)")
        fields = {name: query(request, name) for name in ("call_id", "role", "reason", "cursor")}
        if fields["call_id"] is not None:
            fields["call_id"] = parse_call_id(fields["call_id"])
        try:
            page = await self.records.query(
                **fields,
                since=instant(request, "since"),
                until=instant(request, "until"),
                limit=whole_number(request, "limit", default=50, low=1, high=500),
            )
        except RuntimeError as error:  # the store is not open: it failed to open, or is closing
            raise ApiError(503, "records_unavailable", f"call records cannot be read now: {error}") from None
        return json_answer(request, 200, page)

    @app.route("/stats/hour", methods=["GET"])
    @_read
    def stats_hour(self, request: IRequest) -> bytes:
        """The last hour, minute by minute (this instance's): the live page's charts."""
        if self.hour is None:
            raise ApiError(404, "not_found", "the hour's statistics are not kept")
        return json_answer(request, 200, self.hour.view())

    @app.route("/recordings", methods=["GET"])
    @_read
    async def recordings(self, request: IRequest) -> bytes:
        """
        The calls' recordings, newest first, from the call records, each with
        its size and seconds read from its file (absent: not on this instance,
        or pruned); paged with an opaque cursor, filtered by call id.
        """
        if self.records is None:
            raise ApiError(404, "records_off", "call records are off (--call-records none)")
        call_id = query(request, "call_id")
        try:
            page = await self.records.recordings(
                call_id=None if call_id is None else parse_call_id(call_id), cursor=query(request, "cursor"),
                limit=whole_number(request, "limit", default=20, low=1, high=100),
            )
        except RuntimeError as error:  # the store is not open: it failed to open, or is closing
            raise ApiError(503, "records_unavailable", f"call records cannot be read now: {error}") from None
        found = await self.recorder.sizes([entry["file"] for entry in page["recordings"]]) if self.recorder else {}
        for entry in page["recordings"]:
            size, seconds = found.get(entry["file"], (None, None))
            entry["bytes"], entry["seconds"] = size, seconds
        return json_answer(request, 200, page)

    @app.route("/calls", methods=["GET"])
    @_read
    async def calls(self, request: IRequest) -> bytes:
        """Live calls: this instance's (C{scope=local}), or every instance's (C{scope=cluster})."""
        scope = query(request, "scope") or "local"
        if scope == "local":
            calls = [_call_view(call_id, legs, self.levels) for call_id, legs in self.registry.calls().items()]
            return json_answer(request, 200, {"calls": calls})
        if scope != "cluster":
            raise ApiError(400, "bad_scope", f"scope must be local or cluster, not {scope!r}")
        entries = await self._cluster().directory.legs()
        grouped: dict[str, list[dict[str, Any]]] = {}
        for entry in sorted(entries, key=lambda e: (e.call_id, ROLE_ORDER.get(e.role, 9))):
            leg = asdict(entry)
            grouped.setdefault(leg.pop("call_id"), []).append(leg)
        return json_answer(request, 200, {"calls": [{"call_id": c, "legs": legs} for c, legs in grouped.items()]})

    @app.route("/calls/<string:call_id>", methods=["GET"])
    @_read
    def call(self, request: IRequest, call_id: str) -> bytes:
        call_id = parse_call_id(call_id)
        legs = self.registry.call(call_id)
        if not legs:
            raise unknown_call(call_id)
        return json_answer(request, 200, _call_view(call_id, legs, self.levels))

    @app.route("/calls/<string:call_id>/hangup", methods=["POST"])
    @_control
    def hangup_call(self, request: IRequest, call_id: str) -> Awaitable[bytes]:
        call_id = parse_call_id(call_id)
        body = read_json(request, allowed={"role"}, required=False)
        return self._hangup(request, call_id, role_of(request, body))

    @app.route("/api/hangup", methods=["POST"])
    @_control
    def api_hangup(self, request: IRequest) -> Awaitable[bytes]:
        body = read_json(request, allowed={"call_id", "role"}, required=True)
        if not isinstance(body.get("call_id"), str):
            raise ApiError(400, "bad_call_id", "the body needs a string 'call_id'")
        call_id = parse_call_id(body["call_id"])
        return self._hangup(request, call_id, parse_role(body.get("role", Role.VISITOR.value)))

    @app.route("/calls/<string:call_id>/play", methods=["POST"])
    @_control
    def play(self, request: IRequest, call_id: str) -> Awaitable[bytes]:
        """Queue raw audio in the legs' format; the pacer plays it, 20 ms a frame."""
        call_id = parse_call_id(call_id)
        role = role_of(request)
        formats = {self.formats[target] for target in ([role] if role is not None else Role)}
        if len(formats) > 1:
            raise ApiError(400, "mixed_formats", "the roles' legs carry different formats: name a role")
        # Checked before the call is looked up.
        audio = read_audio(
            request, formats.pop(), max_frames=self.settings.max_queue_frames, max_ms=self.settings.max_queue_ms
        )
        return self._play(request, call_id, role, audio)

    async def _play(self, request: IRequest, call_id: str, role: Role | None, audio: bytes) -> bytes:
        home = await self._home(request, call_id)
        if home is not None:
            # A leg here joined the session there over the media link: the home plays it (and records it).
            return await self.forwarder.passOn(request, home)
        legs = self._live_legs(call_id, role)
        answers = []
        for leg in legs:
            dropped = leg.play(audio)
            answers.append({"role": leg.role, "queued_ms": leg.queued_ms, "dropped_frames": dropped})
        return json_answer(request, 200, {"call_id": call_id, "legs": answers})

    def _live_legs(self, call_id: str, role: Role | None) -> list[IServerLeg]:
        """The call's legs, or one role's; 404 when there are none."""
        legs = self.registry.call(call_id)
        if not legs:
            raise unknown_call(call_id)
        if role is not None:
            legs = [leg for leg in legs if leg.role is role]
            if not legs:
                raise ApiError(404, "no_live_leg", f"call {call_id} has no live {role} leg")
        return legs

    async def _home(self, request: IRequest, call_id: str) -> LegEntry | None:
        """
        The directory's entry of a leg on the instance where this call's
        session lives, when that is not this one; None if it is, or if that
        cannot be told now (then the legs are hung up where each is).
        """
        session = self.registry.session(call_id)
        if session is None or session.home is None:
            return None
        try:
            elsewhere = await self.forwarder.elsewhere(request, call_id)
        except DirectoryUnavailable:
            return None
        return next((entry for entry in elsewhere.values() if entry.instance_id == session.home), None)

    async def _hangup(self, request: IRequest, call_id: str, role: Role | None) -> bytes:
        wait = flag(request, "wait")
        after_playout = flag(request, "after_playout")
        cause = forwarded_cause(request)
        held = self.registry.call(call_id)
        home = await self._home(request, call_id) if role is None or after_playout else None
        if home is not None:
            # The session lives there (a leg here joined it over the media
            # link): it hangs up every leg, this one's through the link; and
            # it plays the legs' audio out (a leg's queue is there).
            return await self.forwarder.passOn(request, home)
        mine = held if role is None else [leg for leg in held if leg.role is role]
        remote = await self.forwarder.elsewhere(request, call_id, role, held)
        if role is not None and remote:
            # Not held here: the owner answers, and its answer is ours.
            return await self.forwarder.passOn(request, remote[role.value])
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
        replies = self.forwarder.toEach(request, remote)
        if wait:
            reasons = await gatherResults(gone)
            for answer, reason in zip(answers, reasons):
                answer["reason"] = reason
        for reply in await replies:
            if reply.failure is None and reply.status == 200:
                answers.extend(reply.json().get("legs", []))
            else:  # the owner did not answer, or refused: say so for its leg
                answers.append({"role": reply.role, "result": "error", **_refused(reply)})
        if not answers:
            raise unknown_call(call_id)
        return json_answer(request, 200, {"call_id": call_id, "legs": answers})

    # Media streams

    @app.route("/calls/<string:call_id>/streams", methods=["POST"])
    @_control
    async def open_streams(self, request: IRequest, call_id: str) -> bytes:
        """Stream one role's leg (or every live leg) to an application over WebSocket."""
        call_id = parse_call_id(call_id)
        streams = self._streams()
        body = read_json(
            request, allowed={"url", "role", "protocol", "mode", "parameters", "headers"}, required=True
        )
        role = role_of(request, body)
        protocol, mode = body.get("protocol"), body.get("mode")
        for name, value in (("protocol", protocol), ("mode", mode)):
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"bad_{name}", f"{name} must be a string")
        url = check_url(body.get("url"))
        parameters = check_fields(body.get("parameters"), "parameters")
        headers = streams.check_headers(check_fields(body.get("headers"), "headers"))
        home = await self._home(request, call_id)
        if home is not None:  # the session's home streams its legs, a linked one too
            return await self.forwarder.passOn(request, home)
        held = self.registry.call(call_id)
        mine = [leg for leg in held if role is None or leg.role is role]
        remote = await self.forwarder.elsewhere(request, call_id, role, held)
        if role is not None and remote:
            return await self.forwarder.passOn(request, remote[role.value])
        if not mine and not remote:
            self._live_legs(call_id, role)  # raises the right 404
        mine = [leg for leg in mine if leg.live]
        for leg in mine:  # all or none: check every leg before opening one
            streams.check(leg, url, protocol, mode)
        opened = [
            streams.open(leg, url, protocol=protocol, mode=mode, parameters=parameters, headers=headers)
            for leg in mine
        ]
        answers = [_opened_view(stream) for stream in opened]
        refused: list[dict[str, Any]] = []  # what an owner answered instead, per role
        for reply in await self.forwarder.toEach(request, remote):
            if reply.failure is None and reply.status == 201:
                answers.extend(reply.json().get("streams", []))
            else:
                refused.append(_refused(reply))
        if not answers:
            if refused:  # the owner's own refusal (409, 400, 502...), not a misleading 404
                first = refused[0]
                return json_answer(request, first["status"], {"error": first["error"]})
            raise ApiError(404, "no_live_leg", f"call {call_id} has no live leg to stream")
        # Some legs streamed: their ids must reach the caller, with what the other legs answered.
        return json_answer(
            request, 201, {"call_id": call_id, "streams": answers, **({"errors": refused} if refused else {})}
        )

    @app.route("/calls/<string:call_id>/streams/<string:stream_id>", methods=["DELETE"])
    @_control
    async def close_stream(self, request: IRequest, call_id: str, stream_id: str) -> bytes:
        """End one stream: C{stop}, then a close with code 1000; the leg stays up."""
        call_id = parse_call_id(call_id)
        stream = self._streams().find(call_id, stream_id)
        if stream is not None:
            stream.stop("deleted through the API")
            view = {**stream.snapshot(), "role": stream.leg.role}
            return json_answer(request, 200, {"call_id": call_id, "stream": view})
        asked = set()
        for entry in (await self.forwarder.elsewhere(request, call_id)).values():
            if entry.instance_id not in asked:  # the instance that holds it, wherever it is
                asked.add(entry.instance_id)
                status, answer = await self.forwarder.ask(request, entry)
                if status == 200:
                    request.setHeader(ANSWERED_BY, entry.instance_id)
                    return json_answer(request, 200, json.loads(answer))
        raise ApiError(404, "unknown_stream", f"call {call_id} has no stream {stream_id} open")

    # Listen-in

    @app.route("/calls/<string:call_id>/listen", methods=["POST"])
    def listen_ticket(self, request: IRequest, call_id: str) -> bytes:
        """
        A ticket to hear a live call (or one role's leg) in a browser: good
        once, for a few seconds, on this call's WebSocket (below). Needs a
        listen or control token: hearing a call is more than reading it.
        """
        listens = self._listens()
        try:
            self.authorize(request, Scope.LISTEN)
        except ApiError:
            listens.refused()
            raise
        self.check_forwarded(request)
        call_id = parse_call_id(call_id)
        role = role_of(request)
        self._live_legs(call_id, role)  # 404 for a call (or role) not live here
        ticket = listens.tickets.issue(
            call_id, role, self._who(request), self.clock.seconds(), throttle_source(request, self.trusted_proxies)
        )
        return json_answer(request, 201, {
            "call_id": call_id, "role": role, "ticket": ticket, "expires_in": TICKET_SECONDS,
            "path": f"calls/{call_id}/listen?ticket={ticket}",
        })

    @app.route("/calls/<string:call_id>/listen", methods=["GET"])
    def listen(self, request: IRequest, call_id: str) -> Any:
        """The listen-in's WebSocket, for the holder of a ticket (a browser cannot send a token on one)."""
        listens = self._listens()
        call_id = parse_call_id(call_id)
        if (header(request, "upgrade") or "").lower() != "websocket":
            raise ApiError(
                400, "websocket_required",
                "this route is a WebSocket: POST it for a ticket, then open it as ws:// or wss:// with ?ticket=",
            )
        now = self.clock.seconds()
        source = throttle_source(request, self.trusted_proxies)
        grant = listens.tickets.take(query(request, "ticket") or "", call_id, now, source)
        if grant is None:
            if source is not None:
                self.throttle.failed(source, now)
            listens.refused()
            raise ApiError(
                403, "bad_ticket",
                f"no valid ticket for call {call_id}: POST /calls/{call_id}/listen with a listen or control "
                f"token gets one, good once for {TICKET_SECONDS:g} s, from the same address",
            )
        legs = [
            leg for leg in self.registry.call(call_id) if leg.live and (grant.role is None or leg.role is grant.role)
        ]
        if not legs:
            raise ApiError(404, "no_live_leg", f"call {call_id} has no live leg here to listen to")
        try:
            listener = listens.begin(grant, legs, _source(request))
        except TooManyListeners as error:
            raise ApiError(503, "too_many_listens", str(error)) from None
        return ListenResource(listener, listens.max_unsent_ms)

    def _who(self, request: IRequest) -> str:
        """Who asked, for the log: the token's scope and fingerprint (never the token), and the source."""
        scheme, _, given = (header(request, "authorization") or "").partition(" ")
        given = given.strip()
        scope = self.tokens.scope_of(given) if self.tokens and scheme.lower() == "bearer" else None
        token = "no token (the API takes none)" if scope is None else f"{scope} token {fingerprint(given)}"
        return f"{token} at {_source(request)}"

    def _listens(self) -> Listens:
        if self.listens is None:
            raise ApiError(404, "listen_off", "listen-in is off")
        return self.listens

    def _streams(self) -> Streams:
        if self.streams is None:
            raise ApiError(404, "streams_off", "media streams are off")
        return self.streams

    # Recordings

    @app.route("/calls/<string:call_id>/recording", methods=["POST"])
    @_control
    async def start_recording(self, request: IRequest, call_id: str) -> bytes:
        """Record a live call from now on (with --record, every call is recorded already: 409)."""
        call_id = parse_call_id(call_id)
        home = await self._home(request, call_id)
        if home is not None:  # the session's home records the call, a linked leg too
            return await self.forwarder.passOn(request, home)
        legs = [leg for leg in self.registry.call(call_id) if leg.live]
        if not legs:
            return await self._atOwner(request, call_id)
        recording = self._recorder().begin(call_id, legs)
        return json_answer(request, 201, {"call_id": call_id, "recording": recording.summary()})

    @app.route("/calls/<string:call_id>/recording", methods=["DELETE"])
    @_control
    async def stop_recording(self, request: IRequest, call_id: str) -> bytes:
        """Stop a call's recording; the answer comes once its file is complete."""
        call_id = parse_call_id(call_id)
        recorder = self._recorder()
        recording = recorder.active.get(call_id)
        if recording is None:
            home = await self._home(request, call_id)
            if home is not None:
                return await self.forwarder.passOn(request, home)
            if not self.registry.call(call_id):
                return await self._atOwner(request, call_id)
            raise NotRecording(call_id)
        await recorder.finish(call_id)
        return json_answer(request, 200, {"call_id": call_id, "recording": recording.summary()})

    @app.route("/calls/<string:call_id>/recording", methods=["GET"])
    @_read
    async def get_recording(self, request: IRequest, call_id: str) -> Any:
        """The call's WAV file, during the call (what is written so far) and after it."""
        call_id = parse_call_id(call_id)
        found = await self._recorder().find(call_id)
        if found is None:
            home = await self._home(request, call_id)
            if home is not None:
                return await self.forwarder.passOn(request, home, piped=True)
            if not self.registry.call(call_id):
                return await self._atOwner(request, call_id, recording=True)
            raise ApiError(404, "no_recording", f"call {call_id} has no recording")
        return WavResource(found.path, found.rate)

    def _recorder(self) -> Recorder:
        if self.recorder is None:
            raise ApiError(404, "recording_off", "recording is off")
        return self.recorder

    async def _atOwner(self, request: IRequest, call_id: str, *, recording: bool = False) -> bytes:
        """A call not held here: its owner's answer (a GET's recording piped as it comes), in a cluster; else 404."""
        for entry in (await self.forwarder.elsewhere(request, call_id)).values():
            return await self.forwarder.passOn(request, entry, piped=recording and request.method == b"GET")
        if recording:
            raise ApiError(404, "no_recording", f"call {call_id} has no recording here")
        raise unknown_call(call_id)

    @app.route("/instances", methods=["GET"])
    @_read
    async def instances(self, request: IRequest) -> bytes:
        """The live instances of the cluster, from the directory."""
        found = await self._cluster().directory.instances()
        return json_answer(request, 200, {"instances": [asdict(instance) for instance in found]})

    def _cluster(self) -> Cluster:
        if self.cluster is None:
            raise ApiError(404, "cluster_off", "this instance runs alone (no --redis)")
        return self.cluster

    # Errors: declaration order is the order Klein tries them in.

    @app.handle_errors(ApiError, *REFUSED)
    def _refusal(self, request: IRequest, failure: Failure) -> bytes:
        """An ApiError, or what the domain refused, answered from the one table."""
        error = refusal(cast(BaseException, failure.value))
        assert error is not None, "handle_errors catches only what the table answers"
        return json_error(request, error)

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
        return json_error(request, ApiError(status, error.name.lower().replace(" ", "_"), message))

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "{method} {path} failed", failure=failure,
            method=request.method.decode(), path=request.path.decode(errors="replace"),
        )
        return json_error(request, ApiError(500, "internal_error", "the server failed; see its log"))


def _opened_view(stream: MediaStream) -> dict[str, Any]:
    return {
        "stream_id": stream.stream_id, "role": str(stream.leg.role), "url": stream.public_url,
        "protocol": stream.protocol.name, "mode": str(stream.mode),
    }


def _call_view(call_id: str, legs: list[IServerLeg], levels: Levels | None = None) -> dict[str, Any]:
    return {"call_id": call_id, "legs": [leg_view(leg, levels) for leg in legs]}


def leg_view(leg: IServerLeg, levels: Levels | None = None) -> dict[str, Any]:
    """What the HTTP API shows of a live leg: its counters, streams and (measured) levels."""
    return {
        "role": leg.role,
        "state": leg.state,
        "peer": leg.peer,
        "connected_at": iso_time(leg.connected_at),
        "frames_in": leg.frames_in,
        "frames_out": leg.frames_out,
        "bytes_in": leg.bytes_in,
        "bytes_out": leg.bytes_out,
        "queued_ms": leg.queued_ms,
        "dropped_frames": leg.queue.dropped,
        "dtmf": leg.dtmf,
        "streams": [stream.snapshot() for stream in leg.streams],
        **(levels.view(leg) if levels is not None else Levels.unknown()),
    }



def _refused(reply: Reply) -> dict[str, Any]:
    """
    What an owner answered instead of success, for its role: its status and
    C{error} object, or the 502 that says it did not answer (one shape for
    hangups and streams).
    """
    if reply.failure is not None:
        error = refusal(reply.failure)
        assert error is not None, "the table answers OwnerUnreachable"
        return {"role": reply.role, "status": error.status, "error": error.body()}
    return {"role": reply.role, "status": reply.status, "error": reply.error()}


def _source(request: IRequest) -> str:
    """The client's address as the log shows it (a UNIX socket's client has none)."""
    host = getattr(request.getClientAddress(), "host", None)
    return host if isinstance(host, str) else "unix"


def _wall_clock() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)
