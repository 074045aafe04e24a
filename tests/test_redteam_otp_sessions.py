"""Red team (issue 15), the second factor as a credential:

* activating or removing a second factor ends the user's sessions (refresh tokens revoked,
  access tokens issued before cut off), on every server (the ``user`` change notice), as
  Keycloak logs sessions out on a credential change;
* a stolen access token of a user without a second factor cannot enroll one (and lock the
  owner out): enrolling one's own needs the current password (a fresh proof, as Keycloak
  re-authenticates before a credential is set up), on the services, HTTP and
  ``qauth otp enroll``; a wrong one counts towards the lockout; an administrator
  (``users:admin``) enrolling someone else needs none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pyotp
import pytest
import requests
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import close_app, password_login, serving, with_identity
from invalidation_helpers import acted_within, pushing_pair, rejects

from qimem.app import AppContext
from qimem.errors import AuthError, ForbiddenError
from qimem.services import identity as ids
from qimem.services import otp as otps

PW = "steady-copper-orchard-7"
A = "/v1/auth/realms"


def code(secret: str, steps: int = 0) -> str:
    """The TOTP code of ``secret`` ``steps`` 30-second steps from now."""
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


def refresh(app: AppContext, realm: str, token: str) -> Any:
    return ids.token(app, realm, {"grant_type": "refresh_token", "refresh_token": token})


def dead(app: AppContext, realm: str, access: str, refresh_token: str | None = None) -> bool:
    """Both tokens are refused."""
    try:
        ids.authenticate(app, access)
        return False
    except AuthError:
        pass
    if refresh_token is not None:
        with pytest.raises(AuthError):
            refresh(app, realm, refresh_token)
    return True


@pytest.fixture
def world() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None), lockout_threshold=5)
    ids.create_realm(made, "acme")
    ids.create_role(made, "acme", "helpdesk", ["users:admin"], "")
    ids.add_user(made, "acme", "helpdesk", PW, ["helpdesk"])
    for user in ("alice", "bob", "vic"):
        ids.add_user(made, "acme", user, PW, [])  # the helpdesk may act on them
    yield made
    close_app(made)


# -- item 2: a credential change ends the sessions ---------------------------------------


def test_confirming_a_second_factor_ends_the_users_sessions(world: AppContext) -> None:
    before = password_login(world, "acme", "alice", PW)
    other = password_login(world, "acme", "bob", PW)
    made = otps.otp_enroll(world, "acme", "alice")  # the operator
    assert ids.authenticate(world, before.access_token)  # pending: nothing changed yet
    otps.otp_confirm(world, "acme", "alice", code(made.secret, -1))
    assert dead(world, "acme", before.access_token, before.refresh_token)
    assert ids.authenticate(world, other.access_token).username == "bob"  # only hers
    refresh(world, "acme", str(other.refresh_token))
    params = {"grant_type": "password", "username": "alice", "password": PW}
    after = ids.token(world, "acme", {**params, "otp": code(made.secret)})
    assert ids.authenticate(world, after.access_token).username == "alice"


def test_removing_or_resetting_a_second_factor_ends_the_users_sessions(world: AppContext) -> None:
    made = otps.otp_enroll(world, "acme", "alice")
    otps.otp_confirm(world, "acme", "alice", code(made.secret, -1))
    params = {
        "grant_type": "password",
        "username": "alice",
        "password": PW,
        "otp": code(made.secret),
    }
    session = ids.token(world, "acme", params)
    helpdesk = ids.authenticate(world, password_login(world, "acme", "helpdesk", PW).access_token)
    otps.otp_disable(world, "acme", "alice", principal=helpdesk)  # an administrator's reset
    assert dead(world, "acme", session.access_token, session.refresh_token)
    again = otps.otp_enroll(world, "acme", "alice", principal=helpdesk)
    assert again.secret != made.secret


def test_the_session_that_confirms_ends_too_over_http(world: AppContext) -> None:
    with serving(world) as url:
        mine = password_login(world, "acme", "alice", PW).access_token
        headers = {"Authorization": f"Bearer {mine}"}
        path = f"{url}{A}/acme/users/alice/otp"
        made = requests.post(path, json={"password": PW}, headers=headers, timeout=10)
        assert made.status_code == 201, made.text
        secret = made.json()["secret"]
        done = requests.post(
            path + "/confirm", json={"code": code(secret, -1)}, headers=headers, timeout=10
        )
        assert done.status_code == 200, done.text
        after = requests.get(path, headers=headers, timeout=10)
        assert after.status_code == 401  # log in again, with the new second factor


def test_a_second_factor_change_reaches_the_other_server_by_push(
    postgres_url: str, root_key_b64: str
) -> None:
    """Servers A and B on one PostgreSQL database, every identity cache and the revocation
    refresh at 60 s: only the ``user`` notice sent by the confirmation explains B's refusal."""
    with pushing_pair(postgres_url, root_key_b64) as (a, b):
        ids.add_user(a, "master", "olga", PW, ["encryptor"])
        token = password_login(a, "master", "olga", PW).access_token
        assert ids.authenticate(b, token).username == "olga"
        made = otps.otp_enroll(a, "master", "olga")
        took = acted_within(
            rejects(b, token),
            lambda: otps.otp_confirm(a, "master", "olga", code(made.secret, -1)),
            a,
        )
        print(f"two servers: B refuses the token {took * 1000:.1f} ms after A's commit")


