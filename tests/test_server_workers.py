"""``qimem serve --workers N`` as real processes: a pre-fork master and its waitress
workers on one socket (qimem.server.prefork). Which worker served a connection is read
from /proc (the process holding the accepted socket), never from anything the server
adds for tests."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from identity_helpers import ADMIN_PASSWORD
from serve_process import (
    QIMEM_ARGV,
    ServeProcess,
    child_pids,
    cpu_seconds,
    home_env,
    qimem_process,
    serve_env_for,
    socket_owners,
    wait_for,
)

from qimem.server.prefork import MAX_FAILURES

PLAINTEXT = base64.b64encode(
    b"sixty-four bytes of plaintext, more or less, for the workers"
).decode()


@pytest.fixture
def serve_env(tmp_path: Path, root_key_b64: str) -> dict[str, str]:
    return serve_env_for(tmp_path, root_key_b64)


def start(
    tmp_path: Path,
    env: dict[str, str],
    processes: list[ServeProcess],
    *extra: str,
    workers: str = "2",
    insecure: bool = True,
) -> ServeProcess:
    server = ServeProcess(tmp_path, env, "--workers", workers, *extra, insecure=insecure)
    processes.append(server)
    server.wait_ready()
    return server


def workers_of(server: ServeProcess, count: int = 2) -> list[int]:
    """The master's worker pids, once there are ``count`` of them."""
    return wait_for(  # type: ignore[return-value]
        lambda: (pids := child_pids(server.proc.pid)) and len(pids) == count and pids,
        what=f"{count} workers",
    )


