"""The workers suite's login clients (bench/workers.py): four users on four hosts, not one
account from one address (which the login flood guard is there to hold back)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path

from bench_helpers import bench_module
from serve_process import ServeProcess, home_env, qimem_process


def test_login_clients_are_distinct_users_from_distinct_loopback_addresses(
    tmp_path: Path,
) -> None:
    workers = bench_module("workers")
    home = tmp_path / "home"
    init = qimem_process(home, "init", "--admin-password-stdin", stdin=workers.ADMIN_PASSWORD)
    assert init.returncode == 0, init.stderr
    server = ServeProcess(tmp_path, home_env(home), "--threads", "4", insecure=False)
    try:
        server.wait_ready()
        users = workers._login_users(server.port, 2)
        rate, _ = workers._logins(server.port, 1.0, users)
        assert rate > 0
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        form = {"grant_type": "password", "username": "admin", "password": workers.ADMIN_PASSWORD}
        conn.request(
            "POST",
            "/v1/auth/realms/master/token",
            body=urllib.parse.urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        token = json.loads(conn.getresponse().read())["access_token"]
        conn.request(
            "GET",
            "/v1/auth/realms/master/audit?action=login&limit=1000",
            headers={"Authorization": f"Bearer {token}"},
        )
        records = json.loads(conn.getresponse().read())["events"]
    finally:
        server.stop()
    seen = {
        (r["actor"], r["detail"].get("source"))
        for r in records
        if r["outcome"] == "success" and r["actor"].startswith("login")
    }
    assert seen == {("login0", "127.0.0.2"), ("login1", "127.0.0.3")}
