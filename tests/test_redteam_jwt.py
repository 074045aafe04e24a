"""Red team: the external JWT provider (builtin_plugins/jwt_provider.py), attacked in process
with two trusted issuers whose keys are static PEMs (no issuer process: the keys are made and
the tokens signed here with PyJWT, as an issuer would).

* **Issuer confusion.** A realm trusting two issuers with overlapping username namespaces
  (both ``username_prefix`` "", or one a prefix of the other) made a token of issuer B with
  ``sub: alice`` log in as the qimem user ``alice`` that issuer A's identity created: the
  same user id, its audit trail, and its roles re-synced to B's claims (A's tokens of that
  user cut off). Such a configuration is refused now.
* **Ambiguous claim paths.** A top-level claim literally named ``a/b`` and a nested
  ``{"a": {"b": ...}}`` flatten to the same name; which one a bound claim saw depended on
  the order of the token's JSON object. Ambiguous names now count as absent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from conftest import make_app
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from identity_helpers import close_app, with_identity

from qimem.app import AppContext
from qimem.errors import AuthError, ValidationError
from qimem.identity.assertion_logins import JWT_BEARER
from qimem.services import auth_providers as aps
from qimem.services import identity as ids
from qimem.services import oidc

AUD = "qimem-ci"


class Issuer:
    """An issuer's RSA key pair; ``sign`` makes its tokens."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def options(self, **overrides: Any) -> dict[str, Any]:
        return {"issuer": self.url, "public_key_pem": self.pem(), "audiences": [AUD], **overrides}

    def sign(self, claims: dict[str, Any]) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": AUD, "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, self.key, algorithm="RS256")


def config(*issuers: dict[str, Any], **mapping: Any) -> dict[str, Any]:
    return {
        "providers": ["jwt"],
        "jwt": {"issuers": list(issuers)},
        "mapping": {"jit_users": True, "default_roles": ["auditor"], **mapping},
    }


def swap(app: AppContext, token: str) -> Any:
    params = {"grant_type": JWT_BEARER, "assertion": token}
    issued = oidc.assertion_token(app, "ci", params)
    return ids.authenticate(app, issued["access_token"])


@pytest.fixture
def app() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None))
    ids.create_realm(made, "ci")
    yield made
    close_app(made)


@pytest.fixture(scope="module")
def idp() -> Issuer:
    return Issuer("https://idp.example.org")


@pytest.fixture(scope="module")
def ci() -> Issuer:
    return Issuer("https://ci.example.org")


@pytest.mark.parametrize(
    ("prefix_a", "prefix_b"), [("", ""), ("", "ci-"), ("ci-", "ci-"), ("ci-", "ci-x-")]
)
def test_two_issuers_may_not_share_usernames(
    app: AppContext, idp: Issuer, ci: Issuer, prefix_a: str, prefix_b: str
) -> None:
    document = config(idp.options(username_prefix=prefix_a), ci.options(username_prefix=prefix_b))
    with pytest.raises(ValidationError, match="username_prefix"):
        aps.set_realm_providers(app, "ci", document)


def test_issuer_b_cannot_log_in_as_issuer_a_users(app: AppContext, idp: Issuer, ci: Issuer) -> None:
    """With disjoint prefixes (the only accepted shape) the same ``sub`` from the two
    issuers is two qimem users; and the realm's earlier (default-prefix) user made by the
    IdP is never reachable from the CI issuer."""
    aps.set_realm_providers(app, "ci", config(idp.options()))
    alice = swap(app, idp.sign({"sub": "alice"}))
    assert alice.username == "alice"
    aps.set_realm_providers(
        app, "ci", config(idp.options(username_prefix="idp-"), ci.options(username_prefix="ci-"))
    )
    from_idp = swap(app, idp.sign({"sub": "alice"}))
    from_ci = swap(app, ci.sign({"sub": "alice"}))
    assert (from_idp.username, from_ci.username) == ("idp-alice", "ci-alice")
    assert len({alice.subject, from_idp.subject, from_ci.subject}) == 3


@pytest.mark.parametrize("top_first", [True, False])
def test_an_ambiguous_claim_path_satisfies_no_bound_claim(
    app: AppContext, idp: Issuer, top_first: bool
) -> None:
    """The bound claim names the nested Kubernetes namespace; a token also carrying a
    top-level claim of the same flattened name (a custom claim the holder could set) with
    the wanted value is refused, whatever the order of the two in the JSON."""
    bound = {"kubernetes.io/namespace": "prod"}
    aps.set_realm_providers(app, "ci", config(idp.options(bound_claims=bound)))
    assert swap(app, idp.sign({"sub": "ok", "kubernetes.io": {"namespace": "prod"}}))
    nested = {"kubernetes.io": {"namespace": "dev"}}
    top = {"kubernetes.io/namespace": "prod"}
    claims = {"sub": "mallory", **(top if top_first else {}), **nested}
    if not top_first:
        claims.update(top)
    with pytest.raises(AuthError):
        swap(app, idp.sign(claims))
    record = ids.audit_events(app, "ci", limit=1, action="login")[0].to_dict()
    assert record["outcome"] == "failure"


@pytest.mark.parametrize("path", ["x" * 5000, "/" + "y" * 300 + "/ca.pem", "a\x00b"])
def test_a_malformed_ca_file_is_a_validation_error(app: AppContext, idp: Issuer, path: str) -> None:
    """A path the system cannot even look up (name too long) was an OSError: a 500 over
    HTTP (PUT .../providers). It is the option's validation error."""
    with pytest.raises(ValidationError, match="ca_file"):
        aps.set_realm_providers(app, "ci", config(idp.options(ca_file=path)))
