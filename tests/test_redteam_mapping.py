"""Red team (issue 15): the role mapping is per provider, and per trusted issuer.

The realm-wide ``mapping`` was shared by every provider and issuer: a directory group called
``kim-admins`` and a JWT ``groups`` value ``kim-admins`` from a low-trust CI issuer gave the
same role, as did one issuer's claim value in another issuer's token. ``mappings`` keys
the mapping by provider (and, for the JWT provider, by issuer): each identity is mapped by
its own provider's entry, its issuer's if that has one, never another's. Against a real
slapd and two real issuer processes; the older realm-wide form is still read (the other
provider tests use it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from identity_helpers import ADMIN_PASSWORD, close_app, identity_app, password_login, serving
from ldap_server import Slapd, available, template_options
from ldap_server import password_of as dir_password
from oidc_issuer import OidcIssuer, exchange, good_claims, issuer_options

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

if not available():  # pragma: no cover - .ci/run installs slapd and ldap-utils
    if os.environ.get("CI"):
        pytest.fail("slapd is not installed (.ci/run installs it)", pytrace=False)
    pytest.skip("slapd is not installed", allow_module_level=True)


def config(directory: Slapd, prod: OidcIssuer, ci: OidcIssuer) -> dict[str, Any]:
    """The directory's ``kim-admins`` are admins; the prod issuer's ``environment=prod`` is
    a key-manager; the CI issuer's identities are auditors, whatever they claim."""
    return {
        "providers": ["password", "ldap", "jwt"],
        "ldap": {**template_options(directory), "allow_plain": True},
        "jwt": {
            "issuers": [
                issuer_options(prod, username_prefix="prod-"),
                issuer_options(ci, username_prefix="ci-"),
            ]
        },
        "mappings": {
            "ldap": {"groups": {"kim-admins": "admin"}, "jit_users": True},
            "jwt": {
                "issuers": {
                    prod.url: {
                        "claims": {"environment": {"prod": "key-manager"}},
                        "jit_users": True,
                    },
                    ci.url: {"default_roles": ["auditor"], "jit_users": True},
                }
            },
        },
    }


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with Slapd(tmp_path_factory.mktemp("slapd")) as server:
        yield server


@pytest.fixture
def issuers() -> Iterator[tuple[OidcIssuer, OidcIssuer]]:
    prod, ci = OidcIssuer(), OidcIssuer()
    try:
        yield prod, ci
    finally:
        prod.stop()
        ci.stop()


@pytest.fixture
def realm(
    tmp_path: Path, root_key_b64: str, directory: Slapd, issuers: tuple[OidcIssuer, OidcIssuer]
) -> Iterator[tuple[AppContext, str, OidcIssuer, OidcIssuer]]:
    app = identity_app(f"sqlite:///{tmp_path / 'q.db'}", root_key_b64)
    ids.create_realm(app, "acme")
    aps.set_realm_providers(app, "acme", config(directory, *issuers))
    with serving(app) as url:
        yield app, url, *issuers
    close_app(app)


def roles(app: AppContext, username: str) -> list[str]:
    return sorted(next(u.roles for u in ids.list_users(app, "acme") if u.username == username))


def test_a_group_name_maps_only_for_the_provider_configured(
    realm: tuple[AppContext, str, OidcIssuer, OidcIssuer],
) -> None:
    app, url, prod, ci = realm
    password_login(app, "acme", "alice", dir_password("alice"))  # in kim-admins
    assert roles(app, "alice") == ["admin"]
    # A CI token claiming the same group name gets the CI issuer's mapping only.
    for issuer, who in ((ci, "ci-bot"), (prod, "prod-bot")):
        claims = good_claims(sub="bot", groups=["kim-admins"], environment="staging")
        answer = exchange(url, issuer.sign(**claims), realm="acme")
        assert answer.status_code == 200, answer.text
        assert "admin" not in roles(app, who)
    assert roles(app, "ci-bot") == ["auditor"]
    assert roles(app, "prod-bot") == []


