"""qimem.hashing_processes: Argon2 in helper processes (``qimem serve``'s default), attacked
as a server operator would: the bound, a helper killed, the server killed, forks, secrets
in /proc, helpers that cannot start; and through a real ``qimem serve``."""

from __future__ import annotations

import json
import multiprocessing.spawn
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from identity_helpers import ADMIN_PASSWORD
from serve_process import ServeProcess, child_pids, home_env, qimem_process, wait_for

from qimem.errors import ConfigError
from qimem.hashing_processes import HashingProcesses, HelpersUnavailable
from qimem.identity.passwords import PasswordHashing
from qimem.identity.settings import IdentitySettings, server_settings, settings_from_mapping

PARAMS = (1, 64, 1)  # time cost, KiB, lanes: cheap
PASSWORD = "tangerine-quokka-4417"  # noqa: S105 (a test password)


@pytest.fixture
def helpers() -> HashingProcesses:
    made = HashingProcesses(1, PARAMS)
    yield made
    made.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_hashes_and_verifies_in_a_helper_process(helpers: HashingProcesses) -> None:
    stored = helpers.hash(PASSWORD)
    assert stored.startswith("$argon2id$v=19$m=64,t=1,p=1$")
    assert helpers.verify(stored, PASSWORD)
    assert not helpers.verify(stored, PASSWORD + "!")
    assert not helpers.verify("$argon2id$not-a-hash", PASSWORD)
    (pid,) = helpers.helper_pids()
    assert _parent(pid) == os.getpid()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_one_helper_hashes_one_at_a_time() -> None:
    heavy = HashingProcesses(1, (1, 16 * 1024, 1))
    try:
        stored = heavy.hash(PASSWORD)
        single = min(_timed(lambda: heavy.verify(stored, PASSWORD)) for _ in range(3))
        results: list[bool] = []
        threads = [
            threading.Thread(target=lambda: results.append(heavy.verify(stored, PASSWORD)))
            for _ in range(6)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = time.perf_counter() - started
        assert results == [True] * 6
        assert len(heavy.helper_pids()) == 1
        # Six hashes one after another, not three pairs on this machine's two cores.
        assert together >= 4.5 * single, (together, single)
    finally:
        heavy.close()


def _timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


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


def test_no_password_in_a_helpers_argv_or_environment_and_no_core_dumps(
    helpers: HashingProcesses,
) -> None:
    stored = helpers.hash(PASSWORD)
    assert helpers.verify(stored, PASSWORD)
    (pid,) = helpers.helper_pids()
    for name in ("cmdline", "environ"):
        assert PASSWORD.encode() not in Path(f"/proc/{pid}/{name}").read_bytes()
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4] == "0", core  # the soft limit


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
    hashing = PasswordHashing(
        IdentitySettings(
            argon2_runs_in="processes",
            argon2_time_cost=1,
            argon2_memory_kib=64,
            max_concurrent_hashes=1,
        )
    )
    assert hashing.helpers is not None
    stored = hashing.hash(PASSWORD)
    assert hashing.helpers.helper_pids()
    hashing.helpers.close()
    with pytest.raises(HelpersUnavailable):
        hashing.helpers.verify(stored, PASSWORD)
    assert hashing.verify(stored, PASSWORD)  # in the calling thread now
    assert hashing.helpers is None
    assert not hashing.verify(stored, "wrong password")


def test_helpers_that_cannot_run_fall_back_to_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every helper exits at once, as on a host where the interpreter cannot be started.
    monkeypatch.setattr(multiprocessing.spawn, "_python_exe", b"/bin/false")
    hashing = PasswordHashing(
        IdentitySettings(argon2_runs_in="processes", argon2_time_cost=1, argon2_memory_kib=64)
    )
    stored = hashing.hash(PASSWORD)
    assert hashing.helpers is None
    assert hashing.verify(stored, PASSWORD)


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
        if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def test_qimem_serve_hashes_logins_in_one_helper_and_stops_it(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    home = tmp_path / "home"
    done = qimem_process(home, "init", "--admin-password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    config = home / "config.toml"
    config.write_text(config.read_text() + "\n[identity]\nmax_concurrent_hashes = 1\n")
    server = ServeProcess(tmp_path, home_env(home), insecure=False)
    processes.append(server)
    server.wait_ready()

    def login(password: str) -> int:
        form = {"grant_type": "password", "username": "admin", "password": password}
        req = urllib.request.Request(
            f"{server.url}/v1/auth/realms/master/token",
            data=urllib.parse.urlencode(form).encode(),
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback)
                assert "access_token" in json.loads(resp.read())
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    assert login(ADMIN_PASSWORD) == 200
    assert login("not the password") == 401
    helpers = _helpers_of(server.proc.pid)
    assert len(helpers) == 1, helpers
    os.kill(helpers[0], signal.SIGKILL)
    assert login(ADMIN_PASSWORD) == 200  # a new helper
    (replacement,) = _helpers_of(server.proc.pid)
    assert replacement != helpers[0]
    assert server.stop() == 0
    wait_for(lambda: not alive(replacement), timeout=10, what="the helper to stop")
    assert "Traceback" not in server.log()
