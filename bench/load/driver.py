"""The client side: forked client processes, each with keep-alive connections (one thread
each) sending the weighted mix against a ``Target``.

Connection ``i`` talks to server ``i % len(target.urls)``, so the connections spread evenly
over the servers. The checks that follow a rotation or a revocation (on every server, within
the bound) are in ``bench.load.checks``.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any

from bench.load.checks import Checks
from bench.load.common import (
    AUDITED,
    DOCUMENTED_503,
    EXPECTED,
    LOGIN_ATTEMPTS,
    MIX,
    REQUEST_TIMEOUT,
    SIZES,
    STAGGER_SECONDS,
    TOKEN_MAX_AGE,
    Bounds,
    DriveResult,
    LoadFailure,
    Record,
    Target,
    _code,
    port_of,
)


def source_address(index: int, same_source: bool = False) -> str:
    """The loopback address client connection ``index`` sends from: its own (127.0.0.2,
    127.0.0.3, ...: one user per host, as in production, where the server's per-address
    share of login places limits a flood from one host, not its users), or 127.0.0.1 for
    every connection with ``same_source``."""
    if same_source:
        return "127.0.0.1"
    if not 0 <= index < 250:
        raise LoadFailure(f"client connection {index}: at most 250 have their own address")
    return f"127.0.0.{2 + index}"


class _Client(Checks):
    """One keep-alive connection with its own user, tokens and ciphertexts (one thread)."""

    def __init__(
        self,
        target: Target,
        index: int,
        pool: list[Record],
        seed: int,
        mix: dict[str, float] | None = None,
        bounds: Bounds | None = None,
        allow_503: bool = False,
        same_source: bool = False,
    ) -> None:
        self.target = target
        self.mix = mix or MIX
        self.bounds = bounds or Bounds()
        self.allow_503 = allow_503
        self.user = target.users[index % len(target.users)]
        self.index = index
        self.home = target.urls[index % len(target.urls)]  # this connection's server
        self.address = source_address(index, same_source)
        self.rng = random.Random(seed)
        self.pool = list(pool)  # ciphertexts from earlier rounds, for decrypts
        self.out = DriveResult()
        self.conn = self._connect()
        self.token = ""
        self.token_at = 0.0
        self.client_token = ""
        self.client_token_at = 0.0
        self.last_key_id: dict[str, str] = {}

    def _connect(self, url: str | None = None) -> http.client.HTTPConnection:
        port = port_of(url or self.home)
        return http.client.HTTPConnection(
            "127.0.0.1", port, timeout=REQUEST_TIMEOUT, source_address=(self.address, 0)
        )

    def request(
        self,
        op: str,
        path: str,
        body: bytes,
        content_type: str,
        token: str | None,
        url: str | None = None,
    ) -> tuple[int, Any]:
        """One timed request; the status (0 for a connection error) and the parsed body.
        On this connection's keep-alive connection, or (``url`` given) on a new connection
        to that server, closed afterwards (a new connection may reach any of its workers)."""
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = self.conn if url is None else self._connect(url)
        start = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.out.latencies.setdefault(op, []).append((time.perf_counter() - start) * 1000)
            self.out.conn_errors[op] += 1
            if len(self.out.samples) < 20:
                self.out.samples.append(f"{op}: connection error {type(exc).__name__}")
            conn.close()
            if url is None:
                self.conn = self._connect()
            time.sleep(0.05)
            return 0, None
        finally:
            if url is not None:
                conn.close()
        self.out.latencies.setdefault(op, []).append((time.perf_counter() - start) * 1000)
        status = response.status
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status == 503 and op == "login" and _code(data) == "login_busy":
            self.out.login_busy += 1
            return status, data
        if status == 503 and self.allow_503 and _code(data) in DOCUMENTED_503:
            self.out.unavailable[op] += 1
            now = time.time()
            window = self.out.unavailable_window
            self.out.unavailable_window = [min([now, *window]), max([now, *window])]
            return status, data
        self.out.statuses.setdefault(op, Counter())[status] += 1
        if status == 200 and path in AUDITED:
            self.out.audited[AUDITED[path]] += 1
        if status not in EXPECTED[op] and len(self.out.samples) < 20:
            self.out.samples.append(f"{op}: {status} {raw[:200]!r}")
        return status, data

    def _json(
        self, op: str, path: str, body: dict[str, Any], token: str, url: str | None = None
    ) -> tuple[int, Any]:
        return self.request(op, path, json.dumps(body).encode(), "application/json", token, url)

    # operations

    def password_login(self) -> tuple[int, Any]:
        """A password login as this connection's user (503 login_busy is retried)."""
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
        return status, data

    def login(self) -> None:
        status, data = self.password_login()
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

    def seal(
        self,
        op: str,
        key: str,
        plaintext: bytes,
        aad: str | None = None,
        token: str | None = None,
        url: str | None = None,
    ) -> tuple[int, Any]:
        """Encrypt ``plaintext`` under ``key`` (by name); a 200's ciphertext is kept for
        the decrypts and the final check."""
        body: dict[str, Any] = {"key": key, "plaintext": base64.b64encode(plaintext).decode()}
        if aad is not None:
            body["aad"] = aad
        status, data = self._json(op, "/v1/security/encrypt", body, token or self.token, url)
        if status == 200:
            digest = hashlib.sha256(plaintext).digest()
            record = Record(data["envelope"], aad, digest, len(plaintext))
            self.out.records.append(record)
            self.pool.append(record)
            if key in self.target.rotated:
                self.last_key_id[key] = data["key_id"]
        return status, data

    def open(self, op: str, record: Record, url: str | None = None) -> tuple[int, bool]:
        """Decrypt ``record``: the status, and whether a 200 gave the right plaintext
        (a wrong one is counted as a mismatch)."""
        body: dict[str, Any] = {"envelope": record.envelope}
        if record.aad is not None:
            body["aad"] = record.aad
        status, data = self._json(op, "/v1/security/decrypt", body, self.token, url)
        if status != 200:
            return status, False
        if hashlib.sha256(base64.b64decode(data["plaintext"])).digest() != record.digest:
            self.out.mismatches += 1
            return status, False
        return status, True

    def encrypt(self) -> None:
        size = self.rng.choices([s for s, _ in SIZES], [w for _, w in SIZES])[0]
        key = self.rng.choice(self.target.keys + self.target.rotated)
        aad = None
        if self.rng.random() < 0.25:
            aad = base64.b64encode(os.urandom(16)).decode()
        self.seal("encrypt", key, os.urandom(size), aad)

    def decrypt(self) -> None:
        if not self.pool:
            return self.encrypt()
        self.open("decrypt", self.rng.choice(self.pool))

    def rotate(self) -> None:
        key = self.rng.choice(self.target.rotated)
        stale = self.last_key_id.get(key)
        # Mostly by name; a third by the last key_id this connection saw, which another
        # connection (or process) may have rotated away since: 409 is the right answer then.
        body = {"key_id": stale} if stale and self.rng.random() < 1 / 3 else {"key": key}
        status, data = self._json("rotate", "/v1/security/rotate", body, self.client_token)
        form = next(iter(body))
        self.out.rotate_forms[f"{form}:{status}"] += 1
        if status == 200:
            self.out.rotations[key] += 1
            self.last_key_id[key] = data["key_id"]
            if form == "key":
                self.after_rotation(key, int(data["version"]), time.monotonic())
        elif status == 0 or status >= 500:
            self.out.rotations_unknown[key] += 1  # it may have committed all the same

    def revoke(self) -> None:
        """A fresh login's token, used on every server, revoked through this one: from
        then on every server must refuse it (``Checks.after_revocation``)."""
        status, data = self.password_login()
        if status != 200:
            return
        token = data["access_token"]
        for url in self.target.urls:  # in use (and cached as verified) everywhere first
            self.seal("revoke-check", self.target.keys[0], os.urandom(1), token=token, url=url)
        form = urllib.parse.urlencode({"token": token}).encode()
        status, _ = self.request(
            "revoke",
            f"/v1/auth/realms/{self.target.realm}/revoke",
            form,
            "application/x-www-form-urlencoded",
            None,
        )
        if status == 200:
            self.after_revocation(token, time.monotonic())

    def run(self, deadline: float) -> DriveResult:
        # Clients do not all start in the same millisecond: staggered first logins, so the
        # run measures the mix rather than a thundering herd on the login gate.
        time.sleep(self.index * STAGGER_SECONDS)
        self.login()
        self.client_login()
        todo = ["encrypt", "decrypt", "rotate", "login"]
        todo += ["revoke"] if self.mix.get("revoke", 0) > 0 else []
        ops, weights = list(self.mix), list(self.mix.values())
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now - self.token_at > TOKEN_MAX_AGE:
                self.login()
                continue
            if now - self.client_token_at > TOKEN_MAX_AGE:
                self.client_login()
                continue
            self.run_due()
            op = todo.pop(0) if todo else self.rng.choices(ops, weights)[0]
            getattr(self, op.replace("-", "_"))()
        self.drop_pending()
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
    bounds: Bounds | None,
    allow_503: bool,
    same_source: bool,
    pipe: Any,
) -> None:
    """A client process: ``connections`` threads until the deadline; the merged result
    goes back through ``pipe``."""
    started = time.monotonic()
    deadline = started + duration
    clients = [
        _Client(target, first_index + i, pool, seed * 1000 + i, mix, bounds, allow_503, same_source)
        for i in range(connections)
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
    bounds: Bounds | None = None,
    allow_503: bool = False,
    same_source: bool = False,
) -> DriveResult:
    """``processes`` forked client processes × ``connections`` keep-alive connections, for
    ``duration`` seconds of the mix (default ``MIX``) against ``target``'s servers (spread
    evenly). ``allow_503``: documented 503s (store unavailable) are counted apart, not as
    unexpected answers (a run with a PostgreSQL restart). Each connection sends from its own
    loopback address (:func:`source_address`), or all from 127.0.0.1 with ``same_source``."""
    ctx = multiprocessing.get_context("fork")  # the children use only the standard library
    pool = pool or []
    children = []
    started = time.monotonic()
    for p in range(processes):
        parent_end, child_end = ctx.Pipe(duplex=False)
        args = (target, duration, connections, p * connections, pool, seed + p, mix)
        proc = ctx.Process(
            target=_process_main,
            args=(*args, bounds, allow_503, same_source, child_end),
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
