"""qimem.hashing_processes: Argon2 in helper processes (``qimem serve``'s default), attacked
as a server operator would: the bound, a helper killed, the server killed, forks, secrets
in /proc, helpers that cannot start; and through a real ``qimem serve``."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from identity_helpers import ADMIN_PASSWORD
from serve_process import ServeProcess, alive, child_pids, home_env, qimem_process, wait_for

from qimem import hashing_processes
from qimem.errors import ConfigError, ValidationError
from qimem.hashing_processes import HashingProcesses, HelpersUnavailable, JobRefused
from qimem.identity.passwords import LoginBusyError, PasswordHashing
from qimem.identity.settings import IdentitySettings, server_settings, settings_from_mapping

PARAMS = (1, 64, 1)  # time cost, KiB, lanes: cheap
PASSWORD = "tangerine-quokka-4417"  # noqa: S105 (a test password)


@pytest.fixture
def helpers() -> HashingProcesses:
    made = HashingProcesses(1, PARAMS)
    yield made
    made.close()


def test_hashes_and_verifies_in_a_helper_process(helpers: HashingProcesses) -> None:
    stored = helpers.hash(PASSWORD)
    assert stored.startswith("$argon2id$v=19$m=64,t=1,p=1$")
    assert helpers.verify(stored, PASSWORD)
    assert not helpers.verify(stored, PASSWORD + "!")
    assert not helpers.verify("$argon2id$not-a-hash", PASSWORD)
    (pid,) = helpers.helper_pids()
    assert pid in child_pids(os.getpid())


def test_never_more_helpers_than_slots() -> None:
    helpers = HashingProcesses(2, PARAMS)
    try:
        stored = helpers.hash(PASSWORD)
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: helpers.verify(stored, PASSWORD), range(12)))
        assert results == [True] * 12
        # Each helper is one process hashing one job at a time: the bound is their number.
        assert 1 <= len(helpers.helper_pids()) <= 2
        assert len(_helpers_of(os.getpid())) == len(helpers.helper_pids())
    finally:
        helpers.close()


def test_a_killed_helper_is_replaced_and_the_login_still_answers(
    helpers: HashingProcesses,
) -> None:
    stored = helpers.hash(PASSWORD)
    (pid,) = helpers.helper_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the helper to die")
    assert helpers.verify(stored, PASSWORD)
    assert helpers.helper_pids() and pid not in helpers.helper_pids()


_SERVER = """
import sys, time
from qimem.hashing_processes import HashingProcesses
helpers = HashingProcesses(1, (1, 64, 1))
assert helpers.verify(helpers.hash("x" * 12), "x" * 12)
print(helpers.helper_pids()[0], flush=True)
time.sleep(120)
"""


def test_helpers_exit_when_their_server_process_is_killed(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        pid = int(server.stdout.readline())
        assert alive(pid)
        server.kill()
        server.wait(10)
        wait_for(lambda: not alive(pid), timeout=10, what="the orphaned helper to exit")
    finally:
        server.kill()
        server.wait(10)


def test_a_helper_gets_no_environment_no_secrets_and_no_core_dumps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QIMEM_ROOT_KEY", "c2VjcmV0LXJvb3Qta2V5LXRoYXQtbXVzdC1zdGF5")
    monkeypatch.delenv("QIMEM_ALLOW_CORE_DUMPS", raising=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    try:  # a helper that merely inherited this limit would have core dumps on
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pytest.skip("cannot raise the core limit here (not root)")
    if os.geteuid() != 0:  # a non-dumpable process's /proc files are root's
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
        pytest.skip("reading a helper's /proc files needs root")
    try:
        helpers = HashingProcesses(1, PARAMS)
        stored = helpers.hash(PASSWORD)
        assert helpers.verify(stored, PASSWORD)
        (pid,) = helpers.helper_pids()
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    try:
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""
        assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file"))
        assert core.split()[4] == "0", core  # the soft limit, set by the helper itself
        fds = os.listdir(f"/proc/{pid}/fd")
        assert sorted(fds, key=int)[:3] == ["0", "1", "2"]
        assert len(fds) <= 6, fds  # its pipes and stdio, none of the server's sockets
    finally:
        helpers.close()


def test_a_password_that_is_not_unicode_is_refused_and_the_helper_lives(
    helpers: HashingProcesses,
) -> None:
    stored = helpers.hash(PASSWORD)
    (pid,) = helpers.helper_pids()
    with pytest.raises(JobRefused):
        helpers.verify(stored, "\ud800" * 9)
    assert helpers.helper_pids() == [pid] and helpers.verify(stored, PASSWORD)
    hashing = _hashing()
    try:
        stored = hashing.hash(PASSWORD)
        assert not hashing.verify(stored, "\udfff" * 9)
        with pytest.raises(ValidationError, match="valid Unicode"):
            hashing.hash("\ud800" * 9)
        assert hashing.helpers is not None and hashing.verify(stored, PASSWORD)
    finally:
        hashing.close()


def _hashing(**overrides: object) -> PasswordHashing:
    settings = {
        "argon2_runs_in": "processes",
        "argon2_time_cost": 1,
        "argon2_memory_kib": 64,
        "max_concurrent_hashes": 1,
    }
    settings.update(overrides)
    return PasswordHashing(IdentitySettings(**settings))  # type: ignore[arg-type]


def test_a_hung_helper_is_killed_and_the_login_is_busy_not_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashing = _hashing()
    try:
        stored = hashing.hash(PASSWORD)  # the helper has started (at the normal timeout)
        assert hashing.helpers is not None
        (pid,) = hashing.helpers.helper_pids()
        monkeypatch.setattr(hashing_processes, "HELPER_TIMEOUT", 1.0)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(LoginBusyError):
            hashing.verify(stored, PASSWORD)
        assert time.monotonic() - started < 10
        wait_for(lambda: not alive(pid), what="the hung helper to be killed")
        monkeypatch.undo()  # a new helper may take over a second to start on a busy machine
        assert hashing.verify(stored, PASSWORD)
    finally:
        hashing.close()


def test_the_bound_and_login_busy_hold_with_helpers() -> None:
    # 1 hashing place + 1 waiting place: of three simultaneous logins one is refused at once.
    # Each hash about half a second: the third login arrives while the first two are in.
    hashing = _hashing(argon2_memory_kib=64 * 1024, argon2_time_cost=8, max_waiting_hashes=1)
    try:
        stored = hashing.hash(PASSWORD)
        start = threading.Barrier(3)

        def login(_: int) -> str:
            start.wait()
            try:
                return "ok" if hashing.verify(stored, PASSWORD) else "no"
            except LoginBusyError:
                return "busy"

        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(login, range(3)))
        assert sorted(outcomes) == ["busy", "ok", "ok"]
        assert hashing.helpers is not None and len(hashing.helpers.helper_pids()) == 1
    finally:
        hashing.close()


def test_a_forked_child_starts_its_own_helpers(helpers: HashingProcesses) -> None:
    stored = helpers.hash(PASSWORD)
    before = helpers.helper_pids()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's result is its exit status
        ok = helpers.verify(stored, PASSWORD) and helpers.helper_pids() != before
        helpers.close()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert helpers.helper_pids() == before and helpers.verify(stored, PASSWORD)


def test_closed_helpers_refuse_and_password_hashing_falls_back_to_threads() -> None:
    hashing = _hashing()
    assert hashing.helpers is not None
    stored = hashing.hash(PASSWORD)
    old = hashing.helpers
    (pid,) = old.helper_pids()
    old.close()
    assert not alive(pid)  # killed and reaped before close returned
    with pytest.raises(HelpersUnavailable):
        old.verify(stored, PASSWORD)
    assert hashing.verify(stored, PASSWORD)  # in the calling thread now
    assert hashing.helpers is None
    assert not hashing.verify(stored, "wrong password")


@pytest.mark.parametrize("interpreter", ["/nonexistent/python3", "/bin/false"])
def test_helpers_that_cannot_run_fall_back_to_threads(
    monkeypatch: pytest.MonkeyPatch, interpreter: str
) -> None:
    # No interpreter at all, or one that exits at once: hashing goes on in the thread.
    monkeypatch.setattr(sys, "executable", interpreter)
    hashing = _hashing()
    stored = hashing.hash(PASSWORD)
    assert hashing.helpers is None
    assert hashing.verify(stored, PASSWORD)
    assert not _helpers_of(os.getpid())


def test_no_executable_falls_back_and_odd_sys_path_entries_are_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "path", [*sys.path, Path("/not/a/str"), b"/bytes"])
    helpers = HashingProcesses(1, PARAMS)
    try:
        assert helpers.verify(helpers.hash(PASSWORD), PASSWORD)  # only str entries are sent
    finally:
        helpers.close()
    monkeypatch.setattr(sys, "executable", None)  # an embedded interpreter
    hashing = _hashing()
    assert hashing.verify(hashing.hash(PASSWORD), PASSWORD)
    assert hashing.helpers is None


def test_a_helper_that_breaks_the_protocol_is_replaced(helpers: HashingProcesses) -> None:
    # What a stray line on a helper's stdout would do: the answers no longer match the jobs.
    stored = helpers.hash(PASSWORD)
    (pid,) = helpers.helper_pids()
    (helper,) = helpers._helpers
    helper._next_id += 5  # the next job's id is one the helper will not echo in order
    helper.pending.append(hashing_processes.Future())  # an answer it would get first
    helper.pending[-1].job_id = helper._next_id - 2  # type: ignore[attr-defined]
    assert helpers.verify(stored, PASSWORD)  # answered by a new helper
    wait_for(lambda: not alive(pid), what="the broken helper to be killed")


def test_where_argon2_runs_is_a_setting() -> None:
    assert IdentitySettings().argon2_runs_in == "auto"
    assert PasswordHashing(IdentitySettings()).helpers is None  # the CLI and the library
    assert server_settings(IdentitySettings(), 8).argon2_runs_in == "processes"
    threads = settings_from_mapping({"argon2_runs_in": "threads"})
    assert server_settings(threads, 8).argon2_runs_in == "threads"
    with pytest.raises(ConfigError, match="argon2_runs_in must be one of"):
        settings_from_mapping({"argon2_runs_in": "gpu"})


def _helpers_of(pid: int) -> list[int]:
    return [
        p
        for p in child_pids(pid)
        if b"qimem.hashing_processes" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def _home(tmp_path: Path) -> Path:
    """A home made by ``qimem init`` with one hashing slot per server process."""
    home = tmp_path / "home"
    done = qimem_process(home, "init", "--admin-password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    config = home / "config.toml"
    config.write_text(config.read_text() + "\n[identity]\nmax_concurrent_hashes = 1\n")
    return home


def _call(url: str, path: str, body: dict[str, object], token: str = "") -> tuple[int, dict]:
    """POST JSON to ``url``/v1/auth/realms/master/``path``: (status, answer)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"{url}/v1/auth/realms/master/{path}",
        data=json.dumps(body).encode(),  # a lone surrogate goes as a \udXXX escape
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback)
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def _login(url: str, password: str = ADMIN_PASSWORD) -> tuple[int, dict]:
    return _call(
        url, "token", {"grant_type": "password", "username": "admin", "password": password}
    )


