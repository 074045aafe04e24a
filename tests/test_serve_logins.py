"""``qimem serve`` keeps logins from taking every worker thread: logins hashing plus logins
waiting for a hashing slot are held to ``--threads - 1`` (qimem.identity.settings.
bounded_by_threads), so during a login flood one thread always serves other requests and
the surplus logins get 503 ``login_busy`` at once instead of queueing on every thread."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import falcon
import falcon.testing
import pytest
import requests
from identity_helpers import ADMIN_PASSWORD

from qimem.errors import QimemError, StoreUnavailableError
from qimem.identity.passwords import LoginBusyError
from qimem.identity.settings import IdentitySettings, bounded_by_threads
from qimem.server.errors import handle_qimem_error


@pytest.mark.parametrize(
    ("threads", "concurrent", "waiting", "expected"),
    [
        (4, 1, 16, (1, 2)),  # the defaults on 2 cores under the default 4 threads
        (4, 2, 16, (2, 1)),
        (8, 1, 16, (1, 6)),
        (64, 2, 16, (2, 16)),  # enough threads: the configured bounds stand
        (2, 4, 16, (1, 0)),
        (1, 1, 16, (1, 16)),  # one thread: nothing can be kept free
    ],
)
def test_login_bounds_leave_one_thread_free(
    threads: int, concurrent: int, waiting: int, expected: tuple[int, int]
) -> None:
    settings = IdentitySettings(max_concurrent_hashes=concurrent, max_waiting_hashes=waiting)
    bounded = bounded_by_threads(settings, threads)
    assert (bounded.max_concurrent_hashes, bounded.max_waiting_hashes) == expected
    assert bounded.argon2_memory_kib == settings.argon2_memory_kib  # nothing else changes


def _run(env: dict[str, str], cwd: Path, *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_login_flood_gets_503_instead_of_every_thread(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(tmp_path / "home")
    _run(env, tmp_path, "init", "--admin-password-stdin", stdin=ADMIN_PASSWORD + "\n")
    with (tmp_path / "home" / "config.toml").open("a") as fh:
        # Slow hashes (~0.1-0.3 s each) so that the logins below overlap for certain.
        fh.write("\n[identity]\nargon2_memory_kib = 65536\nargon2_time_cost = 4\n")
    serve = subprocess.Popen(
        [sys.executable, "-c", "from qimem.cli import main; main()", "serve", "--port", "0"]
        + ["--threads", "2", "--no-access-log"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stderr is not None
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", serve.stderr.readline())
        assert found, "qimem serve did not start"
        url = found.group(1) + "/v1/auth/realms/master/token"
        form = {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD}

        def login(_: int) -> tuple[int, str]:
            answer = requests.post(url, data=form, timeout=60)
            code = answer.json().get("error", {}).get("code", "")
            if code == "login_busy":  # a slot frees within one login: retry soon
                assert answer.headers["Retry-After"] == "1"
            return answer.status_code, code

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(login, range(6)))
    finally:
        serve.terminate()
        serve.wait(20)
    # With 2 threads: 1 login hashing, none waiting; the others are refused at once.
    # (Unbounded, 16 could wait: all 6 would succeed, one after the other.)
    assert (200, "") in answers
    assert (503, "login_busy") in answers
    assert set(answers) <= {(200, ""), (503, "login_busy")}


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [(LoginBusyError("busy"), "1"), (StoreUnavailableError("the key store is unavailable"), "5")],
)
def test_503_answers_say_when_to_retry(error: QimemError, retry_after: str) -> None:
    resp = falcon.Response()
    handle_qimem_error(falcon.testing.create_req(), resp, error, {})
    assert resp.status_code == 503
    assert resp.get_header("Retry-After") == retry_after
    assert resp.media == {"error": {"code": error.code, "message": error.message}}
