"""
C{twistd audiohangup} without a process: the options, the service they make
(on a memory reactor, so no real sockets), the plugin and the repository
layout that lets twistd find it.

These are L{SynchronousTestCase}s, so they run under trial and pytest alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.application.service import IService, IServiceMaker
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from audiohangup import relay as relay_module
from audiohangup import tap
from audiohangup.audio import LegSettings
from audiohangup.protocol import AudioSocketFactory
from audiohangup.reasons import Role
from audiohangup.service import AudioHangupService, Config

REPOSITORY = Path(__file__).resolve().parent.parent

#: The option names C{twistd audiohangup} documents, in C{--help} order.
OPTION_NAMES = (
    "visitor", "resident", "http", "close-timeout", "uuid-timeout", "api-token",
    "call-records", "call-records-days", "flow", "audio", "max-queue-ms", "on-leg-end",
    "idle-timeout", "max-duration", "playout-timeout", "max-legs", "max-unsent-ms",
    "redis", "instance-id", "advertise-url", "heartbeat",
)


class EnvironmentMixin:
    """Run a test with C{os.environ} replaced by a copy that has or lacks the token."""

    def useToken(self, token: str | None) -> None:
        environ = {key: value for key, value in os.environ.items() if key != tap.TOKEN_ENVIRONMENT}
        if token is not None:
            environ[tap.TOKEN_ENVIRONMENT] = token
        self.patch(os, "environ", environ)  # type: ignore[attr-defined]


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def tokens_file(case: SynchronousTestCase) -> str:
    """A tokens file of one good token, the user's alone, removed after the test."""
    folder = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, folder)
    tokens = os.path.join(folder, "tokens")
    with open(tokens, "w") as file:
        file.write("read abcdefghijklmnop\n")
    os.chmod(tokens, 0o600)
    return tokens


def relevant(options: tap.Options) -> dict[str, object]:
    return {name: options[name] for name in OPTION_NAMES}


class OptionsDefaultsTests(EnvironmentMixin, SynchronousTestCase):
    def test_defaults(self) -> None:
        """With no arguments and no token in the environment, the documented defaults."""
        self.useToken(None)
        self.assertEqual(
            relevant(parse()),
            {
                "visitor": "tcp:9092:interface=127.0.0.1",
                "resident": "tcp:9093:interface=127.0.0.1",
                "http": "tcp:8080:interface=127.0.0.1",
                "close-timeout": 2.0,
                "uuid-timeout": 5.0,
                "api-token": None,
                "call-records": "audiohangup.sqlite3",
                "call-records-days": 30.0,
                "flow": "bridge",
                "audio": "slin",
                "max-queue-ms": 1000,
                "on-leg-end": "hangup",
                "idle-timeout": 0.0,
                "max-duration": 0.0,
                "playout-timeout": 10.0,
                "max-legs": 2000,
                "max-unsent-ms": 2000,
                "redis": None,
                "instance-id": None,
                "advertise-url": None,
                "heartbeat": 2.0,
            },
        )

    def test_defaults_make_the_default_config(self) -> None:
        self.useToken(None)
        self.assertEqual(parse().config(), Config())

    def test_timeouts_are_floats(self) -> None:
        """The defaults are floats, as a parsed value would be, not strings."""
        self.useToken(None)
        options = parse()
        self.assertIs(type(options["close-timeout"]), float)
        self.assertIs(type(options["uuid-timeout"]), float)


