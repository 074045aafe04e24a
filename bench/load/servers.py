"""qimem under test: ``qimem init`` and ``qimem serve`` on a fresh PostgreSQL database, and
the realm, users, client and keys the mix uses.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load.common import REALM, THREADS, LoadFailure, Target

# -- qimem under test ------------------------------------------------------------------------


def _call(
    url: str, method: str, path: str, body: Any = None, token: str | None = None, form: bool = False
) -> tuple[int, Any]:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
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


@dataclass
class QimemServer:
    """A running ``qimem serve`` (authentication on) and the realm set up for the mix."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    target: Target
    admin_token: str

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def metrics_5xx(self) -> tuple[int, int]:
        """(requests, 5xx answers) by the server's own ``/metrics`` count."""
        text = _call(self.target.url, "GET", "/metrics")[1]
        total = errors = 0
        for line in text.splitlines():
            found = re.match(r'qimem_http_requests_total\{.*status="(\d+)".*\} ([\d.e+]+)$', line)
            if found:
                n = int(float(found.group(2)))
                total += n
                if int(found.group(1)) >= 500:
                    errors += n
        return total, errors

    def versions(self, key: str) -> int:
        client_id, secret = self.target.client
        token = _must(
            _call(
                self.target.url,
                "POST",
                f"/v1/auth/realms/{REALM}/token",
                {"grant_type": "client_credentials", "client_id": client_id}
                | {"client_secret": secret},
                form=True,
            ),
            "client login",
        )["access_token"]
        shown = _must(_call(self.target.url, "GET", f"/v1/security/keys/{key}", token=token), key)
        return len(shown["versions"])


@contextmanager
def qimem_server(
    store_url: str,
    workdir: Path,
    users: int = 4,
    keys: int = 4,
    rotated: int = 2,
    config_extra: str = "",
) -> Iterator[QimemServer]:
    """``qimem init`` on ``store_url``, ``qimem serve`` on a free loopback port, and realm
    ``load`` with ``users`` users, the ``rotator`` client and the keys; stopped on exit.
    ``config_extra`` (TOML) is appended to the config file before the server starts."""
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
        with (workdir / "home" / "config.toml").open("a") as config:
            config.write("\n" + config_extra + "\n")
    log_path = workdir / "qimem-serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*_exe(), "serve", "--port", "0", "--threads", str(THREADS)],
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        url = ""
        deadline = time.monotonic() + 60
        while not url:
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            if found:
                url = found.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise LoadFailure(f"qimem serve did not start: {log_path.read_text()[-2000:]}")
            else:
                time.sleep(0.05)

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
        target = Target("qimem", url, REALM, people, client, names, rot)
        yield QimemServer(proc, log_path, target, admin)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


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
