"""The audit spill (issue 14 item 3): buffered audit records the store cannot take wait in
a bounded, fsynced local file and are replayed in order, exactly once, when it returns.

The store is made unavailable for real: an SQLite database held under an exclusive lock
by another connection (writes fail with "database is locked"), and a private PostgreSQL
cluster (tests/pg_instance.py) stopped and started again under a real ``qimem serve``.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from identity_helpers import ADMIN_PASSWORD
from pg_instance import PgInstance, require_pg_bin
from serve_process import ServeProcess, home_env

from qimem.errors import AuditUnavailableError
from qimem.identity import audit_spill
from qimem.identity.audit import AuditLog
from qimem.identity.audit_spill import HEADER, Spill, SpillSettings, encode, scan
from qimem.identity.db import Database

SECRETS = ("the-plaintext-nobody-sees", "hunter2-password-value", "eyJ-token-value")


# -- helpers -------------------------------------------------------------------------------


class SqliteStore:
    """A real SQLite audit store whose writes can be blocked (another connection holds
    an exclusive lock) and released."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.engine = sa.create_engine(self.url, connect_args={"timeout": 0.2})
        self.database = Database.for_engine(self.engine)  # migrated to HEAD
        self._blocker: sqlite3.Connection | None = None

    def block(self) -> None:
        self._blocker = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        self._blocker.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self._blocker is not None:
            self._blocker.execute("ROLLBACK")
            self._blocker.close()
            self._blocker = None

    def rows(self) -> list[tuple[str, str]]:
        """(record_id, target) of every audit record, in insertion (id) order."""
        with sqlite3.connect(self.path) as conn:
            return conn.execute("SELECT record_id, target FROM qimem_audit ORDER BY id").fetchall()

    def close(self) -> None:
        self.release()
        self.engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    found = SqliteStore(tmp_path / "audit.db")
    yield found
    found.close()


def open_log(store: SqliteStore, spill_dir: Path, **settings: Any) -> AuditLog:
    return AuditLog(store.database, flush_interval=0.05, spill=SpillSettings(spill_dir, **settings))


def record(log: AuditLog, targets: list[str], **detail: Any) -> None:
    for target in targets:
        log.record("master", "tester", "crypto.encrypt", target, buffered=True, **detail)


def counter(name: str) -> float:
    return float(audit_spill.metrics()[name]._value.get())


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def spill_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("spill-*.qas"))


def key_of(store: SqliteStore) -> str:
    return audit_spill.store_key(store.engine.url.render_as_string(hide_password=True))


# -- spill and replay ------------------------------------------------------------------------


def test_records_spill_while_the_store_is_down_and_replay_in_order_once(
    store: SqliteStore, tmp_path: Path
) -> None:
    spill_dir = tmp_path / "spill"
    targets = [f"t-{i}" for i in range(200)]
    log = open_log(store, spill_dir)
    old_umask = os.umask(0)  # the modes are set exactly, whatever the umask
    try:
        store.block()
        record(log, targets[:120])
        wait_until(lambda: log.spill is not None and log.spill.pending, what="the spill")
        record(log, targets[120:])
        time.sleep(0.3)  # the flusher keeps appending while the store is down
        path = log.spill.path  # type: ignore[union-attr]
        assert path is not None and path.parent == spill_dir
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
        assert oct(spill_dir.stat().st_mode & 0o777) == oct(0o700)
        wait_until(lambda: len(scan(path.read_bytes()).rows) == 200, what="all 200 spilled")
    finally:
        os.umask(old_umask)
        store.release()
    wait_until(lambda: len(store.rows()) == 200, what="the replay")
    log.close()
    rows = store.rows()
    assert [target for _, target in rows] == targets  # in order
    assert len({record_id for record_id, _ in rows}) == 200  # each once, each with an id
    assert spill_files(spill_dir) == []  # an empty spill file is removed at close


