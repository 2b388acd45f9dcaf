# -*- test-case-name: tests.test_wiring,tests.test_flows -*-
"""
What the parts of audiohangup may use of each other, as zope interfaces.

A leg is one AudioSocket connection (L{audiohangup.protocol} provides it).
Flows know it as an L{ILeg}: what they may do with a leg. The server's own
parts (the registry, the observers, the API, the recorder, the media
streams) know it as an L{IServerLeg}, and the pacer as an L{IPacedLeg}; none
of them writes its attributes, none imports the protocol, and a test can hand
them any object that provides the interface.

Ground level: this module imports only pure modules (wire, audio, reasons).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# treq names the reactor its requests need (IReactorTCP, IReactorTime and
# IReactorPluggableNameResolver) only privately; deriving from it is what
# lets our reactor be handed to treq as it is.
from treq._types import _ITreqReactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFDSet, IReactorFromThreads
from zope.interface import Attribute, Interface

from audiohangup.audio import AudioFormat, FrameQueue, Playout
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.wire import Frame


class IReactor(IReactorCore, IReactorFromThreads, IReactorFDSet, _ITreqReactor):
    """
    The reactor the service runs on, as its parts use it: listeners, timers,
    outbound HTTP (webhooks, forwarding), start-up/shutdown triggers and the
    relay's one descriptor.
    Any of Twisted's own reactors provides it.
    """


class ILeg(Interface):
    """
    One AudioSocket leg, as a flow uses it. Every method runs on the reactor
    thread. Nothing is ever written to a leg after C{00 00 00}.
    """

    role: Role = Attribute("The part it plays in its call; each role has its own listening port.")
    call_id: str | None = Attribute("The call id from its UUID frame; None until that frame arrived.")
    format: AudioFormat = Attribute("The audio format it carries, both ways.")
    live: bool = Attribute("True from its UUID until a hangup or a close decision: it takes audio.")
    dtmf: str = Attribute("The last DTMF digits received, oldest first.")

    def forward(frame: Frame) -> None:
        """
        Bridge a frame from another leg: written at once if nothing was written
        in this tick's slot, else held for the next tick (or dropped: queued
        audio, and the app's audio under C{--stream-audio floor}, have the floor).
        """

    def forwardBytes(data: bytes) -> None:
        """L{forward} for one frame still encoded: the bytes as they arrived on the other leg."""

    def bridgeTo(other: ILeg | None) -> None:
        """
        Forward this leg's own audio to C{other}, byte for byte, without a
        flow call per frame (the built-in bridge: two legs, one format);
        None ends that, and every frame goes to the flow again.
        """

    def queueFrames(frames: list[bytes]) -> int:
        """Queue encoded frames for the pacer; return how many old ones were dropped."""

    def play(audio: bytes) -> int:
        """Queue raw audio in the leg's format, cut into 20 ms frames; return frames dropped."""

    def hangup(cause: HangupCause) -> Deferred[CloseReason]:
        """Send C{00 00 00} once and close, bounded; fires with the close reason once gone."""

    def hangupAfterPlayout(cause: HangupCause = HangupCause.API) -> Deferred[CloseReason]:
        """Hang up once the queued audio has played (bounded by the playout timeout)."""

    def whenGone() -> Deferred[CloseReason]:
        """Fires with the close reason once the leg is gone."""


class IServerLeg(ILeg):
    """
    A connection, and once its UUID arrived a leg, as the server's own parts
    use it: the registry, the observers (metrics, records, webhooks, the call
    directory), the API, the recorder and the media streams. They read its
    facts and change it only through its methods.
    """

    peer: str = Attribute("The peer's address, as log lines show it (host:port).")
    state: str = Attribute("awaiting_uuid, live, closing or closed.")
    queue: FrameQueue = Attribute("Encoded frames waiting for the pacer, oldest first (its C{dropped} counts).")
    queued_ms: int = Attribute("Milliseconds of audio in C{queue}.")
    connected_at: float = Attribute("When the connection was made (reactor seconds).")
    ended_at: float | None = Attribute("When the connection went away; None while it is open.")
    frames_in: int = Attribute("Frames received.")
    frames_out: int = Attribute("Frames written.")
    bytes_in: int = Attribute("Bytes received.")
    bytes_out: int = Attribute("Bytes written.")
    dtmf_count: int = Attribute("DTMF digits received.")
    hangup_cause: HangupCause | None = Attribute("Why we sent C{00 00 00}; None if we did not.")
    close_reason: CloseReason | None = Attribute("How it ended; None while it is open.")
    hangup_to_close_ms: float | None = Attribute("From our hangup to the leg being gone, once both happened.")
    recording: str | None = Attribute("The file of its call's recording (relative to the recordings), if any.")
    streams: list[IMediaStream] = Attribute("The media streams this leg has had, live and ended, oldest first.")
    last_in: bytes | Frame | None = Attribute(
        "The last audio frame received, encoded or parsed (the level meters sample it); None before any."
    )
    last_out: bytes | None = Attribute("The last frame written, encoded (the level meters sample it); None before any.")
    feed: Playout | None = Attribute(
        "Audio an application sends the leg (a converse stream), paced after queued prompts; None without one."
    )

    def addTap(tap: ILegTap, heard: bool = False) -> None:
        """
        Tell C{tap} of every frame and digit the leg receives, after its flow;
        or, C{heard}, of every frame written to it (C{legHeard}): what it hears.
        """

    def removeTap(tap: ILegTap) -> None:
        """Tell C{tap} nothing more. Idempotent."""

    def attachFeed(feed: Playout) -> None:
        """Play C{feed} to the leg, paced after queued prompts: one feed at a time (check C{feed} first)."""

    def detachFeed(feed: Playout) -> None:
        """Play nothing more of C{feed}, if it is the leg's feed. Idempotent."""

    def addStream(stream: IMediaStream) -> None:
        """Keep C{stream} in the leg's history (the API shows it, the call record keeps it)."""

    def setRecording(name: str) -> None:
        """The leg is recorded into C{name} (relative to the recordings)."""

    def crowdOut(detail: str) -> None:
        """Close a connection still without its UUID, as C{too_many_pending}: a newer one needs its place."""

    def bytesWaiting() -> bool:
        """
        Whether bytes wait unread in the kernel for this connection: after a
        stall, a UUID the reactor has not read yet, so not a connection to
        crowd out.
        """


