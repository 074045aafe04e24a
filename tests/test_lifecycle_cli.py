"""``qimem keys policy|disable|enable|destroy|schedule-deletion|cancel-deletion|purge`` and
``keys create --derived`` through click's CliRunner on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qimem.cli import cli


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
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]


@pytest.fixture
def home(qimem_home: Path) -> Path:
    ok("init")
    return qimem_home


def test_policy_and_states(home: Path) -> None:
    ok("keys", "create", "--name", "k")
    old = ok("encrypt", "--key", "k", input=b"old").stdout_bytes
    ok("keys", "rotate", "k")
    shown = json.loads(ok("keys", "policy", "k", "--json").stdout)
    assert shown["policy"]["min_decryption_version"] == 1
    assert shown["effective_usage_limit"] == 2**31
    assert set(shown["usage"]) == {"1", "2"}
    changed = json.loads(
        ok(
            "keys",
            "policy",
            "k",
            "--min-decryption-version",
            "2",
            "--usage-limit",
            "1000",
            "--auto-rotate-period",
            "12h",
            "--json",
        ).stdout
    )
    assert changed["policy"]["usage_limit"] == 1000
    assert changed["policy"]["auto_rotate_seconds"] == 12 * 3600
    one_line_error(run("decrypt", input=old), 7, "minimum decryption version")
    text = ok("keys", "policy", "k", "--min-decryption-version", "1", "--usage-limit", "default")
    assert "default (2147483648)" in text.stdout
    assert ok("decrypt", input=old).stdout_bytes == b"old"
    one_line_error(run("keys", "policy", "k", "--auto-rotate-period", "soon"), 3, "invalid period")
    one_line_error(run("keys", "policy", "k", "--min-encryption-version", "3"), 3, "rotate first")

    one_line_error(run("keys", "disable", "k", "--version", "2"), 6, "active version")
    assert "disabled" in ok("keys", "disable", "k", "--version", "1").stdout
    one_line_error(run("decrypt", input=old), 7, "disabled")
    ok("keys", "enable", "k", "--version", "1")
    assert ok("decrypt", input=old).stdout_bytes == b"old"
    # Destroying cannot be undone: without a terminal it needs --yes.
    one_line_error(run("keys", "destroy", "k", "--version", "1"), 3, "--yes")
    ok("keys", "policy", "k", "--deletion-protection")
    one_line_error(run("keys", "destroy", "k", "--version", "1", "--yes"), 6, "protection")
    one_line_error(run("keys", "schedule-deletion", "k"), 6, "protection")
    ok("keys", "policy", "k", "--no-deletion-protection")
    destroyed = json.loads(ok("keys", "destroy", "k", "--version", "1", "--yes", "--json").stdout)
    assert destroyed["state"] == "destroyed"
    one_line_error(run("decrypt", input=old), 7, "destroyed")


def test_scheduled_deletion(home: Path) -> None:
    ok("keys", "create", "--name", "k")
    sealed = ok("encrypt", "--key", "k", input=b"x").stdout_bytes
    one_line_error(run("keys", "schedule-deletion", "k", "--days", "2"), 3, "7..3650")
    assert "will be deleted on" in ok("keys", "schedule-deletion", "k", "--days", "7").stdout
    one_line_error(run("encrypt", "--key", "k", input=b"y"), 6, "scheduled for deletion")
    one_line_error(run("decrypt", input=sealed), 7, "scheduled for deletion")
    assert json.loads(ok("keys", "purge", "--json").stdout) == {"deleted": []}
    ok("keys", "cancel-deletion", "k")
    assert ok("decrypt", input=sealed).stdout_bytes == b"x"
    one_line_error(run("keys", "cancel-deletion", "k"), 6, "not scheduled")


def test_derived_key_from_the_cli(home: Path) -> None:
    ok("keys", "create", "--name", "tenants", "--derived")
    policy = json.loads(ok("keys", "policy", "tenants", "--json").stdout)
    assert policy["policy"]["derived"] is True
    # File encryption has no context option: a derived key says so instead of guessing.
    one_line_error(run("encrypt", "--key", "tenants", input=b"x"), 3, "derived key")


def test_lifecycle_commands_refuse_server_mode(home: Path) -> None:
    ok("keys", "create", "--name", "k")
    for args in (
        ("keys", "policy", "k"),
        ("keys", "disable", "k", "--version", "1"),
        ("keys", "purge"),
    ):
        result = run("--server", "http://127.0.0.1:9", *args)
        one_line_error(result, 3, "not with --server")


def test_cli_create_and_rotate_are_audited(home: Path) -> None:
    """Key operations made with the local CLI land in the audit log, naming the OS user."""
    from qimem.cli.qauth import qauth

    created = json.loads(ok("keys", "create", "--name", "audited", "--json").stdout)
    rotated = json.loads(ok("keys", "rotate", "audited", "--json").stdout)
    result = CliRunner().invoke(qauth, ["audit", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    by_action = {r["action"]: r for r in records}
    assert by_action["keys.create"]["target"] == created["key_id"]
    assert by_action["keys.rotate"]["target"] == rotated["key_id"]
    for action in ("keys.create", "keys.rotate"):
        assert by_action[action]["actor"].endswith("@cli")
        assert by_action[action]["outcome"] == "success"
