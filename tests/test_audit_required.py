"""``[identity] audit_mode = "required"``: no audit record, no answer.

A real server on PostgreSQL connects as an ordinary role; the test takes that role's right
to insert into ``qimem_audit`` away and gives it back. While auditing cannot be written,
every audited key operation gets 503 ``audit_unavailable``: a rotation does not happen, an
encrypt or a decrypt returns no result. The default buffered mode keeps serving instead.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, serving, with_identity

from qimem.app import AppContext
from qimem.services import identity as ids
from qimem.services.keys import show_key

pytestmark = pytest.mark.postgres


@pytest.fixture
def app_role_url(postgres_url: str, root_key_b64: str) -> Iterator[tuple[str, sa.Engine]]:
    """The schema made by the superuser; the server's own role may only read and write rows.
    Yields the role's URL and a superuser engine for granting and revoking."""
    make_app(postgres_url, root_key_b64).close()  # migrations, as the owner
    role = f"qimem_app_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
        conn.execute(
            sa.text(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
            )
        )
        conn.execute(
            sa.text(f'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        )
    url = sa.engine.make_url(postgres_url).set(username=role).render_as_string(hide_password=False)
    try:
        yield url, admin
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER'))
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
        admin.dispose()
        # the database (and with it the grants) is dropped by postgres_url; the role is not
        with sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))


def _audit_inserts(admin: sa.Engine, url: str, allowed: bool) -> None:
    role = sa.engine.make_url(url).username
    verb = "GRANT INSERT ON qimem_audit TO" if allowed else "REVOKE INSERT ON qimem_audit FROM"
    with admin.connect() as conn:
        conn.execute(sa.text(f'{verb} "{role}"'))


def _session(base: str) -> requests.Session:
    session = requests.Session()
    answer = session.post(
        f"{base}/v1/auth/realms/master/token",
        data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    session.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"
    return session


def _post(session: requests.Session, url: str, body: dict[str, Any]) -> requests.Response:
    return session.post(url, json=body, timeout=30)


def _app(url: str, root_key_b64: str, mode: str) -> AppContext:
    return with_identity(make_app(url, root_key_b64), audit_mode=mode)


def _app_with(url: str, root_key_b64: str, **settings: object) -> AppContext:
    return with_identity(make_app(url, root_key_b64), **settings)


def test_required_audit_refuses_to_serve_unaudited(
    app_role_url: tuple[str, sa.Engine], root_key_b64: str
) -> None:
    url, admin = app_role_url
    app = _app(url, root_key_b64, "required")
    secret = base64.b64encode(b"the plaintext that must not come back").decode()
    try:
        with serving(app) as base:
            s = _session(base)
            api = f"{base}/v1/security"
            created = _post(s, f"{api}/keys", {"name": "payroll"})
            assert created.status_code == 201, created.text
            sealed = _post(s, f"{api}/encrypt", {"key": "payroll", "plaintext": secret})
            assert sealed.status_code == 200
            envelope = sealed.json()["envelope"]

            _audit_inserts(admin, url, allowed=False)
            answers = {
                "encrypt": _post(s, f"{api}/encrypt", {"key": "payroll", "plaintext": secret}),
                "decrypt": _post(s, f"{api}/decrypt", {"envelope": envelope}),
                "rotate": _post(s, f"{api}/rotate", {"key": "payroll"}),
            }
            for name, answer in answers.items():
                assert answer.status_code == 503, (name, answer.text)
                assert answer.json()["error"]["code"] == "audit_unavailable", name
                assert answer.headers["Retry-After"] == "5"
                assert secret not in answer.text and "envelope" not in answer.json()
            assert len(show_key(app, "payroll").versions) == 1  # the rotation did not run

            _audit_inserts(admin, url, allowed=True)
            again = _post(s, f"{api}/decrypt", {"envelope": envelope})
            assert again.status_code == 200 and again.json()["plaintext"] == secret
            assert _post(s, f"{api}/rotate", {"key": "payroll"}).status_code == 200
    finally:
        app.close()
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT action, outcome FROM qimem_audit WHERE action LIKE 'crypto.%'")
        ).all()
    # Every served operation has its "requested" record and its outcome record.
    assert sorted(rows) == sorted(
        [
            ("crypto.encrypt", "requested"),
            ("crypto.encrypt", "success"),
            ("crypto.decrypt", "requested"),
            ("crypto.decrypt", "success"),
        ]
    )


def test_buffered_audit_keeps_serving(
    app_role_url: tuple[str, sa.Engine], root_key_b64: str
) -> None:
    url, admin = app_role_url
    app = _app(url, root_key_b64, "buffered")
    try:
        with serving(app) as base:
            s = _session(base)
            api = f"{base}/v1/security"
            assert _post(s, f"{api}/keys", {"name": "payroll"}).status_code == 201
            _audit_inserts(admin, url, allowed=False)
            body = {"key": "payroll", "plaintext": base64.b64encode(b"x").decode()}
            assert _post(s, f"{api}/encrypt", body).status_code == 200
            _audit_inserts(admin, url, allowed=True)
    finally:
        app.close()


def test_an_unknown_audit_mode_is_a_configuration_error() -> None:
    from qimem.errors import ConfigError
    from qimem.identity.settings import settings_from_mapping

    assert settings_from_mapping({"audit_mode": "required"}).audit_mode == "required"
    with pytest.raises(ConfigError, match="audit_mode must be one of buffered, required"):
        settings_from_mapping({"audit_mode": "sometimes"})


