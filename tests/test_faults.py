"""Faults: the database restarted or cut off under load, a full disk, a bad root key.

* PostgreSQL (a private instance, tests/pg_instance.py) restarted with ``-m fast`` and
  ``-m immediate``, stopped for a while, and cut off behind a black-holing TCP proxy, while
  client threads keep a real authenticated ``qimem serve`` busy with logins, encryptions,
  decryptions and rotations: every answer is 2xx or 503 ``store_unavailable`` (never 500,
  never a dropped connection), ``/readyz`` follows the store, and the server recovers by
  itself once the database is back. Every ciphertext it returned still decrypts, and the
  rotations it acknowledged form contiguous versions.
* A genuinely full filesystem (a 1 MiB tmpfs mounted for the test) under ``qimem encrypt``
  / ``decrypt`` outputs and under the SQLite store: one clear error naming the file and
  "No space left on device", no partial or temp files, inputs untouched, the store consistent
  once space is freed.
* A root key file with group/other permissions, empty, of the wrong length, not base64, or a
  different valid key than the store's: ``qimem encrypt`` and ``qimem serve`` refuse to start
  with one line and exit code 9, and ``serve`` refuses before it binds its port.

The measured figures (recovery time, failure latency) are printed with ``-s`` and recorded
as junit properties: ``pytest tests/test_faults.py -s -k postgres``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import re
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from identity_helpers import ADMIN_PASSWORD
from pg_instance import PgInstance, TcpProxy, require_pg_bin
from serve_process import ServeProcess

from qimem.cli import cli as qimem_cli
from qimem.errors import StoreUnavailableError
from qimem.rootkey import encode_root_key, generate_root_key
from qimem.sql import PG_CONNECT_TIMEOUT, create_engine

FAST_IDENTITY = "\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\n"
RECOVERY_DEADLINE = 30.0  # liveness bound only: the figures are reported, not asserted
CLIENT_TIMEOUT = 30.0  # a request that takes longer counts as a hang
TEMPLATE_DB = "faults_template"


def qimem_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from qimem.cli import main; main()", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(extra)
    return env


def run_qimem(
    *args: str, env: dict[str, str], cwd: Path, input: bytes | None = None, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    """A real ``qimem`` process, started outside the repo root."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(qimem_cmd(*args), env=env, cwd=cwd, input=input, timeout=120, **kw)


def cli(*args: str, home: Path | None = None, input: bytes | None = None, **env: str) -> Result:
    """``qimem ARGS`` in this process (click's runner; the CLI closes its store at exit)."""
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("QIMEM_")}
    environ.update(env)
    if home is not None:
        environ["QIMEM_HOME"] = str(home)
    return CliRunner().invoke(qimem_cli, list(args), input=input, env=environ)


def init_home(home: Path) -> Path:
    """``qimem init`` and ``qimem keys create --name k`` in ``home``."""
    for args in (("init",), ("keys", "create", "--name", "k")):
        result = cli(*args, home=home)
        assert result.exit_code == 0, result.output
    return home


def report(record_property: Callable[[str, object], None], name: str, value: object) -> None:
    """A measured figure: printed (``-s``) and kept in the junit XML."""
    print(f"\nFAULTS {name} = {value}")
    record_property(name, value)


# ---- a real qimem serve ------------------------------------------------------------------


def Serve(workdir: Path, env: dict[str, str], *extra: str) -> ServeProcess:  # noqa: N802
    """An authenticated ``qimem serve`` (4 threads, no access log) for the fault tests."""
    name = f"serve-{uuid.uuid4().hex[:6]}"
    return ServeProcess(
        workdir, env, "--threads", "4", "--no-access-log", *extra, name=name, insecure=False
    )


# ---- PostgreSQL faults under load ----------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PgInstance]:
    """A private PostgreSQL server for this module; stopped and removed afterwards."""
    instance = PgInstance(require_pg_bin())
    try:
        instance.start()
        yield instance
    finally:
        instance.destroy()


