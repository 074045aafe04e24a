"""Red-team tests for the root of trust (issue 18): what an outside attacker tries against
the keyring, the providers and the files they read. Finding 1 (recorded provider
settings used as configuration) is fixed: the keyring is authenticated (tags under a root the
configuration names) before anything recorded in it is used; the rest are guards.

The attacker of the first section can write the database (a DBA, a stolen replication
credential, an SQL injection elsewhere) but not the server's host: he edits the
``qimem_root_keyring`` row only. A keyring is a plain JSON document, so everything it
records (a version's provider, its settings, its state) is his to choose.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redteam_root_helpers as rt
import root_helpers as rh
import sqlalchemy as sa

from qimem import fileio
from qimem.builtin_plugins.root_qimem_provider import QimemRootKeyProvider, read_credential
from qimem.errors import ConfigError, DecryptionError
from qimem.root import keyring as kr
from qimem.root import rotation
from qimem.root.kwk import check_value
from qimem.rootkey import encode_root_key, generate_root_key, read_root_key_file
from qimem.services.crypto import encrypt
from qimem.services.keys import create_key

# -- a file-rooted SQLite store that was rotated once (version 2 active) ----------------------


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[tuple[str, Path, bytes]]:
    """The store's URL, its root key file, and an upstream-style envelope the attacker can
    reuse as a "wrapped" blob (any well-formed envelope: he answers the decrypt himself)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    key_file = tmp_path / "root.key"
    from qimem.rootkey import write_root_key_file

    write_root_key_file(key_file)[:] = bytes(32)
    app = rh.file_app(url, key_file)
    try:
        create_key(app, name="enc")
        envelope = encrypt(app, "enc", b"x", aad=b"").envelope
        rh.fast_rotate(app, settle=0.0)
    finally:
        rh.close(app)
    yield url, key_file, envelope


FINDING_1 = (
    "finding 1 (critical): a database writer chooses a root version's provider settings "
    "(url, token_file, library...) and the server uses them as configuration"
)


def test_db_writer_cannot_send_a_local_secret_file_to_his_server(
    victim: tuple[str, Path, bytes],
) -> None:
    """A ``qimem`` version whose ``token_file`` is the server's root key file and whose
    ``url`` is the attacker's: the server reads the file and sends it as a bearer token."""
    url, key_file, envelope = victim
    evil = rt.EvilUpstream(os.urandom(32), rt.envelope_key_id(envelope))
    try:
        settings = {"url": evil.url, "key": "k", "token_file": str(key_file), "timeout": 2}
        rt.inject(url, "qimem", settings, b"\x01" + envelope, "00" * 16)
        app = rt.open_quietly(url, key_file)
        if app is not None:
            rh.close(app)
        root_key = key_file.read_text().strip().encode()
        assert root_key not in evil.sent(), "the root key file was sent to the attacker"
        assert not evil.seen, "the server contacted a URL only the database named"
    finally:
        evil.close()


def test_db_writer_cannot_make_the_server_wrap_new_keys_under_his_kwk(
    victim: tuple[str, Path, bytes], tmp_path: Path
) -> None:
    """The attacker's upstream answers the unwrap with a KWK he chose and the keyring
    records its check value: new key material is then sealed under a key he knows, and he
    reads it from the database he can already read."""
    url, key_file, envelope = victim
    kwk = os.urandom(32)
    evil = rt.EvilUpstream(kwk, rt.envelope_key_id(envelope))
    token = tmp_path / "any-0600-file"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"whatever\n")
    os.close(fd)
    try:
        settings = {"url": evil.url, "key": "k", "token_file": str(token), "timeout": 2}
        rt.inject(url, "qimem", settings, b"\x01" + envelope, check_value(kwk))
        app = rt.open_quietly(url, key_file)
        if app is None:
            return  # refused: the attack failed
        try:
            create_key(app, name="victim-key")
            stolen = rt.rows_opened_with(app, kwk)
        finally:
            rh.close(app)
        assert stolen == 0, f"{stolen} new wrapped rows open under the attacker's KWK"
    finally:
        evil.close()


def test_a_running_server_does_not_follow_an_injected_version(
    victim: tuple[str, Path, bytes],
) -> None:
    """Not only at the next restart: a running process re-reads the keyring before it
    wraps (about once a second) and opens the injected version then."""
    url, key_file, envelope = victim
    evil = rt.EvilUpstream(os.urandom(32), rt.envelope_key_id(envelope))
    app = rh.file_app(url, key_file)
    try:
        settings = {"url": evil.url, "key": "k", "token_file": str(key_file), "timeout": 2}
        rt.inject(url, "qimem", settings, b"\x01" + envelope, "00" * 16)
        time.sleep(1.2)  # past REFRESH_SECONDS
        with contextlib.suppress(ConfigError):
            create_key(app, name="during-the-attack")
        assert not evil.seen, "the running server contacted a URL only the database named"
    finally:
        rh.close(app)
        evil.close()


