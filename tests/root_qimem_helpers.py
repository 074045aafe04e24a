"""A real upstream ``qimem serve`` for the ``qimem`` root-key provider's tests
(:func:`upstream`): the live server of :func:`transit_helpers.transit_world` plus the
keys, the role and the service account an operator sets up for auto-unseal
(docs/operations.md), and stand-in servers that misbehave (:func:`hanging_server`,
:func:`serving_wsgi` answers).

Upstream objects (realm ``master``): encryption keys ``root-kwk`` (the root key),
``other-kwk``, ``team-root`` and ``retired-kwk``; signing key ``signer``; role ``unsealer``
(``crypto:encrypt``, ``crypto:decrypt``); service account ``unseal`` holding ``unsealer``
scoped to ``root-kwk`` only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from transit_helpers import World, login, transit_world

from qimem.builtin_plugins.root_qimem_provider import QimemRootKeyProvider

ROOT_KEY = "root-kwk"
OTHER_KEY = "other-kwk"
SERVICE_ACCOUNT = "unseal"
ROLE = "unsealer"
SIGNER = "signer"


@dataclass
class Upstream:
    """The live upstream, its admin token, and the service account's secret and token."""

    world: World = field(repr=False)
    workdir: Path
    secret: str = field(repr=False, default="")
    token: str = field(repr=False, default="")
    _files: int = 0

    @property
    def url(self) -> str:
        return self.world.url

    def api(self, method: str, path: str, who: str = "admin", **kw: Any) -> requests.Response:
        """A request to the upstream as ``who`` (a user of the world, or a raw token)."""
        token = self.world.tokens.get(who, who)
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def ok(self, method: str, path: str, who: str = "admin", **kw: Any) -> Any:
        answer = self.api(method, path, who, **kw)
        assert answer.status_code in (200, 201, 204), answer.text
        return answer.json() if answer.content else None

    def write(self, content: str, mode: int = 0o600) -> Path:
        """A new file holding ``content`` with ``mode``."""
        self._files += 1
        path = self.workdir / f"credential-{self._files}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(content + "\n")
        path.chmod(mode)
        return path

    def settings(self, who: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Settings of a provider speaking as ``who`` (a user's or a raw token; default:
        the service account's token) for the key ``root-kwk``."""
        token = self.token if who is None else self.world.tokens.get(who, who)
        found: dict[str, Any] = {
            "url": self.url,
            "key": ROOT_KEY,
            "token_file": str(self.write(token)),
            "timeout": 5,
        }
        found.update(overrides)
        return {k: v for k, v in found.items() if v is not None}

    def provider(self, who: str | None = None, **overrides: Any) -> QimemRootKeyProvider:
        return QimemRootKeyProvider.from_settings(self.settings(who, **overrides), self.workdir)

    def client_settings(self, **overrides: Any) -> dict[str, Any]:
        """Settings that log in as the service account (client_id + secret_file)."""
        if "secret_file" not in overrides:
            overrides["secret_file"] = str(self.write(self.secret))
        return self.settings(
            **{"token_file": None, "client_id": SERVICE_ACCOUNT, "realm": "master", **overrides}
        )

    def service_token(self) -> str:
        """A fresh access token of the service account."""
        answer = requests.post(
            f"{self.url}/v1/auth/realms/master/token",
            data={
                "grant_type": "client_credentials",
                "client_id": SERVICE_ACCOUNT,
                "client_secret": self.secret,
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    def audit(self, action: str) -> list[dict[str, Any]]:
        found = self.ok(
            "GET", "/v1/auth/realms/master/audit", params={"action": action, "limit": 1000}
        )
        return list(found["events"])


@contextlib.contextmanager
def upstream(workdir: Path) -> Iterator[Upstream]:
    """A live upstream set up for auto-unseal (see the module's docstring)."""
    with transit_world(workdir) as world:
        up = Upstream(world, workdir)
        for name in (ROOT_KEY, OTHER_KEY, "team-root", "retired-kwk"):
            up.ok("POST", "/v1/security/keys", json={"name": name})
        up.ok("POST", "/v1/security/keys", json={"name": SIGNER, "algorithm": "ed25519"})
        up.ok(
            "POST",
            "/v1/auth/realms/master/roles",
            json={"name": ROLE, "permissions": ["crypto:encrypt", "crypto:decrypt"]},
        )
        made = up.ok("POST", "/v1/auth/realms/master/clients", json={"client_id": SERVICE_ACCOUNT})
        up.secret = str(made["client_secret"])
        up.ok(
            "POST",
            f"/v1/auth/realms/master/users/{SERVICE_ACCOUNT}/roles",
            json={"role": ROLE, "scope": ROOT_KEY},
        )
        up.token = up.service_token()
        yield up


def fresh_login(up: Upstream, who: str) -> str:
    """A new access token of the world's user ``who`` (to revoke without spoiling others)."""
    from identity_helpers import password_of

    return login(up.url, "master", who, password_of(who))


@contextlib.contextmanager
def hanging_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers; yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
