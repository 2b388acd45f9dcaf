"""
The HTTP API: StubTreq against the Klein resource for every answer the API
gives (no sockets, legs on StringTransports), then treq against a real
listening port with fake Asterisk legs on real sockets.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from audiohangup.audio import FORMATS, LegSettings
from audiohangup.http.api import ControlAPI
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import HangupCause, Role
from audiohangup.registry import Registry
from audiohangup.wire import HANGUP_FRAME, encode_uuid
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import connect

CALL = "0b8a1f9e-5c2d-4e3f-8a7b-6c5d4e3f2a1b"
TOKEN = "s3cret-token"


class StubbedAPITestCase(SynchronousTestCase):
    token: str | None = None
    settings = LegSettings()

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry()
        api = ControlAPI(self.registry, api_token=self.token, settings=self.settings)
        self.stub = StubTreq(api.app.resource())

    def leg(self, role: Role = Role.VISITOR, call_id: str = CALL) -> tuple[AudioSocketProtocol, StringTransport]:
        leg = AudioSocketProtocol(role, self.registry, self.settings, self.clock, Pacer(self.clock))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        leg.makeConnection(transport)
        leg.dataReceived(encode_uuid(uuid.UUID(call_id)))
        return leg, transport

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        response = self.successResultOf(self.stub.request(method, "http://api" + path, **kwargs))
        body = self.successResultOf(response.content())
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response.code, json.loads(body), response

    def assertError(self, method: str, path: str, status: int, code: str, **kwargs: Any) -> dict:
        got, body, _ = self.request(method, path, **kwargs)
        self.assertEqual((got, body["error"]["code"]), (status, code), body)
        self.assertTrue(body["error"]["message"])
        return body


class ReadTests(StubbedAPITestCase):
    def test_health(self) -> None:
        self.leg()
        self.assertEqual(self.request("GET", "/health")[:2], (200, {"status": "ok", "legs": 1}))

    def test_calls(self) -> None:
        """Legs are listed per call, visitor first, with their counters."""
        self.leg(Role.RESIDENT)
        self.leg(Role.VISITOR)
        status, body, _ = self.request("GET", "/calls")
        self.assertEqual(status, 200)
        [call] = body["calls"]
        self.assertEqual(call["call_id"], CALL)
        self.assertEqual([leg["role"] for leg in call["legs"]], ["visitor", "resident"])
        self.assertEqual(
            set(call["legs"][0]),
            {
                "role", "state", "peer", "connected_at", "frames_in", "frames_out",
                "bytes_in", "bytes_out", "queued_ms", "dropped_frames", "dtmf", "streams",
                "level_in_dbfs", "level_out_dbfs", "voice_at",
            },
        )
        # No level measured here (no sampler): unknown, not silence.
        self.assertEqual(call["legs"][0]["level_in_dbfs"], None)
        self.assertEqual(call["legs"][0]["state"], "live")
        self.assertEqual(call["legs"][0]["frames_in"], 1)
        self.assertEqual(call["legs"][0]["bytes_in"], 19)

    def test_pageFiles(self) -> None:
        """
        The page's files, each with its type and a CSP that loads nothing from
        elsewhere: media only from the server or from blob: (a recording the
        page fetched with its token); any other name is a 404.
        """
        for name, kind in (("levels.js", "text/javascript"), ("charts.js", "text/javascript"),
                           ("recordings.js", "text/javascript"), ("style.css", "text/css")):
            response = self.successResultOf(self.stub.request("GET", f"http://api/static/{name}"))
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders("content-type"), [f"{kind}; charset=utf-8"])
            self.assertEqual(
                response.headers.getRawHeaders("content-security-policy"),
                ["default-src 'self'; media-src 'self' blob:; frame-ancestors 'none'"],
            )
        self.assertError("GET", "/static/missing.js", 404, "not_found")

    def test_hourWithoutBuckets(self) -> None:
        """An API built without the hour's buckets (a test's) says so."""
        self.assertError("GET", "/stats/hour", 404, "not_found")

    def test_callById(self) -> None:
        """A call id in any case or form finds the canonical one."""
        self.leg()
        status, body, _ = self.request("GET", "/calls/" + CALL.upper())
        self.assertEqual((status, body["call_id"]), (200, CALL))

    def test_callErrors(self) -> None:
        self.assertError("GET", "/calls/not-a-uuid", 400, "bad_call_id")
        self.assertError("GET", "/calls/" + CALL, 404, "unknown_call")

    def test_unknownRouteAndMethod(self) -> None:
        """Routing errors are JSON too, not HTML and not 500."""
        self.assertError("GET", "/nope", 404, "not_found")
        _, _, response = self.request("DELETE", "/calls")
        self.assertEqual(response.code, 405)
        self.assertIn("GET", response.headers.getRawHeaders("allow")[0])
        self.assertError("GET", f"/calls/{CALL}/hangup", 405, "method_not_allowed")


class HangupTests(StubbedAPITestCase):
    def test_oneRole(self) -> None:
        """C{role=} hangs up that leg only; the leg gets C{00 00 00}."""
        _visitor, visitor_wire = self.leg(Role.VISITOR)
        resident, resident_wire = self.leg(Role.RESIDENT)
        status, body, _ = self.request("POST", f"/calls/{CALL}/hangup?role=resident")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"call_id": CALL, "legs": [{"role": "resident", "result": "hangup_sent"}]})
        self.assertEqual(resident_wire.value(), HANGUP_FRAME)
        self.assertEqual(visitor_wire.value(), b"")
        self.assertEqual(resident.hangup_cause, HangupCause.API)

    def test_roleInBody(self) -> None:
        _, wire = self.leg(Role.RESIDENT)
        status, body, _ = self.request("POST", f"/calls/{CALL}/hangup", json={"role": "resident"})
        self.assertEqual((status, body["legs"][0]["role"]), (200, "resident"))
        self.assertEqual(wire.value(), HANGUP_FRAME)

    def test_everyLeg(self) -> None:
        """No role: every live leg of the call."""
        _, visitor_wire = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        status, body, _ = self.request("POST", f"/calls/{CALL}/hangup")
        self.assertEqual(status, 200)
        self.assertEqual([leg["role"] for leg in body["legs"]], ["visitor", "resident"])
        self.assertEqual((visitor_wire.value(), resident_wire.value()), (HANGUP_FRAME, HANGUP_FRAME))

    def test_alreadyClosing(self) -> None:
        """A second hangup succeeds without writing anything."""
        _, wire = self.leg()
        self.request("POST", f"/calls/{CALL}/hangup")
        status, body, _ = self.request("POST", f"/calls/{CALL}/hangup?role=visitor")
        self.assertEqual(status, 200)
        self.assertEqual(body["legs"], [{"role": "visitor", "result": "already_closing"}])
        self.assertEqual(wire.value(), HANGUP_FRAME)

    def test_waitForTheEnd(self) -> None:
        """C{wait=true} answers once the legs are gone, with each close reason."""
        visitor, _ = self.leg(Role.VISITOR)
        resident, _ = self.leg(Role.RESIDENT)
        pending = self.stub.post(f"http://api/calls/{CALL}/hangup?wait=true")
        self.assertNoResult(pending)
        visitor.connectionLost(Failure(ConnectionLost()))
        self.stub.flush()
        self.assertNoResult(pending)
        resident.connectionLost(Failure(ConnectionDone()))
        self.stub.flush()
        response = self.successResultOf(pending)
        body = self.successResultOf(response.json())
        self.assertEqual(
            body["legs"],
            [
                {"role": "visitor", "result": "hangup_sent", "reason": "hangup_reset"},
                {"role": "resident", "result": "hangup_sent", "reason": "hangup_clean"},
            ],
        )
        self.assertEqual(len(self.registry), 0)

    def test_validationBeforeLookup(self) -> None:
        """400 for what is malformed comes before 404 for what is unknown."""
        self.assertError("POST", "/calls/xyz/hangup", 400, "bad_call_id")
        self.assertError("POST", f"/calls/{CALL}/hangup?role=caller", 400, "bad_role")
        self.assertError("POST", f"/calls/{CALL}/hangup?wait=maybe", 400, "bad_wait")
        self.assertError("POST", f"/calls/{CALL}/hangup", 404, "unknown_call")
        self.leg(Role.VISITOR)
        self.assertError("POST", f"/calls/{CALL}/hangup?role=resident", 404, "no_live_leg")

    def test_badBodies(self) -> None:
        self.leg()
        path = f"/calls/{CALL}/hangup"
        self.assertError("POST", path, 400, "bad_json", data=b"{nope")
        self.assertError("POST", path, 400, "bad_body", data=b"[1, 2]")
        self.assertError("POST", path, 400, "unknown_field", json={"role": "visitor", "force": True})
        self.assertError("POST", path, 400, "bad_role", json={"role": 7})
        self.assertError("POST", path + "?role=visitor", 400, "bad_role", json={"role": "resident"})
        self.assertError("POST", path, 413, "body_too_large", data=b" " * (64 * 1024 + 1))

    def test_nullRoleIsRefused(self) -> None:
        """A role given as null is a bad role, not "every leg"."""
        _, wire = self.leg()
        self.assertError("POST", f"/calls/{CALL}/hangup", 400, "bad_role", json={"role": None})
        self.assertEqual(wire.value(), b"")

    def test_undecodableHeaders(self) -> None:
        """Header bytes that are not UTF-8 get a JSON answer, never a 500."""
        self.leg()
        status, _, _ = self.request(
            "POST", f"/calls/{CALL}/play", data=b"\0\0", headers={b"Content-Type": b"audio/L16;rate=\xff"}
        )
        self.assertEqual(status, 400)

    def test_apiHangupRoute(self) -> None:
        """The original system's route: role defaults to visitor."""
        _, visitor_wire = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        status, body, _ = self.request("POST", "/api/hangup", json={"call_id": CALL})
        self.assertEqual((status, body["legs"]), (200, [{"role": "visitor", "result": "hangup_sent"}]))
        self.assertEqual((visitor_wire.value(), resident_wire.value()), (HANGUP_FRAME, b""))
        status, body, _ = self.request("POST", "/api/hangup", json={"call_id": CALL, "role": "resident"})
        self.assertEqual((status, body["legs"][0]["role"]), (200, "resident"))

    def test_apiHangupErrors(self) -> None:
        self.assertError("POST", "/api/hangup", 400, "bad_body")
        self.assertError("POST", "/api/hangup", 400, "bad_call_id", json={"role": "visitor"})
        self.assertError("POST", "/api/hangup", 400, "bad_call_id", json={"call_id": "1234"})
        self.assertError("POST", "/api/hangup", 400, "bad_role", json={"call_id": CALL, "role": "x"})
        self.assertError("POST", "/api/hangup", 404, "unknown_call", json={"call_id": CALL})


