"""The built-in ``ldap`` login provider (issue 15, item 2) against a real OpenLDAP slapd
(:mod:`ldap_server`): search-then-bind and DN templates, groups → roles, LDAPS and
StartTLS with a test CA, and the attacks: LDAP injection in the username, the empty
password (an anonymous bind the directory accepts), uniform refusals, lockout shared with
passwords, outage and a frozen directory → 503, cross-realm, just-in-time creation off."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers_tls import make_test_ca
from identity_helpers import (
    ADMIN_PASSWORD,
    add_user,
    close_app,
    identity_app,
    password_login,
    password_of,
    serving,
)
from ldap_server import (
    PEOPLE,
    READER_DN,
    Slapd,
    available,
    search_options,
    template_options,
)
from ldap_server import password_of as dir_password

from qimem.app import AppContext
from qimem.builtin_plugins.ldap_provider import LdapProvider, check_options
from qimem.errors import AuthError, ValidationError
from qimem.identity.providers import LoginAttempt, ProviderUnavailableError
from qimem.services import auth_providers as aps
from qimem.services import identity as ids

if not available():  # pragma: no cover - .ci/run installs slapd and ldap-utils
    if os.environ.get("CI"):
        pytest.fail("slapd is not installed (.ci/run installs it)", pytrace=False)
    pytest.skip("slapd is not installed", allow_module_level=True)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "identity.md"
MAPPING = {
    "groups": {"kim-admins": "admin", "crypto-users": "encryptor"},
    "default_roles": [],
    "jit_users": True,
}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One directory (plain LDAP and, with StartTLS, TLS) for the module; stopped after."""
    with Slapd(tmp_path_factory.mktemp("slapd"), tls=True) as server:
        yield server


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A directory of this test alone (it gets stopped or frozen)."""
    server = Slapd(tmp_path / "slapd")
    with server:
        yield server


def _attempt(options: dict[str, Any], username: str, password: str) -> LoginAttempt:
    return LoginAttempt("acme", username, password, "127.0.0.1", check_options(options))


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {**options, "allow_plain": True}


@pytest.fixture
def app(tmp_path: Path, root_key_b64: str) -> Iterator[AppContext]:
    the_app = identity_app(f"sqlite:///{tmp_path / 'q.db'}", root_key_b64, lockout_threshold=3)
    ids.create_realm(the_app, "acme")
    add_user(the_app, "acme", "lou", ["encryptor"])
    yield the_app
    close_app(the_app)


def _use_ldap(app: AppContext, options: dict[str, Any], realm: str = "acme", **mapping: Any):  # type: ignore[no-untyped-def]
    return aps.set_realm_providers(
        app,
        realm,
        {"providers": ["password", "ldap"], "ldap": options, "mapping": {**MAPPING, **mapping}},
    )


def _roles(app: AppContext, username: str, realm: str = "acme") -> list[str]:
    return next(u.roles for u in ids.list_users(app, realm) if u.username == username)


def _refused(app: AppContext, username: str, password: str, realm: str = "acme") -> str:
    with pytest.raises(AuthError) as info:
        password_login(app, realm, username, password)
    return str(info.value)


def _last_login(app: AppContext, realm: str = "acme") -> Any:
    return ids.audit_events(app, realm, limit=1, action="login")[0]


# -- the provider against the directory ----------------------------------------------------


@pytest.mark.parametrize("mode", ["search", "template"])
def test_bind_as_the_user_and_read_groups(slapd: Slapd, mode: str) -> None:
    options = _plain(search_options(slapd) if mode == "search" else template_options(slapd))
    found = LdapProvider().authenticate(_attempt(options, "alice", dir_password("alice")))
    assert found is not None and found.username == "alice"
    assert set(found.groups) == {"kim-admins", "crypto-users"}
    bob = LdapProvider().authenticate(_attempt(options, "bob", dir_password("bob")))
    assert bob is not None and bob.groups == ("crypto-users",)
    assert LdapProvider().authenticate(_attempt(options, "bob", dir_password("alice"))) is None
    assert LdapProvider().authenticate(_attempt(options, "nobody", "x-Pass-123")) is None
    # Directories match names case-insensitively; qimem usernames are exact.
    assert LdapProvider().authenticate(_attempt(options, "ALICE", dir_password("alice"))) is None


INJECTIONS = [
    "*",
    "al*",
    "a*e",
    "*)(uid=*",
    ")(uid=*",
    "alice)(uid=*",
    "*)(|(uid=*",
    "alice)(|(objectClass=*",
    "alice\\00",
    "alice\x00",
    "\x00",
    "alice,ou=people,dc=example,dc=org",
    "uid=alice",
]


@pytest.mark.parametrize("mode", ["search", "template"])
@pytest.mark.parametrize("username", INJECTIONS)
def test_ldap_injection_in_the_username(slapd: Slapd, mode: str, username: str) -> None:
    """With alice's password, no crafted name logs in (unescaped, 'al*' would find alice
    alone in search mode, and her password would bind)."""
    options = _plain(search_options(slapd) if mode == "search" else template_options(slapd))
    found = LdapProvider().authenticate(_attempt(options, username, dir_password("alice")))
    assert found is None


def test_empty_password_is_never_an_anonymous_bind(slapd: Slapd, app: AppContext) -> None:
    # The directory itself accepts a DN with an empty password (an unauthenticated bind).
    whoami = subprocess.run(
        ["ldapwhoami", "-x", "-H", slapd.url, "-D", f"uid=alice,{PEOPLE}", "-w", ""],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert whoami.returncode == 0 and "anonymous" in whoami.stdout
    for options in (search_options(slapd), template_options(slapd)):
        assert LdapProvider().authenticate(_attempt(_plain(options), "alice", "")) is None
    _use_ldap(app, _plain(template_options(slapd)))
    for empty in ("", "\x00"):
        with pytest.raises((AuthError, ValidationError)):
            password_login(app, "acme", "alice", empty)
    assert "alice" not in [u.username for u in ids.list_users(app, "acme")]


def test_service_account_refused_is_unavailable_not_wrong_password(slapd: Slapd) -> None:
    options = _plain(search_options(slapd, bind_password="not-the-reader-password"))
    with pytest.raises(ProviderUnavailableError):
        LdapProvider().authenticate(_attempt(options, "alice", dir_password("alice")))


# -- logins through the identity layer ------------------------------------------------------


def test_groups_map_to_roles_admin_or_not(slapd: Slapd, app: AppContext) -> None:
    _use_ldap(app, _plain(search_options(slapd)), default_roles=["auditor"])
    alice = ids.authenticate(
        app, password_login(app, "acme", "alice", dir_password("alice")).access_token
    )
    assert set(alice.roles) == {"admin", "encryptor", "auditor"} and alice.allows("users:admin")
    bob = ids.authenticate(
        app, password_login(app, "acme", "bob", dir_password("bob")).access_token
    )
    assert set(bob.roles) == {"encryptor", "auditor"} and not bob.allows("users:admin")
    carol = ids.authenticate(
        app, password_login(app, "acme", "carol", dir_password("carol")).access_token
    )
    assert carol.roles == ("auditor",) or list(carol.roles) == ["auditor"]
    record = _last_login(app)
    assert record.detail["provider"] == "ldap" and record.outcome == "success"
    # The local user still logs in with his qimem password.
    password_login(app, "acme", "lou", password_of("lou"))
    assert _last_login(app).detail["provider"] == "password"


def test_a_directory_user_enrolls_his_second_factor_with_his_directory_password(
    slapd: Slapd, app: AppContext
) -> None:
    """The fresh proof before enrolling one's own second factor (red team, issue 15) is
    checked by the realm's providers as at login: a directory user gives his directory
    password; a wrong one is refused and counted."""
    from qimem.errors import ForbiddenError
    from qimem.services import otp as otps

    _use_ldap(app, _plain(search_options(slapd)))
    me = ids.authenticate(app, password_login(app, "acme", "bob", dir_password("bob")).access_token)
    with pytest.raises(ForbiddenError):
        otps.otp_enroll(app, "acme", "bob", password="not-" + dir_password("bob"), principal=me)
    bob = next(u for u in ids.list_users(app, "acme") if u.username == "bob")
    assert bob.failed_logins == 1
    made = otps.otp_enroll(app, "acme", "bob", password=dir_password("bob"), principal=me)
    assert made.secret and otps.otp_status(app, "acme", "bob")["enrolled"]


def test_uniform_answer_for_every_refusal(slapd: Slapd, app: AppContext) -> None:
    _use_ldap(app, _plain(search_options(slapd)))
    answers = {
        _refused(app, "alice", "wrong-Pass-999"),
        _refused(app, "nobody", "wrong-Pass-999"),
        _refused(app, "lou", "wrong-Pass-999"),
        _refused(app, "al*", dir_password("alice")),
    }
    assert answers == {"invalid username or password"}


def test_lockout_after_failures_across_providers(slapd: Slapd, app: AppContext) -> None:
    _use_ldap(app, _plain(search_options(slapd)))
    password_login(app, "acme", "bob", dir_password("bob"))  # bob's qimem user (JIT)
    for _ in range(3):  # threshold 3; each guess is refused by password and LDAP alike
        _refused(app, "bob", "guess-Guess-1")
    assert _refused(app, "bob", dir_password("bob"))  # locked: the right password too
    assert _last_login(app).detail["reason"] == "locked"
    # The local user's lockout counts the same way.
    for _ in range(3):
        _refused(app, "lou", "guess-Guess-2")
    assert _refused(app, "lou", password_of("lou"))


def test_cross_realm_a_realm_without_ldap_cannot_use_it(slapd: Slapd, app: AppContext) -> None:
    ids.create_realm(app, "plain")
    _use_ldap(app, _plain(search_options(slapd)))
    password_login(app, "acme", "alice", dir_password("alice"))
    assert _refused(app, "alice", dir_password("alice"), realm="plain")
    assert _refused(app, "alice", dir_password("alice"), realm="master")


def test_jit_off_refuses_an_unknown_directory_user(slapd: Slapd, app: AppContext) -> None:
    _use_ldap(app, _plain(search_options(slapd)), jit_users=False)
    assert _refused(app, "dave", dir_password("dave"))
    assert _last_login(app).detail["reason"] == "not_provisioned"
    assert "dave" not in [u.username for u in ids.list_users(app, "acme")]
    aps.add_external_user(app, "acme", "dave", "ldap")
    password_login(app, "acme", "dave", dir_password("dave"))
    assert _roles(app, "dave") == []


# -- outages --------------------------------------------------------------------------------


def test_directory_down_is_503_with_retry_after(own_slapd: Slapd, app: AppContext) -> None:
    _use_ldap(app, _plain(search_options(own_slapd)))
    password_login(app, "acme", "alice", dir_password("alice"))
    own_slapd.stop()
    with serving(app) as url:
        for _ in range(4):  # more than the lockout threshold: an outage counts nothing
            answer = requests.post(
                f"{url}/v1/auth/realms/acme/token",
                data={"grant_type": "password", "username": "alice", "password": "x-Pass-1"},
                timeout=20,
            )
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "10"
            assert answer.json()["error"]["code"] == "provider_unavailable"
        # A local user with the right password is not held up by the outage.
        lou = requests.post(
            f"{url}/v1/auth/realms/acme/token",
            data={"grant_type": "password", "username": "lou", "password": password_of("lou")},
            timeout=20,
        )
        assert lou.status_code == 200
        # ... and a wrong guess at his password is a counted 401, not an uncounted 503.
        guess = requests.post(
            f"{url}/v1/auth/realms/acme/token",
            data={"grant_type": "password", "username": "lou", "password": "guess-Pass-1"},
            timeout=20,
        )
        assert guess.status_code == 401
    own_slapd.start()
    password_login(app, "acme", "alice", dir_password("alice"))  # not locked by the outage


def test_frozen_directory_times_out_to_503(own_slapd: Slapd, app: AppContext) -> None:
    _use_ldap(app, _plain(template_options(own_slapd, timeout=1)))
    own_slapd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError):
            password_login(app, "acme", "alice", dir_password("alice"))
        assert time.monotonic() - started < 8
    finally:
        own_slapd.resume()
    password_login(app, "acme", "alice", dir_password("alice"))


# -- TLS ------------------------------------------------------------------------------------


def test_ldaps_and_starttls_with_the_ca(slapd: Slapd, tmp_path: Path) -> None:
    assert slapd.ldaps_url and slapd.ca_file
    ca = str(slapd.ca_file)
    for options in (
        template_options(slapd, url=slapd.ldaps_url, ca_file=ca),
        search_options(slapd, start_tls=True, ca_file=ca),
    ):
        found = LdapProvider().authenticate(_attempt(options, "alice", dir_password("alice")))
        assert found is not None and "kim-admins" in found.groups
    # A certificate from another CA is not trusted: unavailable, never a login.
    other_ca, _, _ = make_test_ca(tmp_path / "other")
    for options in (
        template_options(slapd, url=slapd.ldaps_url, ca_file=str(other_ca)),
        search_options(slapd, start_tls=True, ca_file=str(other_ca)),
    ):
        with pytest.raises(ProviderUnavailableError):
            LdapProvider().authenticate(_attempt(options, "alice", dir_password("alice")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"allow_plain": False}, "in the clear"),
        ({"url": "http://x"}, "ldap://"),
        ({"timeout": 0}, "timeout"),
        ({"user_dn_template": "cn=fixed"}, "{username}"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ({"surprise": 1}, "unknown option"),
    ],
)
def test_bad_ldap_options_are_refused(
    slapd: Slapd, app: AppContext, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _use_ldap(app, {**_plain(template_options(slapd)), **change})


# -- the worked example of docs/identity.md ---------------------------------------------


def test_docs_ldap_example_runs_against_slapd(
    slapd: Slapd, app: AppContext, tmp_path: Path
) -> None:
    """docs/identity.md's worked LDAP configuration (illustrative there: it needs a
    directory) applied as written, with this directory's address, CA and password file."""
    import json

    from qimem.cli.qauth_providers import _provider_document

    text = DOCS.read_text()
    block = re.search(
        r"<!-- ldap-example -->\n<!-- illustrative[^\n]*\n```json\n(.*?)```", text, re.S
    )
    assert block, "docs/identity.md lost its worked LDAP example"
    secret = tmp_path / "ldap-bind.pw"
    secret.write_text("reader-Secret-4711\n")
    document = (
        block.group(1)
        .replace("ldap://ldap.example.org", slapd.url)
        .replace("/etc/qimem/ldap-ca.pem", str(slapd.ca_file))
        .replace("/etc/qimem/ldap-bind.pw", str(secret))
    )
    path = tmp_path / "realm.json"
    path.write_text(document)
    assert READER_DN in document
    config = aps.set_realm_providers(app, "acme", _provider_document(str(path)))
    assert json.loads(document)["providers"] == list(config.providers)
    token = password_login(app, "acme", "alice", dir_password("alice"))
    assert "admin" in ids.authenticate(app, token.access_token).roles
    assert _refused(app, "alice", "not-" + dir_password("alice"))
    assert ADMIN_PASSWORD  # the master admin is untouched by a realm's providers
