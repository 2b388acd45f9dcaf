# -*- test-case-name: tests.test_tap -*-
"""
Secrets from a file or the environment, so that none has to be on the
command line, which every local user reads in C{/proc/PID/cmdline}.

Errors name the file or the variable, never what it holds.
"""

from __future__ import annotations

import os
import stat

#: A secret file longer than this is not a secret file (a wrong path, say).
MAX_SECRET_BYTES = 64 * 1024


def from_file(path: str, *, insecure: bool = False) -> str:
    """
    The secret in C{path}: its text without the trailing newline an editor or
    C{echo} leaves; ValueError if it cannot be read, is empty, or group or
    others may read or write it (as a tokens file) unless C{insecure}
    (--insecure-files) says they may.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o077 and not insecure:
                raise ValueError(
                    f"{path}: mode {stat.S_IMODE(mode):04o} lets group or others at the secret: "
                    "chmod 600 it (or pass --insecure-files)"
                )
            data = file.read(MAX_SECRET_BYTES + 1)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"{path} is over {MAX_SECRET_BYTES} bytes: not a secret file")
    try:
        secret = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def from_environment(variable: str) -> str:
    """The secret in C{$variable}; ValueError if it is not set, or empty."""
    secret = os.environ.get(variable)
    if secret is None:
        raise ValueError(f"${variable} is not set")
    if not secret:
        raise ValueError(f"${variable} is empty")
    return secret
