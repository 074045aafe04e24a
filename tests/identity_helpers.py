"""Shared helpers for the identity tests: cheap Argon2 settings, an app with identity (in
memory, on a real SQLite file or a fresh PostgreSQL database), policy-compliant passwords,
a live server, and raw SQL access for the attacker who can write to the database."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_app

from qimem.app import AppContext
from qimem.identity import IdentitySettings
from qimem.services import identity as ids
from qimem.sql import create_engine

#: Argon2 at 1 MiB / t=1 keeps tests fast; production defaults are tested separately.
FAST = dict(argon2_memory_kib=1024, argon2_time_cost=1, argon2_parallelism=1)

#: The master ``admin`` password of :func:`with_identity` (it passes the password policy);
#: the one admin password of the test suite.
ADMIN_PASSWORD = "nqzva-password"  # noqa: S105 (a test password)

#: The two real databases every attack test runs against (:func:`store_url`).
STORES = ["sqlite", "postgres"]

_counter = itertools.count()


def unique(prefix: str) -> str:
    """``prefix`` and a number not used before in this process (fresh names per test)."""
    return f"{prefix}{next(_counter)}"


def password_of(username: str) -> str:
    """A strong test password for ``username`` (passes the default policy; not containing
    the username)."""
    return f"moss-{len(username)}-violet-copper-{sum(map(ord, username)) % 997:03d}"


def fast_settings(**overrides: object) -> IdentitySettings:
    return IdentitySettings(**{**FAST, **overrides})  # type: ignore[arg-type]


def with_identity(app: AppContext, **overrides: object) -> AppContext:
    """``app`` with fast identity settings, realm master + admin (:data:`ADMIN_PASSWORD`)."""
    ids.configure(app, fast_settings(**overrides))
    ids.bootstrap(app, ADMIN_PASSWORD)
    return app


def store_url(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> str:
    """A URL to an empty real database (``kind`` in :data:`STORES`): an SQLite file, or a
    new PostgreSQL database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'qimem.db'}"
    return str(request.getfixturevalue("postgres_url"))


def identity_app(url: str, root_key_b64: str, **settings: object) -> AppContext:
    """An app on ``url`` with identity (:func:`with_identity`); close with :func:`close_app`."""
    return with_identity(make_app(url, root_key_b64), **settings)


def add_user(app: AppContext, realm: str, username: str, roles: list[str]) -> None:
    """Add ``username`` with password :func:`password_of` and ``roles``."""
    ids.add_user(app, realm, username, password_of(username), roles)


def close_app(app: AppContext) -> None:
    ids.close_identity(app)
    app.close()


def raw_sql(url: str, statement: str, **params: Any) -> int:
    """Run one SQL statement as a database writer without the root key; its rowcount."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            return int(conn.execute(sa.text(statement), params).rowcount)
    finally:
        engine.dispose()


def integrity_failures(table: str) -> float:
    """``qimem_authz_integrity_failures_total{table=...}`` so far (finding 15's counter)."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("qimem_authz_integrity_failures_total", {"table": table})
    return value or 0.0


def insert_signing_key(url: str, realm: str, *, active: bool = False) -> tuple[str, Any]:
    """As a database writer without the root key: INSERT an Ed25519 signing key of one's
    own into ``realm`` (junk in place of the wrapped private key). Its kid and private key."""
    import base64
    import uuid

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    kid = f"attacker-{uuid.uuid4().hex[:8]}"
    raw_sql(
        url,
        "INSERT INTO qimem_signing_keys (kid, realm, public_key, private_wrapped, active, "
        "created_at, retire_at) VALUES (:kid, :realm, :pub, :junk, :active, :at, NULL)",
        kid=kid,
        realm=realm,
        pub=base64.urlsafe_b64encode(public).rstrip(b"=").decode(),
        junk=b"\x01" + bytes(40),
        active=active,
        at=9e9 if active else 0.0,
    )
    return kid, private


def during_signing(app: AppContext, action: Any) -> None:
    """Run ``action()`` once, just before ``app``'s identity signs its next access token
    (after the grant's transaction committed): the window of a race with that grant."""
    tokens = ids.identity(app).tokens
    original = tokens.issue
    fired: list[int] = []

    def issue(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(1)
            action()
        return original(*args, **kwargs)

    tokens.issue = issue  # type: ignore[method-assign]  # this identity only


def password_login(app: AppContext, realm: str, username: str, password: str):  # type: ignore[no-untyped-def]
    return ids.token(
        app, realm, {"grant_type": "password", "username": username, "password": password}
    )


@contextlib.contextmanager
def serving(app: AppContext, **options: object) -> Iterator[str]:
    """A real waitress server for ``app`` (with authentication) on a free loopback port;
    yields its base URL and stops it afterwards."""
    from qimem.server.app import create_app

    with serving_wsgi(create_app(app, **options)) as url:  # type: ignore[arg-type]
        yield url


@contextlib.contextmanager
def serving_wsgi(wsgi: Any) -> Iterator[str]:
    """A real waitress server for any WSGI app on a free loopback port; yields its base URL
    and stops it afterwards."""
    from qimem.server.runner import Server

    server = Server(wsgi, host="127.0.0.1", port=0, threads=4, drain_timeout=10)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "server did not stop"
