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


def exposed(mode: int) -> bool:
    """
    Whether a secret file's C{mode} lets others at it: anyone at all (the
    last octal digit), or its group writing it. A group may read it (0640,
    C{root:audiohangup}, as PostgreSQL and OpenSSH allow their keys): a group
    is the operator's own choice of who else shares the secret.
    """
    return bool(mode & 0o027)


def from_file(path: str, *, insecure: bool = False) -> str:
    """
    The secret in C{path}: its text without the trailing newline an editor or
    C{echo} leaves; ValueError if it cannot be read, is empty, or is
    L{exposed} (as a tokens file) unless C{insecure} (--insecure-files) says
    it may be.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if exposed(mode) and not insecure:
                raise ValueError(
                    f"{path}: mode {stat.S_IMODE(mode):04o} lets others read it or its group write it: "
                    "chmod 600 (or 640) it, or pass --insecure-files"
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
