"""The background purge of scheduled deletions (qimem/purger.py) and ``qimem serve
--purge-interval``: a key whose deletion date has passed is deleted without anyone using it
or running ``qimem keys purge``; a key whose date is still ahead is kept."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import make_app
from serve_process import ServeProcess

from qimem.app import AppContext
from qimem.config import Config
from qimem.errors import NotFoundError
from qimem.purger import DeletionPurger
from qimem.services import lifecycle
from qimem.services.keys import create_key, show_key


def _schedule_past_due(app: AppContext, name: str) -> str:
    """A key whose 7-day deletion was scheduled 8 days ago: due since yesterday."""
    lineage_id = create_key(app, name=name).lineage_id
    lifecycle.schedule_deletion(app, name, days=7, now=datetime.now(UTC) - timedelta(days=8))
    return lineage_id


def _gone(app: AppContext, ref: str) -> bool:
    try:
        show_key(app, ref)
    except NotFoundError:
        return True
    return False


def _wait_until(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_purger_deletes_what_is_due_and_keeps_the_rest(
    sqlite_app: AppContext, caplog: pytest.LogCaptureFixture
) -> None:
    due = _schedule_past_due(sqlite_app, "due")
    create_key(sqlite_app, name="pending")
    lifecycle.schedule_deletion(sqlite_app, "pending", days=7)
    create_key(sqlite_app, name="kept")
    caplog.set_level(logging.INFO, logger="qimem.purge")
    purger = DeletionPurger(sqlite_app, 0.05).start()
    try:
        assert _wait_until(lambda: _gone(sqlite_app, due))
    finally:
        purger.stop()
    assert not _gone(sqlite_app, "pending") and not _gone(sqlite_app, "kept")
    assert f"deleted key {due}" in caplog.text
    assert repr(purger) == "<DeletionPurger every 0.05 s>"


def test_a_clock_past_the_date_purges_a_pending_deletion(sqlite_app: AppContext) -> None:
    lineage_id = create_key(sqlite_app, name="later").lineage_id
    lifecycle.schedule_deletion(sqlite_app, "later", days=7)
    now = DeletionPurger(sqlite_app, 60).run_once()
    assert now == [] and not _gone(sqlite_app, lineage_id)
    ahead = DeletionPurger(sqlite_app, 60, clock=lambda: datetime.now(UTC) + timedelta(days=8))
    assert ahead.run_once() == [lineage_id]
    assert _gone(sqlite_app, lineage_id)


def test_a_store_that_is_down_is_logged_and_retried(
    root_key_b64: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on port 1: every connection attempt is refused.
    app = AppContext(
        Config(
            store_url="postgresql+psycopg://postgres@127.0.0.1:1/none", root_key_b64=root_key_b64
        )
    )
    caplog.set_level(logging.WARNING, logger="qimem.purge")
    try:
        assert DeletionPurger(app, 60).run_once() == []
        assert DeletionPurger(app, 60).run_once() == []  # and again at the next tick
    finally:
        app.close()
    assert caplog.text.count("scheduled deletions not purged this time") == 2
    assert "Traceback" not in caplog.text


def test_a_zero_interval_is_refused(sqlite_app: AppContext) -> None:
    with pytest.raises(ValueError):
        DeletionPurger(sqlite_app, 0)


@pytest.mark.slow
def test_qimem_serve_purges_in_the_background(tmp_path: Path, root_key_b64: str) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(QIMEM_HOME=str(tmp_path / "home"), QIMEM_ROOT_KEY=root_key_b64, QIMEM_STORE=store)
    app = make_app(store, root_key_b64)
    try:
        due = _schedule_past_due(app, "due")
        create_key(app, name="kept")
    finally:
        app.close()
    server = ServeProcess(tmp_path, env, "--purge-interval", "0.2")
    try:
        server.wait_ready()
        assert _wait_until(lambda: f"deleted key {due}" in server.log())
    finally:
        assert server.stop() == 0
    app = make_app(store, root_key_b64)
    try:
        assert _gone(app, due) and not _gone(app, "kept")
    finally:
        app.close()
