"""The identity contract (qimem.testing_identity) on every built-in backend, built through
the registry, and on a third-party-style backend made here as an outside plugin would."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from qimem.app import build
from qimem.backend import Backend
from qimem.builtin_plugins.memory_keystore import InMemoryKeyStore
from qimem.config import Config
from qimem.errors import AuthError, QimemError
from qimem.identity.db import Database
from qimem.registry import Registry, make_plugin_manager
from qimem.rootkey import KeyWrapper
from qimem.services import identity as ids
from qimem.sql import create_engine, migrate
from qimem.testing_identity import IdentityContract, NoIdentityContract, OpenBackend


def registry_opener(scheme: str, url: str) -> OpenBackend:
    """Opens ``url`` the way qimem does: the registry's factory for ``scheme``."""
    factory = Registry(make_plugin_manager()).keystores[scheme]
    return lambda wrapper: Backend.of(factory(url, wrapper), scheme)


class TestMemoryIdentity(IdentityContract):
    """memory://: identity on a private in-memory database, gone with the backend."""

    persistent = False
    # The persistence checks would only skip here (data dies with the backend): not
    # collected at all, so a run with CI=true shows no skip.
    test_identity_survives_reopening_the_store = None
    test_revocations_survive_reopening_the_store = None
    test_two_open_backends_share_identity = None
    test_reopening_identity_on_one_backend_keeps_its_data = None

    @pytest.fixture
    def open_backend(self) -> OpenBackend:
        return registry_opener("memory", "memory://")


class TestSqliteIdentity(IdentityContract):
    @pytest.fixture
    def open_backend(self, tmp_path: Path) -> OpenBackend:
        return registry_opener("sqlite", f"sqlite:///{tmp_path / 'qimem.db'}")


@pytest.mark.postgres
class TestPostgresIdentity(IdentityContract):
    @pytest.fixture
    def open_backend(self, postgres_url: str) -> OpenBackend:
        return registry_opener(postgres_url.split("://", 1)[0], postgres_url)


# -- a third-party store: keys of its own kind, identity on a database it chooses ----------


class OutsideKeyStore(InMemoryKeyStore):
    """Stands for a plugin's own non-SQL key store (a subclass, as a plugin's would be)."""


def outside_plugin_factory(database_path: Path) -> OpenBackend:
    """What an outside plugin's factory does: a Backend of its own key store, with an
    ``identity_database`` factory on a database file of its choosing (so, persistent)."""

    def identity_database() -> Database:
        engine = create_engine(f"sqlite:///{database_path}")
        migrate(engine)
        return Database(engine, owned=True)

    def factory(wrapper: KeyWrapper) -> Backend:
        return Backend(OutsideKeyStore(), scheme="outside", identity_database=identity_database)

    return factory


class TestOutsidePluginIdentity(IdentityContract):
    """The contract needs nothing but a Backend: a store qimem does not know passes it."""

    @pytest.fixture
    def open_backend(self, tmp_path: Path) -> OpenBackend:
        return outside_plugin_factory(tmp_path / "outside-identity.db")


class TestOutsidePluginWithoutIdentity(NoIdentityContract):
    @pytest.fixture
    def open_backend(self) -> OpenBackend:
        return lambda wrapper: Backend(OutsideKeyStore(), scheme="outside")


class TestPluginApi10StoreWithoutIdentity(NoIdentityContract):
    """A plugin API 1.0 factory returns a bare KeyStore: wrapped, no identity layer."""

    @pytest.fixture
    def open_backend(self) -> OpenBackend:
        return lambda wrapper: Backend.of(OutsideKeyStore(), "legacy")


# -- the contract is able to fail: broken backends are caught --------------------------------


def _sqlite_identity(path: Path, prepare: Callable[[Engine], None] | None = None) -> OpenBackend:
    """An outside plugin's backend whose identity database is the SQLite file ``path``;
    ``prepare(engine)`` runs on every open (the broken behaviour)."""

    def identity_database() -> Database:
        engine = create_engine(f"sqlite:///{path}")
        migrate(engine)
        if prepare is not None:
            prepare(engine)
        return Database(engine, owned=True)

    return lambda wrapper: Backend(
        OutsideKeyStore(), scheme="broken", identity_database=identity_database
    )


def _forgets_revocations(path: Path) -> OpenBackend:
    """Bug: revocations live in process memory only (lost when the store is re-opened)."""

    def prepare(engine: Engine) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM qimem_revoked_tokens"))

    return _sqlite_identity(path, prepare)


