"""A live ``qimem serve`` (with authentication) for the Transit facade's tests, and hvac
clients for its users: :func:`transit_world` starts it once per test module.

Users of realm ``master`` (roles in :data:`ROLES`): ``admin``; ``crypto`` (encrypt, decrypt,
rewrap, datakey, keys read/create/rotate); ``reader`` (keys:read only); ``scoped``
(``crypto`` on ``team-*`` keys only). Realm ``beta`` has ``intruder`` (admin there).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import requests
import tomli_w
from identity_helpers import ADMIN_PASSWORD, password_of
from serve_process import ServeProcess, home_env

ROLES = {
    "crypto": [
        "crypto:encrypt",
        "crypto:decrypt",
        "crypto:rewrap",
        "crypto:datakey",
        "keys:read",
        "keys:create",
        "keys:rotate",
    ],
    "reader": ["keys:read"],
}
USERS = {"crypto": ("crypto", None), "reader": ("reader", None), "scoped": ("crypto", "team-*")}


@dataclass
class World:
    """The live server, its URL and an access token per user."""

    url: str
    server: ServeProcess
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, who: str = "admin", **options: Any) -> hvac.Client:
        """An hvac client speaking for ``who`` (mount ``transit``)."""
        return hvac.Client(url=self.url, token=self.tokens[who], timeout=30, **options)

    def raw(self, method: str, path: str, who: str = "admin", **kw: Any) -> requests.Response:
        """A raw request with ``X-Vault-Token`` (for what hvac cannot send)."""
        headers = {"X-Vault-Token": self.tokens[who], **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kw)


def _admin(url: str, token: str, path: str, body: dict[str, Any]) -> None:
    answer = requests.post(
        f"{url}/v1/auth/realms{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code in (200, 201, 204), answer.text


def login(url: str, realm: str, username: str, password: str) -> str:
    answer = requests.post(
        f"{url}/v1/auth/realms/{realm}/token",
        data={"grant_type": "password", "username": username, "password": password},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def _configure(home: Path, extra: dict[str, Any]) -> None:
    config = home / "config.toml"
    doc = tomllib.loads(config.read_text())
    doc["identity"] = {"argon2_memory_kib": 1024, "argon2_time_cost": 1}
    doc.update(extra)
    config.write_text(tomli_w.dumps(doc))
    config.chmod(0o600)


@contextlib.contextmanager
def transit_world(workdir: Path, *serve_args: str, **config: Any) -> Iterator[World]:
    """``qimem init`` in ``workdir``, ``config`` tables merged into its config file, then
    a live ``qimem serve`` with users (see the module's docstring); stopped afterwards."""
    home = workdir / "home"
    env = home_env(home)
    init = subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", "init",
         "--admin-password-stdin"],
        input=ADMIN_PASSWORD + "\n", env=env, cwd=workdir, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    _configure(home, config)
    server = ServeProcess(workdir, env, "--no-access-log", *serve_args, insecure=False)
    try:
        server.wait_ready()
        url = server.url
        world = World(url, server)
        admin = login(url, "master", "admin", ADMIN_PASSWORD)
        world.tokens["admin"] = admin
        for role, permissions in ROLES.items():
            _admin(url, admin, "/master/roles", {"name": role, "permissions": permissions})
        for user, (role, scope) in USERS.items():
            _admin(url, admin, "/master/users", {"username": user, "password": password_of(user)})
            _admin(url, admin, f"/master/users/{user}/roles", {"role": role, "scope": scope})
            world.tokens[user] = login(url, "master", user, password_of(user))
        _admin(url, admin, "", {"name": "beta"})
        _admin(
            url,
            admin,
            "/beta/users",
            {"username": "intruder", "password": password_of("intruder"), "roles": ["admin"]},
        )
        world.tokens["intruder"] = login(url, "beta", "intruder", password_of("intruder"))
        yield world
    finally:
        server.stop()
