"""Red team: ``qauth client rotate-secret --secret-file FILE``. The rotation ran on the
server *before* the file was created; a FILE that already existed (or could not be made)
then failed the command after the new secret was issued and thrown away. With
``--overlap 0`` the old secret had been invalidated too: the service account was left
with no secret anyone knows (an outage an operator's typo, or a file planted at the path
by another local user, causes). The file is now created first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, close_app, password_login, serving, with_identity

from qimem.app import AppContext
from qimem.errors import AuthError
from qimem.services import identity as ids


@pytest.fixture
def app() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None))
    ids.create_realm(made, "acme")
    yield made
    close_app(made)


def works(app: AppContext, client_id: str, secret: str) -> bool:
    params = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    try:
        return bool(ids.token(app, "acme", params).access_token)
    except AuthError:
        return False


@pytest.mark.parametrize("obstacle", ["exists", "no_directory"])
def test_a_secret_file_that_cannot_be_made_does_not_rotate(
    app: AppContext, tmp_path: Path, obstacle: str
) -> None:
    made = ids.create_client(app, "acme", "svc", [])
    admin = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    target = tmp_path / "svc.secret"
    if obstacle == "exists":
        target.write_text("planted\n")
    else:
        target = tmp_path / "missing" / "svc.secret"
    with serving(app) as url:
        from qimem.cli.qauth import qauth

        argv: list[Any] = ["--server", url, "--token", admin, "client", "rotate-secret"]
        argv += ["--realm", "acme", "svc", "--overlap", "0", "--secret-file", str(target)]
        done = CliRunner().invoke(qauth, argv, catch_exceptions=False)
    assert done.exit_code != 0
    assert "Traceback" not in done.output
    assert works(app, "svc", made.secret), "the account was left with no known secret"
    if obstacle == "exists":
        assert target.read_text() == "planted\n"


def test_the_secret_file_is_written_when_it_can_be(app: AppContext, tmp_path: Path) -> None:
    made = ids.create_client(app, "acme", "svc", [])
    admin = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    target = tmp_path / "svc.secret"
    with serving(app) as url:
        from qimem.cli.qauth import qauth

        argv: list[Any] = ["--server", url, "--token", admin, "client", "rotate-secret"]
        argv += ["--realm", "acme", "svc", "--overlap", "0", "--secret-file", str(target)]
        done = CliRunner().invoke(qauth, argv, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    new = target.read_text().strip()
    assert new not in done.output
    assert works(app, "svc", new) and not works(app, "svc", made.secret)
