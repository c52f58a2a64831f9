"""Tests for mtad.config."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mtad.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).parent.parent / "conf" / "mtad.toml.example"


class ConfigTests(SynchronousTestCase):
    def test_no_file_gives_defaults(self) -> None:
        """With no config file mtad runs on embedded defaults: SQLite in data_dir, embedded Redis."""
        config = load_config(None)
        self.assertEqual(config.redis.url, "")
        self.assertTrue(config.database_url.startswith("sqlite:///"))
        self.assertTrue(config.database_url.endswith("/data/mtad.sqlite3"))
        self.assertEqual([p.name for p in config.pools()], ["default"])

    def test_example_parses_to_defaults(self) -> None:
        """The example file is valid and its values are the defaults it claims to show."""
        self.assertEqual(load_config(EXAMPLE), Config())

    def test_example_documents_every_key(self) -> None:
        """Every configuration key appears in conf/mtad.toml.example."""
        text = EXAMPLE.read_text()
        missing = []
        for section, cls in _sections():
            for field in attrs.fields(cls):
                key = re.escape(field.name)
                table = re.escape(f"{section}.{field.name}" if section else field.name)
                if not re.search(rf"^(# )?({key} =|\[\[?{table}\]\]?$)", text, re.M):
                    missing.append(f"{section}.{field.name}")
        self.assertEqual(missing, [])

    def test_every_problem_reported_by_key_path(self) -> None:
        """A bad file lists all its problems at once, each by key path, unknown keys included."""
        data = tomllib.loads(
            """
            colour = "blue"
            [smtp]
            max_recipients = 0
            [[smtp.listeners]]
            endpoint = "tcp:25"
            tls = "sometimes"
            [[smtp.listeners]]
            tls = "none"
            [dns]
            timeout = "soon"
            """
        )
        with self.assertRaises(ConfigError) as cm:
            parse_config(data)
        self.assertEqual(
            sorted(cm.exception.problems),
            sorted(
                [
                    "colour: unknown key",
                    "smtp.max_recipients: must be greater than 0 (got 0)",
                    "smtp.listeners[0].tls: must be one of none, starttls, implicit (got 'sometimes')",
                    "smtp.listeners[1].endpoint: required key is missing",
                    "dns.timeout: must be a number (got 'soon')",
                ]
            ),
        )

    def test_cross_checks(self) -> None:
        """A default pool that does not exist and a pool without addresses are both reported."""
        with self.assertRaises(ConfigError) as cm:
            parse_config({"ip_pools": [{"name": "a"}], "delivery": {"default_pool": "b"}})
        self.assertEqual(
            cm.exception.problems,
            [
                "delivery.default_pool: no pool named 'b' in ip_pools",
                "ip_pools[0].addresses: a pool needs at least one address",
            ],
        )

    def test_unreadable_and_invalid_toml(self) -> None:
        """A missing file and a file that is not TOML are errors naming the file."""
        with self.assertRaises(ConfigError) as cm:
            load_config("/nonexistent/mtad.toml")
        self.assertIn("/nonexistent/mtad.toml: cannot read", cm.exception.problems[0])
        bad = Path(self.mktemp())
        bad.write_text("[smtp\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(bad)
        self.assertIn("not valid TOML", cm.exception.problems[0])


def _sections() -> list[tuple[str, type]]:
    import mtad.config as c

    return [
        ("", c.Config),
        ("general", c.GeneralConfig),
        ("database", c.DatabaseConfig),
        ("redis", c.RedisConfig),
        ("smtp", c.SMTPServerConfig),
        ("smtp.listeners", c.ListenerConfig),
        ("http", c.HTTPConfig),
        ("dns", c.DNSConfig),
        ("delivery", c.DeliveryConfig),
        ("delivery.retry", c.RetryConfig),
        ("ip_pools", c.IPPoolConfig),
        ("ip_pools.addresses", c.SourceAddressConfig),
    ]
