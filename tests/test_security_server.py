"""Attacks on a running ``qimem serve`` (issue 12, findings 2, 3, 5 and 12), each against a
real server process: unbounded metric series, slow connections, DNS rebinding, core dumps."""

from __future__ import annotations

import http.client
import json
import os
import random
import resource
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_process import ServeProcess, serve_env_for

# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture
def serve_env(tmp_path: Path, root_key_b64: str) -> dict[str, str]:
    return serve_env_for(tmp_path, root_key_b64)


def start(
    tmp_path: Path, env: dict[str, str], procs: list[ServeProcess], *args: str
) -> ServeProcess:
    server = ServeProcess(tmp_path, env, "--no-access-log", *args)
    procs.append(server)
    return server.wait_ready()


def get(port: int, path: str, *, method: str = "GET", host: str | None = None,
        timeout: float = 5.0) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Host": host} if host is not None else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ---- finding 2: /metrics cardinality ---------------------------------------------------


def series_count(port: int) -> int:
    status, body = get(port, "/metrics")
    assert status == 200
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))


def random_token(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(size))


def test_finding2_random_methods_and_paths_leave_metric_series_unchanged(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes)
    rng = random.Random(12)  # noqa: S311 - test data

    def shapes() -> list[tuple[str, str]]:
        method = "X" + random_token(rng, rng.randint(2, 12))
        return [
            (method, f"/{random_token(rng, 8)}/{random_token(rng, 20)}"),  # no route: 404
            (method, "/healthz"),  # a route without that method: 405
            (method, f"/v1/security/keys/{random_token(rng, 16)}"),  # a templated route
            ("GET", f"/v1/{random_token(rng, 30)}?{random_token(rng, 5)}=1"),
        ]

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def send(method: str, path: str) -> None:
        conn.request(method, path)
        conn.getresponse().read()

    for method, path in shapes():  # one of each kind, so every bounded series exists
        send(method, path)
    series_count(server.port)  # and GET /metrics's own
    before = series_count(server.port)
    for _ in range(250):
        for method, path in shapes():
            send(method, path)
    conn.close()
    after = series_count(server.port)
    assert after == before, f"{after - before} new series from 1,000 random requests"
    _, body = get(server.port, "/metrics")
    assert b'method="OTHER"' in body and b'route="unmatched"' in body
    assert b"/v1/security/keys/{key_id}" in body


# ---- finding 3: slow connections --------------------------------------------------------

TRICKLERS = 500


def open_tricklers(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def trickle(socks: list[socket.socket], data: bytes) -> int:
    """Send ``data`` (a byte) on every socket; returns how many the server had closed."""
    closed = 0
    for sock in socks:
        try:
            sock.send(data)
        except OSError:
            closed += 1
    return closed


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    try:
        status, _ = get(port, "/healthz", timeout=1.0)
    except OSError as exc:
        pytest.fail(f"/healthz did not answer within 1 s under slow clients: {exc!r}")
    assert status == 200
    return time.monotonic() - started


def test_finding3_500_trickling_clients_do_not_stop_healthz(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < TRICKLERS + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, TRICKLERS + 200), hard))
    server = start(tmp_path, serve_env, processes)  # the defaults, as an operator runs it
    socks = open_tricklers(server.port, TRICKLERS)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # never finished
        slowest = 0.0
        for round_ in range(3):  # a byte every 5 s per client, /healthz probed every second
            assert trickle(socks, request[round_ : round_ + 1]) == 0
            for _ in range(5):
                slowest = max(slowest, healthz_seconds(server.port))
                time.sleep(1.0)
        assert slowest < 1.0
    finally:
        for sock in socks:
            sock.close()
    assert healthz_seconds(server.port) < 1.0


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closed ``sock`` (fails after ``timeout``)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(1024)
    except TimeoutError:
        pytest.fail(f"the server kept a trickling connection open for {timeout} s")
    except ConnectionResetError:
        data = b""
    assert data == b""  # closed without an answer
    return time.monotonic() - started


