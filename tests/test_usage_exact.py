"""One-shot processes do one-shot work (issue 13): usage counts are true.

A ``qimem encrypt`` process wraps exactly one data key per input (no throw-away key for the
up-front check) and reserves exactly the usage counts it consumes, so N CLI encryptions
show a usage of exactly N and ``--usage-limit 3`` lets three processes share version 1.
A long-lived app (a server) reserves in blocks; the stored count then exceeds what was
really encrypted by at most the unused part of its live reservations, and closing the app
gives that part back (docs/keys.md "Usage limits").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qimem import services
from qimem.app import AppContext
from qimem.config import Config
from qimem.rootkey import encode_root_key, generate_root_key
from qimem.services import lifecycle

_QIMEM = [sys.executable, "-c", "from qimem.cli import main; main()"]


def _qimem(home: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(home)
    result = subprocess.run(
        [*_QIMEM, *args], input=stdin, capture_output=True, env=env, cwd=home, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    return result


def _policy(home: Path, key: str = "k") -> dict[str, Any]:
    return json.loads(_qimem(home, "keys", "policy", key, "--json").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    _qimem(home, "init")
    _qimem(home, "keys", "create", "--name", "k")
    return home


def test_n_cli_encryptions_count_exactly_n(home: Path) -> None:
    """Files, several files in one process, and standard input: one count per input."""
    for i in range(3):
        (home / f"f{i}.txt").write_bytes(b"x" * i)
    _qimem(home, "encrypt", "--key", "k", str(home / "f0.txt"))
    _qimem(home, "encrypt", "--key", "k", str(home / "f1.txt"), str(home / "f2.txt"))
    _qimem(home, "encrypt", "--key", "k", "-o", str(home / "in.qimem"), stdin=b"hi")
    assert _policy(home)["usage"] == {"1": 4}


def test_usage_limit_is_shared_by_cli_processes(home: Path) -> None:
    """``--usage-limit 3``: three one-shot processes use version 1; the fourth finds it
    at its limit, rotates, and seals with version 2."""
    _qimem(home, "keys", "policy", "k", "--usage-limit", "3")
    for i in range(3):
        _qimem(home, "encrypt", "--key", "k", "-o", str(home / f"{i}.qimem"), stdin=b"m")
    shown = json.loads(_qimem(home, "keys", "show", "k", "--json").stdout)
    assert [v["version"] for v in shown["versions"]] == [1]
    assert _policy(home)["usage"] == {"1": 3}
    _qimem(home, "encrypt", "--key", "k", "-o", str(home / "3.qimem"), stdin=b"m")
    shown = json.loads(_qimem(home, "keys", "show", "k", "--json").stdout)
    assert [(v["version"], v["state"]) for v in shown["versions"]] == [
        (1, "decrypt-only"),
        (2, "active"),
    ]
    assert _policy(home)["usage"] == {"1": 3, "2": 1}
    for i in range(4):
        opened = _qimem(home, "decrypt", str(home / f"{i}.qimem"), "-o", "-")
        assert opened.stdout == b"m"


@pytest.fixture
def server_app(tmp_path: Path) -> AppContext:
    """A long-lived app (as ``qimem serve`` builds it): block reservations."""
    config = Config(
        store_url=f"sqlite:///{tmp_path / 'qimem.db'}",
        root_key_b64=encode_root_key(generate_root_key()),
    )
    return AppContext(config).open()


def _usage(app: AppContext, ref: str = "k") -> int:
    return sum(lifecycle.key_usage(app, ref).values())


def test_server_over_count_is_bounded_and_given_back(server_app: AppContext) -> None:
    app = server_app
    services.create_key(app, name="k")
    block = lifecycle.settings(app).usage_reserve_block
    for _ in range(5):
        services.encrypt(app, "k", b"m")
    # Reserved in a block: the count exceeds the 5 real ones by the unused rest only.
    assert 5 <= _usage(app) <= 5 + (block - 5)
    # A dropped cache entry (another server rotated something) gives its rest back on
    # the next miss; the new entry reserves a fresh block.
    app.cache.clear()
    services.encrypt(app, "k", b"m")
    assert 6 <= _usage(app) <= 6 + (block - 1)
    app.close()
    reopened = AppContext(app.config).open()
    try:
        assert _usage(reopened) == 6  # closing gave every unused count back
    finally:
        reopened.close()


def test_one_shot_app_reserves_what_it_uses(tmp_path: Path) -> None:
    """A one-shot app starts at one count and grows while it keeps encrypting: at any
    moment at most as many unused counts as it used."""
    config = Config(
        store_url=f"sqlite:///{tmp_path / 'qimem.db'}",
        root_key_b64=encode_root_key(generate_root_key()),
    )
    app = AppContext(config, one_shot=True).open()
    try:
        services.create_key(app, name="k")
        services.encrypt(app, "k", b"m")
        assert _usage(app) == 1
        for used in range(2, 40):
            services.encrypt(app, "k", b"m")
            assert used <= _usage(app) <= 2 * used
    finally:
        app.close()
    reopened = AppContext(config).open()
    try:
        assert _usage(reopened) == 39
    finally:
        reopened.close()


def test_server_mode_cli_wraps_one_data_key_per_input(home: Path) -> None:
    """``qimem --server`` encrypt: the up-front key check fetches the data key the input
    then uses (none wrapped for nothing); once the server has stopped (giving its unused
    block back) the usage is exactly the number of inputs."""
    from serve_process import ServeProcess

    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(home)
    server = ServeProcess(home, env).wait_ready()
    try:
        client = home / "client"
        client.mkdir()
        for i in range(3):
            (client / f"f{i}.txt").write_bytes(b"x")
        args = ["--server", server.url, "encrypt", "--key", "k"]
        _qimem(client, *args, str(client / "f0.txt"))
        _qimem(client, *args, str(client / "f1.txt"), str(client / "f2.txt"))
        _qimem(client, *args, "-o", str(client / "in.qimem"), stdin=b"hi")
    finally:
        assert server.stop() == 0
    assert _policy(home)["usage"] == {"1": 4}


def test_parallel_cli_encryptions_count_exactly(home: Path) -> None:
    """``--jobs 2``: the worker processes reserve as one-shot processes and give back what
    they did not use when they exit."""
    files = []
    for i in range(6):
        path = home / f"p{i}.txt"
        path.write_bytes(b"x" * 1000)
        files.append(str(path))
    _qimem(home, "encrypt", "--key", "k", "--jobs", "2", *files)
    assert _policy(home)["usage"] == {"1": 6}
