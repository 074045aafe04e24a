"""Issue 15 item 6: the second factor (TOTP) of password users, and its attacks: brute
force hits the lockout, a replayed code (also two logins racing with one code), a reused
recovery code, wrong password + right code, right password + missing code, one uniform
answer (no enumeration by answer; a coarse timing check), another realm, escalation (a
helpdesk removing an administrator's second factor), secrets at rest."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import requests
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import (
    ADMIN_PASSWORD,
    STORES,
    close_app,
    identity_app,
    password_login,
    raw_sql,
    serving,
    store_url,
    unique,
    with_identity,
)

from qimem.app import AppContext
from qimem.errors import AuthError, ForbiddenError, NotFoundError, ValidationError
from qimem.identity.escalation import EscalationError
from qimem.services import identity as ids
from qimem.services import otp as otps

PW = "steady-copper-orchard-7"
A = "/v1/auth/realms"


def code(secret: str, steps: int = 0) -> str:
    """The TOTP code of ``secret`` ``steps`` 30-second steps from now."""
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


def login(app: AppContext, realm: str, user: str, password: str = PW, otp: str | None = None):  # type: ignore[no-untyped-def]
    params = {"grant_type": "password", "username": user, "password": password}
    if otp is not None:
        params["otp"] = otp
    return ids.token(app, realm, params)


def refusal(
    app: AppContext, realm: str, user: str, password: str = PW, otp: str | None = None
) -> tuple[str, str]:
    with pytest.raises(AuthError) as err:
        login(app, realm, user, password, otp)
    return err.value.code, str(err.value)


def enrolled(app: AppContext, realm: str, user: str) -> tuple[str, list[str]]:
    """``user`` (made now, password :data:`PW`) with an active second factor: its secret
    and recovery codes. The confirming code is of the step before, so the current and next
    steps' codes are still free for the test."""
    ids.add_user(app, realm, user, PW, [])
    made = otps.otp_enroll(app, realm, user)
    codes = otps.otp_confirm(app, realm, user, code(made.secret, -1))
    return made.secret, codes


@pytest.fixture
def world() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None), lockout_threshold=5)
    for realm in ("acme", "beta"):
        ids.create_realm(made, realm)
    ids.create_role(made, "acme", "helpdesk", ["users:admin"], "")
    ids.add_user(made, "acme", "helpdesk", PW, ["helpdesk"])
    ids.add_user(made, "acme", "boss", PW, ["admin"])
    ids.add_user(made, "beta", "intruder", PW, ["admin"])
    yield made
    close_app(made)


def principal(app: AppContext, realm: str, user: str) -> Any:
    return ids.authenticate(app, password_login(app, realm, user, PW).access_token)


# -- enrolment and login -----------------------------------------------------------------


def test_enrol_confirm_and_login(world: AppContext) -> None:
    ids.add_user(world, "acme", "alice", PW, [])
    made = otps.otp_enroll(world, "acme", "alice")
    assert made.uri.startswith("otpauth://totp/qimem%20acme:alice?secret=")
    assert made.secret not in repr(made)
    assert login(world, "acme", "alice").access_token  # not active before confirmation
    with pytest.raises(ValidationError):
        otps.otp_confirm(world, "acme", "alice", "000000" if code(made.secret) != "000000" else "1")
    codes = otps.otp_confirm(world, "acme", "alice", code(made.secret, -1))
    assert len(codes) == 10 == len(set(codes))
    assert otps.otp_status(world, "acme", "alice")["confirmed"] is True
    assert refusal(world, "acme", "alice")[0] == "invalid_grant"  # missing code
    now = code(made.secret)
    assert login(world, "acme", "alice", otp=now).access_token
    assert refusal(world, "acme", "alice", otp=now)[0] == "invalid_grant"  # replayed
    assert login(world, "acme", "alice", otp=code(made.secret, +1)).access_token  # skew +1
    assert refusal(world, "acme", "alice", otp=code(made.secret, -3))[0] == "invalid_grant"
    with pytest.raises(Exception) as again:
        otps.otp_enroll(world, "acme", "alice")
    assert getattr(again.value, "code", "") == "otp_already_enrolled"


def test_wrong_password_with_right_code_does_not_burn_it(world: AppContext) -> None:
    secret, _ = enrolled(world, "acme", "bob")
    right = code(secret)
    assert refusal(world, "acme", "bob", "wrong-password-123", right)[0] == "invalid_grant"
    assert login(world, "acme", "bob", otp=right).access_token


