"""Key backup and restore from the CLI (issue 7, item 5): ``qimem keys export|import`` and
``qimem keys backup|restore``, between real SQLite and PostgreSQL stores with different
root keys. A restore into a fresh store decrypts what was sealed before the backup."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qimem.app import AppContext
from qimem.cli import cli
from qimem.config import load_config

PASSPHRASE = "correct horse battery staple\n"


def run(*args: str, input: bytes | str | None = None) -> Result:  # noqa: A002
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: bytes | str | None = None) -> Result:  # noqa: A002
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


def one_line_error(result: Result, exit_code: int, fragment: str) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimem: error: "), result.stderr
    assert fragment in lines[0], lines[0]


def seal(text: bytes, key: str, *realm: str) -> bytes:
    return ok(*realm, "encrypt", "--key", key, input=text).stdout_bytes


def show(key: str) -> dict:
    return json.loads(ok("keys", "show", key, "--json").stdout)  # type: ignore[no-any-return]


def new_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, *store: str) -> Path:
    home = tmp_path / name
    home.mkdir()
    monkeypatch.setenv("QIMEM_HOME", str(home))
    ok(*store, "init")
    return home


def test_export_import_into_a_fresh_postgres_store(
    qimem_home: Path, tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("init")
    ok("keys", "create", "--name", "payroll")
    first = seal(b"version one", "payroll")
    ok("keys", "rotate", "payroll")
    second = seal(b"version two", "payroll")
    ok("keys", "rotate", "payroll")
    third = seal(b"version three", "payroll")
    ok("keys", "destroy", "payroll", "--version", "1", "--yes")
    ok("keys", "disable", "payroll", "--version", "2")
    ok("keys", "policy", "payroll", "--usage-limit", "500", "--auto-rotate-period", "30d")
    before = show("payroll")

    out = tmp_path / "payroll.qkb"
    ok("keys", "export", "payroll", "--passphrase-stdin", "-o", str(out), input=PASSPHRASE)
    data = out.read_bytes()
    # Never in the clear: no material (raw or base64), no names, no ids.
    with AppContext(load_config()) as app:
        for version in before["versions"][1:]:
            material = bytes(app.store.material("master", version["key_id"]))
            assert material not in data
            assert base64.b64encode(material) not in data
    assert b"payroll" not in data
    assert before["lineage_id"].encode() not in data
    # The output is never clobbered without --force.
    again = run("keys", "export", "payroll", "--passphrase-stdin", "-o", str(out), input=PASSPHRASE)
    one_line_error(again, 6, "exists")
    assert out.read_bytes() == data

    new_home(tmp_path, monkeypatch, "restored", "--store", postgres_url)
    wrong = run("keys", "import", str(out), "--passphrase-stdin", input="not the passphrase\n")
    one_line_error(wrong, 7, "wrong passphrase")
    tampered = tmp_path / "tampered.qkb"
    document = json.loads(data)
    document["kdf"]["time_cost"] += 1  # a header field: bound as associated data
    tampered.write_text(json.dumps(document))
    one_line_error(
        run("keys", "import", str(tampered), "--passphrase-stdin", input=PASSPHRASE), 7, "changed"
    )
    not_backup = tmp_path / "plain.txt"
    not_backup.write_text("hello")
    one_line_error(
        run("keys", "import", str(not_backup), "--passphrase-stdin", input=PASSPHRASE),
        3,
        "not a qimem key backup",
    )

    imported = json.loads(
        ok("keys", "import", str(out), "--passphrase-stdin", "--json", input=PASSPHRASE).stdout
    )
    assert imported == [
        {"lineage_id": before["lineage_id"], "name": "payroll", "realm": "master", "versions": 3}
    ]
    after = show("payroll")
    assert after == before  # ids, versions, states, creation times
    policy = json.loads(ok("keys", "policy", "payroll", "--json").stdout)
    assert policy["policy"]["usage_limit"] == 500
    assert policy["policy"]["auto_rotate_seconds"] == 30 * 86400
    # Decrypts what was sealed before the backup, with the states carried over.
    assert ok("decrypt", input=third).stdout_bytes == b"version three"
    one_line_error(run("decrypt", input=second), 7, "disabled")
    ok("keys", "enable", "payroll", "--version", "2")
    assert ok("decrypt", input=second).stdout_bytes == b"version two"
    one_line_error(run("decrypt", input=first), 7, "destroyed")
    # The store now holds it: importing again restores nothing.
    one_line_error(
        run("keys", "import", str(out), "--passphrase-stdin", input=PASSPHRASE), 6, "already"
    )


def test_whole_store_backup_and_restore(
    qimem_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("init")
    from qimem.cli.qauth import qauth

    assert CliRunner().invoke(qauth, ["realm", "create", "acme"]).exit_code == 0
    ok("keys", "create", "--name", "alpha")
    ok("--realm", "acme", "keys", "create", "--name", "beta")
    ok("--realm", "acme", "keys", "create")
    sealed_alpha = seal(b"alpha text", "alpha")
    sealed_beta = seal(b"beta text", "beta", "--realm", "acme")
    out = tmp_path / "store.qkb"
    ok("keys", "backup", "--passphrase-stdin", "-o", str(out), input=PASSPHRASE)

    new_home(tmp_path, monkeypatch, "elsewhere")
    restored = json.loads(
        ok("keys", "restore", str(out), "--passphrase-stdin", "--json", input=PASSPHRASE).stdout
    )
    assert sorted((r["realm"], r["name"] or "-") for r in restored) == [
        ("acme", "-"),
        ("acme", "beta"),
        ("master", "alpha"),
    ]
    assert ok("decrypt", input=sealed_alpha).stdout_bytes == b"alpha text"
    assert ok("--realm", "acme", "decrypt", input=sealed_beta).stdout_bytes == b"beta text"
    one_line_error(run("decrypt", input=sealed_beta), 5, "does not exist")  # realm kept
    one_line_error(
        run("keys", "restore", str(out), "--passphrase-stdin", input=PASSPHRASE), 6, "already"
    )


def test_weak_passphrase_is_refused_before_anything_is_written(
    qimem_home: Path, tmp_path: Path
) -> None:
    ok("init")
    ok("keys", "create", "--name", "k")
    out = tmp_path / "k.qkb"
    result = run("keys", "export", "k", "--passphrase-stdin", "-o", str(out), input="short\n")
    one_line_error(result, 3, "passphrase")
    assert not out.exists()
    assert list(tmp_path.glob(".k.qkb*")) == []  # no temp file left behind


def test_deeply_nested_backup_file_is_invalid_not_internal(
    qimem_home: Path, tmp_path: Path
) -> None:
    """Found writing the fuzz targets: deeply nested JSON made ``json.loads`` raise
    RecursionError, an internal error (exit 1, and a 500 from ``POST /v1/security/import``)."""
    from qimem import backup
    from qimem.errors import ValidationError

    ok("init")
    deep = tmp_path / "deep.qkb"
    deep.write_bytes(b"[" * 100_000)
    one_line_error(
        run("keys", "import", str(deep), "--passphrase-stdin", input=PASSPHRASE), 3, "not a qimem"
    )
    with pytest.raises(ValidationError, match="not a qimem key backup"):
        backup.open_backup(b'{"a": ' * 5_000, "passphrase")