def _ignores_realms(path: Path) -> OpenBackend:
    """Bug: looking up a user or the audit log ignores the realm (a store emulating SQL
    on a key-value store that indexes users by name only)."""

    def prepare(engine: Engine) -> None:
        @sa.event.listens_for(engine, "before_cursor_execute", retval=True)
        def any_realm(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            for table in ("qimem_users", "qimem_audit"):
                statement = statement.replace(f"{table}.realm = ?", f"({table}.realm = ? OR 1)")
            # a login's first read joins the user to the realm row
            joined = "qimem_users.realm = qimem_realms.name"
            statement = statement.replace(joined, f"({joined} OR 1)")
            return statement, parameters

    return _sqlite_identity(path, prepare)


def _not_persistent(path: Path) -> OpenBackend:
    """Bug: claims to persist identity but keeps it in process memory."""
    return lambda wrapper: Backend(
        OutsideKeyStore(), scheme="broken", identity_database=Database.in_memory
    )


def _sqlite3_of(engine: Engine) -> sqlite3.Connection:
    """The one sqlite3 connection of an in-memory engine (StaticPool)."""
    found = engine.raw_connection().driver_connection
    assert isinstance(found, sqlite3.Connection)
    return found


class _SnapshotDatabase(Database):
    """Bug: loads the identity file into memory when opened and writes it back when closed,
    so two stores open at once do not see each other's changes (a revocation made by one
    server is unknown to the other until a restart)."""

    def __init__(self, path: Path) -> None:
        engine = sa.create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        self._path = path
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as saved:
                saved.backup(_sqlite3_of(engine))
        migrate(engine)
        super().__init__(engine, serialize=True, owned=True)

    def close(self) -> None:
        with contextlib.closing(sqlite3.connect(self._path)) as saved:
            _sqlite3_of(self.engine).backup(saved)
        super().close()


def _snapshots(path: Path) -> OpenBackend:
    return lambda wrapper: Backend(
        OutsideKeyStore(), scheme="broken", identity_database=lambda: _SnapshotDatabase(path)
    )


@pytest.mark.parametrize(
    ("broken", "check"),
    [
        (_forgets_revocations, "test_revocations_survive_reopening_the_store"),
        (_not_persistent, "test_identity_survives_reopening_the_store"),
        (_not_persistent, "test_revocations_survive_reopening_the_store"),
        (_not_persistent, "test_reopening_identity_on_one_backend_keeps_its_data"),
        (_ignores_realms, "test_login_failures_are_uniform"),
        (_ignores_realms, "test_users_are_realm_scoped"),
        (_ignores_realms, "test_audit_log_is_realm_scoped"),
        (_snapshots, "test_two_open_backends_share_identity"),
    ],
)
def test_contract_catches_broken_backend(
    broken: Callable[[Path], OpenBackend], check: str, tmp_path: Path
) -> None:
    contract = IdentityContract()
    opener, root_key = broken(tmp_path / "identity.db"), os.urandom(32)
    app = contract.prepared_app(opener, root_key)
    try:
        test = getattr(contract, check)
        extra = {"open_backend": opener, "root_key": root_key}
        kwargs = {k: v for k, v in extra.items() if k in inspect.signature(test).parameters}
        # A failed assertion, or the operation the broken store lost failing (a lost user
        # cannot log in): either way the check does not pass.
        with pytest.raises((Exception, pytest.fail.Exception)):
            test(app, **kwargs)
    finally:
        app.close()


def test_broken_backends_fail_only_where_claimed(tmp_path: Path) -> None:
    """The broken backends above are broken only where claimed: the same backend passes
    the neighbouring check (so the failures are the contract's doing, not the setup's)."""
    contract = IdentityContract()
    opener, root_key = _forgets_revocations(tmp_path / "identity.db"), os.urandom(32)
    app = contract.prepared_app(opener, root_key)
    try:
        contract.test_identity_survives_reopening_the_store(app, opener, root_key)
    finally:
        app.close()
    snapshots = _snapshots(tmp_path / "snapshot.db")  # it does persist, at close
    app = contract.prepared_app(snapshots, root_key)
    try:
        contract.test_revocations_survive_reopening_the_store(app, snapshots, root_key)
    finally:
        app.close()
    realms = _ignores_realms(tmp_path / "other.db")
    app = contract.prepared_app(realms, root_key)
    try:
        contract.test_custom_role_and_scoped_grant(app)
    finally:
        app.close()


# -- the guide's example, run as an outside project would run it ---------------------------


def test_docs_identity_contract_example_passes(tmp_path: Path) -> None:
    """docs/plugins.md's identity contract example passes as written, run by pytest in a
    directory of its own (no qimem test helpers, no conftest): usable from outside."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text("utf-8")
    blocks = re.findall(r"^```python\n(# test_my_store_identity\.py\n.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1
    (tmp_path / "test_my_store_identity.py").write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # pytest alone: none of the plugins installed here (schemathesis, hypothesis, anyio...),
    # which cost ~3 s of start-up and which the example does not use
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    checks = [n for n in dir(IdentityContract) if n.startswith("test_")]
    no_identity = [n for n in dir(NoIdentityContract) if n.startswith("test_")]
    assert f"{len(checks) + len(no_identity)} passed" in result.stdout, result.stdout[-2000:]
    assert "skipped" not in result.stdout and "failed" not in result.stdout


# -- found while writing the contract ------------------------------------------------------


def test_recreated_realm_does_not_see_the_deleted_realms_audit() -> None:
    contract = IdentityContract()
    app = contract.prepared_app(registry_opener("memory", "memory://"), os.urandom(32))
    try:
        ids.create_realm(app, "tenant")
        contract.add_user(app, "ceo", ["admin"], realm="tenant")
        with pytest.raises(AuthError):
            contract.password_grant(app, "tenant", "ceo", "wrong-password-123")
        ids.delete_realm(app, "tenant")
        ids.create_realm(app, "tenant")  # a new tenant, given the freed name
        assert "ceo" not in repr(ids.audit_events(app, "tenant"))
    finally:
        app.close()


def test_failing_identity_database_factory_is_reported_without_its_text() -> None:
    def identity_database() -> Database:
        raise ConnectionError("cannot reach redis://:hunter2@10.0.0.9:6379/0")

    backend = Backend(OutsideKeyStore(), scheme="outside", identity_database=identity_database)
    with build(Config(store_url="outside://"), backend=backend) as app:
        with pytest.raises(QimemError) as info:
            ids.list_realms(app)
        assert "hunter2" not in str(info.value)