@pytest.fixture(scope="module")
def pg_home(pg: PgInstance, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QIMEM_HOME (config, root key, fast password hashing) whose store, the database
    ``faults_template``, ``qimem init`` set up once: realm master, user admin."""
    home = tmp_path_factory.mktemp("faults") / "home"
    url = pg.create_database(TEMPLATE_DB)
    init = cli("init", "--admin-password-stdin", input=ADMIN_PASSWORD.encode() + b"\n",
               home=home, QIMEM_STORE=url)  # fmt: skip
    assert init.exit_code == 0, init.output
    with (home / "config.toml").open("a") as fh:
        fh.write(FAST_IDENTITY)
    return home


@pytest.fixture
def pg_db(pg: PgInstance, pg_home: Path) -> str:
    """A fresh copy of the initialized template database (the server is started again if a
    test left it stopped); its name."""
    if not pg.running():
        pg.start()
    name = f"faults_{uuid.uuid4().hex[:10]}"
    pg.create_database(name, template=TEMPLATE_DB)
    return name


@dataclass
class Outcome:
    op: str
    start: float  # time.time()
    end: float
    status: int | None  # None: no HTTP answer (connection dropped, timeout)
    code: str | None = None  # the error code of a JSON error body
    problem: str | None = None  # what was wrong with the answer, if anything


@dataclass
class Load:
    """Client threads against one server: encrypt/decrypt workers, one rotator (with a
    password login every few rotations) and a ``/readyz`` prober."""

    url: str
    token: str
    key: str = "faulty"
    workers: int = 2
    outcomes: list[Outcome] = field(default_factory=list)
    sealed: list[tuple[str, bytes]] = field(default_factory=list)
    rotated: list[int] = field(default_factory=list)  # versions of acknowledged rotations
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _call(
        self, http: requests.Session, op: str, method: str, path: str, body: Any = None
    ) -> tuple[Outcome, Any]:
        start = time.time()
        try:
            resp = http.request(
                method,
                self.url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=CLIENT_TIMEOUT,
            )
        except requests.RequestException as exc:
            outcome = Outcome(op, start, time.time(), None, problem=type(exc).__name__)
            with self._lock:
                self.outcomes.append(outcome)
            return outcome, None
        outcome = Outcome(op, start, time.time(), resp.status_code)
        data: Any = None
        try:
            data = resp.json()
        except ValueError:
            outcome.problem = f"not JSON: {resp.text[:80]!r}"
        if resp.status_code >= 300 and outcome.problem is None:
            try:
                outcome.code = data["error"]["code"]
            except (KeyError, TypeError):
                outcome.problem = f"not an error body: {resp.text[:80]!r}"
        with self._lock:
            self.outcomes.append(outcome)
        return outcome, data

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as http:
            while not self.stop.is_set():
                if self.sealed and rng.random() < 0.4:
                    envelope, plaintext = rng.choice(self.sealed)
                    out, data = self._call(
                        http, "decrypt", "POST", "/v1/security/decrypt", {"envelope": envelope}
                    )
                    if out.status == 200 and base64.b64decode(data["plaintext"]) != plaintext:
                        out.problem = "decrypted to other bytes"
                    continue
                plaintext = rng.randbytes(rng.randint(0, 64))
                body = {"key": self.key, "plaintext": base64.b64encode(plaintext).decode()}
                out, data = self._call(http, "encrypt", "POST", "/v1/security/encrypt", body)
                if out.status == 200:
                    with self._lock:
                        self.sealed.append((data["envelope"], plaintext))

    def _rotator(self) -> None:
        with requests.Session() as http:
            count = 0
            while not self.stop.is_set():
                count += 1
                if count % 4 == 0:
                    out, data = self._call(
                        http,
                        "login",
                        "POST",
                        "/v1/auth/realms/master/token",
                        {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
                    )
                    if out.status == 200:
                        self.token = data["access_token"]
                else:
                    out, data = self._call(http, "rotate", "POST", "/v1/security/rotate",
                                           {"key": self.key})  # fmt: skip
                    if out.status == 200:
                        with self._lock:
                            self.rotated.append(data["version"])
                self.stop.wait(0.02)

    def _prober(self) -> None:
        with requests.Session() as http:
            while not self.stop.is_set():
                self._call(http, "readyz", "GET", "/readyz")
                self.stop.wait(0.01)

    def start(self) -> Load:
        targets: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (self._worker, (i,)) for i in range(self.workers)
        ]
        targets += [(self._rotator, ()), (self._prober, ())]
        for target, args in targets:
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def first_success_after(self, ops: tuple[str, ...], since: float) -> float | None:
        """End time of the first 200 of one of ``ops`` that started at/after ``since``."""
        with self._lock:
            ends = [
                o.end for o in self.outcomes if o.op in ops and o.status == 200 and o.start >= since
            ]
        return min(ends) if ends else None

    def wait_success_after(self, ops: tuple[str, ...], since: float) -> float:
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while time.monotonic() < deadline:
            found = self.first_success_after(ops, since)
            if found is not None:
                return found
            time.sleep(0.01)
        pytest.fail(f"no successful {ops} within {RECOVERY_DEADLINE} s of the database's return")

    def wait_for(self, predicate: Callable[[Outcome], bool], since: float) -> Outcome:
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while time.monotonic() < deadline:
            with self._lock:
                hits = [o for o in self.outcomes if o.start >= since and predicate(o)]
            if hits:
                return hits[0]
            time.sleep(0.01)
        pytest.fail("the expected answer never came")


def assert_clean_answers(load: Load) -> None:
    """Every answer was a 2xx or a JSON 503 store_unavailable: no 500, no dropped
    connection, no hang, no wrong plaintext."""
    bad = [
        o
        for o in load.outcomes
        if o.problem is not None
        or o.status is None
        or not (200 <= o.status < 300 or (o.status == 503 and o.code == "store_unavailable"))
    ]
    # A login that found the store down answers 503 store_unavailable too.
    assert not bad, bad[:10]


def assert_consistent_after(load: Load, serve: ServeProcess) -> None:
    """After recovery: every ciphertext decrypts to its plaintext, and the key's versions
    are contiguous with every acknowledged rotation among them, the newest one active."""
    headers = {"Authorization": f"Bearer {load.token}"}
    with requests.Session() as http:
        for at in range(0, len(load.sealed), 500):
            chunk = load.sealed[at : at + 500]
            resp = http.post(
                f"{serve.url}/v1/security/decrypt",
                json={"items": [{"envelope": envelope} for envelope, _ in chunk]},
                headers=headers,
                timeout=CLIENT_TIMEOUT,
            )
            assert resp.status_code == 200, resp.text
            opened = [base64.b64decode(item["plaintext"]) for item in resp.json()["items"]]
            assert opened == [plaintext for _, plaintext in chunk]
        shown = http.get(
            f"{serve.url}/v1/security/keys/{load.key}", headers=headers, timeout=CLIENT_TIMEOUT
        ).json()
        audited = {
            action: [
                e["outcome"]
                for e in http.get(
                    f"{serve.url}/v1/auth/realms/master/audit",
                    params={"action": action, "limit": 1000},
                    headers=headers,
                    timeout=CLIENT_TIMEOUT,
                ).json()["events"]
            ]
            for action in ("crypto.encrypt", "keys.rotate")
        }
    # Audit records made while the store was down were buffered, not lost: a success record
    # per 200 answer (the failures are there too, as "failure"). At least once: a batch whose
    # commit was lost with the connection is written again, so a crash may duplicate one.
    encrypted = sum(o.op == "encrypt" and o.status == 200 for o in load.outcomes)
    assert len(audited["crypto.encrypt"]) < 1000  # all of them fit in one page
    assert audited["crypto.encrypt"].count("success") >= encrypted
    assert audited["keys.rotate"].count("success") >= len(load.rotated)
    versions = [v["version"] for v in shown["versions"]]
    assert sorted(versions) == list(range(1, len(versions) + 1))
    assert len(set(load.rotated)) == len(load.rotated)  # no version acknowledged twice
    assert set(load.rotated) <= set(versions)
    states = {v["version"]: v["state"] for v in shown["versions"]}
    assert [n for n, s in states.items() if s == "active"] == [max(versions)]
    assert load.rotated, "no rotation succeeded at all"


def pg_ready_time(pg: PgInstance) -> float:
    """When the server last logged "ready to accept connections" (epoch seconds; the log
    line prefix is PostgreSQL's default ``%m``, milliseconds in UTC)."""
    lines = [
        line
        for line in pg.log.read_text(errors="replace").splitlines()
        if "ready to accept connections" in line
    ]
    stamp = " ".join(lines[-1].split()[:2])  # 2026-11-30 01:40:04.411 UTC
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def start_authenticated_server(
    tmp_path: Path, home: Path, store_url: str
) -> tuple[ServeProcess, str]:
    """``qimem serve`` (auth on) on ``store_url``; returns the server and an admin access
    token. The key ``faulty`` exists."""
    serve = Serve(tmp_path, clean_env(QIMEM_HOME=str(home), QIMEM_STORE=store_url))
    serve.wait_ready()
    token = requests.post(
        f"{serve.url}/v1/auth/realms/master/token",
        json={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        timeout=CLIENT_TIMEOUT,
    ).json()["access_token"]
    created = requests.post(
        f"{serve.url}/v1/security/keys",
        json={"name": "faulty"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=CLIENT_TIMEOUT,
    )
    assert created.status_code == 201, created.text
    return serve, token


def finish_and_check(load: Load, serve: ServeProcess) -> None:
    load.finish()
    assert_clean_answers(load)
    assert serve.proc.poll() is None, "qimem serve died"
    assert_consistent_after(load, serve)
    assert serve.stop() == 0
    log = serve.log()
    assert "Traceback" not in log and "unexpected" not in log, log[-3000:]


def outage_summary(load: Load, since: float, until: float) -> dict[str, dict[int, int]]:
    """Per operation, how many answers of each status came for requests made in
    ``[since, until]``."""
    summary: dict[str, dict[int, int]] = {}
    for o in load.outcomes:
        if since <= o.start <= until and o.status is not None:
            counts = summary.setdefault(o.op, {})
            counts[o.status] = counts.get(o.status, 0) + 1
    return summary


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restarts_under_load(
    tmp_path: Path,
    pg: PgInstance,
    pg_home: Path,
    pg_db: str,
    record_property: Callable[[str, object], None],
) -> None:
    """``pg_ctl restart -m fast``, then ``-m immediate`` (a crash: recovery from WAL), under
    one running server that is never restarted."""
    serve, token = start_authenticated_server(tmp_path, pg_home, pg.url(pg_db))
    try:
        load = Load(serve.url, token).start()
        load.wait_for(lambda o: o.op == "rotate" and o.status == 200, 0)
        figures = []
        for mode in ("fast", "immediate"):
            time.sleep(0.3)
            before = time.time()
            pg.restart(mode)
            ready = pg_ready_time(pg)
            recovered = load.wait_success_after(("rotate", "login"), ready)
            readyz = load.wait_success_after(("readyz",), ready)
            figures.append((mode, before, ready, recovered, readyz))
        time.sleep(0.3)  # more load after the last recovery
        finish_and_check(load, serve)
    finally:
        serve.stop()
    for mode, before, ready, recovered, readyz in figures:
        report(record_property, f"restart_{mode}_pg_down_s", round(ready - before, 3))
        report(record_property, f"restart_{mode}_answers", outage_summary(load, before, ready))
        report(record_property, f"restart_{mode}_recovery_store_op_s", round(recovered - ready, 3))
        report(record_property, f"restart_{mode}_recovery_readyz_s", round(readyz - ready, 3))
    report(record_property, "restart_requests", len(load.outcomes))


def _failure_latencies(load: Load, since: float, until: float) -> list[float]:
    return sorted(
        o.end - o.start
        for o in load.outcomes
        if o.status == 503 and since <= o.start and o.end <= until and o.op != "readyz"
    )


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_stopped_for_a_while(
    tmp_path: Path,
    pg: PgInstance,
    pg_home: Path,
    pg_db: str,
    record_property: Callable[[str, object], None],
) -> None:
    serve, token = start_authenticated_server(tmp_path, pg_home, pg.url(pg_db))
    try:
        load = Load(serve.url, token).start()
        load.wait_for(lambda o: o.op == "rotate" and o.status == 200, 0)
        stopped = time.time()
        pg.stop("fast")
        down = load.wait_for(lambda o: o.op == "readyz" and o.status == 503, stopped)
        load.wait_for(lambda o: o.op == "rotate" and o.status == 503, stopped)
        load.wait_for(lambda o: o.op == "login" and o.status == 503, stopped)
        time.sleep(0.5)
        back = time.time()
        pg.start()
        ready = pg_ready_time(pg)
        recovered = load.wait_success_after(("rotate", "login"), ready)
        readyz = load.wait_success_after(("readyz",), ready)
        time.sleep(0.3)
        finish_and_check(load, serve)
    finally:
        serve.stop()
    assert down.code == "store_unavailable"
    latencies = _failure_latencies(load, stopped, back)
    assert latencies
    report(record_property, "stopped_answers", outage_summary(load, stopped, back))
    report(
        record_property, "stopped_failure_latency_median_s", round(statistics.median(latencies), 4)
    )
    report(record_property, "stopped_failure_latency_max_s", round(latencies[-1], 4))
    report(record_property, "stopped_recovery_store_op_s", round(recovered - ready, 3))
    report(record_property, "stopped_recovery_readyz_s", round(readyz - ready, 3))


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_black_holed(
    tmp_path: Path,
    pg: PgInstance,
    pg_home: Path,
    pg_db: str,
    record_property: Callable[[str, object], None],
) -> None:
    """The link to the database is cut by a proxy that drops open connections and holds new
    ones without answering: requests fail after qimem's default connect timeout
    (qimem.sql.PG_CONNECT_TIMEOUT), instead of psycopg's 130 s."""
    proxy = TcpProxy(pg.port)
    try:
        through_proxy = pg.url(pg_db, port=proxy.port)
        serve, token = start_authenticated_server(tmp_path, pg_home, through_proxy)
        try:
            load = Load(serve.url, token).start()
            load.wait_for(lambda o: o.op == "rotate" and o.status == 200, 0)
            cut = time.time()
            proxy.blackhole()
            load.wait_for(lambda o: o.op == "readyz" and o.status == 503, cut)
            load.wait_for(lambda o: o.op == "rotate" and o.status == 503, cut)
            restored = time.time()
            proxy.restore()
            recovered = load.wait_success_after(("rotate", "login"), restored)
            readyz = load.wait_success_after(("readyz",), restored)
            time.sleep(0.3)
            finish_and_check(load, serve)
        finally:
            serve.stop()
    finally:
        proxy.close()
    latencies = _failure_latencies(load, cut, restored)
    assert latencies
    report(record_property, "blackhole_answers", outage_summary(load, cut, restored))
    report(
        record_property,
        "blackhole_failure_latency_median_s",
        round(statistics.median(latencies), 3),
    )
    report(record_property, "blackhole_failure_latency_max_s", round(latencies[-1], 3))
    report(record_property, "blackhole_recovery_store_op_s", round(recovered - restored, 3))
    report(record_property, "blackhole_recovery_readyz_s", round(readyz - restored, 3))


@pytest.mark.parametrize("query, expected", [("", PG_CONNECT_TIMEOUT), ("?connect_timeout=2", "2")])
def test_postgres_connect_timeout_default_and_url_override(query: str, expected: object) -> None:
    """The engine hands psycopg a connect timeout: qimem's default, or the URL's own."""
    import sqlalchemy as sa

    engine = create_engine(f"postgresql+psycopg://qimem@127.0.0.1:9/qimem{query}")
    seen: dict[str, Any] = {}

    @sa.event.listens_for(engine, "do_connect")
    def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise ConnectionAbortedError("captured")  # connect nowhere

    with pytest.raises(ConnectionAbortedError):
        engine.connect()
    engine.dispose()
    assert seen["connect_timeout"] == expected


@pytest.mark.postgres
def test_postgres_connections_carry_tcp_keepalives(postgres_url: str) -> None:
    """A real connection runs with qimem's keepalive and send-timeout defaults, and a
    setting in the URL wins over its default."""
    for query, idle in (("", "10"), ("?keepalives_idle=42", "42")):
        engine = create_engine(postgres_url + query)
        try:
            with engine.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        finally:
            engine.dispose()
        assert params["keepalives_idle"] == idle
        assert params["keepalives"] == "1" and params["tcp_user_timeout"] == "25000"
        assert params["keepalives_interval"] == "5" and params["keepalives_count"] == "3"


# ---- a full disk ------------------------------------------------------------------------

SMALL_FS_BYTES = 1 << 20
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@dataclass
class SmallFs:
    """A directory whose writes run out of room: a 1 MiB tmpfs mounted for the test or,
    where mounting is not permitted, a per-process file size limit (RLIMIT_FSIZE) applied
    to the qimem subprocesses (``preexec``), whose writes then fail with EFBIG."""

    path: Path
    mounted: bool

    @property
    def reason(self) -> str:
        return NO_SPACE if self.mounted else os.strerror(errno.EFBIG)

    def preexec(self) -> None:
        if not self.mounted:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_FS_BYTES, SMALL_FS_BYTES))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A 1 MiB file system (tmpfs), unmounted afterwards."""
    path = tmp_path / "small"
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES},mode=0755", "tmpfs", path],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield SmallFs(path, mounted)
    finally:
        if mounted and subprocess.run(["umount", path], capture_output=True).returncode:
            subprocess.run(["umount", "-l", path], capture_output=True)  # still busy


@pytest.fixture(scope="module")
def files_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized QIMEM_HOME (SQLite store on the normal disk) with the key ``k``."""
    return init_home(tmp_path_factory.mktemp("files") / "home")


def run_in(fs: SmallFs, home: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """A qimem command under ``fs``'s limit (if it is a limit rather than a mount)."""
    return run_qimem(*args, env=clean_env(QIMEM_HOME=str(home)), cwd=home.parent,
                     preexec_fn=fs.preexec, **kw)  # fmt: skip


def error_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    """stderr's lines; each must be a one-line qimem error (no traceback)."""
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert lines and all(line.startswith("qimem: error: ") for line in lines), text
    return lines


def leftovers(directory: Path) -> list[str]:
    """Every file under ``directory`` (hidden temp files included)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


def decrypt_all(home: Path, sealed: Path, workdir: Path) -> dict[str, bytes]:
    """``qimem decrypt`` of a directory tree (on the normal disk): ``{name: plaintext}``."""
    out = workdir / "opened"
    result = cli("decrypt", "--out-dir", str(out), str(sealed), home=home)
    assert result.exit_code == 0, result.output
    return snapshot(out)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_disk_full_one_big_file(
    tmp_path: Path, small_fs: SmallFs, files_home: Path, jobs: str
) -> None:
    """9 MiB into 1 MiB: with --jobs 2 the file is split into ranges sealed by two worker
    processes (pwrite into one preallocated temp file)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "big").write_bytes(os.urandom(9 << 20))
    before = snapshot(inputs)
    result = run_in(small_fs, files_home, "encrypt", "--key", "k", "--jobs", jobs,
                    "--out-dir", str(small_fs.path), str(inputs / "big"))  # fmt: skip
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line == (
        f"qimem: error: {inputs / 'big'}: cannot write {small_fs.path / 'big.qimem'}: "
        f"{small_fs.reason}"
    )
    assert leftovers(small_fs.path) == []  # no output, no temp file
    assert snapshot(inputs) == before


@pytest.mark.slow
def test_disk_full_many_files(tmp_path: Path, small_fs: SmallFs, files_home: Path) -> None:
    """40 files of 60 KB and one of 2 MiB into 1 MiB, two worker processes: the files that
    fit are complete and decrypt, each other one is named with the reason."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for i in range(40):
        (inputs / ("sub" if i % 2 else ".") / f"f{i:02d}").write_bytes(os.urandom(60_000))
    (inputs / "huge").write_bytes(os.urandom(2 << 20))
    before = snapshot(inputs)
    out = small_fs.path / "out"
    result = run_in(small_fs, files_home, "encrypt", "--key", "k", "--jobs", "2",
                    "--out-dir", str(out), str(inputs))  # fmt: skip
    assert result.returncode == 1
    lines = error_lines(result)
    if len(lines) > 1:  # several failures: one line each, then the count
        summary = lines.pop()
        assert summary == f"qimem: error: {len(lines)} of 41 files failed"
    failed = set()
    for line in lines:
        found = re.fullmatch(
            rf"qimem: error: {re.escape(str(inputs))}/(\S+): cannot write "
            rf"{re.escape(str(out))}/(\S+)\.qimem: {re.escape(small_fs.reason)}",
            line,
        )
        assert found and found.group(1) == found.group(2), line
        failed.add(found.group(1))
    written = {name.removesuffix(".qimem") for name in leftovers(out)}
    assert all(name.endswith(".qimem") for name in leftovers(out))  # no temp files
    assert "huge" in failed
    assert written and written.isdisjoint(failed) and written | failed == set(before)
    if small_fs.mounted:  # a shared 1 MiB: small files run out of room too
        assert failed - {"huge"}
    assert decrypt_all(files_home, out, tmp_path) == {name: before[name] for name in written}
    assert snapshot(inputs) == before


@pytest.mark.slow
def test_disk_full_single_outputs_and_stdout(
    tmp_path: Path, small_fs: SmallFs, files_home: Path
) -> None:
    """``-o FILE``, ``decrypt --out-dir`` and a shell redirect of standard output into the
    full file system."""
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(2 << 20))
    sealed = tmp_path / "plain.qimem"
    made = cli("encrypt", "--key", "k", str(plain), home=files_home)
    assert made.exit_code == 0, made.output
    before = snapshot(tmp_path)
    full = small_fs.path
    cases = [
        (("encrypt", "--key", "k", "-o", str(full / "o.qimem")), plain, str(full / "o.qimem")),
        (("decrypt", "-o", str(full / "o.plain")), sealed, str(full / "o.plain")),
        (("decrypt", "--out-dir", str(full), str(sealed)), None, str(full / "plain")),
    ]
    for args, stdin, target in cases:
        if small_fs.mounted:  # the mount is everyone's: the command can run in this process
            ran = cli(*args, input=stdin.read_bytes() if stdin else b"", home=files_home)
            exit_code, stderr = ran.exit_code, ran.stderr
        else:  # the limit must be set in a process of its own
            with stdin.open("rb") if stdin else open(os.devnull, "rb") as fh:
                proc = run_in(small_fs, files_home, *args, stdin=fh)
            exit_code, stderr = proc.returncode, proc.stderr.decode()
        assert exit_code == 1, args
        assert stderr.splitlines() == [
            f"qimem: error: {'' if stdin else f'{sealed}: '}cannot write {target}: "
            f"{small_fs.reason}"
        ]
        assert leftovers(full) == [], args
    # Standard output redirected by the shell: qimem cannot remove what the shell created,
    # but it says what happened and fails.
    for args, stdin in ((("encrypt", "--key", "k"), plain), (("decrypt",), sealed)):
        with stdin.open("rb") as fin, (full / "redirected").open("wb") as fout:
            result = run_in(small_fs, files_home, *args, stdin=fin, stdout=fout)
        assert result.returncode == 1
        assert error_lines(result) == [
            f"qimem: error: cannot write standard output: {small_fs.reason}"
        ]
        (full / "redirected").unlink()
    assert snapshot(tmp_path) == before  # inputs untouched, and the mount empty again


def fill(directory: Path) -> None:
    """Write ``filler*`` files until the file system is full."""
    for name, size in (("filler", 65536), ("filler-tail", 512)):  # then the last bits
        with (directory / name).open("wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * size)
    with pytest.raises(OSError) as info:
        (directory / "probe").write_bytes(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.slow
def test_sqlite_store_on_a_full_disk(small_fs: SmallFs) -> None:
    """The SQLite store's disk fills up under a running process and for new ones (the
    CLI): key creation and rotation fail with a store error naming the full disk; once
    space is freed, the store is intact and rotation goes on from where it was."""
    if not small_fs.mounted:
        pytest.skip("needs a mounted small file system (mount not permitted here)")
    home = init_home(small_fs.path / "home")
    db_path = home / "qimem.db"
    full = f"no space left on the file system of {db_path}"
    from conftest import make_app

    from qimem import services

    app = make_app(f"sqlite:///{db_path}", None, root_key_file=home / "root.key")
    try:
        sealed = services.encrypt(app, "k", b"before the disk filled").envelope
        fill(small_fs.path)
        for attempt in (
            lambda: services.create_key(app, name="b"),
            lambda: services.rotate_key(app, "k"),
        ):
            with pytest.raises(StoreUnavailableError) as info:
                attempt()
            assert info.value.message == (
                f"the key store is unavailable (database or disk is full; {full})"
            )
    finally:
        app.close()
    # New processes (here: the CLI, each with its own connection) on the full disk.
    for args in (("keys", "create", "--name", "c"), ("keys", "rotate", "k")):
        result = cli(*args, home=home)
        assert result.exit_code == 10, result.output
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("qimem: error: the key store is unavailable (")
        assert line.endswith(f"; {full})")
    for path in small_fs.path.glob("filler*"):
        path.unlink()
    app = make_app(f"sqlite:///{db_path}", None, root_key_file=home / "root.key")
    try:
        assert services.rotate_key(app, "k").version == 2
        assert services.decrypt(app, sealed).plaintext == b"before the disk filled"
    finally:
        app.close()
    assert cli("keys", "rotate", "k", home=home).exit_code == 0
    shown = json.loads(cli("keys", "show", "k", "--json", home=home).stdout)
    assert [v["version"] for v in shown["versions"]] == [1, 2, 3]
    assert [v["state"] for v in shown["versions"]] == ["decrypt-only", "decrypt-only", "active"]
    listed = json.loads(cli("keys", "list", "--json", home=home).stdout)
    assert [k["name"] for k in listed] == ["k"]  # b and c never appeared
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# ---- a bad root key ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rootkey_store(files_home: Path) -> tuple[str, str]:
    """An initialized SQLite store (realm master, key ``k``): its URL and its root key."""
    return f"sqlite:///{files_home / 'qimem.db'}", (files_home / "root.key").read_text().strip()


def _other_valid_key(right: str) -> str:
    return encode_root_key(generate_root_key())


BAD_ROOT_KEYS: dict[str, tuple[Callable[[str], str], int, str]] = {
    # case: (file contents from the right key, file mode, what the message says)
    "mode-0644": (
        lambda right: right + "\n",
        0o644,
        "root key file {path} is accessible by group or others (mode 0644); "
        "run: chmod 600 {path}",
    ),
    "empty": (lambda right: "", 0o600, "root key file {path} must hold a 32-byte root key"),
    "wrong-length": (lambda right: base64.b64encode(b"k" * 24).decode(), 0o600,
                     "root key file {path} must hold a 32-byte root key"),
    "not-base64": (lambda right: "this is not a root key!", 0o600,
                   "root key file {path} does not hold a base64 root key"),
    "other-key": (_other_valid_key, 0o600, "the root key does not match this store (wrong "
                  "root key file or QIMEM_ROOT_KEY)"),
}  # fmt: skip


def bad_root_key(tmp_path: Path, store: tuple[str, str], case: str) -> tuple[Path, Path, str]:
    """A config naming the store and a root key file damaged as ``case`` says: the config,
    the key file and the expected error line."""
    store_url, right = store
    contents, mode, message = BAD_ROOT_KEYS[case]
    key_file = tmp_path / "root.key"
    key_file.write_text(contents(right))
    key_file.chmod(mode)
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n\n[root_key]\nfile = "{key_file}"\n')
    return config, key_file, "qimem: error: " + message.format(path=key_file)


@pytest.fixture
def taken_port() -> Iterator[str]:
    """A port something else listens on: a server that got as far as binding would fail
    with "cannot listen" instead of the root key error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield str(taken.getsockname()[1])


def assert_refused(
    exit_code: int, stdout: str, stderr: str, expected: str, key_file: Path, right: str
) -> None:
    """Exit 9, the one expected line, no traceback, no key material."""
    assert exit_code == 9, stderr
    assert stderr.strip().splitlines() == [expected]
    assert "Traceback" not in stderr and stdout == ""
    assert right not in stderr  # the store's root key ...
    if key_file.read_text().strip():
        assert key_file.read_text().strip() not in stderr  # ... and the file's contents


@pytest.mark.parametrize("case", sorted(BAD_ROOT_KEYS))
def test_bad_root_key_file_refuses_to_start(
    tmp_path: Path, rootkey_store: tuple[str, str], case: str, taken_port: str
) -> None:
    """``qimem encrypt`` and ``qimem serve`` refuse a bad root key file with one line and
    exit code 9 (configuration), without a traceback or the key; ``serve`` refuses before
    binding its port."""
    config, key_file, expected = bad_root_key(tmp_path, rootkey_store, case)
    output = tmp_path / "out.qimem"
    for args, stdin in (
        (("encrypt", "--key", "k", "-o", str(output)), b"secret"),
        (("serve", "--port", taken_port), None),
    ):
        result = cli(*args, input=stdin, QIMEM_CONFIG=str(config))
        assert_refused(
            result.exit_code, result.stdout, result.stderr, expected, key_file, rootkey_store[1]
        )
    assert not output.exists()
    assert not list(tmp_path.glob(".out.qimem*"))  # no temp file either


@pytest.mark.slow
@pytest.mark.parametrize("case", ["other-key"])
def test_bad_root_key_refusal_in_real_processes(
    tmp_path: Path, rootkey_store: tuple[str, str], case: str, taken_port: str
) -> None:
    """The same refusals from real ``qimem encrypt`` and ``qimem serve`` processes."""
    config, key_file, expected = bad_root_key(tmp_path, rootkey_store, case)
    env = clean_env(QIMEM_CONFIG=str(config))
    output = tmp_path / "out.qimem"
    procs = [
        subprocess.Popen(
            qimem_cmd(*args), env=env, cwd=tmp_path, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for args in (("encrypt", "--key", "k", "-o", str(output)), ("serve", "--port", taken_port))
    ]  # fmt: skip
    try:
        results = [proc.communicate(b"secret", timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for proc, (stdout, stderr) in zip(procs, results):
        assert_refused(
            proc.returncode, stdout.decode(), stderr.decode(), expected, key_file, rootkey_store[1]
        )
    assert not output.exists()


@pytest.mark.postgres
def test_audit_query_waits_for_the_batch_being_written(postgres_url: str) -> None:
    """A query flushes the audit buffer first; when the flusher thread has already taken
    the records and is still writing them (here: blocked by a table lock, as by a slow or
    recovering database), the query waits for that batch instead of missing it."""
    import sqlalchemy as sa

    from qimem.identity.audit import AuditLog
    from qimem.identity.db import Database

    engine = create_engine(postgres_url)
    audit = AuditLog(Database.for_engine(engine), flush_interval=0.05)
    blocker = engine.connect()
    try:
        blocker.execute(sa.text("LOCK TABLE qimem_audit IN EXCLUSIVE MODE"))  # reads pass
        for i in range(5):
            audit.record("master", "tester", "crypto.encrypt", f"key-{i}", buffered=True)
        waiting = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND (starts_with(query, 'COPY qimem_audit') "
            "OR starts_with(query, 'INSERT INTO qimem_audit'))"
        )
        deadline = time.monotonic() + 30
        while True:  # until the flusher holds the batch (a fresh statistics snapshot each time)
            with engine.connect() as probe:
                if probe.execute(waiting).scalar():
                    break
            assert time.monotonic() < deadline, "the flusher never tried to write"
            time.sleep(0.02)
        release = threading.Timer(0.5, blocker.commit)
        release.start()
        try:
            records = audit.query("master", action="crypto.encrypt")
        finally:
            release.join()
        assert sorted(r.target for r in records) == [f"key-{i}" for i in range(5)]
    finally:
        blocker.close()
        audit.close()
        engine.dispose()
