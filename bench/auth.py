"""Auth suite: login cost, access-token verification, and what authentication costs the
encrypt endpoint.

* **login**: one password grant (Argon2id at the OWASP defaults m=19 MiB, t=2, p=1, plus
  the database work and signing) in milliseconds; peer: argon2-cffi's bare ``verify`` with
  the same parameters, i.e. the floor any correct implementation pays.
* **token verification**: a token's first verification (EdDSA signature, claims,
  revocation list, permission map) per second, and a repeated one (a verified-token cache
  that still checks expiry and revocation each time); peer: PyJWT's bare ``jwt.decode`` of
  the same token with the same key.
* **encrypt over HTTP**: ``POST /v1/security/encrypt`` requests per second against two
  ``qimem serve`` processes on one SQLite store, one with bearer tokens and one with
  ``--insecure-no-auth``; the same keep-alive client threads drive both, in alternating
  rounds (best round counts). Target: authenticated >= 0.85 x unauthenticated.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.core import best_of_alternating, make_row, timed
from bench.servers import free_port, wait_healthy

SUITE = "auth"
ADMIN_PASSWORD = "bench-nqzva-password"  # passes the password policy (no "admin")


def _login_rows(quick: bool) -> list[dict[str, Any]]:
    from argon2 import PasswordHasher, Type

    from qimem.app import AppContext
    from qimem.config import Config
    from qimem.identity import IdentitySettings
    from qimem.services import identity as ids

    settings = IdentitySettings()
    app = AppContext(Config(store_url="memory://")).open()
    ids.configure(app, settings)
    ids.bootstrap(app, ADMIN_PASSWORD)
    params = {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD}
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
        type=Type.ID,
    )
    stored = hasher.hash(ADMIN_PASSWORD)
    n = 5 if quick else 20

    def per_call_ms(fn: Any) -> float:
        fn()  # warm up
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1000.0

    login_ms = per_call_ms(lambda: ids.token(app, "master", params))
    bare_ms = per_call_ms(lambda: hasher.verify(stored, ADMIN_PASSWORD))
    rows = [
        make_row(
            SUITE,
            "login (password grant, Argon2id m=19MiB t=2 p=1)",
            "ms",
            login_ms,
            "argon2-cffi verify alone",
            bare_ms,
            higher_is_better=False,
            notes=f"{n} logins, wall time; includes DB, lockout bookkeeping, signing",
        )
    ]

    token = ids.token(app, "master", params).access_token
    ident = ids.identity(app)
    import jwt

    key = next(iter(ident.tokens._load_public(force=True).values())).key
    first = timed(lambda: ident.principal_from_claims(ident.tokens.verify(token)))
    repeat = timed(lambda: ids.authenticate(app, token))
    bare = timed(
        lambda: jwt.decode(
            token, key, algorithms=["EdDSA"], audience="qimem", issuer="qimem/realms/master"
        )
    )
    rounds, seconds = (2, 0.3) if quick else (4, 1.0)
    q_first, q_repeat, p = best_of_alternating(
        [first, repeat, bare], rounds=rounds, seconds=seconds
    )
    rows.append(
        make_row(
            SUITE,
            "access-token verification, first sight (EdDSA)",
            "ops/s",
            q_first,
            "PyJWT jwt.decode alone",
            p,
            notes="signature, claims, revocation list and permission map",
        )
    )
    rows.append(
        make_row(
            SUITE,
            "access-token verification, token seen before",
            "ops/s",
            q_repeat,
            "PyJWT jwt.decode alone",
            p,
            notes="verified-token cache: expiry and revocation list still checked each time",
        )
    )
    ids.close_identity(app)
    app.close()
    return rows


def _load(port: int, token: str | None, body: bytes, seconds: float, clients: int) -> float:
    """Requests per second from ``clients`` keep-alive threads for ``seconds``."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    counts = [0] * clients
    stop = time.monotonic() + seconds
    errors: list[int] = []

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            conn.request("POST", "/v1/security/encrypt", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors.append(response.status)
                break
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"encrypt answered {errors[0]}")
    return sum(counts) / (time.monotonic() - start)


def _http_rows(quick: bool) -> list[dict[str, Any]]:
    home = Path(tempfile.mkdtemp(prefix="qimem-bench-auth-"))
    env = {**os.environ, "QIMEM_HOME": str(home)}
    for var in ("QIMEM_CONFIG", "QIMEM_STORE", "QIMEM_ROOT_KEY"):
        env.pop(var, None)
    exe = [sys.executable, "-c", "from qimem.cli import main; main()"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            [*exe, "init", "--admin-password-stdin"],
            input=ADMIN_PASSWORD.encode() + b"\n",
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*exe, "keys", "create", "--name", "bench"], env=env, check=True, capture_output=True
        )
        ports = [free_port(), free_port()]
        for port, extra in ((ports[0], []), (ports[1], ["--insecure-no-auth"])):
            procs.append(
                subprocess.Popen(
                    [
                        *exe,
                        "serve",
                        "--port",
                        str(port),
                        "--threads",
                        "4",
                        "--no-access-log",
                        *extra,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port, proc in zip(ports, procs, strict=True):
            wait_healthy(port, proc, timeout=30)
        conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=10)
        conn.request(
            "POST",
            "/v1/auth/realms/master/token",
            body=f"grant_type=password&username=admin&password={ADMIN_PASSWORD}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        token = json.loads(conn.getresponse().read())["access_token"]
        conn.close()
        body = json.dumps(
            {"key": "bench", "plaintext": base64.b64encode(os.urandom(256)).decode()}
        ).encode()
        seconds, rounds, clients = (1.0, 2, 4) if quick else (3.0, 3, 4)
        _load(ports[0], token, body, 0.5, clients)  # warm up both
        _load(ports[1], None, body, 0.5, clients)
        best_auth = best_open = 0.0
        for r in range(rounds):
            order = [(0, token), (1, None)] if r % 2 == 0 else [(1, None), (0, token)]
            for index, tok in order:
                rate = _load(ports[index], tok, body, seconds, clients)
                if index == 0:
                    best_auth = max(best_auth, rate)
                else:
                    best_open = max(best_open, rate)
        return [
            make_row(
                SUITE,
                "POST /v1/security/encrypt, 256 B, bearer token vs --insecure-no-auth",
                "req/s",
                best_auth,
                "same server, --insecure-no-auth",
                best_open,
                target=0.85,
                notes=f"qimem serve --threads 4, SQLite store, {clients} keep-alive clients, "
                f"best of {rounds} alternating {seconds:g}s rounds; audit log on",
            )
        ]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(home, ignore_errors=True)


def run(quick: bool) -> list[dict[str, Any]]:
    """The auth suite's rows."""
    return _login_rows(quick) + _http_rows(quick)