def test_an_upstream_answering_another_kwk_is_refused_by_the_check_value(
    victim: tuple[str, Path, bytes], tmp_path: Path
) -> None:
    """Guard: a version injected to make an upstream (compromised, or an attacker's) answer a
    KWK of its choice is refused at open, before the upstream is even asked (the keyring's
    tags do not verify)."""
    url, key_file, envelope = victim
    evil = rt.EvilUpstream(os.urandom(32), rt.envelope_key_id(envelope))
    token = tmp_path / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"service-token\n")
    os.close(fd)
    try:
        settings = {"url": evil.url, "key": "k", "token_file": str(token), "timeout": 2}
        rt.inject(url, "qimem", settings, b"\x01" + envelope, check_value(os.urandom(32)))
        with pytest.raises(ConfigError, match="not vouched for"):
            rh.file_app(url, key_file)
        assert not evil.seen  # the injected version's settings were never used
    finally:
        evil.close()


def test_db_writer_cannot_make_the_server_load_his_pkcs11_library(
    victim: tuple[str, Path, bytes], tmp_path: Path
) -> None:
    """A ``pkcs11`` version whose ``library`` is a shared object of the attacker's choice
    (any path the server can read: an upload directory, a tmp file): the server dlopens it
    at its next start, i.e. database write becomes code execution as the qimem user."""
    pytest.importorskip("pkcs11")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the attacker's shared object")
    url, key_file, _ = victim
    source, library = tmp_path / "evil.c", tmp_path / "evil.so"
    source.write_text(rt.EVIL_SO)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    settings = {"library": str(library), "token_label": "t", "key_label": "k", "pin_file": str(pin)}
    rt.inject(url, "pkcs11", settings, b"\x01" * 60, "00" * 16)
    marker = tmp_path / "marker"
    config = rh.write_config(tmp_path, url, root_file=key_file)
    result = rh.qimem_cli(config, "root", "status", timeout=60, REDTEAM_MARKER=str(marker))
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the attacker's library ran inside qimem"


# -- finding 2: downgrade to an old root version ------------------------------------------------


@pytest.fixture
def rotated_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """An env-rooted SQLite store rotated twice (1 and 2 retired, 3 active)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    key = encode_root_key(generate_root_key())
    app = rh.env_app(url, key, monkeypatch)
    try:
        create_key(app, name="enc")
        rh.fast_rotate(app, settle=0.0)
        rh.fast_rotate(app, settle=0.0)
        assert app.wrapper is not None and app.wrapper.active_version == 3
    finally:
        rh.close(app)
    return url, key


def _reopen_active(url: str, key: str, monkeypatch: pytest.MonkeyPatch) -> int | None:
    try:
        app = rh.env_app(url, key, monkeypatch)
    except ConfigError as exc:
        assert "Traceback" not in str(exc)
        return None
    try:
        create_key(app, name="after-the-edit")
        assert app.wrapper is not None
        return app.wrapper.active_version
    finally:
        rh.close(app)


def test_db_writer_cannot_reactivate_a_retired_version(
    rotated_twice: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2: flipping states only (2 active again, 3 draining) made new keys wrap under
    version 2, whose KWK the operator rotated away from (e.g. after it was read from a
    compromised host's memory). The active version must be the newest one."""
    url, key = rotated_twice
    doc = json.loads(rh.keyring_text(url) or "")
    for version in doc["versions"]:
        version["state"] = {2: "active", 3: "draining"}.get(version["version"], version["state"])
    doc["active"] = 2
    rh.set_keyring_text(url, json.dumps(doc))
    assert _reopen_active(url, key, monkeypatch) in (None, 3)


