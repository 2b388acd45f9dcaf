# -*- test-case-name: tests.test_streams,tests.test_stream_rules -*-
"""
Media streams: a leg's audio to and from any application over WebSocket.

C{messages}: what both protocols share; C{twilio} and C{native}: the two
protocols (pure); C{stream}: one stream's rules; C{client}: the autobahn
WebSocket client under it; C{manager}: every stream of the instance.
"""
