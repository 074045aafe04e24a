"""Online root rotation (issue 18 part 4; qimem/root/rotation.py) on real SQLite and
PostgreSQL stores: tampered keyrings first (a clear ConfigError at open, through the CLI
too), then every kind of wrapped row moving to the new version and still working, status
counts, rotating twice, resuming, a process whose keyring went stale, a legacy store,
provider migrations (file to another file, env to a plugin's provider, file to PKCS#11 on
SoftHSM2), and two rotations at once."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import root_helpers as rh

from qimem.app import AppContext, build
from qimem.config import Config
from qimem.errors import ConfigError
from qimem.root import keyring as kr
from qimem.root import rotation
from qimem.rootkey import encode_root_key, generate_root_key, write_root_key_file
from qimem.services.crypto import decrypt, encrypt
from qimem.services.keys import create_key


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def key_b64(monkeypatch: pytest.MonkeyPatch) -> str:
    key = encode_root_key(generate_root_key())
    monkeypatch.setenv("QIMEM_ROOT_KEY", key)
    return key


@pytest.fixture
def rotated(url: str, key_b64: str) -> Iterator[tuple[str, bytes]]:
    """A store with one key rotated twice (versions 1, 2 retired; 3 active): its URL and
    an envelope made before the rotations."""
    app = rh.env_app(url, key_b64)
    try:
        create_key(app, name="enc")
        envelope = encrypt(app, "enc", b"before", aad=b"root").envelope
        rh.fast_rotate(app, settle=0.0)
        rh.fast_rotate(app, settle=0.0)
    finally:
        app.close()
    yield url, envelope


# -- tampered keyrings: a clear error at open, never a traceback ----------------------------


def _tamper(text: str, how: str) -> str:
    doc = json.loads(text)
    versions = doc["versions"]
    if how == "not-json":
        return text[:-7]
    if how == "two-actives":
        versions[0]["state"] = "active"
    elif how == "no-active":
        versions[-1]["state"] = "draining"
    elif how == "wrong-check":
        versions[-1]["check"] = "0" * 32
    elif how == "swapped-blobs":
        versions[1]["wrapped"], versions[2]["wrapped"] = (
            versions[2]["wrapped"],
            versions[1]["wrapped"],
        )
        versions[1]["state"] = "draining"  # so version 2 is opened at startup too
    elif how == "derive-blob":
        blob = bytearray(base64.b64decode(doc["derive"]["blob"]))
        blob[-1] ^= 1
        doc["derive"]["blob"] = base64.b64encode(bytes(blob)).decode()
    elif how == "other-store-id":
        doc["id"] = "00000000-0000-4000-8000-000000000000"
    elif how == "unknown-provider":
        versions[-1]["provider"] = "nosuchprovider"
    elif how == "huge":
        doc["padding"] = "x" * (kr.MAX_DOCUMENT + 1)
    return json.dumps(doc)


TAMPERS = [
    "not-json",
    "two-actives",
    "no-active",
    "wrong-check",
    "swapped-blobs",
    "derive-blob",
    "other-store-id",
    "unknown-provider",
    "huge",
]


@pytest.mark.parametrize("how", TAMPERS)
def test_tampered_keyring_is_a_clear_config_error(
    rotated: tuple[str, bytes], key_b64: str, how: str, tmp_path: Path
) -> None:
    url, envelope = rotated
    good = rh.keyring_text(url)
    assert good is not None
    rh.set_keyring_text(url, _tamper(good, how))
    with pytest.raises(ConfigError) as info:
        app = rh.env_app(url, key_b64)
        try:
            app.store  # noqa: B018 - the store attaches its keyring when it opens
            rotation.status(app)
        finally:
            app.close()
    message = str(info.value)
    assert "root" in message and "\n" not in message
    assert key_b64 not in message
    # The CLI says the same in one line, with the config error's exit code (9).
    config = rh.write_config(tmp_path, url)
    commands = [("root", "status")]
    if how in ("not-json", "swapped-blobs", "wrong-check"):
        commands.append(("root", "rotate"))
    for args in commands:
        done = rh.qimem_cli(config, *args, QIMEM_ROOT_KEY=key_b64)
        assert done.returncode == 9, (args, done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert key_b64 not in done.stderr + done.stdout
    assert rh.keyring_text(url) == _tamper(good, how)  # a refused rotation changed nothing
    rh.set_keyring_text(url, good)  # restoring the document restores the store
    app = rh.env_app(url, key_b64)
    try:
        assert decrypt(app, envelope, aad=b"root").plaintext == b"before"
        assert rh.versions_state(app)[3] == ("active", 1)
    finally:
        app.close()


# -- what a rotation moves ------------------------------------------------------------------


def test_rotation_moves_every_kind_of_row_and_everything_still_works(
    url: str, key_b64: str
) -> None:
    app = rh.env_app(url, key_b64)
    try:
        world = rh.populate(app)
        before = rh.rows_by_version(url)
        # the helper's list of wrapped columns is the rotation's
        rows = rotation.root_rows(app)
        assert rows is not None
        columns = {(c.table, c.blob) for c in rows.columns}
        assert columns == set(rh.WRAPPED_COLUMNS.items())
        for table, least in rh.WRAPPED_TABLES.items():
            assert set(before[table]) == {1} and before[table][1] >= least, (table, before)
        legacy = rotation.status(app)
        assert legacy["keyring"] is False and legacy["versions"][0]["direct"] is True
        total = sum(n[1] for n in before.values())
        assert legacy["versions"][0]["rows"] == total
        lines: list[str] = []
        report = rh.fast_rotate(app, progress=lines.append)
        assert report.created and report.active == 2 and report.retired == [1]
        assert sum(report.moved.values()) == total
        assert report.moved["OTP secrets"] == 1 and report.moved["realm login settings"] == 1
        assert any("root version 2" in line for line in lines)
        after = rh.rows_by_version(url)
        assert {t: set(c) for t, c in after.items()} == {t: {2} for t in after}, after
        assert rh.versions_state(app) == {1: ("retired", 0), 2: ("active", total)}
        world.check(app)
    finally:
        rh.close(app)
    app = rh.env_app(url, key_b64)  # a fresh process' view
    try:
        world.check(app)
        report = rh.fast_rotate(app)  # rotating twice
        assert report.active == 3 and report.retired == [2]
        state = rh.versions_state(app)
        assert state == {1: ("retired", 0), 2: ("retired", 0), 3: ("active", total)}
        world.check(app)
        doc = json.loads(rh.keyring_text(url) or "")
        assert doc["derive"]["version"] == 3 and doc["active"] == 3
    finally:
        rh.close(app)


def test_interrupted_rotation_resumes_without_a_new_version(url: str, key_b64: str) -> None:
    """A keyring with a draining version (a rotation that died after its first step): the
    next rotation moves the rows to the version already active, and retires the old one."""
    app = rh.env_app(url, key_b64)
    try:
        world = rh.populate(app)
        wrapper = rotation._wrapper(app)
        rotation._new_version(app, wrapper, lambda _line: None)  # step 1 only
        state = rh.versions_state(app)
        assert state[1][0] == "draining" and state[2] == ("active", 0)
        world.check(app)  # rows under either version open
        report = rh.fast_rotate(app)
        assert not report.created and report.active == 2 and report.retired == [1]
        assert rh.versions_state(app)[1] == ("retired", 0)
        world.check(app)
    finally:
        rh.close(app)


def test_a_process_opened_before_the_rotation_follows_it(url: str, key_b64: str) -> None:
    """Another process's cached keyring goes stale: it unwraps a new-version blob by
    reloading the keyring at once, and wraps under the new version within about a second;
    rows it wrapped under the old one meanwhile are moved before the old version retires."""
    rotator = rh.env_app(url, key_b64, cache_ttl=0)
    stale = rh.env_app(url, key_b64, cache_ttl=0)
    writer = rh.env_app(url, key_b64, cache_ttl=0)
    try:
        world = rh.populate(rotator)
        assert decrypt(stale, world.envelopes[0][1], aad=b"root").plaintext == b"v1"
        create_key(writer, name="w-0")
        assert stale.wrapper is not None and writer.wrapper is not None
        assert stale.wrapper.active_version == 1
        stop = threading.Event()
        made: list[str] = []
        failures: list[BaseException] = []

        def write() -> None:  # the other process keeps creating keys during the rotation
            try:
                while not stop.is_set():
                    name = f"w-{len(made) + 1}"
                    create_key(writer, name=name)
                    made.append(name)
                    stop.wait(0.02)  # a steady trickle of new rows, not a flood
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        try:
            rotation.rotate(rotator)  # the real settle time: other processes wrap meanwhile
        finally:
            stop.set()
            thread.join()
        assert not failures, failures
        assert made, "the writer made no key during the rotation"
        counts = rh.count_rows(rotator)
        assert set(counts) == {2}, counts  # nothing left under version 1
        # A key created now by the rotator, then read by the stale process that has not
        # wrapped since: the version-2 blob makes it reload the keyring.
        create_key(rotator, name="fresh")
        sealed = encrypt(rotator, "fresh", b"new", aad=b"root").envelope
        assert stale.wrapper.active_version == 1
        assert decrypt(stale, sealed, aad=b"root").plaintext == b"new"
        assert stale.wrapper.active_version == 2
        assert writer.wrapper.active_version == 2
        for name in made:
            assert encrypt(stale, name, b"x", aad=b"root").key_id
        world.check(stale)
    finally:
        for app in (writer, stale, rotator):
            rh.close(app)


def test_status_through_the_cli(url: str, key_b64: str, tmp_path: Path) -> None:
    app = rh.env_app(url, key_b64)
    try:
        rh.populate(app)
    finally:
        rh.close(app)
    config = rh.write_config(tmp_path, url)
    done = rh.qimem_cli(config, "root", "status", "--json", QIMEM_ROOT_KEY=key_b64)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["keyring"] is False
    done = rh.qimem_cli(config, "root", "rotate", "--json", QIMEM_ROOT_KEY=key_b64)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["active"] == 2 and report["retired"] == [1]
    assert "root version 2 (env) is active" in done.stderr
    done = rh.qimem_cli(config, "root", "status", QIMEM_ROOT_KEY=key_b64)
    assert done.returncode == 0 and "active root version: 2" in done.stdout
    assert key_b64 not in done.stdout + done.stderr


# -- provider migrations ---------------------------------------------------------------------


def test_file_to_another_file(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point [root_key] file at a new path and rotate: the rotation creates the new file;
    afterwards the old one can be deleted. A store that never had a keyring is first
    rotated in place (its version 1 is the old file itself)."""
    monkeypatch.delenv("QIMEM_ROOT_KEY", raising=False)
    old, new = tmp_path / "old.key", tmp_path / "keys" / "new.key"
    write_root_key_file(old)
    app = rh.file_app(url, old)
    try:
        world = rh.populate(app)
    finally:
        rh.close(app)
    with pytest.raises(ConfigError, match="no root keyring"):  # legacy: old file unknown
        app = rh.file_app(url, new)
        try:
            app.store  # noqa: B018
        finally:
            app.close()
    assert not new.exists()
    app = rh.file_app(url, old)
    try:
        rh.fast_rotate(app)  # in place: the store gets a keyring naming old.key
    finally:
        rh.close(app)
    config = rh.write_config(tmp_path, url, root_file=new)
    # The old file stays trusted while the rotation moves away from it: the keyring is
    # authenticated only by roots the configuration names, never by recorded settings.
    with Path(config).open("a") as fh:
        fh.write(f'\n[[root_key.previous]]\nprovider = "file"\nfile = "{old}"\n')
    done = rh.qimem_cli(config, "root", "rotate")
    assert done.returncode == 0, done.stderr
    assert new.exists() and (new.stat().st_mode & 0o077) == 0
    old.unlink()
    app = rh.file_app(url, new)
    try:
        world.check(app)
        state = rh.versions_state(app)
        assert state[3][0] == "active" and all(s == "retired" for s, _ in list(state.values())[:2])
        status = rotation.status(app)
        assert status["versions"][-1]["settings"] == {"file": str(new)}
    finally:
        rh.close(app)


