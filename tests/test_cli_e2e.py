"""The installed ``qimem`` console script, run as real subprocesses (a handful of launches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QIMEM = Path(sys.executable).parent / "qimem"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if not QIMEM.exists():
        pytest.fail(f"the qimem console script is not installed at {QIMEM}")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    clean["QIMEM_HOME"] = str(tmp_path / "home")
    return clean


def qimem(
    env: dict[str, str],
    *args: str,
    input: bytes | None = None,  # noqa: A002
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(QIMEM), *args], input=input, env=env, capture_output=True, timeout=60
    )


def test_init_create_and_pipe_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    init = qimem(env, "init")
    assert init.returncode == 0, init.stderr
    home = Path(env["QIMEM_HOME"])
    assert (home / "config.toml").is_file() and (home / "root.key").is_file()

    created = qimem(env, "keys", "create", "--name", "e2e", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["name"] == "e2e" and key["version"] == 1

    # encrypt | decrypt through a real OS pipe between two processes.
    plaintext = os.urandom(3000) + b"end"
    enc = subprocess.Popen(
        [str(QIMEM), "encrypt", "--key", "e2e"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    dec = subprocess.Popen(
        [str(QIMEM), "decrypt"],
        stdin=enc.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert enc.stdout is not None and enc.stdin is not None
    enc.stdout.close()  # only the decrypt process reads it now
    enc.stdin.write(plaintext)
    enc.stdin.close()
    out, dec_err = dec.communicate(timeout=60)
    enc_err = enc.stderr.read() if enc.stderr else b""
    enc.wait(timeout=60)
    if enc.stderr:
        enc.stderr.close()
    assert enc.returncode == 0, enc_err
    assert dec.returncode == 0, dec_err
    assert out == plaintext


def test_errors_exit_without_traceback(env: dict[str, str]) -> None:
    before_init = qimem(env, "keys", "list")
    assert before_init.returncode == 9
    assert before_init.stderr.decode().startswith("qimem: error: ")
    assert b"Traceback" not in before_init.stderr

    assert qimem(env, "init").returncode == 0
    garbage = qimem(env, "decrypt", input=b"definitely not ciphertext")
    assert garbage.returncode == 7
    assert garbage.stdout == b""
    lines = garbage.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimem: error: "), garbage.stderr
    assert b"Traceback" not in garbage.stderr

    missing = qimem(env, "keys", "show", "nobody")
    assert missing.returncode == 5
    assert b"Traceback" not in missing.stderr
    assert b"nobody" in missing.stderr
