"""A media stream app: greets each caller, echoes what it hears, hangs up on #."""
import base64
import json
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
# Raw μ-law at 8 kHz, e.g. `sox hello.wav -r 8000 -c 1 -t ul greeting.ulaw`.
GREETING = open(sys.argv[2] if len(sys.argv) > 2 else "greeting.ulaw", "rb").read()


class Caller(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        message = json.loads(payload)
        if message["event"] == "start":
            print("stream", message["start"]["callSid"], message["start"]["customParameters"]["role"], flush=True)
            self.send("media", media={"payload": base64.b64encode(GREETING).decode()})
            self.send("mark", mark={"name": "greeted"})
        elif message["event"] == "media":  # the caller's voice, 20 ms at a time: say it back
            self.send("media", media={"payload": message["media"]["payload"]})
        elif message["event"] == "dtmf" and message["dtmf"]["digit"] == "#":
            self.send("hangup", afterPlayout=True)
        elif message["event"] == "mark":
            print("played", message["mark"]["name"], flush=True)

    def send(self, event, **fields):
        self.sendMessage(json.dumps({"event": event, **fields}).encode())


factory = WebSocketServerFactory()
factory.protocol = Caller
reactor.listenTCP(PORT, factory, interface="127.0.0.1")
print("listening on", PORT, flush=True)
reactor.run()
