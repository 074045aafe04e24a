"""Issue 13, item 5: the CLI behaves the way a user expects (through the real CLI).

Usage errors in the house format, a progress bar that moves inside a large file,
``decrypt FILE -o -``, a terminal on standard input, rewrap's summary, no empty --out-dir,
the ``--realm`` hint, and create_key's realm check.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from identity_helpers import ADMIN_PASSWORD, password_login, serving, with_identity

from qimem import batch, batch_progress, services
from qimem.app import AppContext
from qimem.cli import cli
from qimem.cli.qauth import qauth
from qimem.errors import NotFoundError
from qimem.services import identity as ids

QIMEM = Path(sys.executable).with_name("qimem")


def run(*args: str, input: bytes | None = None, group=cli) -> Result:  # type: ignore[no-untyped-def]  # noqa: A002
    prog = "qauth" if group is qauth else "qimem"
    return CliRunner().invoke(
        group, list(args), input=input, catch_exceptions=False, prog_name=prog
    )


def ok(*args: str, input: bytes | None = None, group=cli) -> Result:  # type: ignore[no-untyped-def]  # noqa: A002
    result = run(*args, input=input, group=group)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


@pytest.fixture
def home(qimem_home: Path) -> Path:
    ok("init")
    ok("keys", "create", "--name", "k")
    return qimem_home


# -- usage errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment", "hint"),
    [
        (["no-such-command"], "no such command 'no-such-command'", "qimem --help"),
        (["encrypt"], "missing option '--key'", "qimem encrypt --help"),
        (["encrypt", "--key", "k", "--jobs", "0"], "--jobs", "qimem encrypt --help"),
        (["keys", "list", "--bogus-flag"], "no such option '--bogus-flag'", "qimem keys list"),
        (["--bogus-root-flag"], "no such option '--bogus-root-flag'", "qimem --help"),
        (["keys", "show"], "missing argument 'KEY'", "qimem keys show --help"),
    ],
)
def test_usage_errors_in_the_house_format(
    home: Path, args: list[str], fragment: str, hint: str
) -> None:
    result = run(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("qimem: error: ") and fragment in lines[0], result.stderr
    assert len(lines) == 2 and hint in lines[1], result.stderr  # one short hint line
    assert "Usage:" not in result.stderr and "Error:" not in result.stderr
    assert result.stdout == ""


def test_qauth_usage_errors_in_the_house_format(home: Path) -> None:
    result = run("user", "add", group=qauth)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "qauth: error: missing argument 'USERNAME'", result.stderr
    assert lines[1] == "Try 'qauth user add --help' for help."


def test_usage_error_in_a_real_process(qimem_home: Path) -> None:
    done = subprocess.run(
        [str(QIMEM), "encrypt", "--nope"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("qimem: error: no such option '--nope'"), done.stderr
    assert "Usage:" not in done.stderr


# -- progress inside a large file ----------------------------------------------------


def _big(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_moves_inside_a_large_file(
    sqlite_app: AppContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    size = 4 << 20
    monkeypatch.setattr(batch_progress, "PROGRESS_BYTES", 256 << 10)
    monkeypatch.setattr(batch, "SPLIT_BYTES", 1 << 20)
    monkeypatch.setattr(batch, "RANGE_BYTES", 512 << 10)
    services.create_key(sqlite_app, name="k")
    src = _big(tmp_path, size)
    updates: list[tuple[int, int]] = []
    tasks = batch.plan([src], batch.ENCRYPT)
    result = batch.run(
        sqlite_app,
        tasks,
        batch.ENCRYPT,
        key_ref="k",
        jobs=jobs,
        progress=lambda b, f: updates.append((b, f)),
    )
    assert not result.failures
    inside = [b for b, f in updates if f == 0 and b > 0]
    assert len(inside) >= 4, updates  # the bar moves before the file is done
    assert sum(b for b, _ in updates) == size  # bytes, exactly the input's size
    assert sum(f for _, f in updates) == 1 and updates[-1][1] == 1
    # Decrypting reports as it reads, too.
    updates.clear()
    sealed = Path(str(src) + ".qimem")
    src.unlink()
    tasks = batch.plan([sealed], batch.DECRYPT)
    batch.run(
        sqlite_app, tasks, batch.DECRYPT, jobs=jobs, progress=lambda b, f: updates.append((b, f))
    )
    assert len([b for b, f in updates if f == 0 and b > 0]) >= 4, updates
    assert sum(b for b, _ in updates) == sealed.stat().st_size


# -- standard output and standard input --------------------------------------------


def test_decrypt_file_to_standard_output(home: Path, tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_bytes(b"dear diary\n" * 1000)
    ok("encrypt", "--key", "k", str(plain))
    plain.unlink()
    result = ok("decrypt", str(tmp_path / "notes.txt.qimem"), "-o", "-")
    assert result.stdout_bytes == b"dear diary\n" * 1000
    assert not plain.exists()  # nothing written beside the input
    # Several inputs cannot share standard output; a missing input is one clear error.
    two = run("decrypt", str(tmp_path / "notes.txt.qimem"), str(tmp_path / "x"), "-o", "-")
    assert two.exit_code == 3 and "one input file" in two.stderr
    gone = run("decrypt", str(tmp_path / "missing.qimem"), "-o", "-")
    assert gone.exit_code == 3 and "no such file" in gone.stderr


def test_decrypt_to_standard_output_in_a_pipe(home: Path, tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_bytes(b"x" * 70000)
    ok("encrypt", "--key", "k", str(plain))
    done = subprocess.run(
        [str(QIMEM), "decrypt", str(tmp_path / "a.txt.qimem"), "-o", "-"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"x" * 70000


@pytest.mark.parametrize("command", [["encrypt", "--key", "k"], ["decrypt"]])
def test_terminal_on_stdin_is_refused_with_a_hint(home: Path, command: list[str]) -> None:
    primary, secondary = os.openpty()
    try:
        started = time.monotonic()
        done = subprocess.run(
            [str(QIMEM), *command],
            stdin=secondary,
            capture_output=True,
            text=True,
            timeout=60,  # the old code waited for typed input until this expired
        )
    finally:
        os.close(secondary)
        os.close(primary)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("qimem: error: no FILES given and standard input is a terminal")
    assert "pipe" in done.stderr and done.stdout == ""
    assert time.monotonic() - started < 30


# -- rewrap summary, --out-dir -----------------------------------------------------


def test_rewrap_prints_a_one_line_summary(home: Path, tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"f{i}").write_bytes(b"data %d" % i)
    ok("encrypt", "--key", "k", "-q", *(str(tmp_path / f"f{i}") for i in range(3)))
    ok("keys", "rotate", "k")
    ok("encrypt", "--key", "k", "-q", str(tmp_path / "f3"))  # already under version 2
    (tmp_path / "broken.qimem").write_bytes(b"not a stream at all")
    result = run("rewrap", str(tmp_path))
    assert result.exit_code == 7
    assert result.stdout == "rewrapped 3 files, 1 already current, 1 failed\n"
    assert "broken.qimem" in result.stderr
    again = ok("rewrap", *(str(tmp_path / f"f{i}.qimem") for i in range(4)))
    assert again.stdout == "rewrapped 0 files, 4 already current, 0 failed\n"
    assert ok("rewrap", "-q", str(tmp_path / "f0.qimem")).stdout == ""


def test_out_dir_is_not_created_when_every_input_fails(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"
    missing = run("encrypt", "--key", "k", str(tmp_path / "nope"), "--out-dir", str(out))
    assert missing.exit_code == 3 and not (tmp_path / "out").exists()
    (tmp_path / "bad.qimem").write_bytes(b"garbage, not a stream")
    tampered = run("decrypt", str(tmp_path / "bad.qimem"), "--out-dir", str(out))
    assert tampered.exit_code == 7 and not (tmp_path / "out").exists()
    # A directory that existed before stays, and a partly successful run keeps its outputs.
    (tmp_path / "good").write_bytes(b"good")
    (tmp_path / "kept").mkdir()
    mixed = run(
        "encrypt",
        "--key",
        "k",
        str(tmp_path / "good"),
        str(tmp_path / "nope"),
        "--out-dir",
        str(tmp_path / "kept"),
    )
    assert mixed.exit_code == 3
    assert (tmp_path / "kept" / "good.qimem").is_file()
    kept = str(tmp_path / "kept")
    empty = run("encrypt", "--key", "k", str(tmp_path / "nope"), "--out-dir", kept)
    assert empty.exit_code == 3 and (tmp_path / "kept").is_dir()


# -- "key not found" names the realm ---------------------------------------------------


def test_key_not_found_hints_at_the_realm_that_holds_it(home: Path, tmp_path: Path) -> None:
    ok("realm", "create", "acme", group=qauth)
    ok("--realm", "acme", "keys", "create", "--name", "tenant")
    plain = tmp_path / "t.txt"
    plain.write_bytes(b"tenant data")
    ok("--realm", "acme", "encrypt", "--key", "tenant", str(plain))
    plain.unlink()
    result = run("decrypt", str(tmp_path / "t.txt.qimem"))
    assert result.exit_code == 5, result.stderr
    line = result.stderr.strip()
    assert line.startswith("qimem: error: ") and "\n" not in line
    assert "in realm 'master'" in line and "try --realm acme" in line, line
    ok("--realm", "acme", "decrypt", str(tmp_path / "t.txt.qimem"))
    assert plain.read_bytes() == b"tenant data"
    # A key that exists in no realm gets no hint.
    (tmp_path / "t.txt.qimem").write_bytes(b"garbage")
    bogus = run("--realm", "acme", "decrypt", str(tmp_path / "t.txt.qimem"), "--force")
    assert "--realm" not in bogus.stderr


def test_http_not_found_never_names_another_realm(sqlite_app: AppContext, tmp_path: Path) -> None:
    """A caller who cannot see the master realm learns nothing about its keys."""
    app = with_identity(sqlite_app)
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "pat", "cng-password-long", ["encryptor"])
    services.create_key(app, name="secret-master-key")
    from qimem.services import crypto

    sealed = crypto.encrypt(app, "secret-master-key", b"hush").envelope
    access = password_login(app, "acme", "pat", "cng-password-long").access_token
    with serving(app) as url:
        answer = requests.post(
            f"{url}/v1/security/decrypt",
            json={"envelope": base64.b64encode(sealed).decode()},
            headers={"Authorization": f"Bearer {access}"},
            timeout=10,
        )
    assert answer.status_code == 404, answer.text
    text = answer.text
    assert "master" not in text and "--realm" not in text and "secret-master-key" not in text
    assert ADMIN_PASSWORD not in text


# -- create_key and realms -------------------------------------------------------------


def test_create_key_refuses_an_unknown_realm_with_an_identity_layer(
    sqlite_app: AppContext,
) -> None:
    with pytest.raises(NotFoundError) as caught:
        services.create_key(sqlite_app, name="typo", realm="acmee")
    assert caught.value.code == "realm_not_found" and caught.value.http_status == 404
    ids.create_realm(sqlite_app, "acme")
    assert services.create_key(sqlite_app, name="k", realm="acme").realm == "acme"


def test_create_key_in_any_realm_on_the_memory_store_without_identity(
    memory_app: AppContext,
) -> None:
    assert services.create_key(memory_app, name="k", realm="anything").realm == "anything"


def test_cli_keys_create_in_an_unknown_realm_exits_5(home: Path) -> None:
    result = run("--realm", "nowhere", "keys", "create", "--name", "x")
    assert result.exit_code == 5
    assert result.stderr.startswith("qimem: error: realm 'nowhere' does not exist")
