# -*- test-case-name: tests.test_api,tests.test_http_edge,tests.test_security,tests.test_page -*-
"""
The HTTP API, and the only part of audiohangup that knows status codes:
L{api} (the Klein routes, nothing else), L{request} (what a request says,
read and checked), L{errors} (the one table from the domain's exceptions to
a status and an error code), L{answers} (how answers are written), L{site}
(the Site: deadlines, bounds, Host and Origin checks, the throttle's 429),
L{access} (tokens and the failed-auth throttle), L{hosts} (the names it
answers to) and C{web/} (the live page). Only the wiring imports it.
"""
