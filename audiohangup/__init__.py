# -*- test-case-name: tests.test_packaging,tests.test_wiring -*-
"""
audiohangup: an AudioSocket server for Asterisk, built on Twisted.

The call plane, flat at the top, from the wire up: L{wire} (the frame
format), L{reasons} (close reasons and hangup causes), L{audio} and
L{codecs}, L{protocol} (one leg's connection, with its L{timeline} and its
L{teardown}), L{registry}, L{session} and L{flows} (legs grouped in calls,
and what a call does with its audio), L{pacer} (the 20 ms tick) and L{relay}
(the legs' reads). Around it, one module or subpackage per feature:
L{events}, L{metrics}, L{records}, L{webhooks}, L{recording}, L{streams},
L{cluster}, L{listeners}, L{sources}, L{logs}, L{credentials} and L{http}
(the HTTP API, the only part that knows status codes). L{lifecycle} is what
their starts and stops share; L{service} wires them, and L{tap} holds the
C{twistd audiohangup} options. README.rst's "Development" draws the tree.
"""

__version__ = "0.2.0.dev0"
