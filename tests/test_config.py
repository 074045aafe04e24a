"""Configuration: where it is read from, what overrides what, and how it is written."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from qimem.config import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    Config,
    default_config_path,
    default_store_url,
    load_config,
)
from qimem.errors import ConfigError


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_file(qimem_home: Path) -> Path:
    return write_config(
        qimem_home / "config.toml",
        '[store]\nurl = "sqlite:////from/file.db"\n'
        '[root_key]\nfile = "/keys/root.key"\n'
        '[plugins]\nenabled = ["one", "two"]\n'
        "[cache]\nttl_seconds = 2.5\n"
        "[limits]\nmax_envelope_bytes = 1024\n",
    )


def test_file_values(config_file: Path) -> None:
    config = load_config()
    assert config.path == config_file
    assert config.store_url == "sqlite:////from/file.db"
    assert config.root_key_file == Path("/keys/root.key")
    assert config.plugins_enabled == ["one", "two"]
    assert config.cache_ttl == 2.5
    assert config.max_envelope_bytes == 1024
    assert config.root_key_b64 is None


def test_store_precedence_argument_env_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config().store_url == "sqlite:////from/file.db"
    monkeypatch.setenv("QIMEM_STORE", "sqlite:////from/env.db")
    assert load_config().store_url == "sqlite:////from/env.db"
    assert load_config(store_url="memory://").store_url == "memory://"
    monkeypatch.delenv("QIMEM_STORE")
    assert load_config(store_url="memory://").store_url == "memory://"


def test_config_path_precedence(
    qimem_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_config_path() == qimem_home / "config.toml"
    env_file = write_config(tmp_path / "env.toml", '[store]\nurl = "memory://env"\n')
    arg_file = write_config(tmp_path / "arg.toml", '[store]\nurl = "memory://arg"\n')
    monkeypatch.setenv("QIMEM_CONFIG", str(env_file))
    assert default_config_path() == env_file
    assert load_config().store_url == "memory://env"
    assert load_config(arg_file).store_url == "memory://arg"


def test_root_key_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QIMEM_ROOT_KEY", "c2VjcmV0")
    config = load_config()
    assert config.root_key_b64 == "c2VjcmV0"
    assert "c2VjcmV0" not in repr(config)
    assert "c2VjcmV0" not in repr(config.to_toml())


def test_missing_file(qimem_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="qimem init"):
        load_config()
    defaults = load_config(required=False)
    assert defaults.store_url == default_store_url()
    assert default_store_url() == f"sqlite:///{qimem_home / 'qimem.db'}"
    assert defaults.plugins_enabled == []
    assert defaults.max_envelope_bytes == DEFAULT_MAX_ENVELOPE_BYTES
    # A store given explicitly is enough to run without a file.
    assert load_config(store_url="memory://").store_url == "memory://"
    monkeypatch.setenv("QIMEM_STORE", "memory://")
    assert load_config().store_url == "memory://"


@pytest.mark.parametrize(
    "text",
    [
        "[store\nurl = 1",
        'store = "unterminated',
        "[store]\nurl = 1\n[store]\nurl = 2\n",  # duplicate table
        "\xff\xfe not utf-8",
    ],
)
def test_malformed_toml(qimem_home: Path, text: str) -> None:
    path = qimem_home / "config.toml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[plugins]\nenabled = "myplug"\n', "plugins.enabled must be a list"),
        ("[plugins]\nenabled = [1, 2]\n", "plugins.enabled must be a list"),
        ('[plugins]\nenabled = [["nested"]]\n', "plugins.enabled must be a list"),
        ('plugins = "all"\n', "[plugins] must be a table"),
        ('store = "sqlite:///x.db"\n', "[store] must be a table"),
        ('[cache]\nttl_seconds = "soon"\n', "not a number"),
        ('[limits]\nmax_envelope_bytes = "big"\n', "not a number"),
    ],
)
def test_bad_values(qimem_home: Path, text: str, problem: str) -> None:
    write_config(qimem_home / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert problem in str(info.value)


def test_config_path_is_a_directory(qimem_home: Path) -> None:
    (qimem_home / "config.toml").mkdir()
    with pytest.raises(ConfigError, match="config.toml"):
        load_config()


def test_write_round_trips_and_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "config.toml"
    config = Config(
        store_url="sqlite:////data/q.db",
        root_key_file=Path("/data/root.key"),
        root_key_b64="dGhlIHJvb3Qga2V5IGl0c2VsZg==",
        plugins_enabled=["audit"],
        cache_ttl=1.0,
        max_envelope_bytes=4096,
    )
    config.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "dGhlIHJvb3Qga2V5IGl0c2VsZg==" not in text  # never the root key itself
    doc = tomllib.loads(text)
    assert doc["store"]["url"] == "sqlite:////data/q.db"
    assert doc["root_key"]["file"] == "/data/root.key"
    loaded = load_config(path)
    assert (loaded.store_url, loaded.root_key_file, loaded.plugins_enabled) == (
        "sqlite:////data/q.db",
        Path("/data/root.key"),
        ["audit"],
    )
    assert (loaded.cache_ttl, loaded.max_envelope_bytes) == (1.0, 4096)


def test_write_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("old = true\n")
    os.chmod(path, 0o644)
    old_inode = path.stat().st_ino
    Config(store_url="memory://").write(path)
    # A new file was renamed over the old one (not rewritten in place), with 0600.
    assert path.stat().st_ino != old_inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tomllib.loads(path.read_text())["store"]["url"] == "memory://"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("old = true\n")
    broken = Config(store_url="memory://", plugins_enabled=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        broken.write(path)
    assert path.read_text() == "old = true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


# -- one parser: every section read once into one frozen Settings -------------------------


def test_one_frozen_settings_with_every_section(qimem_home: Path) -> None:
    import dataclasses

    from qimem.config import LifecycleSettings, Settings

    path = write_config(
        qimem_home / "config.toml",
        '[store]\nurl = "memory://"\n[keys]\nusage_reserve_block = 3\n'
        "[identity]\naccess_token_ttl = 60\n[serve]\nconnection_limit = 10\n",
    )
    settings = load_config(path, plugins=["extra"])
    assert isinstance(settings, Settings) and Config is Settings
    assert settings.keys == LifecycleSettings(usage_reserve_block=3)
    assert settings.identity == {"access_token_ttl": 60}
    assert settings.serve == {"connection_limit": 10}
    assert settings.plugins_enabled == ["extra"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.store_url = "sqlite:///elsewhere.db"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[keys]\nusage_limit = 0\n", "[keys] usage_limit and usage_reserve_block must be"),
        ("[keys]\nnope = 1\n", "unknown [keys] setting 'nope'"),
        ("[keys]\nusage_limit = 'x'\n", "[keys] values must be integers"),
        ("keys = 3\n", "[keys] must be a table"),
        ("identity = 3\n", "[identity] must be a table"),
    ],
)
def test_section_errors_name_the_file(qimem_home: Path, text: str, problem: str) -> None:
    path = write_config(qimem_home / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.exit_code == 9
    assert problem in info.value.message
    assert str(path) in info.value.message


def test_section_loaders_share_the_parser(qimem_home: Path) -> None:
    """The lifecycle and identity loaders read the same file through the same parser."""
    from qimem.identity.settings import load_settings as identity_settings
    from qimem.services.lifecycle import load_settings as lifecycle_settings

    path = write_config(
        qimem_home / "config.toml", "[keys]\nmin_deletion_days = 9\n[identity]\naudience = 'x'\n"
    )
    assert lifecycle_settings(path) == load_config(path).keys
    assert identity_settings(path).audience == "x"
    with pytest.raises(ConfigError, match=r"config.toml: unknown identity setting 'nope'"):
        identity_settings(write_config(path, "[identity]\nnope = 1\n"))
