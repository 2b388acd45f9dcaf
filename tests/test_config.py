"""
C{--config FILE}: keys derived from the options, the command line over the
file, errors that name the key and its line, secrets in the file or in files
it names, the log level, and SIGHUP applying what can change live (in
process, then against a real twistd child).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from audiohangup import config as config_file
from audiohangup import tap
from audiohangup.http.access import Scope
from audiohangup.listeners import SourceGate
from audiohangup.loglevel import LogLevelFilter
from audiohangup.reasons import Role
from audiohangup.reload import ConfigReload
from audiohangup.service import AudioHangupService
from tests.conftest import until
from tests.twistd_child import start_server

TOKEN = "abcdefghijklmnopqrstuvwxyz"
OTHER_TOKEN = "zyxwvutsrqponmlkjihgfedcba"


class FileMixin:
    """A private folder per test, a config file in it, and the options parsed over it."""

    def folder(self) -> str:
        if not hasattr(self, "_folder"):
            self._folder = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, self._folder)  # type: ignore[attr-defined]
            environ = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOHANGUP_")}
            self.patch(os, "environ", environ)  # type: ignore[attr-defined]
        return self._folder

    def write(self, text: str, name: str = "audiohangup.toml", mode: int = 0o600) -> str:
        path = os.path.join(self.folder(), name)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(path, mode)
        return path

    def parse(self, text: str, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", self.write(text), "--call-records", "none", *args])
        return options

    def refused(self, text: str, *args: str) -> str:
        error = self.assertRaises(usage.UsageError, self.parse, text, *args)  # type: ignore[attr-defined]
        return str(error)

    def logged(self) -> list[str]:
        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)  # type: ignore[attr-defined]
        return events


def texts(events: list[Any]) -> list[str]:
    return [formatEvent(event) for event in events]


class KeysTests(SynchronousTestCase):
    def test_every_option_has_a_key(self) -> None:
        """Parameters, flags and repeatable options: each under its own name, dashes as on the command line."""
        keys = tap.CONFIG_KEYS
        for entry in tap.Options.optParameters:
            self.assertIn(entry[0], keys.parameters)
        for entry in tap.Options.optFlags:
            self.assertIn(entry[0], keys.flags)
        self.assertLessEqual({"webhook", "http-host", "stream-header", "stream-header-file"}, keys.repeatable)
        self.assertNotIn("help", keys.names())
        for old in (*tap.RENAMED, "record", "config"):
            self.assertIn(old, keys.refused)

    def test_the_example_file_is_all_known_keys(self) -> None:
        example = Path(__file__).resolve().parent.parent / "contrib" / "audiohangup.toml"
        settings = config_file.parse(example.read_text(), str(example), tap.CONFIG_KEYS)
        self.assertIn("api-tokens-file", [setting.key for setting in settings])
        self.assertEqual(config_file.holds_secret(settings), [])  # its secrets are in the files it names

    def test_an_option_added_gets_its_key(self) -> None:
        """What another part adds to Options has its key, with its coerce function, and no work here."""

        class More(tap.Options):
            optParameters = [*tap.Options.optParameters, ["drain-timeout", None, 3600, "", tap._seconds("--drain-timeout")]]
            optFlags = [*tap.Options.optFlags, ["reuse-port", None, ""]]

            def opt_extra(self, value: str) -> None:
                """Repeatable."""

        keys = config_file.keys_of(More)
        self.assertIn("drain-timeout", keys.parameters)
        self.assertIn("reuse-port", keys.flags)
        self.assertIn("extra", keys.repeatable)
        with self.assertRaises(config_file.ConfigError) as raised:
            config_file.parse("drain-timeout = -1\n", "f.toml", keys)
        self.assertIn("f.toml, line 1, key drain-timeout: --drain-timeout must be a positive number", str(raised.exception))


class PrecedenceTests(FileMixin, SynchronousTestCase):
    def test_file_values_are_taken(self) -> None:
        options = self.parse(
            'max-legs = 200\nclose-timeout = 2.5\nallow = ["10.0.0.0/8", "::1"]\nrecord-every-call = true\n'
            'webhook = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]\nlog-level = "warn"\n'
            f'recordings-dir = "{self.folder()}"\n'
        )
        config = options.config()
        self.assertEqual(config.max_legs, 200)
        self.assertEqual(config.close_timeout, 2.5)
        self.assertEqual([str(n) for n in config.allow or ()], ["10.0.0.0/8", "::1/128"])
        self.assertTrue(config.record_every_call)
        self.assertEqual(config.webhooks, ("http://127.0.0.1:9/a", "http://127.0.0.1:9/b"))
        self.assertEqual(config.log_level, "warn")

    def test_command_line_overrides_the_file(self) -> None:
        """Whatever the order on the command line; a repeatable option replaces the file's list, not adds to it."""
        text = 'max-legs = 200\nwebhook = ["http://127.0.0.1:9/a"]\nuuid-timeout = 7\n'
        for args in (["--max-legs", "5", "--webhook", "http://127.0.0.1:9/c"], ["--max-legs=5", "--webhook=http://127.0.0.1:9/c"]):
            config = self.parse(text, *args).config()
            self.assertEqual((config.max_legs, config.webhooks, config.uuid_timeout), (5, ("http://127.0.0.1:9/c",), 7.0))

    def test_an_old_spelling_on_the_command_line_overrides_the_new_key(self) -> None:
        self.assertEqual(self.parse("call-records-days = 3\n", "--records-keep-days", "9").config().records_keep_days, 9.0)

    def test_a_secret_file_on_the_command_line_overrides_the_secret_in_the_file(self) -> None:
        secret = self.write("from-the-file-named\n", "secret")
        options = self.parse(
            'webhook = ["http://127.0.0.1:9/a"]\nwebhook-secret = "in-the-config"\n', "--webhook-secret-file", secret
        )
        self.assertEqual(options["webhook-secret"], "from-the-file-named")

    def test_a_flag_false_in_the_file(self) -> None:
        self.assertFalse(self.parse("insecure-files = false\n").config().insecure_files)