def test_one_uniform_answer(world: AppContext) -> None:
    secret, _ = enrolled(world, "acme", "carol")
    ids.add_user(world, "acme", "plain", PW, [])
    wrong = "000000" if code(secret) != "000000" else "111111"
    answers = {
        refusal(world, "acme", "nobody", PW, code(secret)),
        refusal(world, "acme", "carol", "wrong-password-123"),
        refusal(world, "acme", "carol", "wrong-password-123", code(secret)),
        refusal(world, "acme", "carol", PW),  # missing code
        refusal(world, "acme", "carol", PW, wrong),
        refusal(world, "acme", "carol", PW, "abcde-fghij"),  # not a recovery code
        refusal(world, "acme", "plain", "wrong-password-123"),
    }
    assert len(answers) == 1, answers
    assert answers.pop()[0] == "invalid_grant"


def test_timing_does_not_tell_a_right_password(world: AppContext) -> None:
    """Coarse: right password + wrong code costs about what a wrong password costs."""
    secret, _ = enrolled(world, "acme", "dave")
    ids.identity(world).settings.lockout_threshold = 10_000  # measure, not lock
    wrong = "000000" if code(secret) != "000000" else "111111"

    def timed(password: str, otp: str | None) -> float:
        samples = []
        for _ in range(15):
            start = time.perf_counter()
            refusal(world, "acme", "dave", password, otp)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    bad_password = timed("wrong-password-123", wrong)
    bad_code = timed(PW, wrong)
    assert bad_code < bad_password * 2 + 0.005, (bad_code, bad_password)
    assert bad_password < bad_code * 2 + 0.005, (bad_code, bad_password)


def test_brute_force_hits_the_lockout(world: AppContext) -> None:
    secret, _ = enrolled(world, "acme", "erin")
    wrong = "000000" if code(secret) != "000000" else "111111"
    for _ in range(5):  # lockout_threshold
        assert refusal(world, "acme", "erin", PW, wrong)[0] == "invalid_grant"
    assert refusal(world, "acme", "erin", PW, code(secret))[0] == "invalid_grant"  # locked
    failures = ids.audit_events(world, "acme", limit=20, action="login")
    assert sum(1 for r in failures if r.detail.get("reason") == "bad_otp") >= 4
    assert any(r.detail.get("locked") for r in failures)


def test_recovery_codes_are_single_use(world: AppContext) -> None:
    _, codes = enrolled(world, "acme", "fay")
    assert login(world, "acme", "fay", otp=codes[0]).access_token
    assert refusal(world, "acme", "fay", otp=codes[0])[0] == "invalid_grant"
    assert login(world, "acme", "fay", otp=codes[1].upper().replace("-", " ")).access_token
    assert otps.otp_status(world, "acme", "fay")["recovery_codes_left"] == 8


def test_required_policy(world: AppContext) -> None:
    ids.add_user(world, "acme", "gus", PW, [])
    boss = principal(world, "acme", "boss")
    helpdesk = principal(world, "acme", "helpdesk")
    with pytest.raises(ForbiddenError):
        otps.set_otp_required(world, "acme", True, principal=helpdesk)
    otps.set_otp_required(world, "acme", True, principal=boss)
    # a wrong password is the uniform answer; only a right one learns of the enrolment
    assert refusal(world, "acme", "gus", "wrong-password-123")[0] == "invalid_grant"
    needed, message = refusal(world, "acme", "gus")
    assert needed == "otp_enrollment_required" and "administrator" in message
    made = otps.otp_enroll(world, "acme", "gus", principal=helpdesk)
    otps.otp_confirm(world, "acme", "gus", code(made.secret, -1), principal=helpdesk)
    assert login(world, "acme", "gus", otp=code(made.secret)).access_token
    assert ids.identity(world).otp_required("beta") is False


# -- permissions ----------------------------------------------------------------------------