def test_db_writer_cannot_renumber_the_direct_version(
    rotated_twice: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2: a copy of version 1's record (the root key itself, ``direct``) added as
    version 4 and made active: new rows would be sealed directly under the old root key.
    Only version 1 may be direct (rotations always wrap their KWK)."""
    url, key = rotated_twice
    doc = json.loads(rh.keyring_text(url) or "")
    first = next(v for v in doc["versions"] if v["version"] == 1)
    assert first.get("direct") is True
    for version in doc["versions"]:
        if version["state"] == "active":
            version["state"] = "draining"
    doc["versions"].append({**first, "version": 4, "state": "active"})
    doc["active"] = 4
    rh.set_keyring_text(url, json.dumps(doc))
    assert _reopen_active(url, key, monkeypatch) in (None, 3)


def test_legitimate_keyrings_still_parse(rotated_twice: tuple[str, str]) -> None:
    """Positive control for finding 2's checks: a store rotated twice opens as it is."""
    url, _ = rotated_twice
    keyring = kr.parse(rh.keyring_text(url) or "")
    assert keyring.active == max(v.version for v in keyring.versions) == 3


# -- finding 3: secret files that are FIFOs hang startup forever ---------------------------------


@pytest.mark.parametrize(
    "name,read",
    [
        ("root key file", read_root_key_file),
        ("PIN file", lambda p: fileio.read_private_file(p, "PIN file", 64)),
        ("token file", lambda p: read_credential(p, "token_file")),
    ],
)
def test_fifo_secret_file_is_refused_not_waited_on(tmp_path: Path, name: str, read: Any) -> None:
    """Finding 3: a secret file path naming a FIFO (a config typo, or a database writer's
    recorded settings) made the open block until someone wrote to it."""
    error = rt.returns_quickly(tmp_path, name, read)
    assert isinstance(error, ConfigError), error
    assert "not a regular file" in str(error)


def test_oversized_root_key_file_is_refused_unread(tmp_path: Path) -> None:
    """Finding 3: a root key file is 45 bytes; a huge one (a path to a log or a disk image)
    was read whole into memory before being refused."""
    path = tmp_path / "huge.key"
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB that take no disk
    path.chmod(0o600)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="too large"):
        read_root_key_file(path)
    assert time.monotonic() - started < 1


def test_root_key_file_guards_still_hold(tmp_path: Path) -> None:
    """Positive controls next to finding 3's fix: a good file reads, a 0644 one, a
    directory and /dev/zero are refused by name, a symlink to a good file still works."""
    from qimem.rootkey import write_root_key_file

    good = tmp_path / "root.key"
    write_root_key_file(good)[:] = bytes(32)
    assert len(read_root_key_file(good)) == 32
    link = tmp_path / "link.key"
    link.symlink_to(good)
    assert read_root_key_file(link) == read_root_key_file(good)
    good.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        read_root_key_file(good)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        read_root_key_file(Path("/dev/zero"))
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="root key file"):
        read_root_key_file(directory)


# -- guards: the qimem upstream provider against a hostile upstream ------------------------------


def _provider(url: str, tmp_path: Path, **extra: Any) -> QimemRootKeyProvider:
    token = tmp_path / "token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"service-token-7Qx\n")
        os.close(fd)
    settings = {"url": url, "key": "k", "token_file": str(token), "timeout": 2, **extra}
    return QimemRootKeyProvider.from_settings(settings, tmp_path)


def test_upstream_redirect_is_not_followed(victim: tuple[str, Path, bytes], tmp_path: Path) -> None:
    _, _, envelope = victim
    evil = rt.EvilUpstream(os.urandom(32), rt.envelope_key_id(envelope), status=307)
    try:
        provider = _provider(evil.url, tmp_path)
        with pytest.raises(ConfigError) as caught:
            provider.unwrap(b"\x01" + envelope, b"ctx")
        assert "service-token-7Qx" not in str(caught.value)
        assert len(evil.seen) == 1  # one request, to the configured URL only
    finally:
        evil.close()


def test_upstream_huge_answer_is_bounded(victim: tuple[str, Path, bytes], tmp_path: Path) -> None:
    _, _, envelope = victim
    evil = rt.EvilUpstream(os.urandom(32), rt.envelope_key_id(envelope), extra=b" " * (8 << 20))
    try:
        with pytest.raises(ConfigError):
            _provider(evil.url, tmp_path).unwrap(b"\x01" + envelope, b"ctx")
    finally:
        evil.close()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_upstream_answering_another_length_is_a_decryption_error(
    victim: tuple[str, Path, bytes], tmp_path: Path, size: int
) -> None:
    _, _, envelope = victim
    evil = rt.EvilUpstream(os.urandom(size), rt.envelope_key_id(envelope))
    try:
        with pytest.raises((DecryptionError, ConfigError)):
            _provider(evil.url, tmp_path).unwrap(b"\x01" + envelope, b"ctx")
    finally:
        evil.close()


@pytest.mark.parametrize(
    "url", ["http://192.0.2.1:8080", "http://example.org", "ftp://127.0.0.1/", "file:///etc"]
)
def test_plain_http_to_a_remote_host_is_refused_before_connecting(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError):
        provider = _provider(url, tmp_path)
        provider.wrap(bytes(32), b"ctx")


