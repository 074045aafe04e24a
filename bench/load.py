"""Load suite: a bounded, mixed-traffic run against a real ``qimem serve`` on PostgreSQL.

``python -m bench load [--duration S] [--quick]`` (or ``python -m bench.load --help`` for
every knob). Loopback only. Steps:

1. A fresh PostgreSQL database (admin URL ``$QIMEM_TEST_POSTGRES_URL``, default
   ``postgresql+psycopg://postgres@127.0.0.1:5432/test``; dropped at the end), ``qimem
   init`` on it, and ``qimem serve`` **with authentication** on a free 127.0.0.1 port.
2. Through the API, as ``admin`` of ``master``: realm ``load``, users ``u0..`` (role
   ``encryptor``, Argon2id at the default cost), a service account ``rotator`` (role
   ``key-manager``, client_credentials) and the keys (``k*`` encrypted with, ``r*`` also
   rotated).
3. Client *processes* (so the load generator is not one GIL against the server), each with
   several keep-alive connections (one thread each), send a weighted mix for the duration:
   encrypt (32 B, 1 KiB, 16 KiB; some with aad; by key name), decrypt of ciphertexts
   obtained earlier (checked against the plaintext's SHA-256), rotate (rare; mostly by name,
   some by a possibly stale key_id, where 409 is the expected answer), password logins (the
   connection then uses the new token) and client_credentials logins. Every request carries
   its bearer token. Each connection does one of every operation first, so each runs.
4. Afterwards every ciphertext obtained is decrypted again through the API (batch decrypt)
   and compared: *lost* = no longer decrypts, *corrupted* = decrypts to other bytes. The
   rotated keys must have exactly 1 + (successful rotations) versions; the server's own
   ``/metrics`` must show no 5xx; its log no traceback.

Peer, in the same run, with the same driver and mix: a bare Falcon + waitress server (same
thread count) implementing the same routes with raw ``AESGCM`` keys in memory, argon2-cffi
``verify`` at the same cost for logins and a random bearer token in a set: the framework and
crypto floor, without a database, JWTs, envelopes or auditing. The two run in alternating
rounds so load from other processes on the machine hits both alike.

Any 5xx, connection error, unexpected status, lost or corrupted result, or rotation count
mismatch fails the run (``LoadFailure``; ``python -m bench`` then exits non-zero and does not
save it). The full report of every run, failed or not, is written to
``bench/results/load-<UTC stamp>.json``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.servers import free_port

SUITE = "load"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_ENV = "QIMEM_TEST_POSTGRES_URL"
REALM = "load"
# Server threads, both servers: one per client connection of the default run (2 processes
# x 4). With fewer threads than connections, qimem serve's login gate (hashing + waiting
# logins held to threads - 1, so one thread stays free for other requests) answers the
# surplus of simultaneous password logins with 503 login_busy: backpressure, which the
# clients retry and count apart (`login_busy` in the report).
THREADS = 8
OPS = ("encrypt", "decrypt", "rotate", "login", "client-login")
# Relative weights of the mix; the first round of each connection does one of each.
MIX = {"encrypt": 50.0, "decrypt": 45.0, "rotate": 1.0, "login": 2.0, "client-login": 0.5}
SIZES = ((32, 6), (1024, 3), (16384, 1))  # plaintext bytes, weight
# The only right answers; "verify" is the final batch-decrypt pass.
EXPECTED = {op: {200} for op in (*OPS, "verify")} | {"rotate": {200, 409}}
STAGGER_SECONDS = 0.05  # between the first logins of successive connections
LOGIN_ATTEMPTS = 50  # a login answered 503 login_busy is retried up to this many times


def _code(data: Any) -> str:
    """The error code of a JSON error answer, or ""."""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error.get("code", "")) if isinstance(error, dict) else ""


TOKEN_MAX_AGE = 240.0  # re-login before the 300 s access-token lifetime runs out
REQUEST_TIMEOUT = 30.0
PEER = "bare Falcon+waitress, AESGCM + argon2 in memory"
RESULTS = Path(__file__).resolve().parent / "results"


class LoadFailure(RuntimeError):
    """The run saw a 5xx, a connection error, an unexpected status or a lost result."""


# -- what the driver needs to know about a server --------------------------------------------


@dataclass
class Target:
    """A server under load and the identities and keys the mix uses on it."""

    name: str
    url: str
    realm: str
    users: list[tuple[str, str]]
    client: tuple[str, str]
    keys: list[str]
    rotated: list[str]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@dataclass
class Record:
    """One successful encryption: the envelope, its aad and the plaintext's digest."""

    envelope: str
    aad: str | None
    digest: bytes
    size: int