class ErrorTests(FileMixin, SynchronousTestCase):
    def test_unknown_key(self) -> None:
        message = self.refused("# limits\nmax-leg = 4\n")
        self.assertIn("audiohangup.toml, line 2, key max-leg: no such option (did you mean max-legs?)", message)

    def test_underscores_are_refused_with_the_dashed_key(self) -> None:
        self.assertIn("key max_legs: no such option (keys are spelt as the options are: max-legs)", self.refused("max_legs = 4\n"))

    def test_bad_value_through_the_options_coerce(self) -> None:
        message = self.refused('uuid-timeout = 5\nmax-legs = "many"\n')
        self.assertIn("line 2, key max-legs: --max-legs must be a whole number of at least 1, not 'many'", message)
        self.assertIn("key max-legs: --max-legs must be a whole number", self.refused("max-legs = 1.5\n"))

    def test_bad_value_found_by_the_later_checks(self) -> None:
        self.assertIn("line 1, key visitor: --visitor 'nope:1' is not a valid endpoint", self.refused('visitor = "nope:1"\n'))
        self.assertIn("line 1, key allow: --allow: '999.1.1.1' is not", self.refused('allow = ["999.1.1.1"]\n'))
        self.assertIn("key webhook: --webhook: webhook URL 'ftp://x'", self.refused('webhook = "ftp://x"\n'))

    def test_wrong_types(self) -> None:
        self.assertIn("key insecure-http: a flag takes true or false", self.refused("insecure-http = 1\n"))
        self.assertIn("key max-legs: takes a string or a number, not a boolean", self.refused("max-legs = true\n"))
        self.assertIn("key visitor: takes a string or a number, not an array", self.refused('visitor = ["a"]\n'))
        self.assertIn("key api: a table", self.refused("[api]\ntoken = 1\n"))

    def test_bad_toml(self) -> None:
        message = self.refused("max-legs = 4\nflow = \n")
        self.assertIn("audiohangup.toml: not valid TOML", message)
        self.assertIn("line 2", message)

    def test_old_spellings_and_the_file_itself(self) -> None:
        self.assertIn("key records: an old spelling: say call-records", self.refused('records = "x.sqlite3"\n'))
        self.assertIn("key config: a configuration file cannot name another one", self.refused('config = "x"\n'))

    def test_unreadable_file(self) -> None:
        options = tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", "/no/such/file.toml"])
        self.assertIn("--config: cannot read /no/such/file.toml", str(error))

    def test_no_value_in_a_message(self) -> None:
        """A secret that is not taken is not shown."""
        message = self.refused('api-token = "short"\n')
        self.assertIn("key api-token: --api-token", message)
        self.assertNotIn("short", message.replace("shorter", ""))


