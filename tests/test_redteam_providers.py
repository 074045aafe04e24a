"""Red team: the realm login configuration route (``PUT /v1/auth/realms/{realm}/providers``)
given option values the system cannot even look up. A ``ca_file`` whose name is too long
for the filesystem (a component over 255 bytes) made ``Path.is_file`` raise ``OSError``
in the ldap provider's option check: an unhandled 500 instead of the option's 400."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, close_app, password_login, serving, with_identity

from qimem.app import AppContext
from qimem.errors import ValidationError
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