@dataclass
class DriveResult:
    """What the client processes saw, merged."""

    elapsed: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    conn_errors: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0  # decrypts during the run that returned other bytes
    rotations: Counter[str] = field(default_factory=Counter)  # successful, per key name
    rotate_forms: Counter[str] = field(default_factory=Counter)  # "key:200", "key_id:409" ...
    samples: list[str] = field(default_factory=list)  # a few unexpected answers
    records: list[Record] = field(default_factory=list)
    # 503 login_busy: the server's documented backpressure on password logins (hashing
    # slots full). A client retries shortly, as the answer's Retry-After asks; counted
    # here, not as a status, and reported.
    login_busy: int = 0

    def merge(self, other: DriveResult) -> None:
        self.elapsed += other.elapsed
        for op, values in other.latencies.items():
            self.latencies.setdefault(op, []).extend(values)
        for op, counts in other.statuses.items():
            self.statuses.setdefault(op, Counter()).update(counts)
        self.conn_errors.update(other.conn_errors)
        self.mismatches += other.mismatches
        self.rotations.update(other.rotations)
        self.rotate_forms.update(other.rotate_forms)
        self.samples.extend(other.samples[: max(0, 20 - len(self.samples))])
        self.records.extend(other.records)
        self.login_busy += other.login_busy

    def unexpected(self) -> dict[str, dict[int, int]]:
        return {
            op: {s: n for s, n in counts.items() if s not in EXPECTED[op]}
            for op, counts in self.statuses.items()
            if any(s not in EXPECTED[op] for s in counts)
        }

    def count_5xx(self) -> int:
        return sum(n for c in self.statuses.values() for s, n in c.items() if s >= 500)


@dataclass
class Verification:
    """The final pass: every ciphertext decrypted once more through the API."""

    checked: int = 0
    verified: int = 0
    lost: int = 0
    corrupted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    conn_errors: int = 0
    seconds: float = 0.0


# -- the client side -----------------------------------------------------------------------


