"""The boundary of the threat model (docs/security.md, "What qimem does not protect
against"): these tests show what an attacker *with* the root key, or root on the host, can
do, so that the documented limits are facts, not hopes. If one of them starts failing,
qimem has gained a protection and docs/security.md must say so."""

from __future__ import annotations

import base64
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from identity_helpers import ADMIN_PASSWORD, password_login, with_identity
from serve_process import ServeProcess, serve_env_for

import qimem
from qimem.identity.authz_mac import Sealer
from qimem.rootkey import KeyWrapper
from qimem.services import identity as ids

EVE_PASSWORD = "copper-wombat-forty-two"  # noqa: S105 (a test password)


def test_a_stolen_root_key_with_database_write_forges_a_grant(
    tmp_path: Path, root_key_b64: str
) -> None:
    """With the root key, a database writer re-seals a forged grant: it is accepted."""
    root_key = base64.b64decode(root_key_b64)
    db = tmp_path / "qimem.db"
    app = with_identity(qimem.connect(f"sqlite:///{db}", root_key=root_key))
    try:
        ids.add_user(app, "master", "eve", EVE_PASSWORD, [])
        user_id = ids.identity(app).get_user("master", "eve").user_id
        token = password_login(app, "master", "eve", EVE_PASSWORD).access_token
        assert not ids.authenticate(app, token).allows("realms:admin")

        # The attacker: the stolen root key and plain SQL, no qimem API.
        sealer = Sealer(KeyWrapper(bytearray(root_key)))
        with sqlite3.connect(db) as conn:
            (epoch,) = conn.execute(
                "SELECT tokens_valid_after FROM qimem_users WHERE user_id = ?", (user_id,)
            ).fetchone()
            mac = sealer.grant_mac("master", user_id, "admin", "", epoch)
            conn.execute(
                "INSERT INTO qimem_grants (realm, user_id, role, scope, mac) "
                "VALUES ('master', ?, 'admin', '', ?)",
                (user_id, mac),
            )
        ids.identity(app).invalidate_caches()
        token = password_login(app, "master", "eve", EVE_PASSWORD).access_token
        assert ids.authenticate(app, token).allows("realms:admin")  # the boundary
    finally:
        app.close()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs root on Linux"
)
def test_root_on_the_host_reads_the_servers_root_key(tmp_path: Path, root_key_b64: str) -> None:
    """The server is not dumpable (finding 12), yet root reads its environment, root key
    included: no flag a process sets on itself stops root."""
    server = ServeProcess(tmp_path, serve_env_for(tmp_path, root_key_b64), "--no-access-log")
    try:
        server.wait_ready()
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"QIMEM_ROOT_KEY={root_key_b64}".encode() in environ
        assert len(base64.b64decode(root_key_b64)) == 32
    finally:
        assert server.stop() == 0
    assert ADMIN_PASSWORD not in server.log()