class SecretTests(FileMixin, SynchronousTestCase):
    def test_secrets_in_the_file(self) -> None:
        config = self.parse(f'api-token = "{TOKEN}"\nwebhook = ["http://127.0.0.1:9/a"]\nwebhook-secret = "s3cret"\n').config()
        self.assertEqual((config.api_token, config.webhook_secret), (TOKEN, "s3cret"))

    def test_secrets_in_files_the_file_names(self) -> None:
        secret = self.write("from-a-file\n", "webhook-secret")
        tokens = self.write(f"read {TOKEN}\n", "tokens")
        config = self.parse(
            f'webhook = ["http://127.0.0.1:9/a"]\nwebhook-secret-file = "{secret}"\napi-tokens-file = "{tokens}"\n'
        ).config()
        self.assertEqual(config.webhook_secret, "from-a-file")
        self.assertEqual(config.api_tokens_file, tokens)

    def test_a_secret_file_others_may_read_is_refused_as_on_the_command_line(self) -> None:
        secret = self.write("from-a-file\n", "webhook-secret", mode=0o644)
        message = self.refused(f'webhook = ["http://127.0.0.1:9/a"]\nwebhook-secret-file = "{secret}"\n')
        self.assertIn("key webhook-secret-file: --webhook-secret-file:", message)
        self.assertIn("mode 0644", message)

    def test_a_file_others_may_read_that_holds_a_secret_is_warned_of(self) -> None:
        events = self.logged()
        options = tap.Options()
        path = self.write(f'api-token = "{TOKEN}"\n', mode=0o644)
        options.parseOptions(["--config", path, "--call-records", "none"])
        [warning] = [text for text in texts(events) if "holds secrets" in text]
        self.assertIn("(api-token) and its mode 0644 lets others read it", warning)
        self.assertNotIn(TOKEN, warning)

    def test_no_warning_for_a_private_file_or_one_without_secrets(self) -> None:
        events = self.logged()
        self.parse(f'api-token = "{TOKEN}"\n')
        options = tap.Options()
        options.parseOptions(["--config", self.write("max-legs = 4\n", "open.toml", mode=0o644), "--call-records", "none"])
        self.assertEqual([text for text in texts(events) if "holds secrets" in text], [])

    def test_a_redis_url_with_a_password_is_a_secret(self) -> None:
        settings = config_file.parse('redis = "redis://:pw@127.0.0.1/0"\n', "f", tap.CONFIG_KEYS)
        self.assertEqual(config_file.holds_secret(settings), ["redis"])
        self.assertEqual(config_file.holds_secret(config_file.parse('redis = "redis://h/0"\n', "f", tap.CONFIG_KEYS)), [])