def test_escalation_and_other_realm(world: AppContext) -> None:
    enrolled(world, "acme", "plainuser")
    boss_secret = otps.otp_enroll(world, "acme", "boss").secret
    otps.otp_confirm(world, "acme", "boss", code(boss_secret, -1))
    helpdesk = principal(world, "acme", "helpdesk")
    intruder = principal(world, "beta", "intruder")
    with pytest.raises(EscalationError):
        otps.otp_disable(world, "acme", "boss", principal=helpdesk)
    assert otps.otp_status(world, "acme", "boss")["confirmed"]
    denied = ids.audit_events(world, "acme", limit=10, actor="helpdesk@acme")
    assert ("otp.disable", "denied") in {(r.action, r.outcome) for r in denied}
    for call in (otps.otp_disable, otps.otp_enroll, otps.otp_status):
        with pytest.raises(NotFoundError):
            call(world, "acme", "plainuser", principal=intruder)
    otps.otp_disable(world, "acme", "plainuser", principal=helpdesk)  # holds nothing more
    assert login(world, "acme", "plainuser").access_token  # no second factor now


def test_self_service(world: AppContext) -> None:
    ids.add_user(world, "acme", "hana", PW, [])
    me = principal(world, "acme", "hana")
    made = otps.otp_enroll(world, "acme", "hana", password=PW, principal=me)
    otps.otp_confirm(world, "acme", "hana", code(made.secret, -1), principal=me)
    with pytest.raises(ForbiddenError):
        otps.otp_status(world, "acme", "helpdesk", principal=me)  # not another's
    with pytest.raises(ValidationError):
        otps.otp_disable(world, "acme", "hana", principal=me)  # own: needs a code
    wrong = "000000" if code(made.secret) != "000000" else "111111"
    with pytest.raises(ValidationError):
        otps.otp_disable(world, "acme", "hana", wrong, principal=me)
    assert otps.otp_status(world, "acme", "hana", principal=me)["confirmed"]
    otps.otp_disable(world, "acme", "hana", code(made.secret), principal=me)
    assert not otps.otp_status(world, "acme", "hana")["enrolled"]


def test_service_accounts_have_no_second_factor(world: AppContext) -> None:
    ids.create_client(world, "acme", "svc", [])
    with pytest.raises(ValidationError):
        otps.otp_enroll(world, "acme", "svc")


# -- real databases: races and secrets at rest ------------------------------------------


