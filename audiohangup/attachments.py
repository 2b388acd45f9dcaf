# -*- test-case-name: tests.test_protocol,tests.test_link -*-
"""
What the server's parts attach to a leg (taps, a feed, streams, a
recording's name), the one way they do it: a leg on this instance
(L{audiohangup.protocol}) and a leg held through the media link
(L{audiohangup.cluster.remoteleg}) keep them alike, and no part writes a
leg's attributes. Pure code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audiohangup.audio import Playout
    from audiohangup.interfaces import ILegTap, IMediaStream


class LegAttachments:
    """
    The methods; the leg class that mixes them in holds the attributes (the
    protocol in its slots: this mixin adds none, and Twisted's C{Protocol}
    gives its instances a dict already).
    """

    feed: Playout | None
    taps: list[ILegTap]
    heard: list[ILegTap]
    streams: list[IMediaStream]
    recording: str | None

    def addTap(self, tap: ILegTap, heard: bool = False) -> None:
        (self.heard if heard else self.taps).append(tap)

    def removeTap(self, tap: ILegTap) -> None:
        for taps in (self.taps, self.heard):
            if tap in taps:
                taps.remove(tap)

    def attachFeed(self, feed: Playout) -> None:
        self.feed = feed

    def detachFeed(self, feed: Playout) -> None:
        if self.feed is feed:
            self.feed = None

    def addStream(self, stream: IMediaStream) -> None:
        self.streams.append(stream)

    def setRecording(self, name: str) -> None:
        self.recording = name
