"""qimem under test: ``qimem init`` and ``qimem serve`` on a fresh PostgreSQL database, and
the realm, users, client and keys the mix uses.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load.common import REALM, THREADS, LoadFailure, Target

# -- qimem under test ------------------------------------------------------------------------


def _call(
    url: str, method: str, path: str, body: Any = None, token: str | None = None, form: bool = False
) -> tuple[int, Any]:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=60)
    headers = {}
    payload = None
    if body is not None:
        if form:
            payload = urllib.parse.urlencode(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    ctype = response.getheader("Content-Type") or ""
    return response.status, (json.loads(raw) if raw and "json" in ctype else raw.decode())


def _must(answer: tuple[int, Any], what: str, want: int = 200) -> Any:
    status, data = answer
    if status != want:
        raise LoadFailure(f"setup: {what} answered {status}: {str(data)[:300]}")
    return data


def _env(workdir: Path, store_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(workdir / "home")
    env["QIMEM_STORE"] = store_url
    return env


def _exe() -> list[str]:
    return [sys.executable, "-c", "from qimem.cli import main; main()"]


def workers_supported() -> bool:
    """Whether this ``qimem serve`` has ``--workers`` (issue 14 item 1)."""
    global _WORKERS
    if _WORKERS is None:
        shown = subprocess.run(
            [*_exe(), "serve", "--help"], capture_output=True, text=True, cwd="/", check=False
        )
        _WORKERS = "--workers" in shown.stdout
    return _WORKERS


_WORKERS: bool | None = None


@dataclass
class QimemServer:
    """One running ``qimem serve`` (with ``--workers W`` a master and its W workers)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.url:
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", self.log())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise LoadFailure(f"qimem serve did not start: {self.log()[-2000:]}")
            else:
                time.sleep(0.05)

    def stop(self, timeout: float = 40.0, signalled: bool = False) -> int | str:
        """SIGTERM (a graceful stop) and its exit status; "timeout" if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        if not signalled:  # a second SIGTERM would cut the graceful stop short
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return "timeout"


@dataclass
class QimemServers:
    """``servers`` running ``qimem serve`` on one store, and the realm set up for the mix
    (``target`` lists every server's URL)."""

    servers: list[QimemServer]
    target: Target
    admin_token: str
    store_url: str

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The first server's process."""
        return self.servers[0].proc

    def log(self) -> str:
        """Every server's log, one after the other."""
        return "\n".join(f"--- {s.url} ---\n{s.log()}" for s in self.servers)

    def metrics(self) -> Counter[int]:
        """Requests per HTTP status by the servers' own ``/metrics`` counts, summed."""
        counts: Counter[int] = Counter()
        for server in self.servers:
            for line in _call(server.url, "GET", "/metrics")[1].splitlines():
                pattern = r'qimem_http_requests_total\{.*status="(\d+)".*\} ([\d.e+]+)$'
                found = re.match(pattern, line)
                if found:
                    counts[int(found.group(1))] += int(float(found.group(2)))
        return counts

    def metrics_5xx(self) -> tuple[int, int]:
        """(requests, 5xx answers) by the servers' own ``/metrics`` counts."""
        counts = self.metrics()
        return sum(counts.values()), sum(n for s, n in counts.items() if s >= 500)

    def versions(self, key: str) -> int:
        """How many versions ``key`` has (asked of the first server)."""
        client_id, secret = self.target.client
        url = self.target.url
        form = {"grant_type": "client_credentials", "client_id": client_id}
        form["client_secret"] = secret
        token = _must(
            _call(url, "POST", f"/v1/auth/realms/{REALM}/token", form, form=True),
            "client login",
        )["access_token"]
        shown = _must(_call(url, "GET", f"/v1/security/keys/{key}", token=token), key)
        return len(shown["versions"])

    def stop(self) -> list[int | str]:
        """Stop every server (SIGTERM, at once); their exit statuses."""
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        return [server.stop(signalled=True) for server in self.servers]

    def audit_counts(self, actions: list[str]) -> dict[str, Any]:
        """From the store itself: per action of ``actions`` in realm ``load``, the records
        per outcome; of the realm's records, how many share a record id with another and
        how many have none (both ``None`` before the record id existed)."""
        import sqlalchemy as sa

        from qimem.sql import normalize_url

        engine = sa.create_engine(normalize_url(self.store_url))
        try:
            with engine.connect() as conn:
                columns = {c["name"] for c in sa.inspect(conn).get_columns("qimem_audit")}
                rows = conn.execute(
                    sa.text(
                        "SELECT action, outcome, count(*) FROM qimem_audit WHERE realm = :realm "
                        "AND action = ANY(:actions) GROUP BY action, outcome"
                    ),
                    {"realm": REALM, "actions": actions},
                ).all()
                duplicated = without_id = None
                if "record_id" in columns:
                    duplicated, without_id = conn.execute(
                        sa.text(
                            "SELECT count(record_id) - count(DISTINCT record_id), "
                            "count(*) - count(record_id) FROM qimem_audit WHERE realm = :realm"
                        ),
                        {"realm": REALM},
                    ).one()
        finally:
            engine.dispose()
        counts: dict[str, dict[str, int]] = {a: {} for a in actions}
        for action, outcome, n in rows:
            counts[action][outcome] = int(n)
        return {
            "records": counts,
            "duplicated_record_ids": duplicated,
            "records_without_id": without_id,
        }


def _merge_config(path: Path, extra: str) -> None:
    """Merge the TOML ``extra`` into the config file at ``path`` (its tables into the
    file's tables of the same name, key by key)."""
    import tomllib

    import tomli_w

    config = tomllib.loads(path.read_text())
    for name, value in tomllib.loads(extra).items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name].update(value)
        else:
            config[name] = value
    path.write_text(tomli_w.dumps(config))