def request(
    port: int,
    method: str,
    path: str,
    body: dict | None = None,
    *,
    host: str | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """One request (on ``conn``, else on a connection of its own, closed after)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if host:
        headers["Host"] = host
    try:
        conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def create_key(port: int, name: str = "k") -> None:
    status, body = request(port, "POST", "/v1/security/keys", {"name": name})
    assert status == 201, body


def encrypt(port: int, conn: http.client.HTTPConnection | None = None) -> int:
    return request(
        port, "POST", "/v1/security/encrypt", {"key": "k", "plaintext": PLAINTEXT}, conn=conn
    )[0]


def metric(port: int, name: str, **labels: str) -> float:
    """The value of one sample of ``/metrics`` (0 when absent)."""
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.decode().splitlines():
        found = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if found and found.group(1) == name:
            have = ",".join(sorted((found.group(2) or "").split(",")))
            if have == want:
                return float(found.group(3))
    return 0.0


def encrypts_counted(port: int) -> float:
    return metric(
        port, "qimem_http_requests_total", method="POST", route="/v1/security/encrypt", status="200"
    )


class Client(threading.Thread):
    """Encrypts on a new connection each time until stopped; counts successes and errors."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                status = encrypt(self.port)
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if status == 200:
                self.ok += 1
            else:
                self.errors.append(f"HTTP {status}")

    def stop(self) -> None:
        self._done.set()
        self.join(30)


@pytest.fixture
def initialized(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A home made by ``qimem init`` (config file, root key file, realm master)."""
    env = home_env(tmp_path / "home")
    done = subprocess.run(
        [*QIMEM_ARGV, "init", "--admin-password-stdin"],
        cwd=tmp_path,
        env=env,
        input=ADMIN_PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    yield env


# ---- the option ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "", "257"])
def test_bad_worker_counts_are_usage_errors(tmp_path: Path, value: str) -> None:
    done = qimem_process(tmp_path, "serve", "--insecure-no-auth", "--workers", value)
    assert done.returncode == 2, done.stderr
    assert "invalid value for '--workers'" in done.stderr
    assert "Traceback" not in done.stderr


def test_auto_starts_one_worker_per_cpu(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    cpus = len(os.sched_getaffinity(0))
    server = start(tmp_path, serve_env, processes, workers="auto")
    if cpus == 1:  # one worker: the single-process server, no master
        assert child_pids(server.proc.pid) == []
    else:
        assert len(workers_of(server, cpus)) == cpus
        assert f"{cpus} workers" in server.log()
    assert request(server.port, "GET", "/healthz")[0] == 200
    assert server.stop() == 0


# ---- serving -------------------------------------------------------------------------


def test_connections_are_served_by_both_workers_and_metrics_sum_them(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes)
    pids = workers_of(server)
    create_key(server.port)
    owners: set[int] = set()
    made = 0
    for _ in range(10):  # rounds of 16 concurrent keep-alive connections
        conns = [
            http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(16)
        ]
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda c: encrypt(server.port, c), conns))
        made += len(statuses)
        assert statuses == [200] * 16
        by_client = socket_owners(server.port, pids)
        for conn in conns:
            owners.add(by_client[conn.sock.getsockname()[1]])
            conn.close()
        if len(owners) == 2:
            break
    assert owners == set(pids)  # every worker accepted and served some connections
    for _ in range(20):
        assert encrypt(server.port) == 200
    made += 20
    # Any worker answers the scrape, and it sees every worker's count.
    for _ in range(4):
        assert encrypts_counted(server.port) == made
    assert server.stop() == 0


def test_a_worker_killed_with_sigkill_is_replaced(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes)
    before = workers_of(server)
    create_key(server.port)
    for _ in range(10):
        assert encrypt(server.port) == 200
    os.kill(before[1], signal.SIGKILL)
    for _ in range(30):  # the survivor serves meanwhile; nothing is refused
        assert encrypt(server.port) == 200
    after = wait_for(
        lambda: (p := child_pids(server.proc.pid)) and len(p) == 2 and before[1] not in p and p,
        what="a replacement worker",
    )
    assert before[0] in after  # the other worker was left alone
    wait_for(lambda: "worker 1 started" in server.log(), what="the replacement to be ready")
    assert re.search(
        rf"worker 1 \(pid {before[1]}\) was killed by signal 9; restarting", server.log()
    )
    for _ in range(10):
        assert encrypt(server.port) == 200
    # The dead worker's counts stay in the totals.
    assert encrypts_counted(server.port) == 50
    assert server.stop() == 0


def test_sigterm_lets_a_slow_request_finish_then_exits_0(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes)
    pids = workers_of(server)
    body = json.dumps({"name": "inflight"}).encode()
    head = (
        "POST /v1/security/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body[:4])
        wait_for(lambda: sock.getsockname()[1] in socket_owners(server.port, pids), what="accept")
        server.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_for(refused, timeout=10, what="new connections to be refused")
        assert server.proc.poll() is None  # still running for the request in flight
        sock.sendall(body[4:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 201"), response
    assert server.proc.wait(40) == 0
    assert server.stop() == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    log = server.log()
    assert "qimem: stopped" in log and "Traceback" not in log


def test_sighup_replaces_every_worker_without_refusing_a_connection(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes, "--no-access-log")
    before = set(workers_of(server))
    create_key(server.port)
    clients = [Client(server.port) for _ in range(2)]
    for client in clients:
        client.start()
    wait_for(lambda: all(c.ok > 20 for c in clients), what="traffic before the reload")
    ok_before = sum(c.ok for c in clients)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in server.log(), timeout=60, what="the reload")
    ok_during = sum(c.ok for c in clients) - ok_before
    time.sleep(0.5)  # traffic after the reload, on the new workers only
    for client in clients:
        client.stop()
    assert [e for c in clients for e in c.errors] == []
    assert ok_during > 0
    after = set(workers_of(server))
    assert not after & before  # every worker was replaced
    log = server.log()
    assert log.count("reloaded (pid") == 2
    assert encrypts_counted(server.port) == sum(c.ok for c in clients)
    assert server.stop() == 0


def test_a_config_change_takes_effect_after_sighup_only(
    tmp_path: Path, initialized: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, initialized, processes, insecure=False)
    old = set(workers_of(server))
    local = f"127.0.0.1:{server.port}"
    assert request(server.port, "GET", "/healthz", host=local)[0] == 200
    config = tmp_path / "home" / "config.toml"
    config.write_text(config.read_text() + '\n[serve]\nallowed_hosts = ["qimem.example"]\n')
    time.sleep(0.5)
    assert request(server.port, "GET", "/healthz", host=local)[0] == 200  # not yet
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in server.log(), timeout=60, what="the reload")
    for _ in range(6):  # whichever worker answers
        assert request(server.port, "GET", "/healthz", host=local)[0] == 421
        assert request(server.port, "GET", "/healthz", host="qimem.example")[0] == 200
    assert not set(workers_of(server)) & old
    assert server.stop() == 0


def test_an_invalid_config_on_sighup_is_refused_and_the_workers_stay(
    tmp_path: Path, initialized: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, initialized, processes, insecure=False)
    before = workers_of(server)
    config = tmp_path / "home" / "config.toml"
    config.write_text(config.read_text() + "\n[serve]\nconnection_limit = -5\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in server.log(), what="the refusal")
    assert "connection_limit must be a whole number" in server.log()
    assert workers_of(server) == before
    assert request(server.port, "GET", "/healthz")[0] == 200
    assert server.stop() == 0


def test_the_purge_runs_once_per_server_not_once_per_worker(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    interval, window = 0.2, 3.0
    server = start(tmp_path, serve_env, processes, "--purge-interval", str(interval))
    workers_of(server)

    def runs() -> float:
        return metric(server.port, "qimem_background_job_runs_total", job="purge")

    wait_for(lambda: runs() >= 2, what="the purge to run")
    first, t0 = runs(), time.monotonic()
    time.sleep(window)
    second, elapsed = runs(), time.monotonic() - t0
    # One purger: at most one run per interval (two workers each purging: about twice that).
    assert 3 <= second - first <= elapsed / interval + 2
    assert server.stop() == 0


def test_metrics_dir_is_private_and_removed_and_workers_get_no_new_argv(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes)
    pids = workers_of(server)
    create_key(server.port)  # both workers have counted something by now ...
    for _ in range(8):
        encrypt(server.port)
    maps = Path(f"/proc/{pids[0]}/maps").read_text()  # ... in memory-mapped files there
    found = re.search(r"(/\S+)/counter_\d+\.db", maps)
    assert found, maps
    metrics_dir = Path(found.group(1))
    assert metrics_dir.is_dir() and metrics_dir.stat().st_mode & 0o777 == 0o700
    for pid in pids:  # core dumps stay off in every worker (qimem.hardening)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(r"Max core file size\s+0\s", limits), limits
    master_env = Path(f"/proc/{server.proc.pid}/environ").read_bytes()
    for pid in pids:  # forked, not re-executed: the master's own environment
        assert Path(f"/proc/{pid}/environ").read_bytes() == master_env
    master_argv = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
    for pid in pids:  # forked, not re-executed: the master's own command line
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == master_argv
    assert serve_env["QIMEM_ROOT_KEY"].encode() not in master_argv
    assert server.stop() == 0
    assert not metrics_dir.exists()


def test_workers_stop_when_the_master_is_killed(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, serve_env, processes)
    pids = workers_of(server)
    server.kill()
    wait_for(
        lambda: all(not Path(f"/proc/{pid}").exists() for pid in pids),
        timeout=15,
        what="orphaned workers to exit",
    )


# ---- attacks: failures at start, crash loops ----------------------------------------


def test_an_error_at_start_is_reported_once_with_the_single_process_status(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    # Bearer tokens on a store nobody initialized: no realm 'master'.
    single = ServeProcess(tmp_path, serve_env, name="single", insecure=False)
    processes.append(single)
    assert single.proc.wait(60) != 0
    server = ServeProcess(tmp_path, serve_env, "--workers", "2", insecure=False)
    processes.append(server)
    assert server.proc.wait(60) == single.proc.returncode
    log = server.log()
    assert log.count("no realm 'master'") == 1
    assert "Traceback" not in log and "serving on" not in log


def test_a_crash_loop_backs_off_and_the_master_gives_up(
    tmp_path: Path, initialized: dict[str, str], processes: list[ServeProcess]
) -> None:
    server = start(tmp_path, initialized, processes, "--no-access-log")
    pids = workers_of(server)
    # From now on a worker cannot start: the root key file is damaged.
    (tmp_path / "home" / "root.key").write_text("not a root key\n")
    master_cpu = cpu_seconds(server.proc.pid)
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    cpu = master_cpu
    while server.proc.poll() is None and time.monotonic() - t0 < 60:
        try:
            cpu = cpu_seconds(server.proc.pid)
        except (OSError, IndexError):
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    assert server.proc.wait(5) == 1
    log = server.log()
    assert "giving up" in log and "Traceback" not in log
    # The two kills restart at once if the workers had served 5 s (else they count too).
    delays = [float(d) for d in re.findall(r"restarting in ([\d.]+) s", log)]
    backoffs = [d for d in delays if d > 0]
    assert backoffs == sorted(backoffs) and backoffs[-1] >= 4 * backoffs[0]  # backed off ...
    assert len(delays) <= MAX_FAILURES + 1  # ... a bounded number of tries
    # The two slots back off side by side: the longer chain of waits (at least half of
    # them all, the last one cut short by giving up) passed before the master gave up.
    assert elapsed >= sum(backoffs[:-1]) / 2
    assert cpu - master_cpu < 0.25 * elapsed  # the master waited; it did not spin


def test_a_plugin_enabled_in_the_config_serves_after_sighup(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess]
) -> None:
    # The example third-party plugin, installed with real dist-info metadata on PYTHONPATH
    # (as in test_plugins_disabled.py), enabled only once the server runs.
    example = Path(__file__).resolve().parent.parent / "examples" / "qimem-plugin-aes-gcm-siv"
    site = tmp_path / "site"
    dist = site / "qimem_plugin_aes_gcm_siv-1.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qimem-plugin-aes-gcm-siv\nVersion: 1.0.0\n"
    )
    (dist / "entry_points.txt").write_text("[qimem]\naes-gcm-siv = qimem_plugin_aes_gcm_siv\n")
    serve_env["PYTHONPATH"] = os.pathsep.join([str(site), str(example / "src")])
    server = start(tmp_path, serve_env, processes)
    create_key(server.port)

    def create(name: str) -> int:
        body = {"name": name, "algorithm": "aes-256-gcm-siv"}
        return request(server.port, "POST", "/v1/security/keys", body)[0]

    assert create("siv-before") == 400
    config = tmp_path / "home" / "config.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text('[plugins]\nenabled = ["aes-gcm-siv"]\n')
    config.chmod(0o600)
    assert create("siv-not-yet") == 400
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in server.log(), timeout=60, what="the reload")
    for i in range(6):  # whichever worker answers
        assert create(f"siv-{i}") == 201
    assert encrypt(server.port) == 200  # the keys made before still work
    assert server.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_connection_accepted_just_before_a_stop_still_gets_its_answer(
    tmp_path: Path, serve_env: dict[str, str], processes: list[ServeProcess], workers: str
) -> None:
    """The race a reload runs into: a worker accepts a connection, then gets SIGTERM before
    the request's first byte arrives. The drain must not close it as an idle keep-alive."""
    server = start(tmp_path, serve_env, processes, workers=workers)
    pids = workers_of(server) if workers == "2" else [server.proc.pid]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        wait_for(lambda: sock.getsockname()[1] in socket_owners(server.port, pids), what="accept")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the drain has begun; the client has not spoken yet
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response
    assert server.proc.wait(40) == 0
