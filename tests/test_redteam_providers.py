"""Red team: the realm login configuration route (``PUT /v1/auth/realms/{realm}/providers``)
given option values the system cannot even look up. A ``ca_file`` whose name is too long
for the filesystem (a component over 255 bytes) made ``Path.is_file`` raise ``OSError``
in the ldap provider's option check: an unhandled 500 instead of the option's 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, close_app, password_login, serving, with_identity

from qimem.app import AppContext
from qimem.errors import AuthError, ValidationError
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

LONG = "/" + "y" * 300 + "/ca.pem"  # one path component longer than NAME_MAX


@pytest.fixture
def app() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None))
    ids.create_realm(made, "acme")
    yield made
    close_app(made)


def ldap_config(ca_file: str) -> dict[str, object]:
    return {
        "providers": ["password", "ldap"],
        "ldap": {
            "url": "ldaps://127.0.0.1:1",
            "user_dn_template": "uid={username},dc=example,dc=org",
            "ca_file": ca_file,
        },
    }


@pytest.mark.parametrize("path", [LONG, "a\x00b", "/nonexistent/ca.pem"])
def test_ldap_ca_file_that_cannot_be_looked_up_is_refused(app: AppContext, path: str) -> None:
    with pytest.raises(ValidationError, match="ca_file"):
        aps.set_realm_providers(app, "acme", ldap_config(path))


def test_over_http_it_is_a_400_not_a_500(app: AppContext) -> None:
    token = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    with serving(app) as url:
        answer = requests.put(
            f"{url}/v1/auth/realms/acme/providers",
            json=ldap_config(LONG),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    assert answer.status_code == 400, answer.text
    assert "ca_file" in answer.json()["error"]["message"]
    assert "Traceback" not in answer.text


# -- a local user's password is not sent to the directory -------------------------------


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Any]:
    from ldap_server import Slapd, available

    if not available():
        pytest.skip("slapd is not installed")
    with Slapd(tmp_path / "slapd") as server:
        yield server


@pytest.mark.parametrize("chain", [["ldap", "password"]])
def test_a_local_users_password_never_reaches_the_directory(slapd: Any, chain: list[str]) -> None:
    """The realm asks its directory too. ``alice`` is a local password user of qimem (a
    break-glass account) whose password happens to be her directory password. Every login
    of hers (``ldap`` first) or every wrong try (``password`` first) was a simple bind to the
    directory with the password she typed for qimem: the directory's operators (another
    trust domain) got qimem passwords in clear, and with ``ldap`` first the directory's "yes"
    refused her own local login (``local_account_conflict``). Providers that could not log
    this user in now get a decoy password (same work, nothing disclosed)."""
    from ldap_server import password_of as dir_password
    from ldap_server import template_options

    from qimem.identity.password_policy import PasswordPolicies, PasswordPolicy

    lax = PasswordPolicies(PasswordPolicy(reject_username=False, min_score=0))
    app = with_identity(make_app("memory://", None), password_policy=lax)
    try:
        ids.create_realm(app, "acme")
        shared = dir_password("alice")
        ids.add_user(app, "acme", "alice", shared, [])
        options = {**template_options(slapd), "allow_plain": True}
        aps.set_realm_providers(app, "acme", {"providers": chain, "ldap": options})
        with pytest.raises(AuthError):
            password_login(app, "acme", "alice", "not-her-password-9")
        assert password_login(app, "acme", "alice", shared).access_token
        record = ids.audit_events(app, "acme", limit=1, action="login")[0].to_dict()
        assert record["outcome"] == "success"
        assert record["detail"]["provider"] == "password"
    finally:
        close_app(app)