def test_finding3_a_request_that_takes_too_long_to_arrive_is_closed(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes, "--request-timeout", "1",
                   "--cleanup-interval", "1")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        slow.sendall(b"GET /hea")
        started = time.monotonic()
        for byte in b"lthz HTTP/1.1\r\n":  # a byte every 0.3 s: never idle
            time.sleep(0.3)
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - started > 4.2:
                break
        wait_closed(slow, 4.0)
    # closed by the 1 s request timeout at a check (every 1 s), not after the 4.5 s the
    # bytes take
    assert time.monotonic() - started < 4.0
    # an idle keep-alive connection is not a slow request: it lives until channel_timeout
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b'{"status": "ok"}'
    time.sleep(2.5)  # idle for longer than the request timeout and its check together
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b'{"status": "ok"}'
    assert conn.sock is not None  # still the first connection
    conn.close()


def test_finding3_limits_come_from_the_config_file_and_bad_values_are_refused(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    config = Path(serve_env["QIMEM_HOME"]) / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[serve]\nrequest_timeout = 1\ncleanup_interval = 1\nchannel_timeout = 2\n")
    server = start(tmp_path, serve_env, processes)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        slow.sendall(b"GET /hea")
        assert wait_closed(slow, 4.0) < 4.0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as idle:
        assert wait_closed(idle, 5.0) < 5.0  # idle: channel_timeout 2 s
    config.write_text('[serve]\nconnection_limit = "many"\n')
    bad = subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", "serve",
         "--insecure-no-auth", "--port", "0"],
        cwd=tmp_path, env=serve_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.strip() == (
        "qimem: error: [serve] connection_limit must be a whole number from 1 to 100000"
    )


# ---- finding 5: DNS rebinding --------------------------------------------------------------


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.2",
                                  "localhost.attacker.example", "", "[::1"])  # fmt: skip
def test_finding5_insecure_mode_refuses_a_rebound_host_name(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess], host: str
) -> None:
    server = start(tmp_path, serve_env, processes)
    for path, method in (("/v1/security/keys", "GET"), ("/healthz", "GET")):
        status, body = get(server.port, path, method=method, host=host.format(port=server.port))
        assert status == 421, body
        error = json.loads(body)["error"]
        assert error["code"] == "host_not_allowed"
        assert "loopback names" in error["message"]


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:{port}", "127.0.0.1", "127.0.0.1:{port}",
                                  "[::1]", "[::1]:{port}"])  # fmt: skip
def test_finding5_insecure_mode_answers_loopback_host_names(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess], host: str
) -> None:
    server = start(tmp_path, serve_env, processes)
    status, body = get(server.port, "/v1/security/keys", host=host.format(port=server.port))
    assert status == 200, body


def init_home(env: dict[str, str], cwd: Path) -> None:
    """``qimem init`` (a realm master with its admin) in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", "init"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_finding5_allowed_hosts_in_normal_mode(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    serve_env.pop("QIMEM_ROOT_KEY")  # qimem init writes a root key file of its own
    init_home(serve_env, tmp_path)
    hosts = ("--allowed-host", "keys.example.org", "--allowed-host", "[::1]:8443")
    server = ServeProcess(tmp_path, serve_env, "--no-access-log", *hosts, insecure=False)
    processes.append(server)
    server.wait_ready()
    for host in ("keys.example.org", "KEYS.example.org:443", "[::1]:8443"):
        assert get(server.port, "/healthz", host=host)[0] == 200, host
    for host in ("evil.example", "[::1]:8444", "127.0.0.1", "keys.example.org.evil"):
        status, body = get(server.port, "/healthz", host=host)
        assert status == 421, host
        assert json.loads(body)["error"]["code"] == "host_not_allowed"
    open_server = ServeProcess(tmp_path, serve_env, "--no-access-log", name="open", insecure=False)
    processes.append(open_server)
    open_server.wait_ready()  # no allowed_hosts: any name (a reverse proxy may rewrite it)
    assert get(open_server.port, "/healthz", host="anything.example")[0] == 200


# ---- finding 12: core dumps ---------------------------------------------------------------

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def soft_core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4]
    raise AssertionError("no core limit in /proc/PID/limits")


def allow_cores() -> None:
    """preexec_fn: as if the operator had run ``ulimit -c unlimited`` before qimem."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def cores_in(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name == "core" or p.name.startswith("core.")]


