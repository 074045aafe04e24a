"""Finding 14 (INFO): the password policy was length only (``password``, ``12345678``
accepted). Now, per realm: a minimum length (12), not the username, not a common password
(zxcvbn's list), a zxcvbn strength floor; one ``weak_password`` error naming the rule, never
echoing the password; at user creation and password change through the Python API, HTTP,
``qauth`` (local and ``--server``) and ``qimem init``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, fast_settings, password_login, serving, with_identity

from qimem.app import AppContext
from qimem.cli import cli
from qimem.cli.qauth import qauth
from qimem.errors import ConfigError, ValidationError
from qimem.services import identity as ids

WEAK = {
    "passw0rd": "min_length",  # also common: the first rule broken is named
    "12345678": "min_length",
    "password1234": "common",
    "Password1234!": "common",  # a common word with digits and symbols appended
    "qwertyuiop12": "common",
    "trustno1trustno1": "min_score",
    "iloveyou-2024": "common",
    "aaaaaaaaaaaa": "min_score",
    "Carl-rules-the-world": "username",  # user carl
    "carlcarlcarl": "username",
}


@pytest.fixture
def app() -> Iterator[AppContext]:
    the_app = with_identity(make_app("memory://", None))
    ids.create_realm(the_app, "acme")
    yield the_app
    ids.close_identity(the_app)
    the_app.close()


def _rule(exc: ValidationError) -> str:
    assert exc.code == "weak_password", exc.code
    return exc.message.rsplit("[rule ", 1)[1].rstrip("]")


@pytest.mark.parametrize("password", list(WEAK))
def test_finding14_weak_passwords_are_refused_at_user_creation(
    app: AppContext, password: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ids.add_user(app, "acme", "carl", password, ["encryptor"])
    assert _rule(caught.value) == WEAK[password]
    assert password not in caught.value.message
    assert "carl" not in [u.username for u in ids.list_users(app, "acme")]  # nothing written


def test_finding14_weak_password_is_refused_at_password_change(app: AppContext) -> None:
    ids.add_user(app, "acme", "dora", "mellow-ochre-kettle")
    with pytest.raises(ValidationError) as caught:
        ids.set_password(app, "acme", "dora", "12345678")
    assert _rule(caught.value) == "min_length"
    with pytest.raises(ValidationError) as caught:
        ids.set_password(app, "acme", "dora", "my-name-is-DORA")
    assert _rule(caught.value) == "username"
    assert password_login(app, "acme", "dora", "mellow-ochre-kettle").access_token  # unchanged


def test_finding14_good_passwords_pass_and_log_in(app: AppContext) -> None:
    ids.add_user(app, "acme", "erik", "violet-harbour-engine")
    ids.set_password(app, "acme", "erik", "tundra-Parsley-47")
    assert password_login(app, "acme", "erik", "tundra-Parsley-47").access_token


def test_finding14_an_existing_weak_password_still_logs_in(app: AppContext) -> None:
    """The policy applies when a password is set, never at login (no lock-out by upgrade)."""
    ids.identity(app).add_user("acme", "old", "password")  # as an older qimem stored it
    assert password_login(app, "acme", "old", "password").access_token


def test_finding14_policy_is_per_realm_from_the_identity_settings() -> None:
    from qimem.identity.settings import settings_from_mapping

    settings = settings_from_mapping(
        {
            "argon2_memory_kib": 1024,
            "argon2_time_cost": 1,
            "password_policy": {
                "min_length": 14,
                "realms": {"acme": {"min_length": 20, "min_score": 3}, "lab": {"min_score": 0}},
            },
        }
    )
    policies = settings.password_policy
    assert policies.for_realm("master").min_length == 14
    assert (policies.for_realm("acme").min_length, policies.for_realm("acme").min_score) == (20, 3)
    assert policies.for_realm("lab").min_length == 14  # overrides start from the defaults
    app = make_app("memory://", None)
    try:
        ids.configure(app, settings)
        ids.bootstrap(app, ADMIN_PASSWORD)
        ids.create_realm(app, "acme")
        ids.add_user(app, "master", "fay", "violet-harbour")  # 14: enough in master
        with pytest.raises(ValidationError) as caught:
            ids.add_user(app, "acme", "fay", "violet-harbour")
        assert _rule(caught.value) == "min_length" and "20" in caught.value.message
        assert "'acme'" in caught.value.message
        ids.add_user(app, "acme", "fay", "violet-harbour-engine")
    finally:
        ids.close_identity(app)
        app.close()


@pytest.mark.parametrize(
    "table",
    [
        {"min_lenght": 12},
        {"min_length": "12"},
        {"min_length": 4},
        {"min_score": 5},
        {"reject_common": 1},
        {"realms": {"acme": {"bogus": 1}}},
        {"realms": ["acme"]},
        "strict",
    ],
)
def test_finding14_bad_policy_settings_are_config_errors(table: object) -> None:
    from qimem.identity.settings import settings_from_mapping

    with pytest.raises(ConfigError):
        settings_from_mapping({"password_policy": table})


def test_finding14_generated_passwords_pass_the_policy() -> None:
    from qimem.identity.password_policy import PasswordPolicy, generate_password

    strict = PasswordPolicy(min_length=40, min_score=4)
    for _ in range(20):
        assert strict.check(generate_password(strict, "ab"), "ab")
    app = make_app("memory://", None)
    try:
        ids.configure(app, fast_settings())
        generated = ids.bootstrap(app, None)
        assert generated is not None and len(generated) >= 24
        assert password_login(app, "master", "admin", generated).access_token
    finally:
        ids.close_identity(app)
        app.close()


def test_finding14_http_answers_400_weak_password_without_echo(app: AppContext) -> None:
    with serving(app) as url:
        token = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
        headers = {"Authorization": f"Bearer {token}"}
        users = f"{url}/v1/auth/realms/acme/users"
        response = requests.post(
            users, json={"username": "gus", "password": "password1234"}, headers=headers, timeout=10
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "weak_password"
        assert "rule common" in response.text and "password1234" not in response.text
        ok = requests.post(
            users,
            json={"username": "gus", "password": "saffron-glacier-91"},
            headers=headers,
            timeout=10,
        )
        assert ok.status_code == 201, ok.text
        patched = requests.patch(
            users + "/gus", json={"password": "Gus-is-my-name"}, headers=headers, timeout=10
        )
        assert patched.status_code == 400 and "rule username" in patched.text
        assert "Gus-is-my-name" not in patched.text


def test_finding14_qauth_locally_and_with_server(qimem_home: Path, app: AppContext) -> None:
    runner = CliRunner()
    init = runner.invoke(cli, ["init", "--admin-password-stdin"], input="12345678\n")
    assert init.exit_code == 3, init.output
    assert "rule min_length" in init.stderr and "12345678" not in init.output + init.stderr
    init = runner.invoke(cli, ["init", "--admin-password-stdin"], input="admin-is-me-2024\n")
    assert init.exit_code == 3 and "rule username" in init.stderr
    assert (
        runner.invoke(cli, ["init", "--admin-password-stdin"], input=ADMIN_PASSWORD).exit_code == 0
    )
    with (qimem_home / "config.toml").open("a") as fh:
        fh.write("\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\n")
    local = runner.invoke(qauth, ["user", "add", "hal", "--password-stdin"], input="letmein!\n")
    assert local.exit_code == 3 and "rule min_length" in local.stderr
    made = runner.invoke(qauth, ["user", "add", "hal", "--json"])
    assert made.exit_code == 0, made.stderr
    assert len(json.loads(made.stdout)["generated_password"]) >= 24
    passwd = runner.invoke(
        qauth, ["user", "passwd", "hal", "--password-stdin"], input="dragon2024!!\n"
    )
    assert passwd.exit_code == 3 and "rule common" in passwd.stderr
    assert "dragon2024" not in passwd.output + passwd.stderr
    with serving(app) as url:
        token = password_login(app, "master", "admin", ADMIN_PASSWORD).access_token
        remote = ["--server", url, "--token", token]
        weak = runner.invoke(
            qauth,
            [*remote, "user", "add", "--realm", "acme", "ivy", "--password-stdin"],
            input="football1234\n",
        )
        assert weak.exit_code == 3 and "weak" not in weak.stdout
        assert "rule common" in weak.stderr and "football1234" not in weak.stderr
        strong = runner.invoke(
            qauth,
            [*remote, "user", "add", "--realm", "acme", "ivy", "--password-stdin"],
            input="cobalt-meadow-lantern\n",
        )
        assert strong.exit_code == 0, strong.stderr
