import uuid
import pytest_twisted
from tests.fake_asterisk import connect
from tests.conftest import until

@pytest_twisted.ensureDeferred
async def test_smoke(server, logs):
    cid = uuid.uuid4()
    leg = await connect(server.port("visitor"))
    await leg.send_split(leg and __import__("audiohangup.wire", fromlist=["x"]).encode_uuid(cid), [1, 5, 17])
    proto = await until(lambda: server.registry.get(str(cid), __import__("audiohangup.reasons", fromlist=["x"]).Role.VISITOR))
    d = proto.hangup(__import__("audiohangup.reasons", fromlist=["x"]).HangupCause.API)
    reason = await d
    assert reason == "hangup_reset"
    await leg.closed
    assert leg.ended_with_single_hangup()
    assert len(server.registry) == 0
    print(logs.texts())
