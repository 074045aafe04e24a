"""A key-cache miss on PostgreSQL reads the key store once (KeyStore.encryption_state /
decryption_state: version, policy and wrapped material in one query), not once per part:
what keeps the mixed load run's misses cheap (docs/performance.md). Counted with
SQLAlchemy's cursor events on the store's own engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from conftest import make_app

from qimem import services
from qimem.app import AppContext


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
