"""
audiohangup: an AudioSocket server for Asterisk, built on Twisted.

Modules, from the wire up: L{wire} (frame format), L{reasons} (close reasons
and hangup causes), L{protocol} (one leg's connection), L{registry} (live legs
by call id and role), L{http} (the HTTP API), L{service} (wiring and shutdown)
and L{tap} (the C{twistd audiohangup} options).
"""

__version__ = "0.2.0.dev0"