L16 = {"Content-Type": "audio/L16;rate=8000"}


class PlayTests(StubbedAPITestCase):
    settings = LegSettings(max_queue_ms=200)

    def test_playQueuesFrames(self) -> None:
        """A body of raw audio becomes 20 ms frames on the leg's queue."""
        leg, wire = self.leg()
        status, body, _ = self.request("POST", f"/calls/{CALL}/play?role=visitor", data=b"\x01\x00" * 800, headers=L16)
        self.assertEqual(status, 200)
        self.assertEqual(body["legs"], [{"role": "visitor", "queued_ms": 100, "dropped_frames": 0}])
        self.assertEqual(len(leg.queue), 5)
        self.assertEqual(wire.value(), b"")
        _, listed, _ = self.request("GET", f"/calls/{CALL}")
        self.assertEqual(listed["legs"][0]["queued_ms"], 100)

    def test_overflowIsCounted(self) -> None:
        self.leg()
        self.request("POST", f"/calls/{CALL}/play", data=b"\x01\x00" * 1600, headers=L16)
        _, body, _ = self.request("POST", f"/calls/{CALL}/play", data=b"\x01\x00" * 800, headers=L16)
        self.assertEqual(body["legs"], [{"role": "visitor", "queued_ms": 200, "dropped_frames": 5}])

    def test_badAudio(self) -> None:
        """The body is checked against the legs' format before the call is looked up."""
        path = f"/calls/{CALL}/play"
        self.assertError("POST", path, 400, "wrong_rate", data=b"\0\0", headers={"Content-Type": "audio/L16;rate=16000"})
        self.assertError("POST", path, 400, "wrong_rate", data=b"\0\0", headers={"Content-Type": "audio/L16"})
        self.assertError("POST", path, 400, "bad_content_type", data=b"\0\0", headers={"Content-Type": "audio/wav"})
        self.assertError("POST", path, 400, "bad_content_type", data=b"\0\0")
        self.assertError(
            "POST", path, 400, "wrong_channels", data=b"\0\0",
            headers={"Content-Type": "audio/L16; rate=8000; channels=2"},
        )
        self.assertError("POST", path, 400, "bad_audio_length", data=b"\0\0\0", headers=L16)
        self.assertError("POST", path, 400, "empty_audio", data=b"", headers=L16)
        self.assertError("POST", path, 413, "audio_too_long", data=b"\0" * 3202, headers=L16)
        self.assertError("POST", path, 404, "unknown_call", data=b"\0\0", headers=L16)
        self.assertError("POST", path + "?role=doorman", 400, "bad_role", data=b"\0\0", headers=L16)

    def test_hangupAfterPlayout(self) -> None:
        """A leg with queued audio answers hangup_after_playout and sends nothing yet."""
        visitor, visitor_wire = self.leg(Role.VISITOR)
        _, resident_wire = self.leg(Role.RESIDENT)
        self.request("POST", f"/calls/{CALL}/play?role=visitor", data=b"\x01\x00" * 800, headers=L16)
        status, body, _ = self.request("POST", f"/calls/{CALL}/hangup?after_playout=true")
        self.assertEqual(status, 200)
        self.assertEqual(
            body["legs"],
            [
                {"role": "visitor", "result": "hangup_after_playout"},
                {"role": "resident", "result": "hangup_sent"},
            ],
        )
        self.assertEqual(visitor_wire.value(), b"")
        self.assertEqual(resident_wire.value(), HANGUP_FRAME)
        self.assertTrue(visitor.live)


