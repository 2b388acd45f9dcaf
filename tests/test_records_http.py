"""GET /records over a real server: a record per leg, filters, pages, errors."""

from __future__ import annotations

import uuid
from typing import Any

import pytest_twisted
import treq
from twisted.internet.task import deferLater

from audiohangup.reasons import HangupCause, Role
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import SILENCE_20MS, connect


async def get(server: Server, path: str) -> tuple[int, Any]:
    response = await treq.get(server.url + path, persistent=False)
    return response.code, await response.json()


async def records_settled(server: Server, count: int) -> list[dict]:
    """Poll until C{count} records are complete: the writes run on their own thread."""
    from twisted.internet import reactor

    for _ in range(500):
        _, body = await get(server, "/records?limit=500")
        records = body["records"]
        if len(records) == count and all(record["ended_at"] for record in records):
            return records
        await deferLater(reactor, 0.01)
    raise AssertionError(f"records did not settle: {records}")


@pytest_twisted.ensureDeferred
async def test_records_of_finished_legs(make_server: Any, logs: LogCapture) -> None:
    server = await make_server(on_leg_end="keep")
    call = uuid.uuid4()
    visitor = await connect(server.port("visitor"), on_hangup="reset")
    resident = await connect(server.port("resident"))
    visitor.send_uuid(call)
    resident.send_uuid(call)
    await until(lambda: len(server.registry) == 2)
    resident.send(SILENCE_20MS * 2 + b"\x03\x00\x019")
    leg = server.registry.get(str(call), Role.RESIDENT)
    await until(lambda: leg.dtmf == "9")
    await server.registry.get(str(call), Role.VISITOR).hangup(HangupCause.API)
    resident.close()
    await leg.whenGone()
    records = await records_settled(server, 2)

    by_role = {record["role"]: record for record in records}
    assert by_role["visitor"]["reason"] == "hangup_reset"
    assert by_role["visitor"]["cause"] == "api"
    assert by_role["visitor"]["hangup_to_close_ms"] >= 0
    assert by_role["resident"]["reason"] == "peer_closed"
    assert by_role["resident"]["cause"] is None
    assert by_role["resident"]["dtmf"] == "9"
    assert by_role["resident"]["frames_in"] == 4
    assert by_role["resident"]["bytes_in"] == 19 + 2 * len(SILENCE_20MS) + 4
    assert set(by_role["visitor"]) == {
        "call_id", "role", "peer", "started_at", "ended_at", "reason", "cause", "frames_in",
        "frames_out", "bytes_in", "bytes_out", "dtmf", "hangup_to_close_ms", "streams", "recording",
    }

    assert [r["role"] for r in (await get(server, f"/records?call_id={call}&role=resident"))[1]["records"]] == [
        "resident"
    ]
    assert (await get(server, "/records?reason=hangup_reset"))[1]["records"][0]["role"] == "visitor"
    assert (await get(server, "/records?since=2100-01-01T00:00:00Z"))[1]["records"] == []
    assert len((await get(server, "/records?until=4102444800"))[1]["records"]) == 2


@pytest_twisted.ensureDeferred
async def test_pages_and_errors(make_server: Any, logs: LogCapture) -> None:
    server = await make_server()
    clients = []
    for _ in range(5):
        client = await connect(server.port("visitor"))
        client.send_uuid(uuid.uuid4())
        clients.append(client)
    await until(lambda: len(server.registry) == 5)
    for client in clients:
        client.close()
    await records_settled(server, 5)

    seen: list[str] = []
    path = "/records?limit=2"
    while path:
        status, body = await get(server, path)
        assert status == 200
        seen += [r["call_id"] for r in body["records"]]
        path = f"/records?limit=2&cursor={body['next_cursor']}" if body["next_cursor"] else ""
    assert len(seen) == len(set(seen)) == 5

    for query, code in [
        ("cursor=not-a-cursor", "bad_query"),
        ("limit=0", "bad_limit"),
        ("since=yesterday", "bad_since"),
        ("call_id=42", "bad_call_id"),
        ("role=doorman", "bad_query"),
    ]:
        status, body = await get(server, "/records?" + query)
        assert (status, body["error"]["code"]) == (400, code), query

    off = await make_server(records="none")
    status, body = await get(off, "/records")
    assert (status, body["error"]["code"]) == (404, "records_off")