@pytest.fixture(params=STORES)
def db_app(
    request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> Iterator[AppContext]:
    made = identity_app(store_url(request, tmp_path, request.param), root_key_b64)
    ids.create_realm(made, "acme")
    yield made
    close_app(made)


def _race(app: AppContext, user: str, otp: str) -> list[Any]:
    results: list[Any] = []
    gate = threading.Barrier(4)

    def one() -> None:
        gate.wait()
        try:
            results.append(login(app, "acme", user, otp=otp))
        except AuthError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_racing_logins_with_one_code_and_one_recovery_code(db_app: AppContext) -> None:
    secret, codes = enrolled(db_app, "acme", "ivan")
    for otp in (code(secret), codes[0]):
        results = _race(db_app, "ivan", otp)
        assert len(results) == 4
        assert sum(1 for r in results if not isinstance(r, Exception)) == 1, results


def test_secrets_at_rest(db_app: AppContext) -> None:
    secret, codes = enrolled(db_app, "acme", "judy")
    url = db_app.settings.store_url
    import sqlalchemy as sa

    from qimem.sql import create_engine

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            dump = repr(conn.execute(sa.text("SELECT * FROM qimem_otp")).all())
            dump += repr(conn.execute(sa.text("SELECT * FROM qimem_otp_recovery")).all())
    finally:
        engine.dispose()
    assert secret not in dump and secret.encode() not in dump.encode()
    assert not any(c.replace("-", "") in dump for c in codes)
    # a writer without the root key moves the wrapped secret to another user: it does not
    # unwrap there, so no code of the first user's secret opens the second
    enrolled(db_app, "acme", "kim")
    raw_sql(
        url,
        "UPDATE qimem_otp SET secret_wrapped = (SELECT secret_wrapped FROM qimem_otp o "
        "JOIN qimem_users u ON u.user_id = o.user_id WHERE u.username = 'judy') "
        "WHERE user_id = (SELECT user_id FROM qimem_users WHERE username = 'kim')",
    )
    assert refusal(db_app, "acme", "kim", PW, code(secret))[0] == "invalid_grant"


# -- HTTP and qauth ------------------------------------------------------------------------


def test_http_and_cli(world: AppContext) -> None:
    from qimem.cli.qauth import qauth

    helpdesk = password_login(world, "acme", "helpdesk", PW).access_token
    boss = password_login(world, "acme", "boss", PW).access_token
    ids.add_user(world, "acme", "leo", PW, [])
    with serving(world) as url:

        def http(token: str, method: str, path: str, body: Any = None) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}"}
            return requests.request(method, url + path, json=body, headers=headers, timeout=10)

        enrolled_ = http(helpdesk, "POST", f"{A}/acme/users/leo/otp")
        assert enrolled_.status_code == 201, enrolled_.text
        assert enrolled_.headers["Cache-Control"] == "no-store"
        secret = enrolled_.json()["secret"]
        bad = http(helpdesk, "POST", f"{A}/acme/users/leo/otp/confirm", {"code": "12"})
        assert bad.status_code == 400
        done = http(helpdesk, "POST", f"{A}/acme/users/leo/otp/confirm", {"code": code(secret, -1)})
        assert done.status_code == 200 and len(done.json()["recovery_codes"]) == 10
        assert http(boss, "GET", f"{A}/acme/users/boss/otp").json()["enrolled"] is False

        token_url = f"{url}{A}/acme/token"
        form = {"grant_type": "password", "username": "leo", "password": PW}
        missing = requests.post(token_url, data=form, timeout=10)
        wrong_pw = requests.post(token_url, data={**form, "password": "nope-nope-1"}, timeout=10)
        assert (missing.status_code, missing.json()) == (wrong_pw.status_code, wrong_pw.json())
        assert missing.status_code == 401
        ok = requests.post(token_url, data={**form, "otp": code(secret)}, timeout=10)
        assert ok.status_code == 200, ok.text

        assert http(helpdesk, "PUT", f"{A}/acme/otp-policy", {"required": True}).status_code == 403
        assert http(boss, "PUT", f"{A}/acme/otp-policy", {"required": True}).json()["otp_required"]
        assert http(helpdesk, "GET", f"{A}/acme/otp-policy").json()["otp_required"] is True
        needs = requests.post(
            token_url, data={**form, "username": "helpdesk"}, timeout=10
        )  # a right password, no second factor, in a realm requiring one
        assert needs.status_code == 401
        assert needs.json()["error"]["code"] == "otp_enrollment_required"

        # qauth login reads the code from stdin's second line; qauth otp over --server
        runner = CliRunner()
        result = runner.invoke(
            qauth,
            ["--server", url, "login", "--realm", "acme", "--user", "leo", "--password-stdin"],
            input=f"{PW}\n{code(secret, 1)}\n",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        status = runner.invoke(
            qauth, ["--server", url, "--token", helpdesk, "otp", "status", "--realm", "acme",
                    "leo", "--json"],
        )  # fmt: skip
        assert json.loads(status.stdout)["recovery_codes_left"] == 10
        denied = runner.invoke(
            qauth,
            ["--server", url, "--token", helpdesk, "otp", "disable", "--realm", "acme", "boss"],
        )
        assert denied.exit_code == 4 and "no escalation" in denied.output  # before anything
        gone = runner.invoke(
            qauth,
            ["--server", url, "--token", helpdesk, "otp", "disable", "--realm", "acme", "leo"],
        )
        assert gone.exit_code == 0, gone.output


def test_local_cli(qimem_home: Path) -> None:
    from qimem.cli import cli
    from qimem.cli.qauth import qauth

    def run(*args: str, stdin: str | None = None) -> Any:
        return CliRunner().invoke(qauth, list(args), input=stdin, catch_exceptions=False)

    assert (
        CliRunner()
        .invoke(cli, ["init", "--admin-password-stdin"], input=ADMIN_PASSWORD + "\n")
        .exit_code
        == 0
    )
    with (qimem_home / "config.toml").open("a") as fh:
        fh.write("\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\n")
    name = unique("u")
    assert run("user", "add", name, "--password-stdin", stdin=PW + "\n").exit_code == 0
    made = json.loads(run("otp", "enroll", name, "--json").stdout)
    confirmed = run("otp", "confirm", name, "--json", stdin=code(made["secret"], -1) + "\n")
    assert len(json.loads(confirmed.stdout)["recovery_codes"]) == 10
    refused = run("login", "--user", name, "--password-stdin", stdin=PW + "\n")
    assert refused.exit_code == 4 and "Traceback" not in refused.output
    ok = run("login", "--user", name, "--password-stdin", stdin=f"{PW}\n{code(made['secret'])}\n")
    assert ok.exit_code == 0, ok.output
    assert run("otp", "require", "--json").exit_code == 0
    bad = run("otp", "confirm", name, stdin="\n")
    assert bad.exit_code == 3
