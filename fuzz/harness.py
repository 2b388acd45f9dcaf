"""
What both fuzz targets share: the working tree on C{sys.path}, atheris when
it is installed (each target stays importable, and a crash replayable,
without it), a record of every failure logged while an input runs, the
transport that keeps each write apart, and the entry point.

The targets are run as scripts (C{python fuzz/fuzz_http.py ...}), so this
directory is first on C{sys.path} and they import this module as C{harness}.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

# The working tree, not an installed copy, is what is fuzzed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import atheris
except ImportError:  # importable (and replayable) without atheris
    atheris = None

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner, globalLogPublisher
from twisted.python.failure import Failure


def instrumented(name: str) -> ContextManager[object]:
    """
    Import audiohangup's modules inside this to give atheris their coverage,
    when the target named C{name} runs as the fuzzer (C{"__main__"}).
    """
    if atheris is not None and name == "__main__":
        return atheris.instrument_imports(include=["audiohangup"])  # type: ignore[no-any-return]
    return contextlib.nullcontext()


#: Every failure logged since a target last cleared it: an input must cause none.
failures: list[dict[str, Any]] = []


def _observe(event: dict[str, Any]) -> None:
    # twisted.logger's failure() sets log_failure; the legacy log.err() (which
    # Klein and Twisted Web still use) sets failure and isError instead.
    if "log_failure" in event or (event.get("isError") and "failure" in event):
        failures.append(event)


def failure_of(event: dict[str, Any]) -> Failure:
    return event.get("log_failure") or event["failure"]  # type: ignore[no-any-return]


globalLogPublisher.addObserver(_observe)


class Wire(StringTransport):
    """Keeps each write apart, and what came after the connection was closing or gone."""

    def __init__(self, port: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.writes: list[bytes] = []
        self.late: list[bytes] = []
        self.lost = False

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.lost:
            self.late.append(data)
        self.writes.append(data)
        super().write(data)


def main(test_one_input: Callable[[bytes], None]) -> None:
    if atheris is None:
        sys.exit("pip install atheris to fuzz; TestOneInput can be imported and called without it")
    # Events still reach the observer above; this only stops Twisted's
    # start-up buffer from holding them and its stderr echo of errors.
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