class OptionsParsingTests(EnvironmentMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.useToken(None)

    def test_close_timeout(self) -> None:
        options = parse("--close-timeout", "0.5")
        self.assertEqual(options["close-timeout"], 0.5)
        self.assertIs(type(options["close-timeout"]), float)

    def test_close_timeout_equals_form(self) -> None:
        self.assertEqual(parse("--close-timeout=3")["close-timeout"], 3.0)

    def test_uuid_timeout(self) -> None:
        options = parse("--uuid-timeout", "7")
        self.assertEqual(options["uuid-timeout"], 7.0)
        self.assertIs(type(options["uuid-timeout"]), float)

    def test_endpoints(self) -> None:
        options = parse(
            "--visitor", "tcp:19092:interface=127.0.0.2",
            "--resident", "unix:/tmp/resident.sock",
            "--http", "tcp6:0:interface=\\:\\:1",
        )
        self.assertEqual(options["visitor"], "tcp:19092:interface=127.0.0.2")
        self.assertEqual(options["resident"], "unix:/tmp/resident.sock")
        self.assertEqual(options["http"], "tcp6:0:interface=\\:\\:1")

    def test_same_endpoint_string_for_every_role(self) -> None:
        """C{tcp:0} thrice is fine: each listener gets its own kernel-chosen port."""
        loopback = "tcp:0:interface=127.0.0.1"
        options = parse("--visitor", loopback, "--resident", loopback, "--http", loopback)
        self.assertEqual([options[name] for name in ("visitor", "resident", "http")], [loopback] * 3)

    def test_api_token(self) -> None:
        self.assertEqual(parse("--api-token", "s3cret-s3cret-s3cret")["api-token"], "s3cret-s3cret-s3cret")

    def test_every_option_into_config(self) -> None:
        options = parse(
            "--visitor", "tcp:1:interface=127.0.0.1",
            "--resident", "tcp:2:interface=127.0.0.1",
            "--http", "tcp:3:interface=127.0.0.1",
            "--close-timeout", "0.25",
            "--uuid-timeout", "1.5",
            "--api-token", "t" * 16,
        )
        self.assertEqual(
            options.config(),
            Config(
                visitor="tcp:1:interface=127.0.0.1",
                resident="tcp:2:interface=127.0.0.1",
                http="tcp:3:interface=127.0.0.1",
                close_timeout=0.25,
                uuid_timeout=1.5,
                api_token="t" * 16,
            ),
        )


class ApiTokenEnvironmentTests(EnvironmentMixin, SynchronousTestCase):
    def test_environment_token_used_without_option(self) -> None:
        self.useToken("from-the-environment")
        self.assertEqual(parse()["api-token"], "from-the-environment")

    def test_option_wins_over_environment(self) -> None:
        self.useToken("from-the-environment")
        self.assertEqual(parse("--api-token", "from-the-option-too")["api-token"], "from-the-option-too")

    def test_empty_environment_token_means_none(self) -> None:
        self.useToken("")
        self.assertIsNone(parse()["api-token"])


class BadOptionsTests(EnvironmentMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.useToken(None)

    def assertUsageError(self, args: list[str], *fragments: str) -> str:
        error = self.assertRaises(usage.UsageError, parse, *args)
        message = str(error)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_stream_audio(self) -> None:
        """floor (the default) or mix, into the streams' settings; anything else is a usage error."""
        self.assertEqual(parse().config().streams.settings.audio, "floor")
        self.assertEqual(parse("--stream-audio", "mix").config().streams.settings.audio, "mix")
        self.assertUsageError(["--stream-audio", "loud"], "--stream-audio")

    def test_stop_and_upgrade_options(self) -> None:
        """--on-stop, --drain-timeout, --reuse-port and --local-directory: into the config, or named errors."""
        config = parse("--on-stop", "hangup", "--drain-timeout", "0", "--reuse-port").config()
        self.assertEqual((config.on_stop, config.drain_timeout, config.reuse_port), ("hangup", 0.0, True))
        self.assertEqual((Config().on_stop, Config().drain_timeout, Config().reuse_port), ("drain", 3600.0, False))
        self.assertUsageError(["--on-stop", "later"], "--on-stop must be one of drain, hangup")
        self.assertUsageError(["--drain-timeout", "-1"], "--drain-timeout must be 0 (off) or a positive number")
        self.assertUsageError(["--reuse-port", "--visitor", "unix:/tmp/v.sock"], "--visitor", "tcp: endpoints only")
        folder = self.mktemp()
        self.assertUsageError(["--local-directory", folder], "--local-directory needs --api-token")
        self.assertUsageError(
            ["--local-directory", folder, "--redis", "redis://127.0.0.1:1", "--advertise-url", "http://a",
             "--api-token", "a-control-token-of-length"],
            "--local-directory and --redis",
        )

    def test_close_timeout_not_a_number(self) -> None:
        self.assertUsageError(
            ["--close-timeout", "abc"], "--close-timeout must be a number of seconds, not 'abc'"
        )

    def test_close_timeout_zero(self) -> None:
        self.assertUsageError(
            ["--close-timeout", "0"], "--close-timeout must be a positive number of seconds, not '0'"
        )

    def test_close_timeout_negative(self) -> None:
        self.assertUsageError(
            ["--close-timeout", "-1"], "--close-timeout must be a positive number of seconds, not '-1'"
        )

    def test_close_timeout_infinite(self) -> None:
        self.assertUsageError(
            ["--close-timeout", "inf"], "--close-timeout must be a positive number of seconds, not 'inf'"
        )

    def test_uuid_timeout_nan(self) -> None:
        self.assertUsageError(
            ["--uuid-timeout", "nan"], "--uuid-timeout must be a positive number of seconds, not 'nan'"
        )

    def test_uuid_timeout_zero(self) -> None:
        self.assertUsageError(
            ["--uuid-timeout", "0"], "--uuid-timeout must be a positive number of seconds, not '0'"
        )

    def test_visitor_port_not_a_number(self) -> None:
        self.assertUsageError(
            ["--visitor", "tcp:notaport"],
            "--visitor 'tcp:notaport' is not a valid endpoint",
            "tcp:9092:interface=127.0.0.1",
        )

    def test_resident_port_not_a_number(self) -> None:
        self.assertUsageError(
            ["--resident", "tcp:x"], "--resident 'tcp:x' is not a valid endpoint"
        )

    def test_http_unknown_endpoint_type(self) -> None:
        self.assertUsageError(
            ["--http", "bogus:1"], "--http 'bogus:1' is not a valid endpoint", "bogus"
        )

    def test_records_file_that_is_not_sqlite(self) -> None:
        """A text file as --call-records fails start-up, as the other unusable stores do, not records off."""
        folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, folder)
        (folder / "notes.txt").write_text("call notes, not a database\n")
        notes = str(folder / "notes.txt")
        self.assertUsageError(["--call-records", notes], f"--call-records: {notes} is not a SQLite database")
        (folder / "empty.sqlite3").touch()
        parse("--call-records", str(folder / "empty.sqlite3"))  # SQLite takes 0 bytes as an empty database

    def test_api_token_empty(self) -> None:
        self.assertUsageError(["--api-token", ""], "--api-token must not be empty")

    def test_api_token_empty_beats_environment(self) -> None:
        """An explicitly empty token is an error even when the environment has one."""
        self.useToken("from-env")
        self.assertUsageError(["--api-token", ""], "--api-token must not be empty")

    def test_api_token_too_short(self) -> None:
        """A token shorter than 16 characters is a usage error, from the option or the environment."""
        self.assertUsageError(["--api-token", "fifteen-chars.."], "--api-token", "at least 16 characters")
        self.useToken("tiny-secret")
        error = self.assertUsageError([], "$AUDIOHANGUP_API_TOKEN", "at least 16 characters")
        self.assertNotIn("tiny-secret", error)

    def test_unknown_option(self) -> None:
        self.assertUsageError(["--no-such-option"], "no-such-option")


class FlowAndAudioOptionTests(EnvironmentMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.useToken(None)

    def test_values(self) -> None:
        options = parse(
            "--flow", "echo", "--audio", "slin16", "--max-queue-ms", "500", "--on-leg-end", "keep",
            "--idle-timeout", "30", "--max-duration", "3600", "--playout-timeout", "4",
            "--call-records", "none", "--call-records-days", "0",
        )
        config = options.config()
        self.assertEqual(
            (config.flow, config.audio, config.max_queue_ms, config.on_leg_end, config.idle_timeout,
             config.max_duration, config.playout_timeout, config.records, config.records_keep_days),
            ("echo", "slin16", 500, "keep", 30.0, 3600.0, 4.0, "none", 0.0),
        )
        settings = config.leg_settings()
        self.assertEqual((settings.audio.name, settings.max_queue_frames), ("slin16", 25))

    def test_cluster_options(self) -> None:
        config = parse(
            "--redis", "unix:///run/redis.sock", "--advertise-url", "http://10.0.0.5:8080",
            "--instance-id", "ah-1", "--heartbeat", "0.5", "--api-token", "cluster-token-0123",
        ).config()
        self.assertEqual(
            (config.redis, config.advertise_url, config.instance_id, config.heartbeat),
            ("unix:///run/redis.sock", "http://10.0.0.5:8080", "ah-1", 0.5),
        )
        self.assertEqual((parse().config().redis, parse().config().instance_id), (None, ""))

    def test_custom_flow_by_dotted_path(self) -> None:
        self.assertEqual(parse("--flow", "audiohangup.flows.SilenceFlow")["flow"], "audiohangup.flows.SilenceFlow")

    def test_bad_values(self) -> None:
        for args, fragment in [
            (["--flow", "karaoke"], "unknown flow 'karaoke'"),
            (["--flow", "audiohangup.nothing.Here"], "cannot load flow"),
            (["--flow", "audiohangup.flows.FlowLoadError"], "does not provide"),
            (["--audio", "mp3"], "--audio must be one of"),
            (["--max-queue-ms", "10"], "at least 20"),
            (["--on-leg-end", "maybe"], "--on-leg-end must be one of hangup, keep"),
            (["--idle-timeout", "-1"], "0 (off) or a positive number"),
            (["--playout-timeout", "0"], "a positive number"),
            (["--call-records", ""], "--call-records needs a file path"),
            (["--call-records-days", "-3"], "0 (forever) or a positive number of days"),
            (["--max-legs", "0"], "--max-legs must be a whole number of at least 1"),
            (["--max-unsent-ms", "5"], "at least 20"),
            (["--redis", "redis://127.0.0.1:6379/0"], "--advertise-url is required with --redis"),
            (["--redis", "http://x", "--advertise-url", "http://a:8080"], "--redis must be a redis://"),
            (["--redis", "redis://h:1", "--advertise-url", "a:8080"], "--advertise-url must be an http"),
            (["--heartbeat", "0"], "a positive number"),
            (["--on-duplicate", "merge"], "--on-duplicate must be one of refuse, replace"),
            (["--allow", "10.0.0.0/8,example.com"], "--allow: 'example.com' is not an IPv4 or IPv6"),
            (["--http-allow", "300.1.1.1"], "--http-allow: '300.1.1.1' is not"),
            (["--http", "tcp:8080"], "listens beyond loopback and no API token is configured"),
            (["--http", "tcp6:8080"], "listens beyond loopback"),
            (["--http", "tcp:8080:interface=0.0.0.0"], "listens beyond loopback"),
            (["--call-records", "/no/such/directory/calls.sqlite3"], "--call-records: the directory /no/such/directory"),
            (["--api-tokens-file", "/no/such/tokens"], "--api-tokens-file: /no/such/tokens: cannot be read"),
            (["--webhook-ca", "/no/such/ca.pem"], "--webhook-ca: /no/such/ca.pem: cannot be read"),
            (["--redis", "redis://h:1", "--advertise-url", "http://a:8080"], "--redis needs --api-token"),
            (["--trusted-proxies", "10.0.0.0/8,proxy"], "--trusted-proxies: 'proxy' is not"),
        ]:
            error = self.assertRaises(usage.UsageError, parse, *args)
            self.assertIn(fragment, str(error), args)

    def test_security_options(self) -> None:
        tokens = tokens_file(self)
        config = parse(
            "--allow", "10.0.0.5/32, 2001:db8::/32", "--http-allow", "127.0.0.1",
            "--on-duplicate", "replace", "--api-tokens-file", tokens,
            "--http", "tcp:8080", "--insecure-http", "--trusted-proxies", "10.1.0.0/16,2001:db8::1",
        ).config()
        self.assertEqual([str(n) for n in config.trusted_proxies], ["10.1.0.0/16", "2001:db8::1/128"])
        self.assertEqual([str(n) for n in config.allow or ()], ["10.0.0.5/32", "2001:db8::/32"])
        self.assertEqual([str(n) for n in config.http_allow or ()], ["127.0.0.1/32"])
        self.assertEqual((config.on_duplicate, config.api_tokens_file, config.insecure_http), ("replace", tokens, True))
        defaults = parse().config()
        self.assertEqual(
            (defaults.allow, defaults.http_allow, defaults.on_duplicate, defaults.insecure_http,
             defaults.trusted_proxies, defaults.insecure_files),
            (None, None, "refuse", False, (), False),
        )
        # Beyond loopback is fine with a token, or on a UNIX socket.
        parse("--http", "tcp:8080", "--api-token", "t" * 16)
        parse("--http", "tcp:8080", "--api-tokens-file", tokens)
        parse("--http", "unix:/tmp/audiohangup-api.sock")

    def test_tokens_file_others_may_read(self) -> None:
        """A tokens file others may read (or its group write) is a usage error naming its mode, unless --insecure-files."""
        tokens = tokens_file(self)
        for mode in (0o644, 0o660, 0o604):
            os.chmod(tokens, mode)
            error = self.assertRaises(usage.UsageError, parse, "--api-tokens-file", tokens)
            self.assertIn(f"mode {mode:04o}", str(error))
            self.assertIn("--insecure-files", str(error))
            self.assertNotIn("abcdefghijklmnop", str(error))
            config = parse("--api-tokens-file", tokens, "--insecure-files").config()
            self.assertTrue(config.insecure_files)
        os.chmod(tokens, 0o600)
        self.assertFalse(parse("--api-tokens-file", tokens).config().insecure_files)


class StoreOptionsTests(EnvironmentMixin, SynchronousTestCase):
    """
    The two stores have options of their own names: --call-records* (SQLite
    rows) and --recordings-* with --record-every-call (WAV audio). The old
    spellings, one letter apart, still work, each warning once at start-up.
    """

    def setUp(self) -> None:
        self.useToken(None)
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.warnings: list[str] = []
        self.patch(tap, "log", Logger(observer=lambda event: self.warnings.append(formatEvent(event))))

    def test_recordings(self) -> None:
        config = parse(
            "--record-every-call", "--recordings-dir", self.folder, "--recordings-mix", "heard",
            "--recordings-days", "7", "--call-records", "none", "--call-records-days", "3",
        ).config()
        self.assertEqual(
            (config.record_every_call, config.record_dir, config.record_mix, config.record_days,
             config.records, config.records_keep_days),
            (True, self.folder, "heard", 7.0, "none", 3.0),
        )
        self.assertEqual(self.warnings, [])  # the new spellings warn of nothing

    def test_every_call_into_the_default_directory(self) -> None:
        """--record-every-call alone records beside the call records, and that directory is checked at start-up."""
        records = os.path.join(self.folder, "calls.sqlite3")
        config = parse("--record-every-call", "--call-records", records).config()
        self.assertEqual((config.record_every_call, config.recordings_directory()),
                         (True, os.path.join(self.folder, "recordings")))
        checked = []

        def unusable(path: str) -> None:
            checked.append(path)
            raise ValueError(f"{path} cannot be made or written")

        self.patch(tap.Recorder, "check_directory", staticmethod(unusable))
        error = self.assertRaises(usage.UsageError, parse, "--record-every-call", "--call-records", records)
        self.assertIn("--record-every-call, into the default --recordings-dir:", str(error))
        self.assertEqual(checked, [os.path.join(self.folder, "recordings")])
        parse("--call-records", records)  # recorded only when asked: not checked now
        self.assertEqual(len(checked), 1)

    def test_old_spellings_work_as_the_new(self) -> None:
        old = parse(
            "--records", "none", "--records-keep-days", "3", "--record-dir", self.folder,
            "--record-mix", "heard", "--record-days", "7",
        )
        new = parse(
            "--call-records", "none", "--call-records-days", "3", "--recordings-dir", self.folder,
            "--recordings-mix", "heard", "--recordings-days", "7",
        )
        self.assertEqual(old.config(), new.config())
        self.assertEqual(parse("--record", self.folder).config(),
                         parse("--record-every-call", "--recordings-dir", self.folder).config())
        parse("--record", self.folder, "--record-dir", self.folder)  # the same directory twice: fine

    def test_old_spellings_are_checked_as_the_new(self) -> None:
        for args, fragment in [
            (["--record-days", "-1"], "--recordings-days must be 0 (forever) or a positive number of days"),
            (["--record-mix", "both"], "--recordings-mix must be one of sent, heard"),
            (["--records", ""], "--call-records needs a file path"),
            (["--record", self.folder, "--recordings-dir", "/elsewhere"], "--record DIR sets where recordings go"),
        ]:
            error = self.assertRaises(usage.UsageError, parse, *args)
            self.assertIn(fragment, str(error), args)

    def test_each_old_spelling_warns_once(self) -> None:
        """Once per spelling, however often given, in the order first given, naming the new spelling."""
        parse(
            "--records", "none", "--record-days", "1", "--records", "none", "--record", self.folder,
            "--record-dir", self.folder, "--record-mix", "sent", "--records-keep-days", "2", "--record-days", "2",
        )
        self.assertEqual(self.warnings, [
            "--records is deprecated and will go: say --call-records",
            "--record-days is deprecated and will go: say --recordings-days",
            "--record is deprecated and will go: say --record-every-call --recordings-dir DIR",
            "--record-dir is deprecated and will go: say --recordings-dir",
            "--record-mix is deprecated and will go: say --recordings-mix",
            "--records-keep-days is deprecated and will go: say --call-records-days",
        ])

    def test_every_old_spelling_names_an_option(self) -> None:
        names = {entry[0] for entry in tap.Options.optParameters}
        for old, new in tap.RENAMED.items():
            self.assertIn(new, names)
            self.assertNotIn(old, names)
            self.assertIn(f"Deprecated: say --{new}.", str(tap.Options()))


class MakeServiceTests(EnvironmentMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.useToken(None)
        self.reactor = MemoryReactorClock()

    def start(self, *args: str) -> AudioHangupService:
        # A memory reactor never runs the records store's thread callbacks.
        service = tap.makeService(parse("--call-records", "none", *args), reactor=self.reactor)
        self.assertTrue(verifyObject(IService, service))
        service.privilegedStartService()
        service.startService()
        return service  # type: ignore[return-value]

    def stop(self, service: AudioHangupService) -> None:
        if service.running:
            self.successResultOf(service.stopService())

    def test_listens_on_the_default_endpoints(self) -> None:
        service = self.start()
        self.addCleanup(self.stop, service)
        servers = self.reactor.tcpServers
        self.assertEqual(len(servers), 3, servers)
        by_port = {port: (factory, interface) for port, factory, _backlog, interface in servers}
        self.assertEqual(sorted(by_port), [8080, 9092, 9093])
        self.assertEqual({interface for _, interface in by_port.values()}, {"127.0.0.1"})

        visitor, resident, http = by_port[9092][0], by_port[9093][0], by_port[8080][0]
        self.assertIsInstance(visitor, AudioSocketFactory)
        self.assertIs(visitor.role, Role.VISITOR)
        self.assertIsInstance(resident, AudioSocketFactory)
        self.assertIs(resident.role, Role.RESIDENT)
        self.assertIsInstance(http, Site)
        # Both roles and the API share one registry and the memory reactor.
        self.assertIs(visitor.registry, resident.registry)
        self.assertIs(visitor.registry, service.registry)
        self.assertIs(visitor.reactor, self.reactor)
        self.assertIs(resident.reactor, self.reactor)

    def test_listeners_are_named_and_keep_their_ports(self) -> None:
        service = self.start()
        self.addCleanup(self.stop, service)
        ports = {
            name: service.getServiceNamed(name).port.getHost().port  # type: ignore[attr-defined]
            for name in ("audiosocket-visitor", "audiosocket-resident", "http")
        }
        self.assertEqual(ports, {"audiosocket-visitor": 9092, "audiosocket-resident": 9093, "http": 8080})

    def test_options_reach_the_service(self) -> None:
        service = self.start(
            "--visitor", "tcp:19092:interface=127.0.0.1",
            "--resident", "tcp:19093:interface=127.0.0.1",
            "--http", "tcp:18080:interface=127.0.0.1",
            "--close-timeout", "0.5",
            "--uuid-timeout", "3",
        )
        self.addCleanup(self.stop, service)
        self.assertEqual(sorted(port for port, *_ in self.reactor.tcpServers), [18080, 19092, 19093])
        expected = LegSettings(close_timeout=0.5, uuid_timeout=3.0)
        self.assertEqual(service.settings, expected)
        for _port, factory, _backlog, _interface in self.reactor.tcpServers:
            if isinstance(factory, AudioSocketFactory):
                self.assertEqual(factory.settings, expected)

    def test_stop_service(self) -> None:
        """With no legs, stopping finishes at once and stops every listener."""
        service = self.start()
        self.assertIsNone(self.successResultOf(service.stopService()))
        self.assertFalse(service.running)
        for name in ("audiosocket-visitor", "audiosocket-resident", "http"):
            listener = service.getServiceNamed(name)
            self.assertFalse(listener.running, name)
            self.assertIsNone(listener.port, name)  # type: ignore[attr-defined]

    def test_parts_stop_one_after_another_in_the_stated_order(self) -> None:
        """
        The drain first (it closes the AudioSocket listeners itself), then
        the listeners together, then each part in turn, each once the one
        before it is done (a MultiService would stop them all at once).
        """
        service = self.start()
        stopped: list[str] = []
        draining: Deferred[None] = Deferred()

        def watch(part: IService) -> None:
            original = part.stopService

            def stop() -> object:
                stopped.append(part.name)
                result = original()
                return draining if part.name == "drain" else result

            part.stopService = stop  # type: ignore[method-assign]

        for part in service:
            watch(part)
        done = service.stopService()
        self.assertEqual(stopped, ["drain"])
        self.assertNoResult(done)
        draining.callback(None)
        self.assertIsNone(self.successResultOf(done))
        present = {part.name for part in service}
        self.assertEqual(
            stopped, [name for step in AudioHangupService.STOP_ORDER for name in step if name in present]
        )
        self.assertEqual(
            stopped, ["drain", "audiosocket-visitor", "audiosocket-resident", "http", "gc-pauses", "reactor-lag",
                      "streams", "recorder", "pacer", "relay", "log-level", "hour", "systemd"]
        )

    def test_nothing_outlives_stop_service(self) -> None:
        """
        What the service starts is its own: after stopService no timer is left
        on the reactor, the pacer is stopped, the process-wide hooks (the
        garbage collector's callbacks, the SIGHUP handler of a tokens file) are
        back as they were, and the recordings' thread is gone.
        """
        import gc
        import signal
        import threading

        tokens = tokens_file(self)
        callbacks, handler = list(gc.callbacks), signal.getsignal(signal.SIGHUP)
        threads = set(threading.enumerate())
        service = self.start("--api-tokens-file", tokens)
        self.assertNotEqual(list(gc.callbacks), callbacks)
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), handler)
        relay_reads = relay_module.available()
        self.assertEqual(service.relay in self.reactor.getReaders(), relay_reads)
        self.reactor.advance(1.0)  # the recorder's flush loop runs meanwhile
        self.successResultOf(service.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertFalse(service.pacer.running)
        self.assertNotIn(service.relay, self.reactor.getReaders())
        self.assertEqual(service.relay.fileno(), -1)  # its epoll set closed
        self.assertEqual(list(gc.callbacks), callbacks)
        self.assertEqual(signal.getsignal(signal.SIGHUP), handler)
        self.assertEqual({t for t in threading.enumerate() if t.is_alive()} - threads, set())


class PluginTests(SynchronousTestCase):
    def maker(self) -> IServiceMaker:
        makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "audiohangup"]
        self.assertEqual(len(makers), 1, makers)
        return makers[0]

    def test_discoverable(self) -> None:
        self.assertTrue(verifyObject(IServiceMaker, self.maker()))

    def test_options_are_ours(self) -> None:
        self.assertIs(self.maker().options, tap.Options)

    def test_make_service_is_ours(self) -> None:
        self.assertIs(self.maker().makeService, tap.makeService)

    def test_description(self) -> None:
        self.assertIn("AudioSocket", self.maker().description)


class LayoutTests(SynchronousTestCase):
    """
    C{twisted/plugins/} in the repository is a drop-in directory, not a
    package: an C{__init__.py} there would shadow Twisted's own plugins
    (or Twisted itself) for anything run from the checkout.
    """

    def test_plugin_drop_in_exists(self) -> None:
        self.assertTrue((REPOSITORY / "twisted" / "plugins" / "audiohangup_plugin.py").is_file())

    def test_no_twisted_package(self) -> None:
        self.assertFalse((REPOSITORY / "twisted" / "__init__.py").exists())

    def test_no_twisted_plugins_package(self) -> None:
        self.assertFalse((REPOSITORY / "twisted" / "plugins" / "__init__.py").exists())


class SecretSourcesTests(SynchronousTestCase):
    """
    Every secret can stay off the command line (which every local user reads
    in /proc/PID/cmdline): from a file, or from the environment. A source that
    cannot serve is a usage error naming it, never what it holds.
    """

    def setUp(self) -> None:
        self.folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.folder)
        self.environ = {
            key: value for key, value in os.environ.items()
            if key not in (
                tap.TOKEN_ENVIRONMENT, tap.WEBHOOK_SECRET_ENVIRONMENT, tap.STREAM_SECRET_ENVIRONMENT,
                "AUDIOHANGUP_REDIS_PASSWORD",
            )
        }
        self.patch(os, "environ", self.environ)  # type: ignore[attr-defined]

    def secretFile(self, text: str, name: str = "secret", mode: int = 0o600) -> str:
        path = self.folder / name
        path.write_text(text)
        path.chmod(mode)
        return str(path)

    def assertUsageError(self, args: list[str], *fragments: str, never: str = "") -> None:
        message = str(self.assertRaises(usage.UsageError, parse, *args))
        for fragment in fragments:
            self.assertIn(fragment, message)
        if never:
            self.assertNotIn(never, message)

    def test_secretsFromFiles(self) -> None:
        config = parse(
            "--webhook", "https://hooks.example/x", "--webhook-secret-file", self.secretFile("hook-key\n", "hook"),
            "--stream-secret-file", self.secretFile("stream-key\r\n", "stream"),
        ).config()
        self.assertEqual((config.webhook_secret, config.streams.secret), ("hook-key", "stream-key"))

    def test_secretsFromTheEnvironment(self) -> None:
        self.environ.update({tap.WEBHOOK_SECRET_ENVIRONMENT: "hook-env", tap.STREAM_SECRET_ENVIRONMENT: "stream-env"})
        config = parse().config()
        self.assertEqual((config.webhook_secret, config.streams.secret), ("hook-env", "stream-env"))
        given = parse("--stream-secret-file", self.secretFile("from-file")).config()  # an option wins
        self.assertEqual(given.streams.secret, "from-file")
        self.environ[tap.STREAM_SECRET_ENVIRONMENT] = ""  # empty: as if unset
        self.assertIsNone(parse().config().streams.secret)

    def test_headersFromAFileOrTheEnvironment(self) -> None:
        self.environ["APP_TOKEN"] = "Bearer from-env"
        config = parse(
            "--stream-header-file", f"Authorization: {self.secretFile('Bearer from-file' + chr(10))}",
            "--stream-header-env", "X-App-Token: APP_TOKEN",
            "--stream-header", "X-Site: gate",
        ).config()
        self.assertEqual(
            config.streams.headers,
            (("Authorization", "Bearer from-file"), ("X-App-Token", "Bearer from-env"), ("X-Site", "gate")),
        )

    def test_sourcesThatCannotServe(self) -> None:
        missing = str(self.folder / "missing")
        empty = self.secretFile("\n", "empty")
        nul = self.secretFile("Bearer s3cret\0x\n", "nul")
        for args, fragments in [
            (["--webhook-secret-file", missing], ("--webhook-secret-file: cannot read", missing)),
            (["--stream-secret-file", str(self.folder)], ("--stream-secret-file: cannot read", str(self.folder))),
            (["--stream-secret-file", empty], ("--stream-secret-file:", "is empty")),
            (["--stream-secret", "x", "--stream-secret-file", empty], ("not both",)),
            (["--stream-header-file", f"Authorization: {missing}"], ("--stream-header-file: cannot read", missing)),
            (["--stream-header-file", f"Authorization: {nul}"], ("the value of Authorization holds a control character",)),
            (["--stream-header-env", "Authorization: NO_SUCH_VARIABLE"], ("$NO_SUCH_VARIABLE is not set",)),
            (["--stream-header-env", "Authorization"], ("a header is NAME: VALUE",)),
        ]:
            self.assertUsageError(args, *fragments, never="s3cret")

    def test_aFileOthersMayReadIsRefused(self) -> None:
        """As a tokens file: chmod 600, or --insecure-files says others may read it."""
        shared = self.secretFile("s3cret\n", "shared", mode=0o644)
        for option, argument in [
            ("--webhook-secret-file", shared), ("--stream-secret-file", shared),
            ("--stream-header-file", f"Authorization: {shared}"),
        ]:
            self.assertUsageError([option, argument], f"{option}: {shared}: mode 0644", "--insecure-files", never="s3cret")
        config = parse("--stream-header-file", f"Authorization: {shared}", "--insecure-files").config()
        self.assertEqual(config.streams.headers, (("Authorization", "s3cret"),))  # the flag after the file: still seen
        os.chmod(shared, 0o640)  # a group that may only read: the operator's choice
        self.assertEqual(parse("--webhook-secret-file", shared).config().webhook_secret, "s3cret")

    def test_aHeaderOnceInAnyCase(self) -> None:
        self.environ["APP_TOKEN"] = "Bearer s3cret"
        self.assertUsageError(
            ["--stream-header", "Authorization: Bearer a", "--stream-header-env", "authorization: APP_TOKEN"],
            "--stream-header-env: authorization is given twice", never="s3cret",
        )

    def test_redisPasswordOffTheCommandLine(self) -> None:
        """The Redis password from a file or $AUDIOHANGUP_REDIS_PASSWORD, never beside one in the URL."""
        cluster = ["--redis", "redis://127.0.0.1:6379/2", "--advertise-url", "http://a:8080", "--api-token", "t" * 16]
        config = parse(*cluster, "--redis-password-file", self.secretFile("r3dis\n")).config()
        self.assertEqual((config.redis, config.redis_password), ("redis://127.0.0.1:6379/2", "r3dis"))
        self.assertNotIn("r3dis", repr(config))
        self.environ["AUDIOHANGUP_REDIS_PASSWORD"] = "r3dis-env"
        self.assertEqual(parse(*cluster).config().redis_password, "r3dis-env")
        self.assertIsNone(parse().config().redis_password)  # no --redis: no password wanted
        in_url = ["--redis", "redis://:r3dis@127.0.0.1:6379", *cluster[2:]]
        self.assertUsageError(in_url, "$AUDIOHANGUP_REDIS_PASSWORD gives one too", never="r3dis")
        del self.environ["AUDIOHANGUP_REDIS_PASSWORD"]
        self.assertEqual(parse(*in_url).config().redis_password, None)  # the URL's alone: still taken
        shared = self.secretFile("r3dis\n", "shared", mode=0o644)
        for args, fragments in [
            ([*in_url, "--redis-password-file", self.secretFile("x")], ("--redis-password-file gives one too",)),
            ([*cluster, "--redis-password-file", shared], ("--redis-password-file:", "mode 0644", "--insecure-files")),
            ([*cluster, "--redis-password-file", str(self.folder / "missing")], ("--redis-password-file: cannot read",)),
            (["--redis-password-file", self.secretFile("x")], ("--redis-password-file needs --redis",)),
        ]:
            self.assertUsageError(args, *fragments, never="r3dis")
        self.assertEqual(parse(*cluster, "--redis-password-file", shared, "--insecure-files").config().redis_password, "r3dis")
