"""What one request costs the app alone: ``python -m bench.app_cpu [--postgres-url URL]``.

A diagnostic, not a suite (it has no peer): the WSGI app that ``qimem serve`` builds,
called in this process without a server, and the thread CPU time of each call, for the
operations of the load suite: encrypt and decrypt (32 bytes and 16 KiB), a rotation, a
``client_credentials`` login and a password login (Argon2id at 1 MiB / t=1 here, so the
figure is mostly the work around the hash). On a fresh PostgreSQL database by default
(``$QIMEM_TEST_POSTGRES_URL`` or the local server), else a SQLite file with
``--sqlite``. docs/performance.md ("load", sixth session) quotes its figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ADMIN_PASSWORD = "bench-nqzva-password"  # passes the password policy
FORM = "application/x-www-form-urlencoded"


def _app(store_url: str) -> tuple[Any, Any]:
    from qimem.app import build
    from qimem.config import Config
    from qimem.identity import IdentitySettings
    from qimem.server.app import create_app
    from qimem.services import identity

    root = base64.b64encode(secrets.token_bytes(32)).decode()
    app = build(Config(store_url=store_url, root_key_b64=root), open=True)  # type: ignore[arg-type]
    fast = IdentitySettings(argon2_memory_kib=1024, argon2_time_cost=1, argon2_parallelism=1)
    identity.configure(app, fast)
    identity.bootstrap(app, ADMIN_PASSWORD)
    return app, create_app(app)


def _caller(wsgi: Any) -> Callable[[str, bytes, str, str | None], Any]:
    from falcon.testing import create_environ

    def call(path: str, body: bytes, ctype: str, token: str | None = None) -> Any:
        headers = {"Content-Type": ctype} | ({"Authorization": f"Bearer {token}"} if token else {})
        environ = create_environ(
            path,
            method="POST",
            host="127.0.0.1",
            headers=headers,
            body=body,
            remote_addr="127.0.0.1",
        )
        status: list[str] = []
        out = b"".join(wsgi(environ, lambda s, h, exc=None: status.append(s)))
        if not status[0].startswith(("200", "201")):
            raise RuntimeError(f"{path} answered {status[0]}: {out[:200]!r}")
        return json.loads(out) if out else None

    return call


def _cpu_per_call(fn: Callable[[], Any], n: int) -> float:
    for _ in range(max(20, n // 20)):
        fn()
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n


def measure(store_url: str, scale: float = 1.0) -> dict[str, float]:
    """Microseconds of thread CPU per call, by operation (``scale``: of the calls made)."""
    from qimem.services import identity

    app, wsgi = _app(store_url)
    try:
        call = _caller(wsgi)
        login = f"grant_type=password&username=admin&password={ADMIN_PASSWORD}".encode()
        token = call("/v1/auth/realms/master/token", login, FORM)["access_token"]
        js = "application/json"
        made = call(
            "/v1/auth/realms/master/clients",
            b'{"client_id": "rot", "roles": ["key-manager"]}',
            js,
            token,
        )
        client = (
            f"grant_type=client_credentials&client_id=rot&client_secret={made['client_secret']}"
        ).encode()
        call("/v1/security/keys", b'{"name": "k0"}', js, token)
        call("/v1/security/keys", b'{"name": "r0"}', js, token)
        ops: dict[str, tuple[Callable[[], Any], int]] = {}
        for size, label in ((32, "32 B"), (16384, "16 KiB")):
            plain = base64.b64encode(os.urandom(size)).decode()
            enc = json.dumps({"key": "k0", "plaintext": plain}).encode()
            env = call("/v1/security/encrypt", enc, js, token)["envelope"]
            dec = json.dumps({"envelope": env}).encode()
            ops[f"encrypt {label}"] = (
                lambda b=enc: call("/v1/security/encrypt", b, js, token),
                3000,
            )
            ops[f"decrypt {label}"] = (
                lambda b=dec: call("/v1/security/decrypt", b, js, token),
                3000,
            )
        rotate = b'{"key": "r0"}'
        ops["rotation"] = (lambda: call("/v1/security/rotate", rotate, js, token), 300)
        ops["client_credentials login"] = (
            lambda: call("/v1/auth/realms/master/token", client, FORM),
            300,
        )
        ops["password login (Argon2id 1 MiB, t=1)"] = (
            lambda: call("/v1/auth/realms/master/token", login, FORM),
            300,
        )
        return {
            name: _cpu_per_call(fn, max(1, int(n * scale))) * 1e6 for name, (fn, n) in ops.items()
        }
    finally:
        identity.close_identity(app)
        app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_cpu", description=__doc__)
    parser.add_argument("--postgres-url", help="admin URL of a PostgreSQL server")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        if args.sqlite:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url = f"sqlite:///{folder / 'qimem.db'}"
        else:
            from bench.load.servers import fresh_database
            from bench.load.suite import DEFAULT_ADMIN_URL, POSTGRES_ENV

            admin = args.postgres_url or os.environ.get(POSTGRES_ENV) or DEFAULT_ADMIN_URL
            url = stack.enter_context(fresh_database(admin))
        for name, micros in measure(url).items():
            print(f"{name:40} {micros:9.1f} us of CPU per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
