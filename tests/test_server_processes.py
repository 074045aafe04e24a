"""``qimem serve`` as a real process: refusals, graceful SIGTERM/SIGINT, and two servers
on one PostgreSQL database (the scale-out path)."""

from __future__ import annotations

import base64
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from serve_process import ServeProcess, home_env

from qimem.cli import cli
from qimem.cli.serve import api_command, unified_command
from qimem.server.auth import resolve_loopback_bind


@pytest.fixture
def serve_env(tmp_path: Path, root_key_b64: str) -> dict[str, str]:
    return home_env(tmp_path / "home", QIMEM_ROOT_KEY=root_key_b64)


def wait_until_refused(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.05)
    pytest.fail("the server kept accepting connections after SIGTERM")


def test_sigterm_lets_the_request_in_flight_finish(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    serve_env["QIMEM_STORE"] = f"sqlite:///{tmp_path / 'keys.db'}"
    server = ServeProcess(tmp_path, serve_env)
    processes.append(server)
    server.wait_ready()
    body = json.dumps({"name": "inflight"}).encode()
    head = (
        "POST /v1/security/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head + body[:4])
        time.sleep(0.3)  # the server has read the partial request
        server.proc.send_signal(signal.SIGTERM)
        wait_until_refused(server.port)  # shutting down: no new connections ...
        assert server.proc.poll() is None  # ... but still running for the request in flight
        sock.sendall(body[4:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 201"), response
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["name"] == "inflight"
    # The first SIGTERM's graceful stop ends the process by itself (stop() would send a
    # second one, which can land after the handler is gone and report -15).
    assert server.proc.wait(20) == 0
    assert server.stop() == 0
    log = server.log()
    assert "qimem: stopped" in log and "Traceback" not in log
    access = [json.loads(line) for line in log.splitlines() if line.startswith('{"event"')]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [
        ("POST", "/v1/security/keys", 201)
    ]  # written out at shutdown

    from conftest import make_app

    app = make_app(serve_env["QIMEM_STORE"], serve_env["QIMEM_ROOT_KEY"])
    try:
        from qimem import services

        assert services.show_key(app, "inflight").name == "inflight"
    finally:
        app.close()


def test_sigint_stops_an_idle_server_with_exit_0(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    serve_env["QIMEM_STORE"] = "memory://"
    server = ServeProcess(tmp_path, serve_env, "--no-access-log")
    processes.append(server)
    server.wait_ready()
    with requests.Session() as http:  # leaves an idle keep-alive connection open
        assert http.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(20) == 0
    assert "Traceback" not in server.log()


@pytest.mark.postgres
def test_two_servers_on_one_postgres_database(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess], postgres_url: str
) -> None:
    serve_env["QIMEM_STORE"] = postgres_url
    one = ServeProcess(tmp_path, serve_env, "--no-access-log", name="one")
    processes.append(one)
    two = ServeProcess(tmp_path, serve_env, "--no-access-log", name="two")
    processes.append(two)
    one.wait_ready()
    two.wait_ready()

    created = requests.post(f"{one.url}/v1/security/keys", json={"name": "shared"}, timeout=20)
    assert created.status_code == 201
    key_id = created.json()["key_id"]

    # Rotate the same key_id through both servers at once, several times each.
    urls = [one.url, two.url] * 4
    barrier = threading.Barrier(len(urls))
    statuses: list[int] = []
    lock = threading.Lock()

    def rotate(url: str) -> None:
        with requests.Session() as http:
            barrier.wait(10)
            result = http.post(f"{url}/v1/security/rotate", json={"key_id": key_id}, timeout=30)
        with lock:
            statuses.append(result.status_code)
        if result.status_code == 409:
            assert result.json()["error"]["code"] == "key_not_active"

    threads = [threading.Thread(target=rotate, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200] + [409] * (len(urls) - 1)

    for server in (one, two):
        shown = requests.get(f"{server.url}/v1/security/keys/shared", timeout=20).json()
        assert [v["version"] for v in shown["versions"]] == [1, 2]
        assert [v["state"] for v in shown["versions"]] == ["decrypt-only", "active"]

    secret = base64.b64encode(b"scale out").decode()
    sealed = requests.post(
        f"{one.url}/v1/security/encrypt", json={"key": "shared", "plaintext": secret}, timeout=20
    )
    assert sealed.status_code == 200 and sealed.json()["version"] == 2
    opened = requests.post(
        f"{two.url}/v1/security/decrypt", json={"envelope": sealed.json()["envelope"]}, timeout=20
    )
    assert opened.status_code == 200 and opened.json()["plaintext"] == secret
    back = requests.post(
        f"{two.url}/v1/security/encrypt", json={"key": "shared", "plaintext": secret}, timeout=20
    )
    reopened = requests.post(
        f"{one.url}/v1/security/decrypt", json={"envelope": back.json()["envelope"]}, timeout=20
    )
    assert reopened.status_code == 200 and reopened.json()["plaintext"] == secret

    assert one.stop() == 0 and two.stop() == 0


# ---- refusals (no process needed: click's runner) --------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on: a refusal test that wrongly went on to serve would
    fail with "cannot listen" instead of blocking."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", ""])
def test_insecure_mode_refuses_non_loopback_binds(
    qimem_home: Path, host: str, taken_port: int
) -> None:
    args = [
        "--store",
        "memory://",
        "serve",
        "--insecure-no-auth",
        "--host",
        host,
        "--port",
        str(taken_port),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 9
    assert "refuses to bind" in result.output


def test_loopback_names_resolve_to_loopback() -> None:
    assert resolve_loopback_bind("127.0.0.1", 0) == "127.0.0.1"
    assert resolve_loopback_bind("localhost", 0) in ("127.0.0.1", "::1")


def test_port_in_use_is_a_clear_error(qimem_home: Path, taken_port: int) -> None:
    args = ["--store", "memory://", "serve", "--insecure-no-auth", "--port", str(taken_port)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 9 and "cannot listen" in result.output


@pytest.mark.parametrize(
    "command, prog", [(api_command, "qimem-api"), (unified_command, "qauth-api")]
)
def test_console_scripts_report_errors_in_one_line(
    qimem_home: Path, command: object, prog: str, taken_port: int
) -> None:
    args = ["--store", "memory://", "--insecure-no-auth", "--port", str(taken_port)]
    result = CliRunner().invoke(command, args, prog_name=prog)  # type: ignore[arg-type]
    assert result.exit_code == 9
    assert result.output.startswith(f"{prog}: error: cannot listen on 127.0.0.1:{taken_port}")
    assert len(result.output.strip().splitlines()) == 1