class LogLevelTests(SynchronousTestCase):
    def test_filters_the_observers_present_at_start_until_stop(self) -> None:
        publisher, seen = LogPublisher(), []
        publisher.addObserver(seen.append)
        levels = LogLevelFilter("info", install=True, publisher=publisher)
        levels.startService()
        publisher({"log_level": LogLevel.debug, "log_namespace": "x"})
        publisher({"log_level": LogLevel.info, "log_namespace": "x"})
        self.assertEqual([e["log_level"] for e in seen], [LogLevel.info])
        levels.set("error")
        publisher({"log_level": LogLevel.warn, "log_namespace": "x"})
        self.assertEqual(len(seen), 1)
        self.assertEqual(levels.level, "error")
        levels.stopService()
        publisher({"log_level": LogLevel.debug, "log_namespace": "x"})
        self.assertEqual(len(seen), 2)

    def test_not_installed_leaves_the_log_alone(self) -> None:
        publisher, seen = LogPublisher(), []
        publisher.addObserver(seen.append)
        levels = LogLevelFilter("critical", install=False, publisher=publisher)
        levels.startService()
        publisher({"log_level": LogLevel.debug, "log_namespace": "x"})
        levels.stopService()
        self.assertEqual(len(seen), 1)

    def test_bad_level(self) -> None:
        options = tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--log-level", "loud"])
        self.assertIn("--log-level must be one of debug, info, warn, error, critical", str(error))


class ReloadTests(FileMixin, SynchronousTestCase):
    """SIGHUP's work, in process: L{ConfigReload.reload} over a service on a memory reactor."""

    def start(self, text: str, *args: str) -> tuple[AudioHangupService, ConfigReload, str]:
        path = self.write(text)
        options = tap.Options()
        options.parseOptions(["--config", path, "--call-records", "none", *args])
        service = tap.build_service(options.config(), MemoryReactorClock(), reread=tap.Reread(options))
        previous = signal.getsignal(signal.SIGHUP)
        service.privilegedStartService()
        service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), previous)

        def stop() -> None:
            self.successResultOf(service.stopService())
            self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

        self.addCleanup(stop)
        reload = service.getServiceNamed("reload")
        assert isinstance(reload, ConfigReload)
        return service, reload, path

    def test_applies_what_can_change_and_names_what_needs_a_restart(self) -> None:
        service, reload, _path = self.start(f'api-token = "{TOKEN}"\nmax-legs = 10\non-duplicate = "refuse"\n')
        api = service.api
        assert api is not None
        self.write(
            f'api-token = "{OTHER_TOKEN}"\nmax-legs = 20\non-duplicate = "replace"\nallow = ["192.0.2.0/24"]\n'
            'log-level = "warn"\nidle-timeout = 30\nrecord-every-call = true\n'
        )
        events = self.logged()
        reload.reload()
        [line] = [text for text in texts(events) if "configuration reloaded" in text]
        self.assertIn("applied allow, api-token, idle-timeout, log-level, max-legs, record-every-call;", line)
        self.assertIn("needing a restart: on-duplicate", line)
        self.assertNotIn(OTHER_TOKEN, line)
        self.assertIs(api.tokens.scope_of(OTHER_TOKEN), Scope.CONTROL)
        self.assertIsNone(api.tokens.scope_of(TOKEN))
        visitor = service.getServiceNamed("audiosocket-visitor")
        gate = visitor.factory.gate  # type: ignore[attr-defined]
        assert isinstance(gate, SourceGate)
        self.assertFalse(gate.acl.allows("127.0.0.1"))
        self.assertTrue(gate.acl.allows("192.0.2.7"))
        for role in Role:
            factory = service.getServiceNamed(f"audiosocket-{role}").factory.factory  # type: ignore[attr-defined]
            self.assertEqual((factory.settings.max_legs, factory.settings.idle_timeout), (20, 30.0))
        levels = service.getServiceNamed("log-level")
        assert isinstance(levels, LogLevelFilter)
        self.assertEqual(levels.level, "warn")
        assert service.recorder is not None
        self.assertTrue(service.recorder.config.every_call)
        # The same file again: nothing new applied, the restart still named.
        events.clear()
        reload.reload()
        [line] = [text for text in texts(events) if "configuration reloaded" in text]
        self.assertIn("applied nothing new", line)
        self.assertIn("needing a restart: on-duplicate", line)

    def test_a_bad_file_changes_nothing(self) -> None:
        service, reload, path = self.start(f'api-token = "{TOKEN}"\nmax-legs = 10\n')
        self.write(f'api-token = "{OTHER_TOKEN}"\nmax-legs = 0\n')
        events = self.logged()
        reload.reload()
        [line] = [text for text in texts(events) if "not reloaded" in text]
        self.assertIn(f"{path}, line 2, key max-legs: --max-legs must be a whole number of at least 1", line)
        self.assertNotIn(OTHER_TOKEN, line)
        assert service.api is not None
        self.assertIs(service.api.tokens.scope_of(TOKEN), Scope.CONTROL)
        self.assertEqual(service.settings.max_legs, 10)

    def test_webhook_targets(self) -> None:
        service, reload, _path = self.start('webhook = ["http://127.0.0.1:9/a"]\n', "--webhook-outbox", "none")
        self.write('webhook = ["http://127.0.0.1:9/b", "http://127.0.0.1:9/c"]\nwebhook-secret = "s3cret"\n')
        reload.reload()
        assert service.webhooks is not None
        self.assertEqual(service.webhooks.urls, ["http://127.0.0.1:9/b", "http://127.0.0.1:9/c"])
        self.assertEqual(service.webhooks.secret, "s3cret")

    def test_webhooks_first_given_on_reload_need_a_restart(self) -> None:
        _service, reload, _path = self.start("max-legs = 10\n", "--webhook-outbox", "none")
        self.write('max-legs = 10\nwebhook = ["http://127.0.0.1:9/b"]\n')
        events = self.logged()
        reload.reload()
        [line] = [text for text in texts(events) if "configuration reloaded" in text]
        self.assertIn("applied nothing new", line)
        self.assertIn("needing a restart: webhook", line)

    def test_the_command_line_still_wins(self) -> None:
        service, reload, _path = self.start("max-legs = 10\n", "--max-legs", "7")
        self.write("max-legs = 20\n")
        reload.reload()
        self.assertEqual(service.settings.max_legs, 7)