class IRemoteLeg(IServerLeg):
    """
    A leg whose connection is held by another instance of the cluster,
    joined to its session here through the media link
    (L{audiohangup.cluster.link}). The directory leaves it out: it lists
    where a connection is, and this one is on C{instance_id}.
    """

    instance_id: str = Attribute("The instance that holds the leg's connection.")


class IPacedLeg(IServerLeg):
    """
    A leg as the shared pacer sees it. The pacer decides the common case (a
    bridged leg, nothing queued, fed or held, not idle) from these attributes
    alone, and calls C{paceTick} for any other leg.
    """

    forwarded_at: float = Attribute("When audio was last bridged to it (reactor seconds).")
    last_frame_at: float = Attribute("When its peer last sent a frame (reactor seconds).")
    idle_after: float = Attribute("Seconds without a frame before the idle hangup (inf: never).")
    held: deque[bytes] = Attribute("Bridged frames held for the next tick: its slot had a frame already.")

    def paceTick(now: float, bridged_since: float, missed: int) -> None:
        """One 20 ms tick: the idle check, then at most one frame; C{missed} slots were skipped before it."""


class ILegTap(Interface):
    """
    Hears what a leg receives, besides its flow: a media stream, a
    recording. Called on the reactor for every frame; must not block.
    """

    def legAudio(frame: Frame) -> None:
        """An audio frame arrived on the leg."""

    def legDtmf(digit: str) -> None:
        """A DTMF digit arrived on the leg."""

    def legHeard(data: bytes) -> None:
        """An encoded frame was written to the leg (only taps in its C{heard} list are told)."""


class IMediaStream(Interface):
    """A leg's audio to and from an application over WebSocket, as the leg, the API and the records show it."""

    stream_id: str = Attribute("Unique; the id the API's routes take.")

    def snapshot() -> dict[str, Any]:
        """C{stream_id}, C{url} (without its query), C{protocol}, C{mode}, C{state}."""

    def record() -> dict[str, Any]:
        """What the leg's call record keeps of it: url, protocol, mode, outcome."""


class ISession(Interface):
    """The live legs sharing a call id, and the flow that runs them."""

    call_id: str = Attribute("The call id its legs share.")
    legs: Mapping[Role, ILeg] = Attribute("Its live legs by role; a flow may read, never change it.")

    def others(leg: ILeg) -> Sequence[ILeg]:
        """The session's other legs that can still take audio."""

    def ordered() -> Sequence[ILeg]:
        """The legs, visitor first."""

    def hangup(cause: HangupCause) -> Deferred[list[CloseReason]]:
        """Hang up every leg; fires with their close reasons once all are gone."""


class IFlow(Interface):
    """What a session does with its legs. Called on the reactor thread; must not block."""

    def legJoined(session: ISession, leg: ILeg) -> None:
        """A leg's UUID arrived and it is now part of C{session}."""

    def audioReceived(session: ISession, leg: ILeg, frame: Frame) -> None:
        """An audio frame arrived on C{leg}."""

    def dtmfReceived(session: ISession, leg: ILeg, digit: str) -> None:
        """A DTMF digit arrived on C{leg} (it is already kept on the leg)."""

    def legEnded(session: ISession, leg: ILeg, reason: CloseReason) -> None:
        """C{leg} is gone, with C{reason}; the session's other legs may still be live."""


#: Makes the flow of one new session.
FlowFactory = Callable[[], IFlow]


class ILegObserver(Interface):
    """Told of every leg's life, synchronously on the reactor; must not block."""

    def legStarted(leg: IServerLeg) -> None:
        """A leg's UUID arrived: it has a call id and a role."""

    def hangupSent(leg: IServerLeg, cause: HangupCause) -> None:
        """We wrote C{00 00 00} to the leg."""

    def legEnded(leg: IServerLeg) -> None:
        """A leg that had started is gone; C{leg.close_reason} says how."""

    def callEnded(call_id: str) -> None:
        """The last leg of a call id is gone."""

    def connectionEnded(connection: IServerLeg) -> None:
        """A connection ended before it became a leg (no UUID: refused, timed out, closed)."""
