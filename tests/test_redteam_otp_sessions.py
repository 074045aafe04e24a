"""Red team (issue 15): activating or removing a second factor ends the user's sessions
(refresh tokens revoked, access tokens issued before cut off), on every server (the ``user``
change notice), as Keycloak logs sessions out on a credential change. The fresh proof
needed to enroll one's own: tests/test_redteam_otp_enroll.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pyotp
import pytest
import requests
from conftest import make_app
from identity_helpers import close_app, password_login, serving, with_identity
from invalidation_helpers import acted_within, pushing_pair, rejects

from qimem.app import AppContext
from qimem.errors import AuthError
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