class RecordsNotOpenTests(SynchronousTestCase):
    def test_recordsNotOpen(self) -> None:
        """A records store that did not open answers 503, not 500."""
        from twisted.internet import reactor

        from audiohangup.records import CallRecords

        records = CallRecords(self.mktemp(), reactor)
        stub = StubTreq(ControlAPI(Registry(), records=records).app.resource())
        response = self.successResultOf(stub.get("http://api/records"))
        body = self.successResultOf(response.json())
        self.assertEqual((response.code, body["error"]["code"]), (503, "records_unavailable"))


class RefusalTableTests(SynchronousTestCase):
    """The domain raises its own exceptions; the one table in audiohangup.http.errors says how each is answered."""

    def test_table(self) -> None:
        from audiohangup.cluster.directory import DirectoryUnavailable
        from audiohangup.cluster.forward import OwnerAnswerTooLarge, OwnerUnreachable
        from audiohangup.http.errors import ApiError, refusal
        from audiohangup.recording import AlreadyRecording, NotRecording, RecorderStopped, RecordingOff
        from audiohangup.records import BadQuery
        from audiohangup.streams.manager import (
            AlreadyConversing,
            BadStreamField,
            BadStreamURL,
            LegNotLive,
            TooManyStreams,
        )

        for error, status, code in [
            (BadStreamURL("no"), 400, "bad_url"),
            (BadStreamField("parameters", "no"), 400, "bad_parameters"),
            (LegNotLive("gone"), 404, "no_live_leg"),
            (TooManyStreams("16"), 409, "too_many_streams"),
            (AlreadyConversing("one"), 409, "already_conversing"),
            (RecordingOff("off"), 404, "recording_off"),
            (AlreadyRecording(CALL), 409, "already_recording"),
            (NotRecording(CALL), 404, "not_recording"),
            (RecorderStopped("stopping"), 503, "shutting_down"),
            (BadQuery("cursor"), 400, "bad_query"),
            (DirectoryUnavailable("down"), 503, "redis_unavailable"),
            (OwnerAnswerTooLarge("b", "http://b", "64 KiB"), 502, "owner_answer_too_large"),
            (OwnerUnreachable("b", "http://b", "refused"), 502, "owner_unreachable"),
        ]:
            answer = refusal(error)
            assert answer is not None, error
            self.assertEqual((answer.status, answer.code), (status, code), error)
        self.assertEqual(refusal(NotRecording(CALL)).message, f"call {CALL} is not being recorded")  # type: ignore[union-attr]
        self.assertEqual(
            refusal(DirectoryUnavailable("down")).message,  # type: ignore[union-attr]
            "the call directory (Redis) is unreachable: down",
        )
        own = ApiError(418, "teapot", "short and stout")
        self.assertIs(refusal(own), own)
        self.assertIsNone(refusal(ValueError("not a refusal")))  # a bug: the API's 500

    def test_oneShapeOfAnOwnersFailure(self) -> None:
        """A leg whose owner did not answer, or refused, is reported the same way by the hangup and stream routes."""
        from audiohangup.cluster.forward import OwnerUnreachable, Reply
        from audiohangup.http.api import _refused

        unreachable = Reply("visitor", "b", failure=OwnerUnreachable("b", "http://b:8080", "refused"))
        self.assertEqual(_refused(unreachable), {
            "role": "visitor", "status": 502,
            "error": {"code": "owner_unreachable", "message": "instance b at http://b:8080 did not answer: refused"},
        })
        refused = Reply("visitor", "b", 409, b'{"error": {"code": "already_conversing", "message": "one"}}')
        self.assertEqual(
            _refused(refused),
            {"role": "visitor", "status": 409, "error": {"code": "already_conversing", "message": "one"}},
        )
        garbled = Reply("resident", "b", 500, b"<html>")
        self.assertEqual(
            _refused(garbled),
            {"role": "resident", "status": 500, "error": {"code": "owner_error", "message": "the owner answered 500"}},
        )


