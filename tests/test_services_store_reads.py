"""A key-cache miss on PostgreSQL reads the key store once (KeyStore.encryption_state /
decryption_state: version, policy and wrapped material in one query), not once per part:
what keeps the mixed load run's misses cheap (docs/performance.md). Counted with
SQLAlchemy's cursor events on the store's own engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_app

from qimem import services
from qimem.app import AppContext
from qimem.errors import DecryptionError, QimemError, ValidationError
from qimem.services import crypto, lifecycle


@pytest.fixture
def pg_app(postgres_url: str, root_key_b64: str) -> Iterator[AppContext]:
    app = make_app(postgres_url, root_key_b64)
    yield app
    app.close()


def _key_reads(app: AppContext, call: object) -> list[str]:
    """The statements ``call()`` sends that read qimem_key_versions (writes aside)."""
    seen: list[str] = []

    def listener(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "qimem_key_versions" in statement:
            seen.append(statement)

    engine = app.store.engine  # type: ignore[attr-defined]
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        call()  # type: ignore[operator]
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    return seen


def test_an_encrypt_after_a_rotation_reads_the_store_once(pg_app: AppContext) -> None:
    services.create_key(pg_app, name="once")
    services.encrypt(pg_app, "once", b"warm")
    rotated = services.rotate_key(pg_app, "once")
    reads = _key_reads(pg_app, lambda: services.encrypt(pg_app, "once", b"after"))
    assert len(reads) == 1, reads
    assert services.encrypt(pg_app, "once", b"again").key_id == rotated.key_id


def test_a_cold_decrypt_reads_the_store_once(
    pg_app: AppContext, postgres_url: str, root_key_b64: str
) -> None:
    services.create_key(pg_app, name="once")
    sealed = services.encrypt(pg_app, "once", b"message").envelope
    cold = make_app(postgres_url, root_key_b64)
    try:
        reads = _key_reads(cold, lambda: services.decrypt(cold, sealed))
        assert len(reads) == 1, reads
        assert services.decrypt(cold, sealed).plaintext == b"message"
    finally:
        cold.close()


# ---- refused requests unwrap nothing ------------------------------------------------------
# The state reads hand back the wrapped material with a callable that unwraps it: a request
# the checks refuse (wrong purpose, pending deletion, derived key without context, below a
# minimum version) costs no root-key call, and with a PKCS#11 or remote root that is down it
# still gets its own 4xx error, not the root's 5xx.


class _CountingWrapper:
    """The store's own root wrapper, its unwraps counted."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.unwraps = inner, 0

    def unwrap(self, *args: Any, **kwargs: Any) -> bytearray:
        self.unwraps += 1
        return self.inner.unwrap(*args, **kwargs)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _counted(app: AppContext) -> _CountingWrapper:
    counter = _CountingWrapper(app.store._wrapper)  # type: ignore[attr-defined]
    app.store._wrapper = counter  # type: ignore[attr-defined]
    return counter


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def test_a_refused_encrypt_unwraps_nothing(store_url: str, root_key_b64: str) -> None:
    app = make_app(store_url, root_key_b64)
    try:
        services.create_key(app, name="signer", algorithm="ed25519")
        services.create_key(app, name="derived", derived=True)
        services.create_key(app, name="doomed")
        lifecycle.schedule_deletion(app, "doomed", days=7)
        counter = _counted(app)
        refusals = {"signer": "wrong_purpose", "derived": None, "doomed": "key_pending_deletion"}
        for name, code in refusals.items():
            with pytest.raises(QimemError) as refused:
                services.encrypt(app, name, b"refused")
            assert code is None or refused.value.code == code, refused.value
        # Data keys and files take encrypt keys only: a deterministic key is refused before
        # its load too (datakey, and the check a file encryption makes first).
        services.create_key(app, name="tokens", algorithm="aes-256-siv")
        for refused_call in (
            lambda: services.datakey(app, "tokens"),
            lambda: crypto.check_encryption_key(app, "tokens"),
        ):
            with pytest.raises(ValidationError) as wrong:
                refused_call()
            assert wrong.value.code == "wrong_purpose"
        assert counter.unwraps == 0
        services.create_key(app, name="fine")
        services.encrypt(app, "fine", b"allowed")
        assert counter.unwraps == 1  # the counter sees the one real load
    finally:
        app.close()


def test_a_refused_decrypt_unwraps_nothing(store_url: str, root_key_b64: str) -> None:
    app = make_app(store_url, root_key_b64)
    try:
        services.create_key(app, name="floor")
        below = services.encrypt(app, "floor", b"v1").envelope
        services.rotate_key(app, "floor")
        lifecycle.set_policy(app, "floor", min_decryption_version=2)
        services.create_key(app, name="doomed")
        doomed = services.encrypt(app, "doomed", b"pending").envelope
        lifecycle.schedule_deletion(app, "doomed", days=7)
        services.create_key(app, name="fine")
        fine = services.encrypt(app, "fine", b"allowed").envelope
    finally:
        app.close()
    cold = make_app(store_url, root_key_b64)
    try:
        counter = _counted(cold)
        for sealed, code in (
            (below, "below_min_decryption_version"),
            (doomed, "key_pending_deletion"),
        ):
            with pytest.raises(DecryptionError) as refused:
                services.decrypt(cold, sealed)
            assert refused.value.code == code
        assert counter.unwraps == 0
        assert services.decrypt(cold, fine).plaintext == b"allowed"
        assert counter.unwraps == 1
    finally:
        cold.close()