# Against a real twistd child


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_config_file(spawn: Any, tmp_path: Path) -> None:
    """
    The token and the allow list change on SIGHUP: the new token is taken,
    the old one refused, a source out of the new list is closed at once; a
    changed key that needs a restart is named; a bad file changes nothing.
    """
    config = tmp_path / "audiohangup.toml"
    config.write_text(f'api-token = "{TOKEN}"\nallow = ["127.0.0.0/8"]\non-duplicate = "refuse"\n')
    config.chmod(0o600)
    child, ports = await start_server(spawn, "--config", str(config), "--call-records", "none")
    base = f"http://127.0.0.1:{ports['http']}"

    async def status(token: str) -> int:
        response = await treq.get(f"{base}/calls", headers={"Authorization": f"Bearer {token}"}, persistent=False)
        await response.content()
        return int(response.code)

    def knock() -> None:
        """A connection to the visitor listener from 127.0.0.1; the server closes it at once if --allow refuses it."""
        try:
            with socket.create_connection(("127.0.0.1", ports["audiosocket-visitor"]), timeout=10):
                pass
        except ConnectionResetError:
            pass  # the refusal may reach us before connect() returns: an abort is a reset

    assert await status(TOKEN) == 200
    assert await status(OTHER_TOKEN) == 401
    config.write_text(f'api-token = "{OTHER_TOKEN}"\nallow = ["192.0.2.0/24"]\non-duplicate = "replace"\n')
    child.signal("HUP")
    await until(lambda: "configuration reloaded" in child.log, 10, "the reload")
    assert "applied allow, api-token" in child.log, child.describe()
    assert "needing a restart: on-duplicate" in child.log, child.describe()
    assert await status(OTHER_TOKEN) == 200
    assert await status(TOKEN) == 401
    knock()
    await until(lambda: "not in --allow" in child.log, 10, "the refusal's line")
    config.write_text(f'api-token = "{TOKEN}"\nmax-legs = "many"\n')
    child.signal("HUP")
    await until(lambda: "not reloaded" in child.log, 10, "the refused reload")
    assert "line 2, key max-legs: --max-legs must be a whole number" in child.log, child.describe()
    assert await status(OTHER_TOKEN) == 200
    for secret in (TOKEN, OTHER_TOKEN):
        assert secret not in child.output
    child.signal("TERM")
    await child.exit()