class OddQueuePlayTests(StubbedAPITestCase):
    settings = LegSettings(max_queue_ms=110)  # not a whole number of 20 ms frames

    def test_playFitsTheQueueWhole(self) -> None:
        """/play takes only what the queue holds whole: never drops the start of a prompt."""
        self.leg()
        status, body, _ = self.request("POST", f"/calls/{CALL}/play", data=b"\x01\x00" * 800, headers=L16)
        self.assertEqual((status, body["legs"][0]["dropped_frames"]), (200, 0))
        self.assertError("POST", f"/calls/{CALL}/play", 413, "audio_too_long", data=b"\x01\x00" * 880, headers=L16)


class G711PlayTests(StubbedAPITestCase):
    settings = LegSettings(audio=FORMATS["ulaw"])

    def test_pcmu(self) -> None:
        _leg, _ = self.leg()
        status, body, _ = self.request(
            "POST", f"/calls/{CALL}/play", data=b"\x7f" * 161, headers={"Content-Type": "audio/PCMU"}
        )
        self.assertEqual((status, body["legs"][0]["queued_ms"]), (200, 40))
        self.assertError("POST", f"/calls/{CALL}/play", 400, "bad_content_type", data=b"\x7f", headers=L16)


class AuthTests(StubbedAPITestCase):
    token = TOKEN

    def test_undecodableToken(self) -> None:
        self.assertError("GET", "/calls", 401, "unauthorized", headers={b"Authorization": b"Bearer \xff\xfe"})

    def test_healthIsOpen(self) -> None:
        self.assertEqual(self.request("GET", "/health")[0], 200)

    def test_everyOtherRouteNeedsTheToken(self) -> None:
        _, wire = self.leg()
        for method, path in [
            ("GET", "/calls"),
            ("GET", f"/calls/{CALL}"),
            ("POST", f"/calls/{CALL}/hangup"),
            ("POST", "/api/hangup"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                body = self.assertError(method, path, 401, "unauthorized", headers=headers)
                self.assertIn("Bearer", body["error"]["message"])
        self.assertEqual(wire.value(), b"")
        status, _, _ = self.request("GET", "/calls", headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 200)
        status, _, _ = self.request(
            "POST", f"/calls/{CALL}/hangup", headers={"Authorization": f"bearer {TOKEN}"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(wire.value(), HANGUP_FRAME)


# Over a real listening port, with real legs.


async def post(url: str, **kwargs: Any) -> tuple[int, Any]:
    response = await treq.post(url, persistent=False, **kwargs)
    return response.code, await response.json()


async def get(url: str, **kwargs: Any) -> tuple[int, Any]:
    response = await treq.get(url, persistent=False, **kwargs)
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_hangup_over_http_with_a_resetting_peer(server: Server, logs: LogCapture) -> None:
    """A leg that resets the moment it reads our hangup is still a success."""
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="reset")
    client.send_uuid(call_id)
    await until(lambda: len(server.registry) == 1)
    status, body = await post(f"{server.url}/calls/{call_id}/hangup?role=visitor&wait=true")
    assert status == 200
    assert body["legs"] == [{"role": "visitor", "result": "hangup_sent", "reason": "hangup_reset"}]
    await client.closed
    assert client.ended_with_single_hangup()
    assert (await get(f"{server.url}/health"))[1] == {"status": "ok", "legs": 0}


@pytest_twisted.ensureDeferred
async def test_api_hangup_route_and_auth_over_http(make_server: Any, logs: LogCapture) -> None:
    server = await make_server(api_token=TOKEN, on_leg_end="keep")
    call_id = uuid.uuid4()
    visitor = await connect(server.port("visitor"), on_hangup="close")
    resident = await connect(server.port("resident"), on_hangup="close")
    visitor.send_uuid(call_id)
    resident.send_uuid(call_id)
    await until(lambda: len(server.registry) == 2)
    assert (await post(f"{server.url}/api/hangup", json={"call_id": str(call_id)}))[0] == 401
    assert (await get(f"{server.url}/health"))[0] == 200
    status, body = await post(
        f"{server.url}/api/hangup?wait=true",
        json={"call_id": str(call_id)},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    assert body["legs"] == [{"role": "visitor", "result": "hangup_sent", "reason": "hangup_clean"}]
    await visitor.closed
    # The resident stays (on_leg_end=keep): no 00 00 00 reached it, its leg
    # is live, and the pacer's audio keeps reaching it.
    heard = len(resident.frames)
    await until(lambda: len(resident.frames) >= heard + 3, what="three more frames to the resident")
    assert resident.hangup_frames == 0 and not resident.got_hangup
    resident_leg = server.registry.get(str(call_id), Role.RESIDENT)
    assert resident_leg is not None and resident_leg.live
    status, body = await get(f"{server.url}/calls", headers={"Authorization": f"Bearer {TOKEN}"})
    assert [leg["role"] for leg in body["calls"][0]["legs"]] == ["resident"]
    resident.close()
    await until(lambda: len(server.registry) == 0)


@pytest_twisted.ensureDeferred
async def test_hundred_concurrent_legs_hung_up_through_the_api(server: Server, logs: LogCapture) -> None:
    """50 calls of two legs, each hung up over HTTP at once; every leg ends, none is left."""
    calls = [uuid.uuid4() for _ in range(50)]
    clients = []
    for index, call_id in enumerate(calls):
        for role in ("visitor", "resident"):
            client = await connect(server.port(role), on_hangup="reset" if index % 2 else "close")
            client.send_uuid(call_id)
            clients.append(client)
    await until(lambda: len(server.registry) == 100, what="100 legs")
    answers = await gatherResults(
        [ensureDeferred(post(f"{server.url}/calls/{call_id}/hangup?wait=true")) for call_id in calls]
    )
    assert all(status == 200 for status, _ in answers)
    reasons = [leg["reason"] for _, body in answers for leg in body["legs"]]
    assert sorted(set(reasons)) == ["hangup_clean", "hangup_reset"]
    assert len(reasons) == 100
    await gatherResults([client.closed for client in clients])
    assert all(client.ended_with_single_hangup() for client in clients)
    assert len(server.registry) == 0 and server.registry.connections() == []
    assert len(logs.ended()) == 100