def test_required_audit_gives_management_operations_the_same_pair(
    app_role_url: tuple[str, sa.Engine], root_key_b64: str
) -> None:
    """Key lifecycle and identity administration in required mode: a "requested" record
    before the operation (none written: 503, the operation does not run) and an outcome
    record after it, as for key operations."""
    url, admin = app_role_url
    app = _app(url, root_key_b64, "required")
    try:
        with serving(app) as base:
            s = _session(base)
            api = f"{base}/v1/security"
            assert _post(s, f"{api}/keys", {"name": "payroll"}).status_code == 201
            assert _post(s, f"{api}/rotate", {"key": "payroll"}).status_code == 200
            users = f"{base}/v1/auth/realms/master/users"
            new_user = {"username": "pat", "password": "a-long-enough-password-1"}

            _audit_inserts(admin, url, allowed=False)
            answers = {
                "disable": _post(s, f"{api}/keys/payroll/disable", {"version": 1}),
                "user": _post(s, users, new_user),
                "schedule": _post(s, f"{api}/keys/payroll/schedule-deletion", {"days": 30}),
            }
            for name, answer in answers.items():
                assert answer.status_code == 503, (name, answer.text)
                assert answer.json()["error"]["code"] == "audit_unavailable", name
            shown = show_key(app, "payroll")
            assert [v.state.value for v in shown.versions][0] == "decrypt-only"  # did not run
            policy = s.get(f"{api}/keys/payroll/policy", timeout=30)
            assert policy.status_code == 200 and policy.json().get("deletion_date") is None
            with admin.connect() as conn:
                found = conn.execute(
                    sa.text("SELECT count(*) FROM qimem_users WHERE username = 'pat'")
                )
                assert found.scalar() == 0

            _audit_inserts(admin, url, allowed=True)
            assert _post(s, f"{api}/keys/payroll/disable", {"version": 1}).status_code == 200
            assert _post(s, users, new_user).status_code == 201
    finally:
        app.close()
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT action, outcome FROM qimem_audit WHERE action IN "
                "('keys.disable', 'user.create') AND actor = 'admin@master' ORDER BY id"
            )
        ).all()
    pairs = {
        action: [o for a, o in rows if a == action] for action in ("keys.disable", "user.create")
    }
    # the pair (requested first), plus the record the operation writes with its details
    for action, outcomes in pairs.items():
        assert outcomes[0] == "requested", (action, outcomes)
        assert outcomes.count("requested") == 1 and outcomes.count("success") == 2, outcomes


def test_buffered_management_records_wait_in_the_spill(
    app_role_url: tuple[str, sa.Engine], root_key_b64: str, tmp_path: Path
) -> None:
    """Buffered mode: a key lifecycle change whose audit record cannot be written at once
    (here: the insert right is gone) is not lost; it waits in the spill and arrives once."""
    from qimem.services import key_states, keys

    url, admin = app_role_url
    spill = tmp_path / "spill"
    app = _app_with(url, root_key_b64, audit_mode="buffered", audit_spill_dir=str(spill))
    try:
        keys.create_key(app, name="payroll")
        keys.rotate_key(app, "payroll")
        _audit_inserts(admin, url, allowed=False)
        key_states.disable_version(app, "payroll", version=1, actor="admin@master")
        deadline = time.monotonic() + 20
        while not any(p.stat().st_size > 100 for p in spill.glob("spill-*.qas")):
            assert time.monotonic() < deadline, "the record never reached the spill"
            time.sleep(0.05)
        _audit_inserts(admin, url, allowed=True)
        ids.identity(app).audit.flush()
    finally:
        app.close()
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT actor, target FROM qimem_audit WHERE action = 'keys.disable'")
        ).all()
    assert len(rows) == 1 and rows[0][0] == "admin@master"


def test_a_full_spill_in_refuse_mode_refuses_audited_requests(
    app_role_url: tuple[str, sa.Engine], root_key_b64: str, tmp_path: Path
) -> None:
    """``audit_spill_full = "refuse"``: while the audit cannot be written and the spill is
    full, audited requests get 503 ``audit_unavailable`` before they run; once it can be
    written again they are served, and every served request has exactly one record."""
    url, admin = app_role_url
    app = _app_with(
        url,
        root_key_b64,
        audit_spill_dir=str(tmp_path / "spill"),
        audit_spill_max_bytes=4096,
        audit_spill_full="refuse",
    )
    body = {"key": "payroll", "plaintext": base64.b64encode(b"x").decode()}
    served = 0
    try:
        with serving(app) as base:
            s = _session(base)
            api = f"{base}/v1/security"
            assert _post(s, f"{api}/keys", {"name": "payroll"}).status_code == 201
            _audit_inserts(admin, url, allowed=False)
            refused = None
            for _ in range(400):
                answer = _post(s, f"{api}/encrypt", body)
                if answer.status_code != 200:
                    refused = answer
                    break
                served += 1
                time.sleep(0.01)  # the flusher spills every 0.5 s
            assert refused is not None and served > 0, served
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "audit_unavailable"
            assert "envelope" not in refused.json()

            _audit_inserts(admin, url, allowed=True)
            deadline = time.monotonic() + 20
            while (answer := _post(s, f"{api}/encrypt", body)).status_code != 200:
                assert answer.json()["error"]["code"] == "audit_unavailable"
                assert time.monotonic() < deadline, "still refused after the store came back"
                time.sleep(0.1)
            served += 1
    finally:
        app.close()
    with admin.connect() as conn:
        audited = conn.execute(
            sa.text(
                "SELECT count(*), count(DISTINCT record_id) FROM qimem_audit "
                "WHERE action = 'crypto.encrypt' AND outcome = 'success'"
            )
        ).one()
    assert tuple(audited) == (served, served)