@pytest_twisted.ensureDeferred
async def test_recordings_listed_paged_and_searched(make_server: Any, logs: LogCapture, tmp_path: Any) -> None:
    """
    GET /recordings: one entry per file (a call's two legs name one), newest
    first, with its bytes and seconds from the file; paged by cursor; found
    by call id; a file gone from the disk has no size; errors are named.
    """
    server = await make_server(record_every_call=True, record_dir=str(tmp_path / "rec"))
    calls = []
    for _ in range(3):
        call = uuid.uuid4()
        visitor, resident = await connect(server.port("visitor")), await connect(server.port("resident"))
        visitor.send_uuid(call)
        resident.send_uuid(call)
        await until(lambda: len(server.registry) == 2)
        visitor.send(SILENCE_20MS * 10)
        visitor.close()
        resident.close()
        await until(lambda: len(server.registry) == 0 and not server.service.recorder.active)
        calls.append(str(call))
    await records_settled(server, 6)

    status, body = await get(server, "/recordings")
    assert status == 200
    assert [entry["call_id"] for entry in body["recordings"]] == calls[::-1]
    assert body["next_cursor"] is None
    newest = body["recordings"][0]
    assert newest["file"].endswith(f"/{calls[-1]}.wav") and newest["ended_at"] is not None
    assert newest["bytes"] > 44 and newest["seconds"] > 0

    status, first = await get(server, "/recordings?limit=2")
    assert [entry["call_id"] for entry in first["recordings"]] == calls[:0:-1]
    status, second = await get(server, f"/recordings?limit=2&cursor={first['next_cursor']}")
    assert [entry["call_id"] for entry in second["recordings"]] == calls[:1]
    assert second["next_cursor"] is None

    status, found = await get(server, f"/recordings?call_id={calls[1].upper()}")
    assert [entry["call_id"] for entry in found["recordings"]] == [calls[1]]

    (tmp_path / "rec" / found["recordings"][0]["file"]).unlink()
    status, gone = await get(server, f"/recordings?call_id={calls[1]}")
    assert (gone["recordings"][0]["bytes"], gone["recordings"][0]["seconds"]) == (None, None)

    assert (await get(server, "/recordings?cursor=nonsense"))[0] == 400
    assert (await get(server, "/recordings?call_id=nope"))[1]["error"]["code"] == "bad_call_id"
    assert (await get(server, "/recordings?limit=0"))[0] == 400


@pytest_twisted.ensureDeferred
async def test_recordings_need_the_records(make_server: Any, logs: LogCapture) -> None:
    server = await make_server(records="none")
    status, body = await get(server, "/recordings")
    assert (status, body["error"]["code"]) == (404, "records_off")


@pytest_twisted.ensureDeferred
async def test_stats_hour(make_server: Any, logs: LogCapture) -> None:
    """GET /stats/hour: sixty minutes, the current one holding this test's legs and their reasons."""
    server = await make_server()
    call = uuid.uuid4()
    visitor = await connect(server.port("visitor"), on_hangup="close")
    visitor.send_uuid(call)
    await until(lambda: len(server.registry) == 1)
    await server.registry.get(str(call), Role.VISITOR).hangup(HangupCause.API)
    status, body = await get(server, "/stats/hour")
    assert status == 200 and len(body["minutes"]) == 60
    totals: dict[str, int] = {}
    for minute in body["minutes"]:
        for reason, count in minute["legs_ended"].items():
            totals[reason] = totals.get(reason, 0) + count
    assert sum(minute["legs_started"] for minute in body["minutes"]) == 1
    assert totals == {"hangup_clean": 1}
    assert body["minutes"][-1]["live_legs"]["last"] == 0