def test_a_token_from_one_issuer_never_gets_anothers_mapping(
    realm: tuple[AppContext, str, OidcIssuer, OidcIssuer],
) -> None:
    app, url, prod, ci = realm
    claims = good_claims(sub="deployer", environment="prod")
    assert exchange(url, ci.sign(**claims), realm="acme").status_code == 200
    assert roles(app, "ci-deployer") == ["auditor"]  # not the prod issuer's key-manager
    assert exchange(url, prod.sign(**claims), realm="acme").status_code == 200
    assert roles(app, "prod-deployer") == ["key-manager"]


def test_jit_is_per_provider(
    tmp_path: Path, root_key_b64: str, directory: Slapd, issuers: tuple[OidcIssuer, OidcIssuer]
) -> None:
    """Just-in-time creation on for the directory does not open the realm to any issuer."""
    app = identity_app(f"sqlite:///{tmp_path / 'q.db'}", root_key_b64)
    try:
        ids.create_realm(app, "acme")
        document = config(directory, *issuers)
        document["mappings"] = {"ldap": document["mappings"]["ldap"]}  # none for jwt
        aps.set_realm_providers(app, "acme", document)
        password_login(app, "acme", "alice", dir_password("alice"))
        with serving(app) as url:
            refused = exchange(url, issuers[1].sign(**good_claims(sub="x")), realm="acme")
        assert refused.status_code == 401
        last = ids.audit_events(app, "acme", limit=1, action="login")[0]
        assert last.detail.get("reason") == "not_provisioned"
    finally:
        close_app(app)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(mapping={"default_roles": []}), "not both"),
        (lambda d: d["mappings"].update(table={}), "not in 'providers'"),
        (lambda d: d["mappings"]["jwt"].update(issuers=[]), "issuer → mapping"),
        (lambda d: d["mappings"]["ldap"].update(groups={"g": "no-such-role"}), "does not have"),
        (lambda d: d["mappings"]["ldap"].update(issuers={"x": {"bogus": 1}}), "unknown field"),
        (lambda d: d["mappings"].update(ldap=[]), "must be an object"),
    ],
)
def test_bad_mappings_are_refused(
    realm: tuple[AppContext, str, OidcIssuer, OidcIssuer],
    directory: Slapd,
    change: Any,
    message: str,
) -> None:
    app, _, prod, ci = realm
    document = config(directory, prod, ci)
    change(document)
    with pytest.raises(ValidationError, match=message):
        aps.set_realm_providers(app, "acme", document)


def test_http_and_cli_show_the_mapping_per_provider(
    realm: tuple[AppContext, str, OidcIssuer, OidcIssuer],
) -> None:
    from qimem.cli.qauth import qauth

    app, url, prod, ci = realm
    admin = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
    headers = {"Authorization": f"Bearer {admin}"}
    shown = requests.get(f"{url}/v1/auth/realms/acme/providers", headers=headers, timeout=10)
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert "mapping" not in body
    assert body["mappings"]["jwt"]["issuers"][ci.url]["default_roles"] == ["auditor"]
    put = requests.put(
        f"{url}/v1/auth/realms/acme/providers", json=body, headers=headers, timeout=10
    )  # what GET shows is accepted back
    assert put.status_code == 200, put.text
    text = CliRunner().invoke(
        qauth, ["--server", url, "--token", admin, "realm", "providers", "acme"]
    )
    assert text.exit_code == 0, text.output
    assert "mapping of ldap:" in text.output and f"issuer {ci.url}:" in text.output
    as_json = CliRunner().invoke(
        qauth, ["--server", url, "--token", admin, "realm", "providers", "acme", "--json"]
    )
    assert json.loads(as_json.stdout)["mappings"]["ldap"]["groups"] == {"kim-admins": ["admin"]}