def _home(workdir: Path, index: int) -> Path:
    return workdir / ("home" if index == 0 else f"home-{index}")


@contextmanager
def qimem_servers(
    store_url: str,
    workdir: Path,
    servers: int = 1,
    workers: int = 1,
    users: int = 4,
    keys: int = 4,
    rotated: int = 2,
    config_extra: str = "",
) -> Iterator[QimemServers]:
    """``qimem init`` on ``store_url``; ``servers`` × ``qimem serve`` on it, each on a free
    loopback port with its own copy of the home directory (config, root key) and
    ``--workers workers`` when ``workers`` > 1; realm ``load`` with ``users`` users, the
    ``rotator`` client and the keys (made through the first server). Stopped on exit.
    ``config_extra`` (TOML) is merged into the config file, table by table, before the
    servers start."""
    if workers > 1 and not workers_supported():
        raise LoadFailure("qimem serve has no --workers option (yet): use --workers 1")
    env = _env(workdir, store_url)
    admin_password = secrets.token_urlsafe(18)
    subprocess.run(
        [*_exe(), "init", "--admin-password-stdin"],
        input=admin_password.encode() + b"\n",
        env=env,
        cwd=workdir,  # not the repo root, whose ./qimem would shadow the installed package
        check=True,
        capture_output=True,
    )
    if config_extra:
        _merge_config(workdir / "home" / "config.toml", config_extra)
    argv = [*_exe(), "serve", "--port", "0", "--threads", str(THREADS)]
    argv += ["--workers", str(workers)] if workers > 1 else []
    started: list[QimemServer] = []
    try:
        for i in range(servers):
            if i:
                shutil.copytree(_home(workdir, 0), _home(workdir, i))
            log_path = workdir / f"qimem-serve-{i}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    argv,
                    env=env | {"QIMEM_HOME": str(_home(workdir, i))},
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            started.append(QimemServer(proc, log_path))
        for server in started:
            server.wait_ready()
        url = started[0].url
        form = {"grant_type": "password", "username": "admin", "password": admin_password}
        admin = _must(
            _call(url, "POST", "/v1/auth/realms/master/token", form, form=True), "admin login"
        )["access_token"]
        _must(_call(url, "POST", "/v1/auth/realms", {"name": REALM}, admin), "realm", 201)
        people = [(f"u{i}", secrets.token_urlsafe(18)) for i in range(users)]
        for username, password in people:
            user = {"username": username, "password": password, "roles": ["encryptor"]}
            _must(_call(url, "POST", f"/v1/auth/realms/{REALM}/users", user, admin), "user", 201)
        made = _must(
            _call(
                url,
                "POST",
                f"/v1/auth/realms/{REALM}/clients",
                {"client_id": "rotator", "roles": ["key-manager"]},
                admin,
            ),
            "client",
            201,
        )
        client = ("rotator", made["client_secret"])
        form = {"grant_type": "client_credentials", "client_id": client[0]}
        form["client_secret"] = client[1]
        rotator = _must(
            _call(url, "POST", f"/v1/auth/realms/{REALM}/token", form, form=True), "client login"
        )["access_token"]
        names = [f"k{i}" for i in range(keys)]
        rot = [f"r{i}" for i in range(rotated)]
        for name in names + rot:
            _must(_call(url, "POST", "/v1/security/keys", {"name": name}, rotator), "key", 201)
        urls = [s.url for s in started]
        target = Target("qimem", urls, REALM, people, client, names, rot, workers)
        target.pids = [s.proc.pid for s in started]
        yield QimemServers(started, target, admin, store_url)
    finally:
        for server in started:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in started:
            server.stop(signalled=True)


def qimem_server(
    store_url: str,
    workdir: Path,
    users: int = 4,
    keys: int = 4,
    rotated: int = 2,
    config_extra: str = "",
) -> AbstractContextManager[QimemServers]:
    """One ``qimem serve`` (``qimem_servers`` with one server, one worker)."""
    return qimem_servers(store_url, workdir, 1, 1, users, keys, rotated, config_extra)


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new empty PostgreSQL database on the server of ``admin_url``; dropped on exit."""
    import sqlalchemy as sa

    from qimem.sql import normalize_url

    admin_url = normalize_url(admin_url)
    name = f"qimem_load_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield (
                sa.engine.make_url(admin_url)
                .set(database=name)
                .render_as_string(hide_password=False)
            )
        finally:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