def test_qimem_serve_hashes_logins_in_one_helper_and_stops_it(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    server = ServeProcess(tmp_path, home_env(_home(tmp_path)), insecure=False)
    processes.append(server)
    server.wait_ready()

    def call(path: str, body: dict[str, object], token: str = "") -> tuple[int, dict]:
        return _call(server.url, path, body, token)

    def login(password: str) -> tuple[int, dict]:
        return _login(server.url, password)

    status, answer = login(ADMIN_PASSWORD)
    assert status == 200
    token = answer["access_token"]
    assert login("not the password")[0] == 401
    (helper,) = _helpers_of(server.proc.pid)
    assert login("\ud800" * 9)[0] == 401
    status, answer = call(
        "users", {"username": "eve", "password": "Vx9#qTr7!mLp\udfffZk2$wN8@"}, token
    )
    assert (status, answer["error"]["code"]) == (400, "invalid_password"), answer
    assert _helpers_of(server.proc.pid) == [helper]  # the helper still serves
    os.kill(helper, signal.SIGKILL)
    assert login(ADMIN_PASSWORD)[0] == 200  # a new helper
    (replacement,) = _helpers_of(server.proc.pid)
    assert replacement != helper
    assert server.stop() == 0
    wait_for(lambda: not alive(replacement), timeout=10, what="the helper to stop")
    assert "Traceback" not in server.log()


def test_workers_have_their_own_helpers_and_a_reload_or_stop_ends_them(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    server = ServeProcess(tmp_path, home_env(_home(tmp_path)), "--workers", "2", insecure=False)
    processes.append(server)
    server.wait_ready()
    workers = wait_for(lambda: (w := child_pids(server.proc.pid)) and len(w) == 2 and w)

    def helpers() -> list[int]:
        return [h for w in workers for h in _helpers_of(w)]  # type: ignore[union-attr]

    for _ in range(6):  # new connections: both workers are likely to serve one
        assert _login(server.url)[0] == 200
    before = helpers()
    assert 1 <= len(before) <= 2  # one per worker that hashed, never more
    assert not _helpers_of(server.proc.pid)  # the master never hashes
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in server.log(), timeout=60, what="the reload")
    wait_for(lambda: not any(alive(h) for h in before), what="the old workers' helpers to end")
    assert _login(server.url)[0] == 200
    workers = child_pids(server.proc.pid)
    after = helpers()
    assert after and not set(after) & set(before)
    assert server.stop() == 0
    wait_for(lambda: not any(alive(h) for h in after), timeout=10, what="the helpers to end")
