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
import re
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


# ---- the config's owner and directory (red-team RT-7) ------------------------------------

CONFIG_TEXT = '[store]\nurl = "sqlite:////tmp/attacker-store.db"\n'
NOBODY = 65534


@pytest.fixture
def as_root() -> None:
    """The test gives files to another uid: only root can."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")


def private_config(directory: Path) -> Path:
    """``directory/config.toml``, mode 0600, in a directory made 0700."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = directory / "config.toml"
    path.write_text(CONFIG_TEXT)
    path.chmod(0o600)
    return path


def test_finding11_config_owned_by_another_user_is_refused(qimem_home: Path, as_root: None) -> None:
    assert run("init").exit_code == 0
    path = qimem_home / "config.toml"
    path.chmod(0o644)
    os.chown(path, NOBODY, NOBODY)  # its owner may rewrite it at will
    result = run("keys", "list")
    assert result.exit_code == ConfigError.exit_code == 9
    assert str(path) in result.stderr and f"uid {NOBODY}" in result.stderr
    assert "chown" in result.stderr and "Traceback" not in result.output
    os.chown(path, 0, 0)  # root's (or your own) file is fine
    assert run("keys", "list").exit_code == 0


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707, 0o730], ids=lambda m: f"{m:04o}")
def test_finding11_config_in_a_directory_others_may_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = private_config(tmp_path / "shared")
    path.parent.chmod(mode)  # no sticky bit: anyone may rename a file of his over it
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert str(path) in message and f"{mode:04o}" in message
    assert f"chmod go-w {path.parent}" in message
    path.parent.chmod(mode | stat.S_ISVTX)  # sticky (like /tmp): only the owner may replace
    assert load_config(path).store_url.endswith("attacker-store.db")
    path.parent.chmod(0o755)
    load_config(path)


def test_finding11_config_in_a_directory_of_another_user_is_refused(
    tmp_path: Path, as_root: None
) -> None:
    path = private_config(tmp_path / "theirs")
    os.chown(path.parent, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
        load_config(path)


def test_finding11_symlinked_config_is_accepted_only_if_its_target_passes(
    tmp_path: Path,
) -> None:
    target = private_config(tmp_path / "private")
    link = tmp_path / "links" / "config.toml"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(target)
    load_config(link)  # a private target through a private link: fine
    target.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        load_config(link)
    target.chmod(0o600)
    target.parent.chmod(0o777)  # the target's directory: anyone may replace the target
    with pytest.raises(ConfigError, match=re.escape(str(target.parent))):
        load_config(link)
    target.parent.chmod(0o700)
    link.parent.chmod(0o777)  # the link's directory: anyone may replace the link
    with pytest.raises(ConfigError, match=re.escape(str(link.parent))):
        load_config(link)
    link.parent.chmod(0o700)
    load_config(link)


def test_finding11_symlinked_config_owned_by_another_user_is_refused(
    tmp_path: Path, as_root: None
) -> None:
    target = private_config(tmp_path / "private")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "config.toml"
    link.symlink_to(target)
    load_config(link)
    os.lchown(link, NOBODY, NOBODY)  # in a sticky directory its owner may still replace it
    with pytest.raises(ConfigError, match=f"symlink belonging to uid {NOBODY}"):
        load_config(link)
    os.chown(target, NOBODY, NOBODY)  # follows the link: the target is another's
    os.lchown(link, 0, 0)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
        load_config(link)
