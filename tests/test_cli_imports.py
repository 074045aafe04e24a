"""A command imports only what it uses (issue 13, "Import only what a command uses").

Each test runs the real CLI in a fresh interpreter and reads ``sys.modules`` as it exits:
``qimem --version`` / ``--help`` load no service code, no cryptography and no entry-point
scan; ``encrypt``, ``decrypt`` and ``keys list`` on the embedded SQLite store load neither
SQLAlchemy nor Alembic; ``--server`` mode never loads SQLAlchemy; a third-party plugin's
entry points are read only when one is enabled.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_process import ServeProcess

from qimem.cli import COMMANDS

#: Runs the CLI, then (at exit, after click's SystemExit) writes sys.modules as JSON.
_PROBE = (
    "import atexit, json, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from qimem.cli import main\n"
    "main()\n"
)
_DATABASE = ("sqlalchemy", "alembic", "psycopg")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(home)
    return env


def modules_of(tmp_path: Path, env: dict[str, str], *args: str, stdin: bytes = b"") -> set[str]:
    """The modules a ``qimem ARGS`` process had imported when it exited (status 0)."""
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    return set(json.loads(out.read_text()))


def _loaded(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in prefixes or m in prefixes)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized home (SQLite store) with key ``k`` and a sealed file."""
    home = tmp_path_factory.mktemp("home")
    env = _env(home)
    qimem = [sys.executable, "-c", "from qimem.cli import main; main()"]
    for args in (["init"], ["keys", "create", "--name", "k"]):
        subprocess.run([*qimem, *args], env=env, check=True, capture_output=True, cwd=home)
    (home / "plain.txt").write_bytes(b"hi\n")
    subprocess.run(
        [*qimem, "encrypt", "--key", "k", str(home / "plain.txt"), "-o", str(home / "s.qimem")],
        env=env,
        check=True,
        capture_output=True,
        cwd=home,
    )
    return home


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_load_no_services(tmp_path: Path, home: Path, args: list[str]) -> None:
    modules = modules_of(tmp_path, _env(home), *args)
    assert not _loaded(modules, "cryptography", *_DATABASE)
    assert "importlib.metadata" not in modules  # no entry-point scan, no version lookup
    assert not {"qimem.app", "qimem.services", "qimem.registry", "pluggy"} & modules


@pytest.mark.parametrize(
    "args",
    [
        ["encrypt", "--key", "k", "-o", "-"],  # stdin
        ["encrypt", "--key", "k", "plain.txt", "-o", "out.qimem", "--force"],
        ["decrypt", "s.qimem", "-o", "out.txt", "--force"],
        ["keys", "list"],
        ["keys", "show", "k"],
    ],
)
def test_sqlite_hot_path_loads_no_sqlalchemy(tmp_path: Path, home: Path, args: list[str]) -> None:
    work = tmp_path
    for name in ("plain.txt", "s.qimem"):
        (work / name).write_bytes((home / name).read_bytes())
    modules = modules_of(work, _env(home), *args, stdin=b"hi\n")
    assert not _loaded(modules, *_DATABASE)
    assert "importlib.metadata" not in modules  # no third-party plugin enabled: no scan
    # Only the algorithm and store used were imported: not the SQLAlchemy store.
    assert "qimem.builtin_plugins.sql.store" not in modules
    assert "qimem.builtin_plugins.sql.sqlite" in modules


def test_enabled_plugin_scans_entry_points(tmp_path: Path, home: Path) -> None:
    """The entry points are read when a third-party plugin is enabled (here one that is
    not installed: the run fails naming it, after the scan)."""
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), "--plugin", "no-such-plugin", "keys", "list"],
        capture_output=True,
        env=_env(home),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no-such-plugin" in result.stderr.decode()
    assert "importlib.metadata" in set(json.loads(out.read_text()))


def test_server_mode_loads_no_sqlalchemy(tmp_path: Path) -> None:
    """``qimem --server URL encrypt|decrypt|keys list`` talks HTTP: no database code."""
    server_home = tmp_path / "server"
    server_home.mkdir()
    env = _env(server_home)
    subprocess.run(
        [sys.executable, "-c", "from qimem.cli import main; main()", "init"],
        env=env,
        check=True,
        capture_output=True,
        cwd=server_home,
    )
    server = ServeProcess(server_home, env).wait_ready()
    try:
        client_home = tmp_path / "client"
        client_home.mkdir()
        client = {**_env(client_home), "QIMEM_SERVER": server.url}
        modules_of(tmp_path, client, "keys", "create", "--name", "remote")
        sealed = tmp_path / "r.qimem"
        for args, stdin in (
            (["encrypt", "--key", "remote", "-o", str(sealed)], b"hi\n"),
            (["decrypt", str(sealed), "-o", str(tmp_path / "r.txt")], b""),
            (["keys", "list"], b""),
        ):
            modules = modules_of(tmp_path, client, *args, stdin=stdin)
            assert not _loaded(modules, *_DATABASE), args
        assert (tmp_path / "r.txt").read_bytes() == b"hi\n"
    finally:
        server.stop()


def test_lazy_command_table_matches_the_commands() -> None:
    """``qimem --help`` lists commands from the table: each entry names a real command
    whose own one-line help it repeats."""
    for name, (reference, short_help) in COMMANDS.items():
        module_name, _, attr = reference.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert command.name == name
        assert command.get_short_help_str(45) == short_help, name
