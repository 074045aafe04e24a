"""Red team (issue 15, second round) against the second-factor fixes of the last hour:
attempts to get around "enrolling one's own needs the current password" and "a second
factor's activation ends the sessions".

* a service account whose client id is the user's name is not the user (no self path);
* the password and a stolen token are not enough to replace an active factor (re-enroll
  is refused until it is removed, which needs a current code);
* a refresh token rotated just before the confirmation dies with the session, and so does
  the access token it gave; a login after it needs the new factor;
* another realm's user of the same name is not the user.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pyotp
import pytest
from conftest import make_app
from identity_helpers import close_app, password_login, with_identity

from qimem.app import AppContext
from qimem.errors import AuthError, ConflictError, ForbiddenError, QimemError, ValidationError
from qimem.services import identity as ids
from qimem.services import otp as otps

PW = "steady-copper-orchard-7"


def code(secret: str, steps: int = 0) -> str:
    """The TOTP code ``steps`` 30-second steps from now (a used step is not accepted again)."""
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


def refresh(app: AppContext, realm: str, token: str) -> Any:
    return ids.token(app, realm, {"grant_type": "refresh_token", "refresh_token": token})


@pytest.fixture
def world() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None), lockout_threshold=5)
    for realm in ("acme", "beta"):
        ids.create_realm(made, realm)
    ids.add_user(made, "acme", "vic", PW, [])
    ids.add_user(made, "beta", "vic", PW, [])
    yield made
    close_app(made)


def test_a_service_account_named_like_the_user_is_not_the_user(world: AppContext) -> None:
    """Client ids and user names share one namespace: no service account can be made with
    the user's name (whose token would then pass a by-name self check); a client of
    another name is nobody's self."""
    with pytest.raises(ConflictError) as caught:
        ids.create_client(world, "acme", "vic")
    assert caught.value.code == "user_exists"
    secret = ids.create_client(world, "acme", "vic-bot").secret
    answer = ids.token(
        world,
        "acme",
        {"grant_type": "client_credentials", "client_id": "vic-bot", "client_secret": secret},
    )
    client = ids.authenticate(world, answer.access_token)
    assert client.kind != "user"
    for call in (
        lambda: otps.otp_enroll(world, "acme", "vic-bot", password=PW, principal=client),
        lambda: otps.otp_enroll(world, "acme", "vic", password=PW, principal=client),
        lambda: otps.otp_status(world, "acme", "vic", principal=client),
    ):
        with pytest.raises(QimemError) as refused:
            call()
        assert refused.value.code in ("forbidden", "not_found", "user_not_found")
    assert otps.otp_status(world, "acme", "vic")["enrolled"] is False


def test_password_and_a_stolen_token_cannot_replace_an_active_factor(world: AppContext) -> None:
    owner = ids.authenticate(world, password_login(world, "acme", "vic", PW).access_token)
    made = otps.otp_enroll(world, "acme", "vic", password=PW, principal=owner)
    otps.otp_confirm(world, "acme", "vic", code(made.secret), principal=owner)
    # the attacker: the password (phished) and a token of a full session, not the device
    session = ids.token(
        world,
        "acme",
        {"grant_type": "password", "username": "vic", "password": PW, "otp": code(made.secret, 1)},
    )
    stolen = ids.authenticate(world, session.access_token)
    with pytest.raises(ConflictError) as caught:
        otps.otp_enroll(world, "acme", "vic", password=PW, principal=stolen)
    assert caught.value.code == "otp_already_enrolled"
    for guess in (None, "", "000000"):
        with pytest.raises((ValidationError, AuthError, ForbiddenError)):
            otps.otp_disable(world, "acme", "vic", guess, principal=stolen)
    assert otps.otp_status(world, "acme", "vic")["enrolled"] is True


def test_a_refresh_just_before_the_confirmation_dies_with_the_session(world: AppContext) -> None:
    login = password_login(world, "acme", "vic", PW)
    owner = ids.authenticate(world, login.access_token)
    made = otps.otp_enroll(world, "acme", "vic", password=PW, principal=owner)
    rotated = refresh(world, "acme", login.refresh_token)  # the attacker's copy, refreshed
    otps.otp_confirm(world, "acme", "vic", code(made.secret), principal=owner)
    for access in (login.access_token, rotated.access_token):
        with pytest.raises(AuthError):
            ids.authenticate(world, access)
    for token in (login.refresh_token, rotated.refresh_token):
        with pytest.raises(AuthError):
            refresh(world, "acme", token)
    with pytest.raises(AuthError):
        password_login(world, "acme", "vic", PW)  # the next login needs the factor


def test_another_realms_user_of_the_same_name_is_not_the_user(world: AppContext) -> None:
    beta_vic = ids.authenticate(world, password_login(world, "beta", "vic", PW).access_token)
    with pytest.raises(QimemError) as caught:
        otps.otp_enroll(world, "acme", "vic", password=PW, principal=beta_vic)
    assert caught.value.code in ("forbidden", "realm_not_found", "not_found")
    assert otps.otp_status(world, "acme", "vic")["enrolled"] is False
