"""The installed ``qimem`` console script, run as real subprocesses (a handful of launches)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QIMEM = Path(sys.executable).parent / "qimem"
REPO = Path(__file__).resolve().parent.parent


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


def _readme_demo() -> str:
    """The README's first command, without its ``pip install . &&`` and QIMEM_HOME export."""
    text = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", text, re.S)
    assert first, "README.md should open with a bash block"
    steps = [s.strip() for s in first.group(1).split("&&")]
    assert steps[0].startswith("pip install"), steps
    return " && ".join(s for s in steps[1:] if not s.startswith("export QIMEM_HOME"))


def test_readme_demo_and_binary_pipe(env: dict[str, str], tmp_path: Path) -> None:
    """The README demo as a user's shell runs it, then binary data through a real pipe."""
    env = {**env, "PATH": f"{QIMEM.parent}{os.pathsep}{env.get('PATH', '')}"}
    demo = subprocess.run(
        ["bash", "-c", "set -o pipefail; " + _readme_demo()],
        env=env,
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.decode().splitlines()[-1] == "attack at dawn"
    home = Path(env["QIMEM_HOME"])
    assert (home / "config.toml").is_file() and (home / "root.key").is_file()

    data = tmp_path / "blob.bin"
    data.write_bytes(os.urandom(5000) + b"\r\n\x00end")
    piped = subprocess.run(
        [
            "bash",
            "-c",
            'set -o pipefail; qimem encrypt --key demo < "$1" | qimem decrypt',
            "-",
            str(data),
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == data.read_bytes()


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


def test_cli_import_stays_light(tmp_path: Path) -> None:
    """``qimem --help`` must not pay for the store, identity or HTTP layers: they are
    imported by the commands that use them."""
    heavy = ("sqlalchemy", "alembic", "psycopg", "falcon", "waitress", "jwt", "argon2")
    heavy += ("qimem.identity", "qimem.server", "qimem.services.identity")
    program = (
        "import sys, qimem.cli\n"
        f"heavy = {heavy!r}\n"
        "print(sorted({m for m in sys.modules if m.startswith(heavy)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
