"""Shared helpers for the identity tests: cheap Argon2 settings and an app with identity."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from qimem.app import AppContext
from qimem.identity import IdentitySettings
from qimem.services import identity as ids

#: Argon2 at 1 MiB / t=1 keeps tests fast; production defaults are tested separately.
FAST = dict(argon2_memory_kib=1024, argon2_time_cost=1, argon2_parallelism=1)

#: The master ``admin`` password of :func:`with_identity` (it passes the password policy).
ADMIN_PASSWORD = "nqzva-password"


def fast_settings(**overrides: object) -> IdentitySettings:
    return IdentitySettings(**{**FAST, **overrides})  # type: ignore[arg-type]


def with_identity(app: AppContext, **overrides: object) -> AppContext:
    """``app`` with fast identity settings, realm master + admin (:data:`ADMIN_PASSWORD`)."""
    ids.configure(app, fast_settings(**overrides))
    ids.bootstrap(app, ADMIN_PASSWORD)
    return app


def password_login(app: AppContext, realm: str, username: str, password: str):  # type: ignore[no-untyped-def]
    return ids.token(
        app, realm, {"grant_type": "password", "username": username, "password": password}
    )


@contextlib.contextmanager
def serving(app: AppContext, **options: object) -> Iterator[str]:
    """A real waitress server for ``app`` (with authentication) on a free loopback port;
    yields its base URL and stops it afterwards."""
    from qimem.server.app import create_app

    with serving_wsgi(create_app(app, **options)) as url:  # type: ignore[arg-type]
        yield url


@contextlib.contextmanager
def serving_wsgi(wsgi: Any) -> Iterator[str]:
    """A real waitress server for any WSGI app on a free loopback port; yields its base URL
    and stops it afterwards."""
    from qimem.server.runner import Server

    server = Server(wsgi, host="127.0.0.1", port=0, threads=4, drain_timeout=10)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "server did not stop"
