"""Issue 13, item 6: a version's usage limit respects its algorithm's nonce bound.

Random 96-bit nonces are safe for about 2^32 messages per key (NIST SP 800-38D): the CLI,
the HTTP API and the config file refuse a usage limit above an algorithm's bound
(``max_messages_per_key``; 2^32 when an algorithm declares none), and encryption never goes
past it, whatever limit a lineage stored earlier.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from identity_helpers import ADMIN_PASSWORD, password_login, serving, with_identity

from qimem import services
from qimem.app import AppContext
from qimem.config import Config
from qimem.errors import ConfigError, PluginError, ValidationError
from qimem.hooks import hookimpl
from qimem.keys import DEFAULT_USAGE_LIMIT, RANDOM_NONCE_MESSAGE_BOUND, max_messages_per_key
from qimem.registry import make_plugin_manager
from qimem.services import lifecycle

CAP = 2**32


def run(*args: str) -> Result:
    from qimem.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False, prog_name="qimem")


def ok(*args: str) -> Result:
    result = run(*args)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


class _Gcm:
    """AES-256-GCM under another name and id, with an optional declared bound."""

    key_size, tag_size = 32, 16

    def __init__(self, name: str, algorithm_id: int, nonce_size: int = 12, **extra: Any) -> None:
        self.name, self.algorithm_id, self.nonce_size = name, algorithm_id, nonce_size
        for attr, value in extra.items():
            setattr(self, attr, value)

    def generate_key(self) -> bytearray:
        return bytearray(os.urandom(32))

    def cipher(self, key: bytes | bytearray) -> AESGCM:
        return AESGCM(bytes(key))

    def encrypt(self, key: Any, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        return AESGCM(bytes(key)).encrypt(nonce[:12], plaintext, aad)

    def decrypt(self, key: Any, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        return AESGCM(bytes(key)).decrypt(nonce[:12], data, aad)


def _app(sqlite_url: str, root_key_b64: str, *algorithms: Any) -> AppContext:
    class Plugin:
        @hookimpl
        def qimem_register_algorithms(self, register: Any) -> None:
            for algorithm in algorithms:
                register(algorithm)

    pm = make_plugin_manager()
    pm.register(Plugin(), name="test-bounds")
    return AppContext(Config(store_url=sqlite_url, root_key_b64=root_key_b64), pm=pm).open()


@pytest.fixture
def home(qimem_home: Path) -> Path:
    ok("init")
    ok("keys", "create", "--name", "k")
    return qimem_home


def test_cli_refuses_a_usage_limit_above_2_to_the_32(home: Path) -> None:
    shown = ok("keys", "policy", "k", "--json").stdout
    assert f'"effective_usage_limit": {DEFAULT_USAGE_LIMIT}' in shown  # default stays 2^31
    result = run("keys", "policy", "k", "--usage-limit", str(CAP + 1))
    assert result.exit_code == 3, result.stderr
    line = result.stderr.strip()
    assert line.startswith("qimem: error: usage_limit 4294967297 is above 4294967296 (2^32)")
    assert "random 96-bit nonces" in line and "\n" not in line
    for huge in (str(2**53 - 1), str(2**64)):
        refused = run("keys", "policy", "k", "--usage-limit", huge)
        assert refused.exit_code == 3 and "(2^32)" in refused.stderr, refused.stderr
    ok("keys", "policy", "k", "--usage-limit", str(CAP))  # exactly the bound is fine
    assert f'"effective_usage_limit": {CAP}' in ok("keys", "policy", "k", "--json").stdout


def test_config_refuses_a_default_above_2_to_the_32(home: Path) -> None:
    config = home / "config.toml"
    config.write_text(config.read_text() + f"\n[keys]\nusage_limit = {CAP + 1}\n")
    result = run("keys", "policy", "k")
    assert result.exit_code == 9, result.stderr
    assert "usage_limit 4294967297 is above 2^32" in result.stderr
    assert "random 96-bit nonces" in result.stderr
    with pytest.raises(ConfigError, match="2\\^32"):
        lifecycle.LifecycleSettings(usage_limit=CAP + 1)
    assert lifecycle.LifecycleSettings(usage_limit=CAP).usage_limit == CAP


def test_http_refuses_a_usage_limit_above_the_bound(sqlite_app: AppContext) -> None:
    app = with_identity(sqlite_app)
    key = services.create_key(app, name="k")
    admin = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    head = {"Authorization": f"Bearer {admin}"}
    with serving(app) as url:
        path = f"{url}/v1/security/keys/{key.key_id}/policy"
        refused = requests.post(path, json={"usage_limit": CAP + 1}, headers=head, timeout=10)
        accepted = requests.post(path, json={"usage_limit": CAP}, headers=head, timeout=10)
        shown = requests.get(path, headers=head, timeout=10).json()
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_policy"
    assert "2^32" in error["message"] and "random 96-bit nonces" in error["message"]
    assert accepted.status_code == 200, accepted.text
    assert shown["effective_usage_limit"] == CAP


def test_an_algorithm_declares_its_own_bound(sqlite_url: str, root_key_b64: str) -> None:
    """A plugin's declared bound caps the limit it may be given, and the default limit:
    the fourth message under a bound of 3 goes to a new version."""
    app = _app(sqlite_url, root_key_b64, _Gcm("tiny-gcm", 201, max_messages_per_key=3))
    try:
        key = services.create_key(app, algorithm="tiny-gcm", name="t")
        with pytest.raises(ValidationError, match="above 3, .*declares it") as caught:
            lifecycle.set_policy(app, "t", usage_limit=4)
        assert caught.value.code == "invalid_policy"
        versions = [services.encrypt(app, "t", b"m%d" % i).version for i in range(4)]
        assert versions == [1, 1, 1, 2]
        assert lifecycle.key_usage(app, "t")[key.key_id] == 3
        lifecycle.set_policy(app, "t", usage_limit=2)  # below the bound: fine
    finally:
        app.close()


def test_an_algorithm_without_the_attribute_gets_the_conservative_default(
    sqlite_url: str, root_key_b64: str
) -> None:
    long_nonce = _Gcm("long-nonce", 202, nonce_size=24)  # declares nothing: still 2^32
    app = _app(sqlite_url, root_key_b64, long_nonce)
    try:
        services.create_key(app, algorithm="long-nonce", name="x")
        with pytest.raises(ValidationError, match="declares no max_messages_per_key"):
            lifecycle.set_policy(app, "x", usage_limit=CAP + 1)
        lifecycle.set_policy(app, "x", usage_limit=CAP)
    finally:
        app.close()
    assert max_messages_per_key(long_nonce) == RANDOM_NONCE_MESSAGE_BOUND
    assert max_messages_per_key(_Gcm("big", 203, max_messages_per_key=2**40)) == 2**40
    for bad in (0, -1, True, "many", 1.5):
        with pytest.raises(PluginError, match="max_messages_per_key"):
            max_messages_per_key(_Gcm("bad", 204, max_messages_per_key=bad))


def test_a_stored_limit_above_the_bound_is_capped_at_encryption(
    sqlite_url: str, root_key_b64: str
) -> None:
    """A policy stored before the bound existed (or written by another tool) is not
    trusted: encryption applies the algorithm's bound anyway."""
    app = _app(sqlite_url, root_key_b64, _Gcm("tiny-gcm", 201, max_messages_per_key=2))
    try:
        key = services.create_key(app, algorithm="tiny-gcm", name="t")
        from dataclasses import replace

        policy = app.store.policy("master", key.lineage_id)
        app.store.set_policy("master", key.lineage_id, replace(policy, usage_limit=10**6))
        versions = [services.encrypt(app, "t", b"m").version for _ in range(3)]
        assert versions == [1, 1, 2]
    finally:
        app.close()