class _Client:
    """One keep-alive connection with its own user, tokens and ciphertexts (one thread)."""

    def __init__(
        self,
        target: Target,
        index: int,
        pool: list[Record],
        seed: int,
        mix: dict[str, float] | None = None,
    ) -> None:
        self.target = target
        self.mix = mix or MIX
        self.user = target.users[index % len(target.users)]
        self.index = index
        self.rng = random.Random(seed)
        self.pool = list(pool)  # ciphertexts from earlier rounds, for decrypts
        self.out = DriveResult()
        self.conn = self._connect()
        self.token = ""
        self.token_at = 0.0
        self.client_token = ""
        self.client_token_at = 0.0
        self.last_key_id: dict[str, str] = {}

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.target.port, timeout=REQUEST_TIMEOUT)

    def request(
        self, op: str, path: str, body: bytes, content_type: str, token: str | None
    ) -> tuple[int, Any]:
        """One timed request; the status (0 for a connection error) and the parsed body."""
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        start = time.perf_counter()
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.out.latencies.setdefault(op, []).append((time.perf_counter() - start) * 1000)
            self.out.conn_errors[op] += 1
            if len(self.out.samples) < 20:
                self.out.samples.append(f"{op}: connection error {type(exc).__name__}")
            self.conn.close()
            self.conn = self._connect()
            time.sleep(0.05)
            return 0, None
        self.out.latencies.setdefault(op, []).append((time.perf_counter() - start) * 1000)
        status = response.status
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status == 503 and op == "login" and _code(data) == "login_busy":
            self.out.login_busy += 1
            return status, data
        self.out.statuses.setdefault(op, Counter())[status] += 1
        if status not in EXPECTED[op] and len(self.out.samples) < 20:
            self.out.samples.append(f"{op}: {status} {raw[:200]!r}")
        return status, data

    def _json(self, op: str, path: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
        return self.request(op, path, json.dumps(body).encode(), "application/json", token)

    # operations

    def login(self) -> None:
        username, password = self.user
        form = {"grant_type": "password", "username": username, "password": password}
        for _ in range(LOGIN_ATTEMPTS):
            status, data = self.request(
                "login",
                f"/v1/auth/realms/{self.target.realm}/token",
                urllib.parse.urlencode(form).encode(),
                "application/x-www-form-urlencoded",
                None,
            )
            if not (status == 503 and _code(data) == "login_busy"):
                break
            time.sleep(self.rng.uniform(0.05, 0.3))  # backpressure: retry shortly
        self.token_at = time.monotonic()  # a failed login is not retried in a tight loop
        if status == 200:
            self.token = data["access_token"]

    def client_login(self) -> None:
        client_id, secret = self.target.client
        form = {"grant_type": "client_credentials", "client_id": client_id}
        form["client_secret"] = secret
        status, data = self.request(
            "client-login",
            f"/v1/auth/realms/{self.target.realm}/token",
            urllib.parse.urlencode(form).encode(),
            "application/x-www-form-urlencoded",
            None,
        )
        self.client_token_at = time.monotonic()
        if status == 200:
            self.client_token = data["access_token"]

    def encrypt(self) -> None:
        size = self.rng.choices([s for s, _ in SIZES], [w for _, w in SIZES])[0]
        plaintext = os.urandom(size)
        key = self.rng.choice(self.target.keys + self.target.rotated)
        body: dict[str, Any] = {"key": key, "plaintext": base64.b64encode(plaintext).decode()}
        aad = None
        if self.rng.random() < 0.25:
            aad = body["aad"] = base64.b64encode(os.urandom(16)).decode()
        status, data = self._json("encrypt", "/v1/security/encrypt", body, self.token)
        if status == 200:
            record = Record(data["envelope"], aad, hashlib.sha256(plaintext).digest(), size)
            self.out.records.append(record)
            self.pool.append(record)
            if key in self.target.rotated:
                self.last_key_id[key] = data["key_id"]

    def decrypt(self) -> None:
        if not self.pool:
            return self.encrypt()
        record = self.rng.choice(self.pool)
        body: dict[str, Any] = {"envelope": record.envelope}
        if record.aad is not None:
            body["aad"] = record.aad
        status, data = self._json("decrypt", "/v1/security/decrypt", body, self.token)
        if status == 200 and hashlib.sha256(base64.b64decode(data["plaintext"])).digest() != (
            record.digest
        ):
            self.out.mismatches += 1

    def rotate(self) -> None:
        key = self.rng.choice(self.target.rotated)
        stale = self.last_key_id.get(key)
        # Mostly by name; a third by the last key_id this connection saw, which another
        # connection (or process) may have rotated away since: 409 is the right answer then.
        body = {"key_id": stale} if stale and self.rng.random() < 1 / 3 else {"key": key}
        status, data = self._json("rotate", "/v1/security/rotate", body, self.client_token)
        self.out.rotate_forms[f"{next(iter(body))}:{status}"] += 1
        if status == 200:
            self.out.rotations[key] += 1
            self.last_key_id[key] = data["key_id"]

    def run(self, deadline: float) -> DriveResult:
        # Clients do not all start in the same millisecond: staggered first logins, so the
        # run measures the mix rather than a thundering herd on the login gate.
        time.sleep(self.index * STAGGER_SECONDS)
        self.login()
        self.client_login()
        todo = ["encrypt", "decrypt", "rotate", "login"]
        ops, weights = list(self.mix), list(self.mix.values())
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now - self.token_at > TOKEN_MAX_AGE:
                self.login()
                continue
            if now - self.client_token_at > TOKEN_MAX_AGE:
                self.client_login()
                continue
            op = todo.pop(0) if todo else self.rng.choices(ops, weights)[0]
            getattr(self, op.replace("-", "_"))()
        self.conn.close()
        return self.out


def _process_main(
    target: Target,
    duration: float,
    connections: int,
    first_index: int,
    pool: list[Record],
    seed: int,
    mix: dict[str, float],
    pipe: Any,
) -> None:
    """A client process: ``connections`` threads until the deadline; the merged result
    goes back through ``pipe``."""
    started = time.monotonic()
    deadline = started + duration
    clients = [
        _Client(target, first_index + i, pool, seed * 1000 + i, mix) for i in range(connections)
    ]
    results: list[DriveResult] = []
    threads = [
        threading.Thread(target=lambda c=c: results.append(c.run(deadline))) for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = DriveResult()
    for r in results:
        merged.merge(r)
    merged.elapsed = time.monotonic() - started
    pipe.send(merged)
    pipe.close()


def drive(
    target: Target,
    duration: float,
    processes: int,
    connections: int,
    pool: list[Record] | None = None,
    seed: int = 0,
    mix: dict[str, float] | None = None,
) -> DriveResult:
    """``processes`` forked client processes × ``connections`` keep-alive connections, for
    ``duration`` seconds of the mix (default ``MIX``) against ``target``."""
    ctx = multiprocessing.get_context("fork")  # the children use only the standard library
    pool = pool or []
    children = []
    started = time.monotonic()
    for p in range(processes):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_process_main,
            args=(target, duration, connections, p * connections, pool, seed + p, mix, child_end),
            daemon=True,
        )
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
    merged = DriveResult()
    try:
        for proc, pipe in children:
            if not pipe.poll(duration + REQUEST_TIMEOUT + 60):
                raise LoadFailure(f"client process {proc.pid} did not report back")
            merged.merge(pipe.recv())
    finally:
        for proc, _ in children:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    merged.elapsed = time.monotonic() - started
    return merged


def verify(target: Target, records: list[Record], connections: int = 2) -> Verification:
    """Decrypt every record once more through the API (batches) and compare the plaintext."""
    result = Verification(checked=len(records))
    batches: list[list[Record]] = []
    batch: list[Record] = []
    size = 0
    for record in records:
        if batch and (len(batch) >= 500 or size + len(record.envelope) > 400_000):
            batches.append(batch)
            batch, size = [], 0
        batch.append(record)
        size += len(record.envelope) + 100
    if batch:
        batches.append(batch)

    lock = threading.Lock()
    started = time.monotonic()

    def worker(mine: list[list[Record]]) -> None:
        client = _Client(target, 0, [], 0)
        client.login()
        for items in mine:
            body = {
                "items": [
                    {"envelope": r.envelope} | ({"aad": r.aad} if r.aad is not None else {})
                    for r in items
                ]
            }
            status, data = client._json("verify", "/v1/security/decrypt", body, client.token)
            verified = corrupted = 0
            if status == 200 and len(data.get("items", [])) == len(items):
                for record, answer in zip(items, data["items"]):
                    if "plaintext" not in answer:
                        continue  # lost
                    got = hashlib.sha256(base64.b64decode(answer["plaintext"])).digest()
                    if got == record.digest:
                        verified += 1
                    else:
                        corrupted += 1
            with lock:
                if status:
                    result.statuses[status] += 1
                else:
                    result.conn_errors += 1
                result.verified += verified
                result.corrupted += corrupted
                result.lost += len(items) - verified - corrupted
        client.conn.close()

    threads = [
        threading.Thread(target=worker, args=(batches[i::connections],)) for i in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result


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


# -- the peer --------------------------------------------------------------------------------

_PEER_SERVER = r"""
import base64, hashlib, json, logging, os, secrets, struct, sys, threading, urllib.parse
import falcon, waitress
from argon2 import PasswordHasher, Type
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

logging.getLogger("waitress.queue").setLevel(logging.ERROR)
config = json.loads(sys.stdin.readline())
hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)
users = {u: hasher.hash(p) for u, p in config["users"]}
clients = {config["client"][0]: hashlib.sha256(config["client"][1].encode()).digest()}
names = config["keys"]
keys = {n: [AESGCM(AESGCM.generate_key(256))] for n in names}
tokens = {}
lock = threading.Lock()


def bearer(req, need):
    token = (req.get_header("Authorization") or "")[7:]
    if tokens.get(token) not in need:
        raise falcon.HTTPUnauthorized()


def seal(name, plaintext, aad):
    versions = keys[name]
    v = len(versions)
    aead = versions[v - 1]  # not versions[-1]: a rotation may append in between
    nonce = os.urandom(12)
    header = struct.pack(">BI", names.index(name), v) + nonce
    sealed = aead.encrypt(nonce, plaintext, header + aad)
    return {"envelope": base64.b64encode(header + sealed).decode(), "key_id": f"{name}.{v}",
            "version": v}


def unseal(envelope, aad):
    raw = base64.b64decode(envelope)
    index, v = struct.unpack(">BI", raw[:5])
    header = raw[:17]
    plaintext = keys[names[index]][v - 1].decrypt(raw[5:17], raw[17:], header + aad)
    return {"plaintext": base64.b64encode(plaintext).decode(), "key_id": f"{names[index]}.{v}",
            "version": v}


def aad_of(item):
    return base64.b64decode(item["aad"]) if item.get("aad") else b""


class Token:
    def on_post(self, req, resp, realm):
        form = dict(urllib.parse.parse_qsl(req.bounded_stream.read().decode()))
        if form["grant_type"] == "password":
            try:
                hasher.verify(users[form["username"]], form["password"])
            except Exception:
                raise falcon.HTTPUnauthorized()
            kind = "user"
        else:
            digest = hashlib.sha256(form["client_secret"].encode()).digest()
            if not secrets.compare_digest(clients[form["client_id"]], digest):
                raise falcon.HTTPUnauthorized()
            kind = "client"
        token = secrets.token_urlsafe(32)
        tokens[token] = kind
        resp.media = {"access_token": token, "token_type": "Bearer", "expires_in": 300}


class Encrypt:
    def on_post(self, req, resp):
        bearer(req, ("user",))
        body = json.loads(req.bounded_stream.read())
        resp.media = seal(body["key"], base64.b64decode(body["plaintext"]), aad_of(body))


class Decrypt:
    def on_post(self, req, resp):
        bearer(req, ("user",))
        body = json.loads(req.bounded_stream.read())
        if "items" in body:
            out = []
            for item in body["items"]:
                try:
                    out.append(unseal(item["envelope"], aad_of(item)))
                except (InvalidTag, IndexError, ValueError):
                    out.append({"error": {"code": "decryption_failed"}})
            resp.media = {"items": out}
            return
        try:
            resp.media = unseal(body["envelope"], aad_of(body))
        except InvalidTag:
            raise falcon.HTTPUnprocessableEntity()


class Rotate:
    def on_post(self, req, resp):
        bearer(req, ("client",))
        body = json.loads(req.bounded_stream.read())
        name = body.get("key") or body["key_id"].rsplit(".", 1)[0]
        with lock:
            versions = keys[name]
            if "key_id" in body and body["key_id"] != f"{name}.{len(versions)}":
                raise falcon.HTTPConflict()
            versions.append(AESGCM(AESGCM.generate_key(256)))
            v = len(versions)
        resp.media = {"key_id": f"{name}.{v}", "version": v, "name": name}


class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


app = falcon.App()
app.add_route("/v1/auth/realms/{realm}/token", Token())
app.add_route("/v1/security/encrypt", Encrypt())
app.add_route("/v1/security/decrypt", Decrypt())
app.add_route("/v1/security/rotate", Rotate())
app.add_route("/healthz", Health())
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=int(sys.argv[2]),
               ident="peer", asyncore_use_poll=True, _quiet=True)
"""


@contextmanager
def peer_server(like: Target, workdir: Path) -> Iterator[Target]:
    """The bare peer with the same users, client and key names as ``like``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _PEER_SERVER, str(port), str(THREADS)],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "peer.log").open("wb"),
    )
    try:
        config = {"users": like.users, "client": like.client, "keys": like.keys + like.rotated}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if _call(url, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LoadFailure(f"peer did not start: {(workdir / 'peer.log').read_text()}")
            time.sleep(0.1)
        yield Target("peer", url, like.realm, like.users, like.client, like.keys, like.rotated)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- one whole run ---------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(result: DriveResult, seconds: float) -> dict[str, Any]:
    """Per operation: count, req/s, p50/p99/max latency (ms), statuses; and the totals."""
    ops: dict[str, Any] = {}
    for op in OPS:
        lat = result.latencies.get(op, [])
        ops[op] = {
            "count": len(lat),
            "rps": len(lat) / seconds if seconds else 0.0,
            "p50_ms": _pct(lat, 0.50),
            "p99_ms": _pct(lat, 0.99),
            "max_ms": max(lat) if lat else None,
            "statuses": {str(s): n for s, n in sorted(result.statuses.get(op, {}).items())},
            "conn_errors": result.conn_errors.get(op, 0),
        }
    total = sum(len(v) for v in result.latencies.values())
    every = [x for v in result.latencies.values() for x in v]
    return {
        "seconds": seconds,
        "requests": total,
        "rps": total / seconds if seconds else 0.0,
        "p99_ms": _pct(every, 0.99),
        "ops": ops,
        "encrypted": len(result.records),
        "decrypt_mismatches": result.mismatches,
        "rotations": dict(result.rotations),
        "rotate_forms": dict(sorted(result.rotate_forms.items())),
        "5xx": result.count_5xx(),
        "login_busy": result.login_busy,
        "conn_errors": sum(result.conn_errors.values()),
        "unexpected": {
            op: {str(s): n for s, n in c.items()} for op, c in result.unexpected().items()
        },
        "samples": result.samples,
    }


def failures(report: dict[str, Any]) -> list[str]:
    """Every reason the run failed (empty: it passed)."""
    bad = []
    for side in ("qimem", "peer"):
        if side not in report:
            continue
        s = report[side]
        for what in ("5xx", "conn_errors", "decrypt_mismatches"):
            if s[what]:
                bad.append(f"{side}: {what} {s[what]}")
        if s["unexpected"]:
            bad.append(f"{side}: unexpected statuses {s['unexpected']}")
        v = s["verification"]
        if v["lost"] or v["corrupted"] or v["verified"] != s["encrypted"]:
            bad.append(
                f"{side}: verification {v['verified']}/{s['encrypted']} verified, "
                f"{v['lost']} lost, {v['corrupted']} corrupted"
            )
    q = report.get("qimem", {})
    for key, (want, have) in q.get("versions", {}).items():
        if want != have:
            bad.append(f"qimem: key {key} has {have} versions, {want} expected from the rotations")
    # The server counts its login_busy answers among its 5xx; the clients counted them too.
    if q.get("server_5xx", 0) - q.get("login_busy", 0) > 0:
        bad.append(
            f"qimem: /metrics counts {q['server_5xx']} 5xx answers, "
            f"{q.get('login_busy', 0)} of them login_busy"
        )
    if q.get("traceback"):
        bad.append("qimem: the server logged a traceback")
    if q.get("exit_code") not in (None, 0):
        bad.append(f"qimem: serve exited {q['exit_code']} on SIGTERM")
    return bad


def run_load(
    store_url: str,
    workdir: Path,
    duration: float = 30.0,
    processes: int = 2,
    connections: int = 4,
    rounds: int = 3,
    users: int = 4,
    peer: bool = True,
    mix: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The whole run against a fresh database at ``store_url``; the report (see
    ``failures``). ``duration`` is the total time of load on qimem (and as much on the
    peer), split into ``rounds`` alternating rounds."""
    report: dict[str, Any] = {
        "duration": duration,
        "processes": processes,
        "connections": connections,
        "rounds": rounds,
        "mix": mix or MIX,
        "sizes": [s for s, _ in SIZES],
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with qimem_server(store_url, workdir, users=users) as server:
        sides = {"qimem": server.target}
        with peer_server(server.target, workdir) if peer else _nothing() as peer_target:
            if peer_target is not None:
                sides["peer"] = peer_target
            results = {name: DriveResult() for name in sides}
            order = list(sides)
            for r in range(rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    sample = random.Random(r).sample(
                        results[name].records, min(500, len(results[name].records))
                    )
                    part = drive(
                        sides[name],
                        duration / rounds,
                        processes,
                        connections,
                        sample,
                        100 * r,
                        mix,
                    )
                    results[name].merge(part)
            report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            for name, target in sides.items():
                s = summarize(results[name], results[name].elapsed)
                done = verify(target, results[name].records)
                checked = {f.name: getattr(done, f.name) for f in dataclasses.fields(done)}
                checked["statuses"] = {str(k): v for k, v in sorted(done.statuses.items())}
                s["verification"] = checked
                report[name] = s
        q = report["qimem"]
        q["versions"] = {
            key: (1 + results["qimem"].rotations.get(key, 0), server.versions(key))
            for key in server.target.rotated
        }
        q["server_requests"], q["server_5xx"] = server.metrics_5xx()
        server.proc.send_signal(signal.SIGTERM)
        try:
            q["exit_code"] = server.proc.wait(40)
        except subprocess.TimeoutExpired:
            q["exit_code"] = "timeout"
        q["traceback"] = "Traceback" in server.log()
    report["failures"] = failures(report)
    if report["failures"]:  # the server's side of the story (the access log has no secrets)
        report["qimem"]["log_tail"] = server.log()[-20000:]
    return report


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# -- reporting and the bench entry point ------------------------------------------------------


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def render(report: dict[str, Any]) -> str:
    """The run as a plain-text table plus the checks."""
    lines = []
    head = f"{'side':6} {'op':13} {'count':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
    head += f"{'max ms':>8}  statuses"
    lines.append(head)
    for side in ("qimem", "peer"):
        if side not in report:
            continue
        s = report[side]
        for op, o in s["ops"].items():
            statuses = " ".join(f"{k}:{v}" for k, v in o["statuses"].items())
            if o["conn_errors"]:
                statuses += f" conn-errors:{o['conn_errors']}"
            lines.append(
                f"{side:6} {op:13} {o['count']:>8} {o['rps']:>8.1f} {_ms(o['p50_ms']):>8} "
                f"{_ms(o['p99_ms']):>8} {_ms(o['max_ms']):>8}  {statuses}"
            )
        lines.append(
            f"{side:6} {'all':13} {s['requests']:>8} {s['rps']:>8.1f} {'':>8} {_ms(s['p99_ms']):>8}"
        )
        v = s["verification"]
        lines.append(
            f"  {side}: {s['encrypted']} ciphertexts, {v['verified']} verified, {v['lost']} lost,"
            f" {v['corrupted']} corrupted (final pass {v['seconds']:.1f} s); 5xx {s['5xx']}, "
            f"connection errors {s['conn_errors']}, in-run decrypt mismatches "
            f"{s['decrypt_mismatches']}, login_busy answers (retried) {s['login_busy']}"
        )
    q = report.get("qimem", {})
    if "versions" in q:
        lines.append(
            "  qimem: versions (expected, found) "
            + ", ".join(f"{k} {w}/{h}" for k, (w, h) in q["versions"].items())
            + f"; /metrics {q['server_requests']} requests, {q['server_5xx']} 5xx; "
            f"exit {q['exit_code']} on SIGTERM; traceback in log: {q['traceback']}"
        )
        forms = " ".join(f"{k}:{v}" for k, v in q["rotate_forms"].items())
        lines.append(f"  qimem: rotate by form:status {forms}")
    lines.append(
        f"  load average before {report['loadavg_before']}, after "
        f"{report.get('loadavg_after')}; {report['processes']} processes × "
        f"{report['connections']} connections, {report['rounds']} round(s)"
    )
    for sample in q.get("samples", [])[:10]:
        lines.append(f"  sample: {sample}")
    lines.append("  FAILED: " + "; ".join(report["failures"]) if report["failures"] else "  OK")
    return "\n".join(lines)


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Bench rows: per operation and overall req/s against the peer; the correctness row."""
    q, p = report["qimem"], report.get("peer")
    out = []
    for op in [*OPS, "all"]:
        mine = q if op == "all" else q["ops"][op]
        theirs = None if p is None else (p if op == "all" else p["ops"][op])
        ratio = theirs and theirs["rps"] and mine["rps"] / theirs["rps"]
        note = f"p99 {_ms(mine['p99_ms'])} ms"
        if op != "all":
            note = f"p50 {_ms(mine['p50_ms'])} ms, " + note + f", max {_ms(mine['max_ms'])} ms"
        if theirs is not None:
            note += f" (peer p99 {_ms(theirs['p99_ms'])} ms)"
        out.append(
            {
                "case": f"mixed load on PostgreSQL: {op}",
                "metric": "req/s",
                "qimem": round(mine["rps"], 1),
                "peer_name": PEER if p else "",
                "peer": None if theirs is None else round(theirs["rps"], 1),
                "ratio": ratio or None,
                "notes": note,
            }
        )
    v = q["verification"]
    out.append(
        {
            "case": "mixed load on PostgreSQL: failed checks",
            "metric": "count",
            "qimem": len(report["failures"]),
            "target": "0",
            "ok": not report["failures"],
            "notes": (
                f"{q['encrypted']} ciphertexts all decrypted again: {v['verified']} verified, "
                f"{v['lost']} lost, {v['corrupted']} corrupted; 5xx {q['5xx']}, connection "
                f"errors {q['conn_errors']}; {report['duration']:g} s, {report['processes']} "
                f"procs × {report['connections']} conns, load avg {report['loadavg_before']}"
            ),
            "details": report,
        }
    )
    return out


def _save_report(report: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"load-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def measure(
    duration: float,
    processes: int = 2,
    connections: int = 4,
    rounds: int = 3,
    admin_url: str | None = None,
    peer: bool = True,
    mix: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A fresh database and a temporary directory around ``run_load``; prints the table,
    saves the report, raises ``LoadFailure`` when the run failed."""
    admin_url = admin_url or os.environ.get(POSTGRES_ENV) or DEFAULT_ADMIN_URL
    workdir = Path(tempfile.mkdtemp(prefix="qimem-bench-load-"))
    try:
        with fresh_database(admin_url) as store_url:
            report = run_load(
                store_url, workdir, duration, processes, connections, rounds, peer=peer, mix=mix
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path = _save_report(report)
    print(render(report))
    print(f"report: {path}")
    if report["failures"]:
        raise LoadFailure("; ".join(report["failures"]))
    return report


def run(quick: bool, duration: float | None = None) -> list[dict[str, Any]]:
    """The load suite's rows (``python -m bench load [--quick] [--duration S]``)."""
    if duration is None:
        duration = 6.0 if quick else 30.0
    return rows(measure(duration, rounds=1 if quick else 3))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.load``: every knob; ``--save`` merges the rows into latest.json."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds on each server")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="connections per process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--postgres-url",
        help=f"admin URL of the server (default ${POSTGRES_ENV} or {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="OP=WEIGHT",
        help=f"change one weight of the mix (default {MIX}); repeatable",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the peer")
    parser.add_argument("--save", action="store_true", help="merge into results/latest.json")
    args = parser.parse_args(argv)
    mix = dict(MIX)
    for item in args.mix:
        op, _, weight = item.partition("=")
        if op not in MIX:
            parser.error(f"--mix: unknown operation {op!r} (known: {', '.join(MIX)})")
        try:
            mix[op] = float(weight)
        except ValueError:
            parser.error(f"--mix: {item!r} is not OP=NUMBER")
    from bench.__main__ import check_row, machine, save

    info = machine()
    started = time.monotonic()
    try:
        report = measure(
            args.duration,
            args.processes,
            args.connections,
            args.rounds,
            args.postgres_url,
            peer=not args.no_peer,
            mix=mix,
        )
    except LoadFailure as exc:
        print(f"load: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.save:
        command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
        ran = {
            SUITE: {
                "when": report["when"],
                "command": command.strip(),
                "quick": False,
                "seconds": round(time.monotonic() - started, 1),
                "machine": info,
            }
        }
        path = save([check_row(SUITE, r) for r in rows(report)], ran)
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
