"""Shared helpers for the root-rotation tests (test_root_rotation.py, test_root_http.py,
test_root_crash.py, test_root_live.py): a store holding every kind of wrapped row, and the
checks that every one of them still works after a rotation (or a killed one).

Every kind of wrapped row: key versions of each purpose (AEAD, signing, MAC; a rotated
lineage has two), the realms' token signing keys, an OTP secret, and a realm's sealed login
settings (an ``ldap`` provider with a bind password).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import sqlalchemy as sa
from identity_helpers import ADMIN_PASSWORD, fast_settings

from qimem.app import AppContext, build
from qimem.config import Config
from qimem.root import rotation
from qimem.services import auth_providers as aps
from qimem.services import identity as ids
from qimem.services import otp as otps
from qimem.services.crypto import decrypt, encrypt
from qimem.services.keys import create_key, rotate_key
from qimem.services.macs import mac, verify_mac
from qimem.services.signing import sign, verify
from qimem.sql import create_engine

OTP_PASSWORD = "steady-copper-orchard-7"  # noqa: S105 (a test password)
LDAP_OPTIONS = {
    "url": "ldap://127.0.0.1:9",
    "bind_dn": "cn=reader,dc=example,dc=org",
    "bind_password": "reader-bind-secret-7",
    "user_search_base": "ou=people,dc=example,dc=org",
    "user_filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
    "allow_plain": True,
    "timeout": 1,
}


def env_app(url: str, root_key_b64: str, monkeypatch: Any = None, **config: Any) -> AppContext:
    """An app whose root is ``QIMEM_ROOT_KEY`` (the ``env`` provider reads the variable
    itself, so it is set in the environment, not only in the config)."""
    if monkeypatch is not None:
        monkeypatch.setenv("QIMEM_ROOT_KEY", root_key_b64)
    else:
        os.environ["QIMEM_ROOT_KEY"] = root_key_b64
    return build(Config(store_url=url, root_key_b64=root_key_b64, **config), open=True)


def file_app(url: str, key_file: Path, **config: Any) -> AppContext:
    """An app whose root is the key file ``key_file`` (``[root_key] file``)."""
    return build(Config(store_url=url, root_key_file=key_file, **config), open=True)


def close(app: AppContext) -> None:
    ids.close_identity(app)
    app.close()


def otp_code(secret: str, steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


@dataclass
class World:
    """What a populated store holds, to check after a rotation."""

    envelopes: list[tuple[bytes, bytes]] = field(default_factory=list)  # (plaintext, envelope)
    signature: bytes = b""
    tag: bytes = b""
    token: str = ""
    otp_secret: str = ""
    otp_step: int = 0
    recovery: list[str] = field(default_factory=list)
    extra_keys: int = 0

    def check(self, app: AppContext) -> None:
        """Every kind of wrapped row still opens: envelopes decrypt, the signature and MAC
        verify, a token issued before verifies, the admin logs in, the OTP user logs in
        with a code, and the realm's LDAP login settings are still there."""
        for plaintext, envelope in self.envelopes:
            assert decrypt(app, envelope, aad=b"root").plaintext == plaintext
        assert verify(app, "sig", b"signed before", self.signature).valid
        assert verify_mac(app, "mac", b"maced before", self.tag).valid
        assert sign(app, "sig", b"after").signature  # the private key unwraps
        assert mac(app, "mac", b"after").tag
        principal = ids.authenticate(app, self.token)
        assert principal.username == "admin"
        fresh = ids.token(
            app,
            "master",
            {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        )
        assert ids.authenticate(app, fresh.access_token).realm == "master"
        # The OTP secret unwraps (as the server does), and the user logs in with a code of
        # it or, once that step is claimed, with one of the recovery codes (their hashes
        # come from the store's derive base).
        assert otp_secret_of(app, "acme", "otto") == self.otp_secret
        step = int(time.time() // 30)
        if step > self.otp_step:  # a TOTP code of a step not used yet
            second: str | None = otp_code(self.otp_secret)
            self.otp_step = step
        else:  # this step's code is claimed: a recovery code while some are left
            second = self.recovery.pop() if self.recovery else None
        if second is not None:  # (many checks within 30 s: the unwrap above is the check)
            acme = ids.token(
                app,
                "acme",
                {
                    "grant_type": "password",
                    "username": "otto",
                    "password": OTP_PASSWORD,
                    "otp": second,
                },
            )
            assert ids.authenticate(app, acme.access_token).username == "otto"
        auth = ids.identity(app).realm_auth("acme")
        assert auth.providers == ("password", "ldap"), auth.providers
        fresh_envelope = encrypt(app, "enc", b"after rotation", aad=b"root").envelope
        assert decrypt(app, fresh_envelope, aad=b"root").plaintext == b"after rotation"


def populate(app: AppContext, *, extra_keys: int = 0) -> World:
    """Fill ``app``'s store with every kind of wrapped row (and ``extra_keys`` more AEAD
    keys, one envelope each); returns what to check."""
    ids.configure(app, fast_settings())
    ids.bootstrap(app, ADMIN_PASSWORD)
    ids.create_realm(app, "acme")
    world = World(extra_keys=extra_keys)
    create_key(app, name="enc")
    world.envelopes.append((b"v1", encrypt(app, "enc", b"v1", aad=b"root").envelope))
    rotate_key(app, "enc")
    world.envelopes.append((b"v2", encrypt(app, "enc", b"v2", aad=b"root").envelope))
    create_key(app, name="chacha", algorithm="chacha20-poly1305")
    world.envelopes.append((b"cc", encrypt(app, "chacha", b"cc", aad=b"root").envelope))
    create_key(app, name="sig", algorithm="ed25519")
    world.signature = sign(app, "sig", b"signed before").signature
    create_key(app, name="mac", algorithm="hmac-sha256")
    world.tag = mac(app, "mac", b"maced before").tag
    for i in range(extra_keys):
        create_key(app, name=f"bulk-{i}")
        plaintext = f"bulk {i}".encode()
        world.envelopes.append(
            (plaintext, encrypt(app, f"bulk-{i}", plaintext, aad=b"root").envelope)
        )
    world.token = ids.token(
        app, "master", {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD}
    ).access_token
    ids.add_user(app, "acme", "otto", OTP_PASSWORD, ["encryptor"])
    made = otps.otp_enroll(app, "acme", "otto")
    world.recovery = otps.otp_confirm(app, "acme", "otto", otp_code(made.secret, -1))
    world.otp_secret = made.secret
    world.otp_step = int(time.time() // 30) - 1  # the confirming code's step is claimed
    aps.set_realm_providers(app, "acme", {"providers": ["password", "ldap"], "ldap": LDAP_OPTIONS})
    return world


def otp_secret_of(app: AppContext, realm: str, username: str) -> str:
    """``username``'s OTP secret, unwrapped by ``app``'s root from its stored row."""
    from qimem.identity.otp import _context

    engine = app.store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT o.secret_wrapped, u.user_id FROM qimem_otp o JOIN qimem_users u "
                "ON u.user_id = o.user_id WHERE u.realm = :r AND u.username = :n"
            ),
            {"r": realm, "n": username},
        ).one()
    assert app.wrapper is not None
    return bytes(app.wrapper.unwrap(bytes(row[0]), _context(realm, row[1]))).decode()


#: The tables of wrapped rows, and at least how many rows each holds after :func:`populate`.
WRAPPED_TABLES = {
    "qimem_key_versions": 5,
    "qimem_signing_keys": 2,
    "qimem_otp": 1,
    "qimem_realm_auth": 1,
}
#: The wrapped column of each of those tables.
WRAPPED_COLUMNS = {
    "qimem_key_versions": "material",
    "qimem_signing_keys": "private_wrapped",
    "qimem_otp": "secret_wrapped",
    "qimem_realm_auth": "config",
}


def rows_by_version(url: str) -> dict[str, dict[int, int]]:
    """Per wrapped table, how many blobs each root version wraps (read with raw SQL, as a
    database reader without any key would)."""
    from qimem.rootkey import blob_root_version

    out: dict[str, dict[int, int]] = {}
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for table, column in WRAPPED_COLUMNS.items():
                counts: dict[int, int] = {}
                query = sa.text(f"SELECT {column} FROM {table}")  # noqa: S608
                for (blob,) in conn.execute(query):
                    if blob is not None:
                        version = blob_root_version(bytes(blob))
                        counts[version] = counts.get(version, 0) + 1
                out[table] = counts
    finally:
        engine.dispose()
    return out


def count_rows(app: AppContext) -> dict[int, int]:
    """Rows per root version, as the rotation counts them."""
    rows = rotation.root_rows(app)
    assert rows is not None
    return rotation.count_rows(rows.engine, rows.columns)


def keyring_text(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM qimem_root_keyring")).first()
            return None if row is None else str(row._mapping["document"])
    finally:
        engine.dispose()


def set_keyring_text(url: str, text: str) -> None:
    """As a database writer: overwrite the stored keyring document."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE qimem_root_keyring SET document = :d"), {"d": text})
    finally:
        engine.dispose()


def versions_state(app: AppContext) -> dict[int, tuple[str, int]]:
    """``{version: (state, rows)}`` from :func:`qimem.root.rotation.status`."""
    return {v["version"]: (v["state"], v["rows"]) for v in rotation.status(app)["versions"]}


def fast_rotate(app: AppContext, **kwargs: Any) -> rotation.RotationReport:
    """A rotation that waits only briefly between passes (nothing else writes)."""
    return rotation.rotate(app, settle=kwargs.pop("settle", 0.05), **kwargs)


def iter_lines(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()


# -- the CLI in its own process ----------------------------------------------------------


def write_config(
    directory: Path,
    url: str,
    *,
    root_file: Path | None = None,
    provider: str | None = None,
    **settings: Any,
) -> Path:
    """A 0600 ``config.toml`` in ``directory`` for ``url`` and a ``[root_key]`` table."""
    from qimem.config import Config

    config = Config(
        store_url=url,
        root_key_file=root_file,
        root_key_provider=provider,
        root_key_settings=dict(settings),
    )
    path = directory / "config.toml"
    path.unlink(missing_ok=True)
    config.write(path)
    return path


def cli_env(config: Path, **variables: str) -> dict[str, str]:
    """The environment of a ``qimem`` child using ``config`` (no other ``QIMEM_*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(QIMEM_CONFIG=str(config), QIMEM_HOME=str(config.parent), **variables)
    return env


def qimem_cli(config: Path, *args: str, timeout: float = 120, **variables: str) -> Any:
    """``qimem ARGS`` as a child process with ``config``; the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", *args],
        env=cli_env(config, **variables),
        cwd=str(config.parent),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
