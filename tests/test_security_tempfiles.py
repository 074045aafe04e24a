"""Finding 11: temp files at names an attacker can predict, and a config others may write.

The attacker is a local user who can create entries in a directory qimem writes to (a
shared data directory, an output directory) and plants a symlink at the temp name qimem
will use, pointing at a file of the victim's he wants overwritten. He is modelled as one
who guessed the name: the random bytes of ``qimem.fileio``'s next temp name are replaced by
the attacker's guess for one draw, so the planted name is exactly the one qimem tries first.
"""

from __future__ import annotations

import io
import os
import stat
import types
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qimem import batch, fileio
from qimem.app import AppContext
from qimem.cli import cli
from qimem.config import Config, load_config, write_toml
from qimem.errors import ConfigError
from qimem.rootkey import read_root_key_file, write_root_key_file
from qimem.services import files as file_services

VICTIM = b"the victim's file, which must survive\n"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def guessed(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """The attacker guessed qimem's next temp name: the random bytes of fileio's next temp
    name are first all zero (then random again). Only fileio's ``os.urandom`` is affected."""
    state = types.SimpleNamespace(first=True)

    class GuessedOs:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def urandom(size: int) -> bytes:
            if state.first:
                state.first = False
                return bytes(size)
            return os.urandom(size)

    monkeypatch.setattr(fileio, "os", GuessedOs())
    return state


def plant(target: Path, victim: Path, guessed: types.SimpleNamespace) -> list[Path]:
    """Symlinks to ``victim`` at every temp name for ``target`` an attacker can predict:
    the old fixed ``.NAME.tmpPID`` and the name qimem will draw first."""
    victim.write_bytes(VICTIM)
    names = [target.with_name(f".{target.name}.tmp{os.getpid()}")]
    names.append(fileio.temp_name(target))  # uses up the 'guess' draw ...
    guessed.first = True  # ... which qimem draws again
    for name in names:
        name.symlink_to(victim)
    return names


def assert_untouched(victim: Path, links: list[Path]) -> None:
    assert victim.read_bytes() == VICTIM
    for link in links:
        assert link.is_symlink() and os.readlink(link) == str(victim)


def test_finding11_config_write_does_not_follow_a_planted_symlink(
    tmp_path: Path, guessed: types.SimpleNamespace
) -> None:
    path = tmp_path / "config.toml"
    links = plant(path, tmp_path / "victim", guessed)
    Config(store_url="sqlite:///x.db").write(path)
    assert_untouched(tmp_path / "victim", links)
    assert load_config(path).store_url == "sqlite:///x.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.is_symlink()


def test_finding11_config_rewrite_keeps_mode_and_ignores_planted_symlinks(
    tmp_path: Path, guessed: types.SimpleNamespace
) -> None:
    path = tmp_path / "config.toml"
    Config(store_url="sqlite:///x.db").write(path)
    path.chmod(0o640)
    links = plant(path, tmp_path / "victim", guessed)
    write_toml(path, {"store": {"url": "sqlite:///y.db"}})  # as 'plugins enable' does
    assert_untouched(tmp_path / "victim", links)
    assert load_config(path).store_url == "sqlite:///y.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_finding11_init_does_not_follow_planted_symlinks(
    qimem_home: Path, guessed: types.SimpleNamespace
) -> None:
    links = plant(qimem_home / "config.toml", qimem_home / "victim", guessed)
    result = run("init")
    assert result.exit_code == 0, result.output
    assert_untouched(qimem_home / "victim", links)
    assert stat.S_IMODE((qimem_home / "config.toml").stat().st_mode) == 0o600


def test_finding11_root_key_write_does_not_follow_a_planted_symlink(
    tmp_path: Path, guessed: types.SimpleNamespace
) -> None:
    path = tmp_path / "root.key"
    links = plant(path, tmp_path / "victim", guessed)
    key = write_root_key_file(path)
    assert_untouched(tmp_path / "victim", links)
    assert read_root_key_file(path) == key


def test_finding11_atomic_output_does_not_follow_a_planted_symlink(
    tmp_path: Path, guessed: types.SimpleNamespace
) -> None:
    path = tmp_path / "export.bin"
    links = plant(path, tmp_path / "victim", guessed)
    with fileio.atomic_output(path) as fh:
        fh.write(b"exported")
    assert_untouched(tmp_path / "victim", links)
    assert path.read_bytes() == b"exported"


def test_finding11_batch_outputs_do_not_follow_planted_symlinks(
    memory_app: AppContext, tmp_path: Path, guessed: types.SimpleNamespace
) -> None:
    from qimem import services

    services.create_key(memory_app, name="t")
    src = tmp_path / "doc.txt"
    src.write_bytes(b"secret document")
    links = plant(tmp_path / "doc.txt.qimem", tmp_path / "victim", guessed)
    result = batch.run(memory_app, batch.plan([src], batch.ENCRYPT), batch.ENCRYPT, key_ref="t")
    assert result.failures == []
    assert_untouched(tmp_path / "victim", links)
    sealed = tmp_path / "doc.txt.qimem"
    plain = io.BytesIO()
    file_services.decrypt_stream(memory_app, sealed.open("rb"), plain)
    assert plain.getvalue() == b"secret document"
    # Rewrapping in place writes a temp file too.
    services.rotate_key(memory_app, "t")
    for link in links:
        link.unlink()
    links = plant(sealed, tmp_path / "victim", guessed)
    assert file_services.rewrap_file(memory_app, sealed)[1] is True
    assert_untouched(tmp_path / "victim", links)


def test_finding11_temp_files_are_created_exclusively_without_following(tmp_path: Path) -> None:
    target = tmp_path / "out"
    fd, tmp = fileio.create_temp(target)
    os.close(fd)
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
    assert fileio.CREATE_FLAGS & os.O_EXCL and fileio.CREATE_FLAGS & os.O_NOFOLLOW
    assert len(tmp.name.rsplit("-", 1)[1]) == 16  # 64 random bits


def test_finding11_temp_name_of_a_longest_name_fits(tmp_path: Path) -> None:
    target = tmp_path / ("é" * 120 + "x" * 8)  # 248 bytes: fits, its temp name must too
    with fileio.atomic_output(target) as fh:
        fh.write(b"x")
    assert target.read_bytes() == b"x"
    assert fileio.temp_owner(fileio.temp_name(target).name) == os.getpid()


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660])
def test_finding11_group_or_world_writable_config_is_refused(qimem_home: Path, mode: int) -> None:
    assert run("init").exit_code == 0
    path = qimem_home / "config.toml"
    path.chmod(mode)
    result = run("keys", "list")
    assert result.exit_code == ConfigError.exit_code == 9
    assert str(path) in result.stderr and f"{mode:04o}" in result.stderr
    assert f"chmod go-w {path}" in result.stderr
    assert "Traceback" not in result.output
    with pytest.raises(ConfigError, match="writable by group or others"):
        load_config(path)
    path.chmod(0o644)  # readable by others is fine: it holds no secret
    assert run("keys", "list").exit_code == 0