def test_a_spill_survives_a_killed_process_and_is_replayed_exactly_once(
    store: SqliteStore, tmp_path: Path
) -> None:
    """A process spills and is killed (SIGKILL); the next process on the store adopts its
    file. The first records were already committed before the crash (a crash between the
    replay's commit and the spill's truncation): they are not written twice. A torn last
    append is skipped."""
    spill_dir = tmp_path / "spill"
    script = """
import os, signal, sys
from pathlib import Path
import sqlalchemy as sa
from qimem.identity.audit import AuditLog
from qimem.identity.audit_spill import SpillSettings
from qimem.identity.db import Database
url, spill_dir, n = sys.argv[1:4]
engine = sa.create_engine(url, connect_args={"timeout": 0.2})
log = AuditLog(Database(engine), flush_interval=60, spill=SpillSettings(Path(spill_dir)))
for i in range(int(n)):
    log.record("master", "tester", "crypto.encrypt", f"t-{i}", buffered=True)
log.flush(replay=False)
print(log.spill.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    store.block()
    try:
        child = subprocess.run(
            [sys.executable, "-c", script, store.url, str(spill_dir), "300"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        store.release()
    assert child.returncode == -9, child.stderr
    path = Path(child.stdout.strip())
    assert path.exists() and path.parent == spill_dir
    found = scan(path.read_bytes())
    assert len(found.rows) == 300 and not found.torn_bytes
    with path.open("ab") as fh:  # a crash in the middle of an append
        fh.write(encode({"target": "torn", "record_id": "x"})[:-7])
    first = [row for row, _ in found.rows[:40]]  # committed, but the spill not truncated
    with store.engine.begin() as conn:
        from qimem.identity.audit import insert_rows

        insert_rows(conn, first)

    log = open_log(store, spill_dir)  # adopts the dead process's file
    try:
        wait_until(lambda: len(store.rows()) >= 300 and not path.exists(), what="adoption")
    finally:
        log.close()
    rows = store.rows()
    assert [target for _, target in rows] == [f"t-{i}" for i in range(300)]
    assert len({record_id for record_id, _ in rows}) == 300
    assert spill_files(spill_dir) == []


def test_each_worker_spills_to_its_own_file_and_adopts_a_stopped_ones(
    store: SqliteStore, tmp_path: Path
) -> None:
    """Two audit logs on one store and one spill directory (as the workers of
    ``qimem serve --workers 2``): each appends to its own file; a worker stopped while the
    store is down leaves its file, locked by nobody, and the other adopts it."""
    spill_dir = tmp_path / "spill"
    first, second = open_log(store, spill_dir), open_log(store, spill_dir)
    try:
        store.block()
        record(first, [f"a-{i}" for i in range(30)])
        record(second, [f"b-{i}" for i in range(30)])
        first.flush(replay=False)
        second.flush(replay=False)
        paths = {first.spill.path, second.spill.path}  # type: ignore[union-attr]
        assert len(paths) == 2 and set(spill_files(spill_dir)) == paths
        first.close()  # stopped (SIGHUP reload, scale down) with its records still spilled
        assert first.spill.path.exists()  # type: ignore[union-attr]
    finally:
        store.release()
    wait_until(lambda: len(store.rows()) == 60, what="both files in the store")
    assert spill_files(spill_dir) == [second.spill.path]  # type: ignore[union-attr]
    second.close()
    targets = [target for _, target in store.rows()]
    assert [t for t in targets if t.startswith("a-")] == [f"a-{i}" for i in range(30)]
    assert [t for t in targets if t.startswith("b-")] == [f"b-{i}" for i in range(30)]
    assert len({record_id for record_id, _ in store.rows()}) == 60
    assert spill_files(spill_dir) == []


def test_a_damaged_spill_file_is_reported_and_its_intact_records_replayed(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spill_dir = tmp_path / "spill"
    writer = Spill(SpillSettings(spill_dir), key_of(store))
    rows = [
        {"at": 1.0 + i, "realm": "master", "actor": "a", "action": "crypto.encrypt",
         "target": f"t-{i}", "outcome": "success", "detail": "{}", "record_id": f"id-{i}"}
        for i in range(10)
    ]  # fmt: skip
    assert writer.append(rows) == 10
    path = writer.path
    writer.close()  # not empty: left for the next process
    assert path is not None
    data = bytearray(path.read_bytes())
    frame = len(encode(rows[0]))
    data[len(HEADER) + 3 * frame + 20] ^= 0xFF  # inside the 4th record's payload
    data += b"\x00garbage\xa7Q"  # junk at the end
    path.write_bytes(bytes(data))
    before = counter("damaged")
    with caplog.at_level(logging.WARNING, logger="qimem.audit"):
        log = open_log(store, spill_dir)
        try:
            wait_until(lambda: not path.exists(), what="adoption")
        finally:
            log.close()
    assert [target for _, target in store.rows()] == [f"t-{i}" for i in range(10) if i != 3]
    assert path.with_name(path.name + ".damaged").exists()  # kept for inspection
    assert counter("damaged") == before + 1
    assert "is damaged: 1 region(s) skipped, 9 intact record(s)" in caplog.text
    assert "torn record" in caplog.text


def test_spilled_entries_that_are_not_records_are_skipped(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Intact frames (right CRC) whose payload is not an audit row, e.g. an extra column or
    a wrong type, are skipped and counted; they do not block the replay of the others."""
    spill_dir = tmp_path / "spill"
    writer = Spill(SpillSettings(spill_dir), key_of(store))
    good = {"at": 1.0, "realm": "master", "actor": "a", "action": "crypto.encrypt",
            "target": "ok", "outcome": "success", "detail": "{}", "record_id": "r-1"}  # fmt: skip
    bad = [{**good, "id": 1, "record_id": "r-2"}, {**good, "at": "now", "record_id": "r-3"}, {}]
    assert writer.append([bad[0], good, *bad[1:]]) == 4
    path = writer.path
    writer.close()
    before = counter("damaged")
    with caplog.at_level(logging.ERROR, logger="qimem.audit"):
        log = open_log(store, spill_dir)
        try:
            wait_until(lambda: path is not None and not path.exists(), what="adoption")
        finally:
            log.close()
    assert store.rows() == [("r-1", "ok")]
    assert counter("damaged") == before + 3
    assert "3 spilled entries are not audit records; skipped" in caplog.text