# -- enrolling one's own second factor needs a fresh proof ----------------------------


def test_a_stolen_token_cannot_enroll_a_second_factor(world: AppContext) -> None:
    stolen = ids.authenticate(world, password_login(world, "acme", "vic", PW).access_token)
    for password in (None, "", "not-her-password-1"):
        with pytest.raises(ForbiddenError) as refused:
            otps.otp_enroll(world, "acme", "vic", password=password, principal=stolen)
        assert refused.value.code == "password_required"
    assert otps.otp_status(world, "acme", "vic")["enrolled"] is False
    made = otps.otp_enroll(world, "acme", "vic", password=PW, principal=stolen)  # the owner
    assert made.secret and otps.otp_status(world, "acme", "vic")["enrolled"] is True


def test_guessing_the_password_through_enroll_hits_the_lockout(world: AppContext) -> None:
    stolen = ids.authenticate(world, password_login(world, "acme", "vic", PW).access_token)
    for i in range(5):
        with pytest.raises(ForbiddenError):
            otps.otp_enroll(world, "acme", "vic", password=f"guess-{i}-wrong", principal=stolen)
    with pytest.raises(ForbiddenError):  # locked: even the right one is refused now
        otps.otp_enroll(world, "acme", "vic", password=PW, principal=stolen)
    with pytest.raises(AuthError):
        password_login(world, "acme", "vic", PW)
    failures = [
        e
        for e in ids.audit_events(world, "acme", limit=50, action="otp.enroll")
        if e.outcome == "failure"
    ]
    assert len(failures) == 6 and PW not in str([e.__dict__ for e in failures])


def test_an_administrator_enrolls_someone_else_without_a_password(world: AppContext) -> None:
    helpdesk = ids.authenticate(world, password_login(world, "acme", "helpdesk", PW).access_token)
    made = otps.otp_enroll(world, "acme", "vic", principal=helpdesk)
    assert made.secret


def test_http_and_qauth_otp_enroll_need_the_password_for_ones_own(world: AppContext) -> None:
    from qimem.cli.qauth import qauth

    stolen = password_login(world, "acme", "vic", PW).access_token
    helpdesk = password_login(world, "acme", "helpdesk", PW).access_token
    with serving(world) as url:

        def enroll(token: str, user: str, body: Any = None) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}"}
            path = f"{url}{A}/acme/users/{user}/otp"
            return requests.post(path, json=body, headers=headers, timeout=10)

        for body in (None, {"password": "wrong-password-1"}, {}):
            answer = enroll(stolen, "vic", body)
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "password_required"
            assert "secret" not in answer.text
        assert enroll(stolen, "vic", {"password": 7}).status_code == 400
        assert enroll(stolen, "vic", {"password": PW, "extra": 1}).status_code == 400
        runner = CliRunner()
        base = ["--server", url, "--token", stolen, "otp", "enroll", "--realm", "acme", "vic"]
        denied = runner.invoke(qauth, base)
        assert denied.exit_code == 4 and "current password" in denied.output
        assert "Traceback" not in denied.output
        wrong = runner.invoke(qauth, [*base, "--password-stdin"], input="wrong-password-1\n")
        assert wrong.exit_code == 4
        assert otps.otp_status(world, "acme", "vic")["enrolled"] is False
        ok = runner.invoke(qauth, [*base, "--password-stdin", "--json"], input=PW + "\n")
        assert ok.exit_code == 0, ok.output
        assert enroll(helpdesk, "bob").status_code == 201  # an administrator: no password
