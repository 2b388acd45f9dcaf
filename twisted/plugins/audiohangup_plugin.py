"""twistd drop-in: C{twistd -n audiohangup}. Lazy, so a plugin scan imports nothing of ours."""

from twisted.application.service import ServiceMaker

audiohangup = ServiceMaker(
    "audiohangup",  # name
    "audiohangup.tap",  # module with Options and makeService
    "AudioSocket server for Asterisk with reason-aware teardown and a hangup API",  # description
    "audiohangup",  # tapname
)