def abort_server(tmp_path: Path, env: dict[str, str], name: str) -> tuple[Path, int]:
    """Start ``qimem serve`` in its own directory with core dumps allowed by the parent,
    raise its core limit from outside too (``prlimit``), SIGABRT it; (its cwd, exit)."""
    workdir = tmp_path / name
    workdir.mkdir()
    server = ServeProcess(workdir, env, "--no-access-log", preexec_fn=allow_cores)
    try:
        server.wait_ready()
        pid = server.proc.pid
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.prlimit(pid, resource.RLIMIT_CORE, (hard, hard))
        os.kill(pid, signal.SIGABRT)
        code = server.proc.wait(60)
    finally:
        server.kill()
    return workdir, code


@needs_linux
def test_finding12_serve_sets_its_core_limit_to_zero(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = ServeProcess(tmp_path, serve_env, "--no-access-log", preexec_fn=allow_cores)
    processes.append(server)
    server.wait_ready()
    assert soft_core_limit(server.proc.pid) == "0"


@needs_linux
def test_finding12_aborted_server_leaves_no_core_file(
    tmp_path: Path, serve_env: dict[str, str]
) -> None:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write to the cwd; limits tested above")
    # Control: with the documented opt-out, this machine does write a core here.
    control, code = abort_server(tmp_path, {**serve_env, "QIMEM_ALLOW_CORE_DUMPS": "1"}, "opt-out")
    assert code == -signal.SIGABRT
    written = cores_in(control)
    for core in written:
        core.unlink()
    if not written:
        pytest.skip("this machine writes no core file even when allowed; limits tested above")
    # The attack: a crash of the real server. Its core limit is raised from outside, so
    # only the non-dumpable flag stands between the crash and a file holding its keys.
    workdir, code = abort_server(tmp_path, serve_env, "hardened")
    assert code == -signal.SIGABRT
    assert cores_in(workdir) == []


STORE = "state = CliState(None, 'memory://', [], 'master')\nstate.app.open()\n"
CLIENT = (  # what qauth --server builds (nothing is sent)
    "state = CliState(None, None, [], 'master', server='http://127.0.0.1:9')\n"
    "state.http_client('a-token')\n"
)


def cli_core_state(cwd: Path, opens: str = STORE, **env: str) -> tuple[int, int]:
    """(PR_GET_DUMPABLE, soft RLIMIT_CORE) of a CLI process after it opened its store or
    its --server client (the flag is only readable from inside the process, so the child
    reports it)."""
    code = (
        "import ctypes, resource\n"
        "from qimem.cli.context import CliState\n"
        + opens
        + "flag = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)\n"
        "print(flag, resource.getrlimit(resource.RLIMIT_CORE)[0])\n"
        "state.close()\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=environ,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=allow_cores,  # noqa: PLW1509
    )
    assert out.returncode == 0, out.stderr
    flag, limit = out.stdout.split()
    return int(flag), int(limit)


@needs_linux
def test_finding12_cli_processes_that_open_the_store_cannot_dump_core(
    tmp_path: Path, root_key_b64: str
) -> None:
    flag, limit = cli_core_state(tmp_path, QIMEM_ROOT_KEY=root_key_b64)
    assert (flag, limit) == (0, 0)
    # the documented opt-out for debugging
    flag, limit = cli_core_state(tmp_path, QIMEM_ROOT_KEY=root_key_b64, QIMEM_ALLOW_CORE_DUMPS="1")
    assert flag == 1 and limit != 0


@needs_linux
def test_finding12_cli_clients_of_a_server_cannot_dump_core(tmp_path: Path) -> None:
    """qauth --server holds passwords, tokens and client secrets."""
    assert cli_core_state(tmp_path, CLIENT) == (0, 0)
    assert cli_core_state(tmp_path, CLIENT, QIMEM_ALLOW_CORE_DUMPS="1")[0] == 1