def test_scan_never_fails_on_arbitrary_bytes() -> None:
    rng = random.Random(14)
    good = HEADER + b"".join(encode({"n": i}) for i in range(20))
    for _ in range(500):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        found = scan(bytes(data[: rng.randint(0, len(data))]))
        assert all(isinstance(row, dict) for row, _ in found.rows)
    assert scan(b"not a spill file").bad_header


# -- when the spill is full ----------------------------------------------------------------


def test_a_full_spill_drops_and_counts(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    targets = [f"t-{i}" for i in range(60)]
    log = open_log(store, tmp_path / "spill", max_bytes=4096, when_full="drop")
    before = counter("dropped")
    try:
        store.block()
        record(log, targets, password=SECRETS[1])
        with caplog.at_level(logging.WARNING, logger="qimem.audit"):
            log.flush(replay=False)
        kept = len(scan(log.spill.path.read_bytes()).rows)  # type: ignore[union-attr]
        assert 0 < kept < 60
        assert counter("dropped") == before + 60 - kept
        assert f"audit store down and audit spill full: {60 - kept} audit records" in caplog.text
        assert "t-5" not in caplog.text and SECRETS[1] not in caplog.text
        log.admit()  # "drop" never refuses
    finally:
        store.release()
    log.flush()
    log.close()
    assert [target for _, target in store.rows()] == targets[:kept]


def test_a_full_spill_refuses_new_operations_and_loses_nothing(
    store: SqliteStore, tmp_path: Path
) -> None:
    targets = [f"t-{i}" for i in range(60)]
    log = open_log(store, tmp_path / "spill", max_bytes=4096, when_full="refuse")
    before = counter("dropped")
    try:
        log.admit()
        store.block()
        record(log, targets)
        log.flush(replay=False)
        with pytest.raises(AuditUnavailableError) as refused:
            log.admit()
        assert refused.value.code == "audit_unavailable"
    finally:
        store.release()
    wait_until(lambda: len(store.rows()) == 60, what="everything written")
    log.admit()  # room again
    log.close()
    assert [target for _, target in store.rows()] == targets
    assert counter("dropped") == before


# -- files: permissions, symlinks, secrets -------------------------------------------------


def test_a_symlinked_spill_directory_is_refused(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    planted = tmp_path / "spill"
    planted.symlink_to(elsewhere)
    log = open_log(store, planted)
    try:
        store.block()
        record(log, ["a", "b"])
        with caplog.at_level(logging.ERROR, logger="qimem.audit"):
            log.flush(replay=False)
    finally:
        store.release()
        log.close()
    assert f"audit spill directory {planted} is a symlink; refusing it" in caplog.text
    assert list(elsewhere.iterdir()) == []


def test_planted_spill_files_are_not_replayed(
    store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlink, a file readable by others, or (as root) another user's file where a spill
    file would be: reported, never read, replayed, followed or removed."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir(mode=0o700)
    forged = HEADER + encode(
        {"at": 1.0, "realm": "master", "actor": "forger", "action": "keys.create",
         "target": "forged", "outcome": "success", "detail": "{}", "record_id": "forged-1"}
    )  # fmt: skip
    target = tmp_path / "victim.bin"
    target.write_bytes(forged)
    key = key_of(store)
    link = spill_dir / f"spill-{key}-999999-aaaa.qas"
    link.symlink_to(target)
    loose = spill_dir / f"spill-{key}-999998-bbbb.qas"
    loose.write_bytes(forged)
    loose.chmod(0o644)
    planted = [link, loose]
    if os.geteuid() == 0:
        other = spill_dir / f"spill-{key}-999997-cccc.qas"
        other.write_bytes(forged)
        other.chmod(0o600)
        os.chown(other, 65534, 65534)
        planted.append(other)
    with caplog.at_level(logging.ERROR, logger="qimem.audit"):
        log = open_log(store, spill_dir)
        log.flush()
        log.close()
    assert store.rows() == []
    assert all(p.is_symlink() or p.exists() for p in planted)
    assert target.read_bytes() == forged
    assert f"audit spill file {link} is a symlink; refusing it" in caplog.text
    assert f"audit spill file {loose} is mode 0644, not 0600; refusing it" in caplog.text
    if os.geteuid() == 0:
        assert "owned by uid 65534, not by you; refusing it" in caplog.text


def test_no_secrets_in_the_spill(store: SqliteStore, tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    log = open_log(store, spill_dir)
    try:
        store.block()
        for i in range(5):
            log.record(
                "master", "tester", "crypto.encrypt", f"t-{i}", buffered=True,
                plaintext=SECRETS[0], password=SECRETS[1], token=SECRETS[2],
                authorization=f"Bearer {SECRETS[2]}", client_secret=SECRETS[1],
            )  # fmt: skip
        log.flush(replay=False)
        data = log.spill.path.read_bytes()  # type: ignore[union-attr]
        assert len(scan(data).rows) == 5
        for secret in SECRETS:
            assert secret.encode() not in data
    finally:
        store.release()
        log.close()


def test_spill_settings_are_validated() -> None:
    from qimem.errors import ConfigError
    from qimem.identity.settings import settings_from_mapping

    ok = settings_from_mapping(
        {
            "audit_spill_dir": "/var/lib/x",
            "audit_spill_max_bytes": 8192,
            "audit_spill_full": "refuse",
        }
    )
    assert ok.spill_settings() == SpillSettings(Path("/var/lib/x"), 8192, "refuse")
    assert settings_from_mapping({"audit_spill_max_bytes": 0}).spill_settings() is None
    with pytest.raises(ConfigError, match="audit_spill_full must be one of drop, refuse"):
        settings_from_mapping({"audit_spill_full": "sometimes"})
    with pytest.raises(ConfigError, match="audit_spill_max_bytes must be 0 .no spill. or at least"):
        settings_from_mapping({"audit_spill_max_bytes": 100})
    with pytest.raises(ConfigError, match="audit_spill_max_bytes has the wrong type"):
        settings_from_mapping({"audit_spill_max_bytes": "lots"})


# -- end to end: a real server, PostgreSQL stopped for 30 s under load -----------------------

OUTAGE_SECONDS = 30.0
AUDITED = {"encrypt": "crypto.encrypt", "decrypt": "crypto.decrypt"}


class Load:
    """Client threads sending encrypt and decrypt requests; every answer is kept."""

    def __init__(self, url: str, token: str, threads: int = 4) -> None:
        self.url, self.token = url, token
        self.answers: list[tuple[str, int | None, str | None]] = []  # op, status, error code
        self.plaintexts: list[bytes] = []
        self.spilled_seen: list[bytes] = []
        self._sealed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def _call(self, http: requests.Session, op: str, body: dict[str, Any]) -> Any:
        try:
            answer = http.post(f"{self.url}/v1/security/{op}", json=body, timeout=30)
        except requests.RequestException as exc:
            with self._lock:
                self.answers.append((op, None, type(exc).__name__))
            return None
        try:
            data = answer.json()
        except ValueError:
            data = None
        code = None
        if answer.status_code != 200:
            code = (data or {}).get("error", {}).get("code") if isinstance(data, dict) else None
        with self._lock:
            self.answers.append((op, answer.status_code, code))
        return data if answer.status_code == 200 else None

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {self.token}"
            while not self._stop.is_set():
                if self._sealed and rng.random() < 0.4:
                    self._call(http, "decrypt", {"envelope": rng.choice(self._sealed)})
                    continue
                plaintext = f"{SECRETS[0]}-{rng.getrandbits(64):x}".encode()
                body = {"key": "k", "plaintext": base64.b64encode(plaintext).decode()}
                data = self._call(http, "encrypt", body)
                with self._lock:
                    self.plaintexts.append(plaintext)
                    if data is not None:
                        self._sealed.append(data["envelope"])

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(40)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def succeeded(self, op: str) -> int:
        return sum(1 for o, status, _ in self.answers if o == op and status == 200)


def _configure(home: Path, spill_dir: Path) -> None:
    import tomllib

    import tomli_w

    config = home / "config.toml"
    doc = tomllib.loads(config.read_text())
    doc["identity"] = {
        "argon2_memory_kib": 1024,
        "argon2_time_cost": 1,
        "cache_seconds": 600.0,  # signing keys and roles: served from memory in the outage
        "audit_spill_dir": str(spill_dir),
    }
    doc.setdefault("cache", {})["ttl_seconds"] = 600.0
    doc["keys"] = {"usage_reserve_block": 1_000_000}  # no usage reservation in the outage
    config.write_text(tomli_w.dumps(doc))
    config.chmod(0o600)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_stopped_for_30_seconds_under_load_loses_no_audit_record(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    """A real ``qimem serve`` on a private PostgreSQL, client threads encrypting and
    decrypting; PostgreSQL is stopped for 30 s and started again. Every successful request
    has exactly one audit record (by record id), the spill held records during the outage
    and no secret, and every error answer is a documented 503."""
    pg = PgInstance(require_pg_bin())
    try:
        pg.start()
        url = pg.create_database("audit_spill")
        home, spill_dir = tmp_path / "home", tmp_path / "spill"
        env = home_env(home, QIMEM_STORE=url)
        init = subprocess.run(
            [sys.executable, "-c", "from qimem.cli import main; main()", "init",
             "--admin-password-stdin"],
            input=ADMIN_PASSWORD + "\n", env=env, cwd=tmp_path, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        _configure(home, spill_dir)
        serve = ServeProcess(tmp_path, env, "--threads", "8", "--no-access-log", insecure=False)
        processes.append(serve)
        serve.wait_ready()
        login = requests.post(
            f"{serve.url}/v1/auth/realms/master/token",
            data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
            timeout=30,
        )
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        created = requests.post(
            f"{serve.url}/v1/security/keys",
            json={"name": "k"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert created.status_code == 201, created.text

        load = Load(serve.url, token).start()
        try:
            time.sleep(3)
            pg.stop("fast")
            stopped = time.monotonic()
            spilled: dict[str, bytes] = {}
            while time.monotonic() - stopped < OUTAGE_SECONDS:
                time.sleep(2)
                for path in spill_files(spill_dir):
                    spilled[path.name] = path.read_bytes()
            pg.start()
            time.sleep(4)
        finally:
            load.stop()

        expected = {action: load.succeeded(op) for op, action in AUDITED.items()}
        engine = sa.create_engine(url)
        query = sa.text(
            "SELECT action, count(*), count(DISTINCT record_id) FROM qimem_audit "
            "WHERE outcome = 'success' AND action IN ('crypto.encrypt', 'crypto.decrypt') "
            "GROUP BY action"
        )
        found: dict[str, tuple[int, int]] = {}

        def arrived() -> bool:
            with engine.connect() as conn:
                found.clear()
                found.update({a: (n, d) for a, n, d in conn.execute(query)})
            return all(found.get(a, (0, 0))[0] >= n for a, n in expected.items())

        try:
            wait_until(arrived, timeout=60, what=f"audit records {expected}, have {found}")
            time.sleep(1)  # nothing more arrives (no duplicate replay)
            arrived()
        finally:
            engine.dispose()
        assert serve.stop() == 0
    finally:
        pg.destroy()

    print(f"\nAUDIT-SPILL expected={expected} found={found} answers={len(load.answers)}")
    for action, n in expected.items():
        assert found[action] == (n, n), (action, found[action], n)  # exactly once, by id
    bad = [
        a
        for a in load.answers
        if a[1] != 200 and not (a[1] == 503 and a[2] in ("store_unavailable", "audit_unavailable"))
    ]
    assert not bad, bad[:10]
    records = [row for data in spilled.values() for row, _ in scan(data).rows]
    print(f"AUDIT-SPILL records seen in the spill during the outage: {len(records)}")
    assert records, "nothing was spilled while PostgreSQL was down"
    assert any(r["action"] == "crypto.encrypt" for r in records)
    blob = b"".join(spilled.values()) + serve.log().encode()
    for secret in (ADMIN_PASSWORD, token, *(p.decode() for p in load.plaintexts[:200])):
        assert secret.encode() not in blob
        assert base64.b64encode(secret.encode()) not in blob
    assert SECRETS[0].encode() not in blob
    assert "Traceback" not in serve.log()
