# -*- test-case-name: tests.test_config -*-
"""
The configuration file (C{--config FILE}, TOML): one key per option, named
as the option is, so that C{--help}, the README and the file use one name.

The keys are derived from the options themselves (L{keys_of}): an option
added to C{Options} has its key with no work here. Parameters take a string
or a number (C{max-legs = 200}), flags a boolean, options given once per
value (C{--webhook}) an array; options whose value is a comma-separated list
(C{--allow}) take an array too. Keys are spelt with dashes, as the options
are: an underscore spelling is refused with the dashed one named, so one file
never says one thing two ways.

Sans-IO: L{parse} turns the file's text into each option's arguments, every
value checked by the option's own coerce function; C{tap.Options} reads the
file and applies them under the command line's.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the same parser, as a backport
    import tomli as tomllib

from twisted.python import reflect, usage

#: Keys whose values are secrets: the file holding any of them should be its owner's alone (0600). The
#: C{-file} keys (api-tokens-file, webhook-secret-file, stream-secret-file, redis-password-file,
#: stream-header-file) name files instead, which are checked as on the command line.
SECRET_KEYS = ("api-token", "webhook-secret", "stream-secret", "stream-header")

#: Keys that no file can hold: the file itself.
NOT_IN_FILE = {"config": "a configuration file cannot name another one"}


class ConfigError(ValueError):
    """A file that cannot be taken; the message names the file, the key and its line, never a value."""


@dataclass(frozen=True)
class Keys:
    """What each key of the file is, from the options: their names are the keys."""

    #: Parameters and their coerce functions (None: taken as a string).
    parameters: Mapping[str, Callable[[str], Any] | None]
    flags: frozenset[str]
    #: Options given once per value (an C{opt_} method that takes one): an array in the file.
    repeatable: frozenset[str]
    #: Parameters whose value is a comma-separated list: an array is joined with commas.
    comma_lists: frozenset[str] = frozenset()
    #: Keys refused, and what to say instead (old spellings, the file itself).
    refused: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted({*self.parameters, *self.flags, *self.repeatable})


def keys_of(
    options: type[usage.Options], *, comma_lists: Iterable[str] = (), refused: Mapping[str, str] = {}
) -> Keys:
    """
    The keys of an C{Options} class: its C{optParameters}, C{optFlags} and
    C{opt_} methods (C{usage.Options}' own, help and version, excepted).
    """
    parameters: dict[str, Callable[[str], Any] | None] = {}
    for entry in getattr(options, "optParameters", []):
        parameters[entry[0]] = entry[4] if len(entry) > 4 else None
    flags = {entry[0] for entry in getattr(options, "optFlags", [])}
    repeatable = set()
    methods: dict[str, int] = {}
    reflect.addMethodNamesToDict(options, methods, "opt_")
    for name in methods:
        if hasattr(usage.Options, f"opt_{name}"):
            continue
        key = name.replace("_", "-")
        if key in refused or key in parameters or key in flags:
            continue
        # Unbound: (self) is a flag, (self, value) takes a value.
        if len(inspect.signature(getattr(options, f"opt_{name}")).parameters) == 1:
            flags.add(key)
        else:
            repeatable.add(key)
    return Keys(
        parameters, frozenset(flags), frozenset(repeatable), frozenset(comma_lists), {**NOT_IN_FILE, **refused}
    )


@dataclass(frozen=True)
class Setting:
    """One key of the file: the arguments its option is given (one per value), or a flag's state."""

    key: str
    arguments: tuple[str, ...] = ()
    flag: bool | None = None
    line: int | None = None


def parse(text: str, source: str, keys: Keys) -> list[Setting]:
    """
    The settings of a file's text, in the file's order; a L{ConfigError}
    names the file, the key and its line for anything not taken: bad TOML,
    an unknown key, a value of the wrong type or one its option refuses.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    settings = []
    for key, value in document.items():
        where = _where(source, key, text)
        settings.append(_setting(key, value, where, keys, _line_of(text, key)))
    return settings


def _setting(key: str, value: object, where: str, keys: Keys, line: int | None) -> Setting:
    if key in keys.refused:
        raise ConfigError(f"{where}: {keys.refused[key]}")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: a table; every key is an option's name, at the top level of the file")
    if key in keys.flags:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: a flag takes true or false")
        return Setting(key, flag=value, line=line)
    if key in keys.repeatable:
        values = value if isinstance(value, list) else [value]
        return Setting(key, tuple(_scalar(item, where) for item in values), line=line)
    if key not in keys.parameters:
        raise ConfigError(f"{where}: no such option{_suggestion(key, keys)}")
    if isinstance(value, list) and key in keys.comma_lists:
        if not value:
            raise ConfigError(f"{where}: an empty list (leave the key out for the default)")
        argument = ",".join(_scalar(item, where) for item in value)
    else:
        argument = _scalar(value, where)
    coerce = keys.parameters[key]
    if coerce is not None:
        try:
            coerce(argument)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return Setting(key, (argument,), line=line)


def _scalar(value: object, where: str) -> str:
    """A value as its option's argument: a string, or a number (not a boolean, a table or an array)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = {bool: "a boolean", list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    raise ConfigError(f"{where}: takes a string or a number, not {kind}")


def _suggestion(key: str, keys: Keys) -> str:
    dashed = key.replace("_", "-")
    if dashed != key and dashed in keys.names():
        return f" (keys are spelt as the options are: {dashed})"
    close = difflib.get_close_matches(key, keys.names(), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _where(source: str, key: str, text: str) -> str:
    line = _line_of(text, key)
    return f"{source}, line {line}, key {key}" if line is not None else f"{source}, key {key}"


def _line_of(text: str, key: str) -> int | None:
    """The line a top-level key is on (tomllib says only where a syntax error is)."""
    quoted = re.escape(key)
    pattern = re.compile(rf"""^[ \t]*(?:{quoted}|"{quoted}"|'{quoted}')[ \t]*=""", re.MULTILINE)
    found = pattern.search(text)
    return None if found is None else text.count("\n", 0, found.start()) + 1


def holds_secret(settings: list[Setting]) -> list[str]:
    """The keys among C{settings} whose values are secrets (a Redis URL with a password is one)."""
    found = [setting.key for setting in settings if setting.key in SECRET_KEYS]
    for setting in settings:
        if setting.key == "redis" and setting.arguments and urlsplit(setting.arguments[0]).password:
            found.append("redis")
    return found


def changed(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    """The option names whose values differ between two parsed configurations (values are never shown)."""
    return sorted(key for key in {*old, *new} if old.get(key) != new.get(key))
