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


#: Not needed by a one-shot encrypt or decrypt (issue 13): logging loads on the first log
#: record (qimem.lazylog), the stream's header MAC is cryptography's HMAC (no hashlib), and
#: a short option such as -o or -q is matched without click's difflib suggestion detour;
#: key events and the key-management services load when a key is created or rotated.
_NOT_ON_THE_FILE_PATH = (
    "logging",
    "hashlib",
    "hmac",
    "_hashlib",
    "difflib",
    "qimem.events",
    "qimem.services.keys",
)


@pytest.mark.parametrize(
    "args",
    [
        ["encrypt", "--key", "k", "-q", "-o", "-"],  # stdin
        ["encrypt", "--key", "k", "plain.txt", "-o", "out.qimem", "--force", "-q"],
        ["decrypt", "s.qimem", "-o", "out.txt", "--force"],
        ["decrypt", "-o", "-"],  # stdin
    ],
)
def test_file_path_loads_only_what_it_uses(tmp_path: Path, home: Path, args: list[str]) -> None:
    for name in ("plain.txt", "s.qimem"):
        (tmp_path / name).write_bytes((home / name).read_bytes())
    stdin = (home / "s.qimem").read_bytes() if args[0] == "decrypt" else b"hi\n"
    modules = modules_of(tmp_path, _env(home), *args, stdin=stdin)
    assert not set(_NOT_ON_THE_FILE_PATH) & modules


def test_short_options_parse_as_before(tmp_path: Path, home: Path) -> None:
    """The direct short-option match (qimem.cli.context.Command) changes no parse: -o alone,
    -q and -o combined, -o glued to its value, and an unknown short option still fails."""
    (tmp_path / "s.qimem").write_bytes((home / "s.qimem").read_bytes())
    qimem = [sys.executable, "-c", "from qimem.cli import main; main()"]
    for args, out in (
        (["-o", "a.txt"], "a.txt"),
        (["-qo", "b.txt"], "b.txt"),
        (["-oc.txt"], "c.txt"),
    ):
        subprocess.run(
            [*qimem, "decrypt", "s.qimem", *args], env=_env(home), cwd=tmp_path, check=True
        )
        assert (tmp_path / out).read_bytes() == b"hi\n"
    bad = subprocess.run(
        [*qimem, "decrypt", "s.qimem", "-x"], env=_env(home), cwd=tmp_path, capture_output=True
    )
    assert bad.returncode == 2
    assert b"no such option '-x'" in bad.stderr


def test_lazy_logger_is_the_named_logger(caplog: pytest.LogCaptureFixture) -> None:
    """A lazy logger's records are the real logger's: levels, handlers and caplog apply."""
    import logging

    from qimem.lazylog import get_logger

    log = get_logger("qimem.test_lazylog")
    with caplog.at_level(logging.WARNING, logger="qimem.test_lazylog"):
        log.warning("could not return %d unused usage counts", 3)
        log.debug("not shown")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("qimem.test_lazylog", "WARNING", "could not return 3 unused usage counts")
    ]
    assert log.isEnabledFor(logging.WARNING)


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