@pytest.mark.parametrize("timeout", [0, -1, 1e9, float("inf"), float("nan"), True, "10"])
def test_absurd_upstream_timeouts_are_refused(tmp_path: Path, timeout: Any) -> None:
    with pytest.raises(ConfigError):
        _provider("http://127.0.0.1:9", tmp_path, timeout=timeout)


# -- guards: blobs naming versions that do not exist --------------------------------------------


@pytest.mark.parametrize("version", [0, 4, 2**31 - 1, 2**31, 2**32 - 1])
def test_blob_claiming_a_foreign_version_is_a_decryption_error(
    rotated_twice: tuple[str, str], monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    url, key = rotated_twice
    app = rh.env_app(url, key, monkeypatch)
    try:
        assert app.wrapper is not None
        blob = b"\x02" + version.to_bytes(4, "big") + os.urandom(40)
        with pytest.raises(DecryptionError):
            app.wrapper.unwrap(blob, b"ctx")
    finally:
        rh.close(app)


def test_a_wrapped_row_copied_to_another_store_does_not_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cross-store: two stores under the same root key variable, each rotated once; a
    version-2 blob of one does not open in the other (their version-2 KWKs differ)."""
    key = encode_root_key(generate_root_key())
    apps = []
    try:
        for name in ("a", "b"):
            app = rh.env_app(f"sqlite:///{tmp_path / name}.db", key, monkeypatch)
            apps.append(app)
            create_key(app, name="enc")
            rh.fast_rotate(app, settle=0.0)
        assert apps[0].wrapper is not None and apps[1].wrapper is not None
        blob = apps[0].wrapper.wrap(b"secret material", b"ctx")
        assert blob[0] == 2 and apps[0].wrapper.unwrap(blob, b"ctx") == b"secret material"
        with pytest.raises(DecryptionError):
            apps[1].wrapper.unwrap(blob, b"ctx")
    finally:
        for app in apps:
            rh.close(app)


# -- finding 4: one damaged row blocked every root rotation ----------------------------------------


@pytest.mark.parametrize("damage", ["flip-last-byte", "unknown-version"])
def test_one_damaged_row_does_not_block_the_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """Finding 4: a database writer who flips one byte of one wrapped row (or relabels it
    under a version the keyring lacks) made every ``qimem root rotate`` fail with a bare
    DecryptionError and move nothing (the batch rolled back), i.e. the operator could not
    rotate away from a compromised root. Now the other rows move, the damaged row is named
    and stays under its version, which is not retired."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    app = rh.env_app(url, encode_root_key(generate_root_key()), monkeypatch)
    try:
        for name in ("a", "b", "c"):
            create_key(app, name=name)
        engine = rotation.root_rows(app).engine  # type: ignore[union-attr]
        with engine.begin() as conn:
            query = sa.text("SELECT key_id, material FROM qimem_key_versions")
            rows = {kid: bytes(material) for kid, material in conn.execute(query)}
            victim_id = sorted(rows)[1]
            blob = bytearray(rows[victim_id])
            if damage == "flip-last-byte":
                blob[-1] ^= 1
            else:
                blob = bytearray(b"\x02" + (9).to_bytes(4, "big")) + blob[1:]
            conn.execute(
                sa.text("UPDATE qimem_key_versions SET material = :m WHERE key_id = :k"),
                {"m": bytes(blob), "k": victim_id},
            )
        lines: list[str] = []
        report = rotation.rotate(app, progress=lines.append, settle=0.0)
        assert report.active == 2 and sum(report.moved.values()) == 2
        assert report.unopenable == [f"key versions {victim_id}"]
        assert any(victim_id in line and "does not unwrap" in line for line in lines)
        # A row under version 1 keeps version 1 draining; one claiming version 9 does not.
        assert (1 in report.retired) is (damage == "unknown-version")
        states = rh.versions_state(app)
        assert states[2] == ("active", 2)
        assert states[1][1] == (1 if damage == "flip-last-byte" else 0)
    finally:
        rh.close(app)


# -- guards: /v1/root over HTTP: a disabled admin's token, and nothing secret in what it shows ---


def test_disabled_admin_token_and_no_secret_in_status_audit_or_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second master admin starts a rotation and is disabled while it runs: his token no
    longer reads the status or starts another rotation. The status, the audit rows and
    /metrics never carry the root key, a KWK or a wrapped blob."""
    import requests
    from identity_helpers import ADMIN_PASSWORD, add_user, password_of, serving, with_identity

    from qimem.services import identity as ids

    url = f"sqlite:///{tmp_path / 'store.db'}"
    key = encode_root_key(generate_root_key())
    app = with_identity(rh.env_app(url, key, monkeypatch))
    try:
        for name in ("a", "b"):
            create_key(app, name=name)
        add_user(app, "master", "second-admin", ["admin"])
        params = {"grant_type": "password", "username": "second-admin"}
        second = ids.token(app, "master", {**params, "password": password_of("second-admin")})
        first = ids.token(
            app, "master", {**params, "username": "admin", "password": ADMIN_PASSWORD}
        )
        mine = {"Authorization": f"Bearer {second.access_token}"}
        admin = {"Authorization": f"Bearer {first.access_token}"}
        with serving(app) as base:
            started = requests.post(f"{base}/v1/root/rotate", headers=mine, json={}, timeout=10)
            assert started.status_code == 202, started.text
            ids.set_user_enabled(app, "master", "second-admin", False)
            for method, path in (("GET", "status"), ("POST", "rotate")):
                answer = requests.request(
                    method, f"{base}/v1/root/{path}", headers=mine, json={}, timeout=10
                )
                assert answer.status_code in (401, 403), (method, answer.status_code)
            deadline = time.monotonic() + 30
            while True:
                body = requests.get(f"{base}/v1/root/status", headers=admin, timeout=10)
                if body.json()["rotation"]["state"] != "running":
                    break
                assert time.monotonic() < deadline
                time.sleep(0.1)
            metrics = requests.get(f"{base}/metrics", timeout=10).text
        status = body.text
        assert body.json()["rotation"]["state"] == "succeeded", status
        keyring = json.loads(rh.keyring_text(url) or "")
        secrets = [key, base64.b64decode(key).hex()]
        secrets += [v["wrapped"] for v in keyring["versions"] if "wrapped" in v]
        secrets.append(keyring["derive"]["blob"])
        ids.identity(app).audit.flush()
        engine = rotation.root_rows(app).engine  # type: ignore[union-attr]
        with engine.connect() as conn:
            audit = " ".join(
                map(str, conn.execute(sa.text("SELECT * FROM qimem_audit")).fetchall())
            )
        assert "root.rotate" in audit
        for secret in secrets:
            assert secret not in status and secret not in metrics and secret not in audit
    finally:
        ids.close_identity(app)
        app.close()


# -- guard: a rotation racing a key destroy and a key rotation on the same rows -----------------


@pytest.mark.postgres
def test_rotation_racing_destroy_and_key_rotation_resurrects_nothing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the rotation's read of a key version's row and its write, another process
    destroys that version and rotates the key: the destroyed material must stay destroyed
    (the rotation's compare-and-set misses), and the new version ends under the new root.
    PostgreSQL only: its row locks let the racing writer commit while the rotation's batch
    is open (SQLite serialises the two writers instead)."""
    from qimem.rootkey import KeyWrapper
    from qimem.services.crypto import decrypt
    from qimem.services.key_states import destroy_version
    from qimem.services.keys import rotate_key

    key = encode_root_key(generate_root_key())
    app = rh.env_app(postgres_url, key, monkeypatch)
    other = rh.env_app(postgres_url, key, monkeypatch)
    try:
        create_key(app, name="k")
        sealed = encrypt(app, "k", b"old secret", aad=b"")
        old, old_id = sealed.envelope, sealed.key_id
        rotate_key(app, "k")  # version 1 decrypt-only, version 2 active
        original = KeyWrapper.rewrap
        raced: list[bool] = []

        def racing(self: KeyWrapper, blob: bytes, context: bytes) -> bytes | None:
            if not raced:
                raced.append(True)
                destroy_version(other, "k", version=1)
                rotate_key(other, "k")
            return original(self, blob, context)

        monkeypatch.setattr(KeyWrapper, "rewrap", racing)
        report = rotation.rotate(app, settle=0.0)
        monkeypatch.setattr(KeyWrapper, "rewrap", original)
        assert raced and report.active == 2
        with pytest.raises(Exception) as caught:
            decrypt(app, old, aad=b"")
        assert "destroyed" in str(caught.value).lower()
        with rotation.root_rows(app).engine.connect() as conn:  # type: ignore[union-attr]
            query = sa.text("SELECT material FROM qimem_key_versions WHERE key_id = :k")
            material = conn.execute(query, {"k": old_id}).scalar_one()
        assert bytes(material) == b"", "the destroyed version's material was written back"
        fresh = encrypt(app, "k", b"new", aad=b"").envelope
        assert bytes(decrypt(app, fresh, aad=b"").plaintext) == b"new"
        assert set(rh.count_rows(app)) == {2}
    finally:
        rh.close(other)
        rh.close(app)
