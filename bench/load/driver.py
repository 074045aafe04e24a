"""The client side: forked client processes, each with keep-alive connections (one thread
each) sending the weighted mix against a ``Target``.
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

from bench.load.common import (
    EXPECTED,
    LOGIN_ATTEMPTS,
    MIX,
    REQUEST_TIMEOUT,
    SIZES,
    STAGGER_SECONDS,
    TOKEN_MAX_AGE,
    DriveResult,
    LoadFailure,
    Record,
    Target,
    _code,
)

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
