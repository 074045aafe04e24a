"""Shared fixtures: fresh plugin managers, real SQLite files and real PostgreSQL databases.

PostgreSQL tests read ``QIMEM_TEST_POSTGRES_URL`` (e.g. ``postgresql+psycopg://postgres@
127.0.0.1:5432/test``) and get a fresh database of their own, dropped afterwards. Without
the variable they skip, except under ``CI=true`` where a skipped PostgreSQL test fails the
run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_process import ServeProcess

from qimem.app import AppContext, build
from qimem.config import Config
from qimem.rootkey import encode_root_key, generate_root_key

#: Fixture modules shared by several test files (each defines them once), and the hook that
#: starts the longest tests first (tests/slow_first.py).
pytest_plugins = ["jwt_fixtures", "slow_first"]

POSTGRES_ENV = "QIMEM_TEST_POSTGRES_URL"
REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "vectors"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def require_postgres() -> str:
    """The admin URL, or skip (fail under CI=true) when PostgreSQL is not configured."""
    url = postgres_admin_url()
    if url is None:
        message = f"PostgreSQL tests need {POSTGRES_ENV}"
        if _in_ci():
            pytest.fail(message + " (CI=true: PostgreSQL tests must not be skipped)")
        pytest.skip(message)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to a brand-new empty PostgreSQL database, dropped after the test."""
    import sqlalchemy as sa

    from qimem.sql import normalize_url

    admin_url = normalize_url(require_postgres())
    name = f"qimem_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def root_key_b64() -> str:
    return encode_root_key(generate_root_key())


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qimem.db'}"


def make_app(store_url: str, root_key_b64: str | None, **config: object) -> AppContext:
    settings = Config(store_url=store_url, root_key_b64=root_key_b64, **config)  # type: ignore[arg-type]
    return build(settings, open=True)


@pytest.fixture
def memory_app() -> Iterator[AppContext]:
    app = make_app("memory://", None)
    yield app
    app.close()


@pytest.fixture
def sqlite_app(sqlite_url: str, root_key_b64: str) -> Iterator[AppContext]:
    app = make_app(sqlite_url, root_key_b64)
    yield app
    app.close()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_app(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[AppContext]:
    """An AppContext on each store backend in turn."""
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'qimem.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    app = make_app(url, root_key_b64)
    yield app
    app.close()


@pytest.fixture
def qimem_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated QIMEM_HOME with no config yet; env overrides cleared."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("QIMEM_HOME", str(home))
    for var in ("QIMEM_CONFIG", "QIMEM_STORE", "QIMEM_ROOT_KEY"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def processes() -> Iterator[list[ServeProcess]]:
    """``qimem serve`` processes a test starts (append them): killed after the test."""
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.kill()


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """Under CI=true, any skipped test that needs PostgreSQL fails the run."""
    if not _in_ci():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    postgres_skips = [r for r in skipped if "postgres" in str(r.longrepr).lower()]
    if postgres_skips:
        if reporter:
            reporter.write_line(
                f"CI=true: {len(postgres_skips)} PostgreSQL test(s) were skipped", red=True
            )
        session.exitstatus = 1