def test_env_to_a_plugin_provider(
    url: str, key_b64: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QIMEM_ROOT_KEY to a provider a plugin registers (tests/root_provider_helpers.py's
    ``sealbox``): afterwards the store opens without QIMEM_ROOT_KEY."""
    import root_provider_helpers as plugin

    from qimem.registry import make_plugin_manager

    def pm() -> Any:
        manager = make_plugin_manager()
        manager.register(plugin, name="sealbox-test")
        return manager

    secret = tmp_path / "sealbox.key"
    plugin.write_secret(secret)
    settings = {"key_file": str(secret)}

    def open_app(**config: Any) -> AppContext:
        return build(
            Config(
                store_url=url, root_key_provider="sealbox", root_key_settings=settings, **config
            ),
            pm=pm(),
            open=True,
        )

    app = rh.env_app(url, key_b64)
    try:
        world = rh.populate(app)
    finally:
        rh.close(app)
    app = open_app(root_key_b64=key_b64)
    try:
        report = rh.fast_rotate(app)
        assert report.active == 2
        assert rotation.status(app)["versions"][-1]["provider"] == "sealbox"
    finally:
        rh.close(app)
    monkeypatch.delenv("QIMEM_ROOT_KEY")
    app = open_app()
    try:
        world.check(app)
        assert set(rh.count_rows(app)) == {2}
    finally:
        rh.close(app)
    # a different sealbox secret is refused by name, not a failure on every row
    secret.unlink()
    plugin.write_secret(secret)
    with pytest.raises(ConfigError, match="root version 2"):
        app = open_app()
        try:
            app.store  # noqa: B018
        finally:
            app.close()


def test_file_to_pkcs11_on_softhsm(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root key file to a non-extractable AES key in a SoftHSM2 token: configure the
    pkcs11 provider next to the old file, rotate, delete the file."""
    from softhsm_helpers import softhsm

    from qimem.builtin_plugins.root_pkcs11_provider import create_root_key

    hsm = softhsm()
    monkeypatch.delenv("QIMEM_ROOT_KEY", raising=False)
    label = f"rot-{tmp_path.name[-12:]}"
    settings = hsm.settings(tmp_path, "qimem-a", label)
    create_root_key(settings, tmp_path)
    old = tmp_path / "old.key"
    write_root_key_file(old)
    app = rh.file_app(url, old)
    try:
        world = rh.populate(app)
    finally:
        rh.close(app)

    def pkcs11_app(root_file: Path | None) -> AppContext:
        return build(
            Config(
                store_url=url,
                root_key_file=root_file,
                root_key_provider="pkcs11",
                root_key_settings=settings,
            ),
            open=True,
        )

    app = pkcs11_app(old)
    try:
        report = rh.fast_rotate(app)
        assert report.active == 2 and report.retired == [1]
    finally:
        rh.close(app)
    old.unlink()
    app = pkcs11_app(None)
    try:
        world.check(app)
        version = rotation.status(app)["versions"][-1]
        assert version["provider"] == "pkcs11" and version["state"] == "active"
        assert hsm.pin("qimem-a") not in json.dumps(rotation.status(app))  # a path, no PIN
    finally:
        rh.close(app)


# -- two rotations at once ---------------------------------------------------------------------


def test_two_rotations_at_once(url: str, key_b64: str, tmp_path: Path) -> None:
    """Two ``qimem root rotate`` processes started together: each either completes (one
    made the version, the other resumed it) or stops with a one-line conflict (exit 6);
    afterwards every row is under the one active version and everything works."""
    app = rh.env_app(url, key_b64)
    try:
        world = rh.populate(app)
    finally:
        rh.close(app)
    config = rh.write_config(tmp_path, url)
    argv = [
        "-c",
        "from qimem.cli import main; main()",
        "root",
        "rotate",
        "--json",
    ]
    import sys

    children = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rh.cli_env(config, QIMEM_ROOT_KEY=key_b64),
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [child.communicate(timeout=120) + (child.returncode,) for child in children]
    codes = sorted(rc for _, _, rc in outcomes)
    assert codes in ([0, 0], [0, 6]), outcomes
    for _, err, rc in outcomes:
        assert "Traceback" not in err
        if rc == 6:
            assert len(err.strip().splitlines()) == 1 and "root keyring" in err
    app = rh.env_app(url, key_b64)
    try:
        status = rotation.status(app)
        active = status["active"]
        assert active == 2, status  # one new version, not two
        assert set(rh.count_rows(app)) == {active}
        assert [v["state"] for v in status["versions"]] == ["retired", "active"]
        world.check(app)
    finally:
        rh.close(app)


def test_keyring_record_tampered_on_a_retired_version_is_refused(
    rotated: tuple[str, bytes], key_b64: str
) -> None:
    """Any edit of the keyring document, even of a retired version's record, breaks its
    tags: the store refuses it at open (red team finding 1: recorded settings are used only
    once the document is authenticated by a root the configuration names)."""
    url, envelope = rotated
    keyring = kr.parse(rh.keyring_text(url) or "")
    first, second, *rest = keyring.versions
    damaged = replace(keyring, versions=(first, replace(second, check="f" * 32), *rest))
    rh.set_keyring_text(url, damaged.dump())
    with pytest.raises(ConfigError, match="not vouched for"):
        app = rh.env_app(url, key_b64)
        try:
            decrypt(app, envelope, aad=b"root")
        finally:
            app.close()
