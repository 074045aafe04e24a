"""Issue 13, item 5 for ``qauth``: a disabled user's token exits 4; the audit log is newest
first (CLI and HTTP), even when buffered records are written after newer ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from identity_helpers import ADMIN_PASSWORD, password_login, serving, with_identity

from qimem.app import AppContext
from qimem.cli import cli
from qimem.cli.qauth import qauth
from qimem.services import identity as ids

PASSWORD = "Str0ng-passphrase-4-qauth"


def run(group, *args: str, input: str | None = None) -> Result:  # type: ignore[no-untyped-def]  # noqa: A002
    prog = "qauth" if group is qauth else "qimem"
    return CliRunner().invoke(
        group, list(args), input=input, catch_exceptions=False, prog_name=prog
    )


def ok(*args: str, input: str | None = None) -> Result:  # noqa: A002
    result = run(qauth, *args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


@pytest.fixture
def home(qimem_home: Path) -> Path:
    assert run(cli, "init").exit_code == 0
    ok("realm", "create", "acme")
    ok("user", "add", "--realm", "acme", "bob", "--password-stdin", input=PASSWORD + "\n")
    return qimem_home


def test_token_for_a_disabled_user_exits_4(home: Path) -> None:
    assert ok("token", "--realm", "acme", "--user", "bob").stdout.strip()
    ok("user", "disable", "--realm", "acme", "bob")
    minted = run(qauth, "token", "--realm", "acme", "--user", "bob")
    assert minted.exit_code == 4, minted.stderr
    assert minted.stderr == "qauth: error: user 'bob' is disabled\n"
    login = run(
        qauth, "token", "--realm", "acme", "--user", "bob", "--password-stdin", input=PASSWORD
    )
    assert login.exit_code == 4 and minted.stdout == login.stdout == ""
    assert PASSWORD not in login.stderr
    ok("user", "enable", "--realm", "acme", "bob")
    assert ok("token", "--realm", "acme", "--user", "bob").stdout.strip()


def test_qauth_audit_is_newest_first(home: Path) -> None:
    ok("user", "disable", "--realm", "acme", "bob")
    ok("user", "enable", "--realm", "acme", "bob")
    events = json.loads(ok("audit", "--realm", "acme", "--json").stdout)
    assert [e["action"] for e in events[:3]] == ["user.enable", "user.disable", "user.create"]
    stamps = [e["at"] for e in events]
    assert stamps == sorted(stamps, reverse=True)
    table = ok("audit", "--realm", "acme").stdout.splitlines()
    assert "user.enable" in table[1] and "user.create" in table[3]


def test_audit_is_newest_first_when_buffered_records_are_written_late(
    sqlite_app: AppContext,
) -> None:
    """An encrypt is audited buffered (written at the next flush); a rotation after it is
    written at once. Listing by insertion order would put the older encrypt first."""
    app = with_identity(sqlite_app)
    admin = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token  # audited
    ids.audit_key_operation(app, "master", "svc", "crypto.encrypt", "k1", buffered=True)
    time.sleep(0.01)
    ids.audit_key_operation(app, "master", "svc", "keys.rotate", "k1", buffered=False)
    listed = ids.audit_events(app, "master", limit=2)
    assert [r.action for r in listed] == ["keys.rotate", "crypto.encrypt"]
    with serving(app) as url:
        answer = requests.get(
            f"{url}/v1/auth/realms/master/audit?limit=2",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=10,
        )
    assert answer.status_code == 200, answer.text
    events = answer.json()["events"]
    assert [e["action"] for e in events] == ["keys.rotate", "crypto.encrypt"]
