# -*- test-case-name: tests.test_directory,tests.test_cluster -*-
"""
Several instances behind one API.

- L{audiohangup.cluster.redis}: where Redis is (its URL), and the one
  connection to it, a ClientService that hands out only connections Redis
  answers on.
- L{audiohangup.cluster.directory}: the call directory in Redis (keys, Lua
  scripts, heartbeats, queries): which instance holds which leg.
- L{audiohangup.cluster.forward}: a control request for a leg another
  instance holds, forwarded to it.

Nothing is re-exported here: import from the module that holds a name.
"""
