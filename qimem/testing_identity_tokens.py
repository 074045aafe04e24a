"""The identity contract's fixtures and its token checks (used by :mod:`qimem.testing_identity`).

:class:`IdentityFixtures` opens an application context on the backend a store plugin
returns (:func:`qimem.app.build` with ``backend=``), exactly as the CLI and the server do,
with cheap Argon2 settings, realm ``master`` and its ``admin``, and two empty realms.
:class:`TokenChecks` are the contract's checks of what the identity layer keeps between
requests: refresh-token rotation and reuse detection, revocation and introspection,
service accounts, the audit log, and (for a persistent store) all of it surviving the
store being closed and opened again. Everything goes through :mod:`qimem.services.identity`,
never SQL, so it holds whatever database the backend's ``identity_database`` returns.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qimem.app import AppContext, build
from qimem.backend import Backend
from qimem.config import Config
from qimem.errors import AuthError, NotFoundError, ValidationError
from qimem.identity import IdentitySettings, TokenResponse
from qimem.rootkey import ROOT_KEY_SIZE, KeyWrapper
from qimem.services import identity as ids

__all__ = [
    "FAST_ARGON2",
    "IdentityFixtures",
    "OpenBackend",
    "TokenChecks",
    "contract_password",
]

#: Opens the store under test with a root key wrapper: each call opens it anew on the same
#: storage (the fixture ``open_backend`` of a contract subclass returns one).
OpenBackend = Callable[[KeyWrapper], Backend]

#: Argon2 at 1 MiB, one pass: fast contract runs (production defaults are qimem's concern).
FAST_ARGON2: dict[str, int] = {
    "argon2_memory_kib": 1024,
    "argon2_time_cost": 1,
    "argon2_parallelism": 1,
}


def contract_password(username: str) -> str:
    """A password for ``username`` that passes the default password policy."""
    return f"moss-{len(username)}-violet-copper-{sum(map(ord, username)) % 997:03d}"


class IdentityFixtures:
    """Fixtures and helpers shared by the identity contract's checks.

    A subclass provides the fixture ``open_backend``: a callable taking a
    :class:`~qimem.rootkey.KeyWrapper` and returning a :class:`~qimem.backend.Backend` of
    the store under test (what its plugin's factory returns). The first call of a test
    must find the store empty (at least of realms named ``contract-...``); later calls of
    the same test open the same storage again.
    """

    #: Whether data outlives closing the backend (a database, a server). ``memory://``
    #: and other per-process stores set it False: the re-opening checks are skipped.
    persistent: bool = True
    #: The realm most checks work in, and a second one to check nothing leaks across.
    realm = "contract-a"
    other_realm = "contract-b"
    #: The password of ``admin`` in realm ``master`` (passes the password policy).
    admin_password = "nqzva-contract-password"  # noqa: S105 (a test password)
    #: Failed logins before a lockout (small, so the lockout check is quick).
    lockout_threshold = 3

    def identity_settings(self) -> IdentitySettings:
        """The identity settings of the contract's contexts: fast hashing, and revocations
        by another context on the same store seen at once (not within 2 s)."""
        return IdentitySettings(
            **FAST_ARGON2,  # type: ignore[arg-type]
            lockout_threshold=self.lockout_threshold,
            revocation_refresh_seconds=0.0,
        )

    @pytest.fixture
    def root_key(self) -> bytes:
        """This test's root key (the same one each time the store is opened)."""
        return os.urandom(ROOT_KEY_SIZE)

    @pytest.fixture
    def app(self, open_backend: OpenBackend, root_key: bytes) -> Iterator[AppContext]:
        """A context on the store with ``master``/``admin`` and the two contract realms."""
        app = self.prepared_app(open_backend, root_key)
        try:
            yield app
        finally:
            app.close()

    def prepared_app(self, open_backend: OpenBackend, root_key: bytes) -> AppContext:
        """What the ``app`` fixture gives: :meth:`open_app` and the two contract realms."""
        app = self.open_app(open_backend, root_key)
        try:
            ids.create_realm(app, self.realm)
            ids.create_realm(app, self.other_realm)
        except BaseException:
            app.close()
            raise
        return app

    def open_app(self, open_backend: OpenBackend, root_key: bytes) -> AppContext:
        """A context on a newly opened backend (the composition root, :func:`build`), with
        realm ``master`` and its ``admin`` (idempotent); close it with ``app.close()``."""
        backend = open_backend(KeyWrapper(bytearray(root_key)))
        config = Config(
            store_url=f"{backend.scheme}://contract",
            root_key_b64=base64.b64encode(root_key).decode(),
        )
        app = build(config, backend=backend, identity_settings=self.identity_settings())
        try:
            ids.bootstrap(app, self.admin_password)
        except BaseException:
            app.close()
            raise
        return app

    # -- helpers ----------------------------------------------------------------------

    def add_user(
        self, app: AppContext, username: str, roles: list[str] | None = None, realm: str = ""
    ) -> str:
        """Add ``username`` (password :func:`contract_password`) to ``realm`` (default
        :attr:`realm`) as the local operator; returns the username."""
        ids.add_user(app, realm or self.realm, username, contract_password(username), roles or [])
        return username

    def login(self, app: AppContext, username: str, realm: str = "") -> TokenResponse:
        """A password login of ``username`` with :func:`contract_password`."""
        return self.password_grant(app, realm or self.realm, username, contract_password(username))

    @staticmethod
    def password_grant(app: AppContext, realm: str, username: str, password: str) -> TokenResponse:
        params = {"grant_type": "password", "username": username, "password": password}
        return ids.token(app, realm, params)

    @staticmethod
    def refresh(app: AppContext, realm: str, refresh_token: str | None) -> TokenResponse:
        params = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return ids.token(app, realm, params)

    @staticmethod
    def refused(code: str, call: Callable[..., Any], *args: Any) -> AuthError:
        """``call(*args)`` fails with exactly an :class:`AuthError` (not a subclass: not a
        ``ForbiddenError``) of ``code``; the error."""
        with pytest.raises(AuthError) as info:
            call(*args)
        assert type(info.value) is AuthError, info.value
        assert info.value.code == code
        return info.value


class TokenChecks(IdentityFixtures):
    """Refresh tokens, revocation, introspection, service accounts, audit, persistence."""

    # -- refresh tokens ---------------------------------------------------------------

    def test_refresh_rotates_and_reuse_revokes_the_family(self, app: AppContext) -> None:
        first = self.login(app, self.add_user(app, "rota", ["encryptor"]))
        second = self.refresh(app, self.realm, first.refresh_token)
        assert second.refresh_token not in (None, first.refresh_token)
        assert ids.authenticate(app, second.access_token).username == "rota"
        # The first token was used: using it again is a theft signal that ends the family.
        self.refused("invalid_grant", self.refresh, app, self.realm, first.refresh_token)
        self.refused("invalid_grant", self.refresh, app, self.realm, second.refresh_token)
        assert ids.introspect(app, self.realm, second.refresh_token or "") == {"active": False}
        assert self.refresh(app, self.realm, self.login(app, "rota").refresh_token)

    def test_concurrent_refreshes_of_one_token_succeed_once(self, app: AppContext) -> None:
        from qimem.testing import run_concurrently

        first = self.login(app, self.add_user(app, "racer"))
        results = run_concurrently(4, lambda _: self.refresh(app, self.realm, first.refresh_token))
        assert sum(isinstance(r, TokenResponse) for r in results) == 1, results
        assert all(isinstance(r, TokenResponse | AuthError) for r in results), results

    def test_refresh_token_is_bound_to_its_realm(self, app: AppContext) -> None:
        tokens = self.login(app, self.add_user(app, "bound"))
        self.refused("invalid_grant", self.refresh, app, self.other_realm, tokens.refresh_token)
        # The refused attempt elsewhere neither worked nor burnt the token in its own realm.
        assert self.refresh(app, self.realm, tokens.refresh_token).subject == tokens.subject

    # -- revocation and introspection -------------------------------------------------

    def test_revoke_and_introspect(self, app: AppContext) -> None:
        tokens = self.login(app, self.add_user(app, "rev", ["auditor"]))
        info = ids.introspect(app, self.realm, tokens.access_token)
        assert info["active"] and info["username"] == "rev" and info["realm"] == self.realm
        assert info["roles"] == ["auditor"]
        assert ids.introspect(app, self.realm, tokens.refresh_token or "")["active"]
        assert ids.revoke(app, self.realm, tokens.access_token) is True
        assert ids.introspect(app, self.realm, tokens.access_token) == {"active": False}
        self.refused("invalid_token", ids.authenticate, app, tokens.access_token)
        assert ids.revoke(app, self.realm, tokens.refresh_token or "") is True
        self.refused("invalid_grant", self.refresh, app, self.realm, tokens.refresh_token)
        assert ids.revoke(app, self.realm, "not-a-token-at-all-xxxxxxxx") is False

    def test_tokens_are_not_usable_from_another_realm(self, app: AppContext) -> None:
        tokens = self.login(app, self.add_user(app, "local", ["admin"]))
        for token in (tokens.access_token, tokens.refresh_token or ""):
            assert ids.introspect(app, self.other_realm, token) == {"active": False}
            assert ids.revoke(app, self.other_realm, token) is False
        # Revoking from the other realm changed nothing: both still work here.
        assert ids.authenticate(app, tokens.access_token).realm == self.realm
        assert self.refresh(app, self.realm, tokens.refresh_token)

    # -- service accounts -------------------------------------------------------------

    def test_service_account_client_credentials(self, app: AppContext) -> None:
        made = ids.create_client(app, self.realm, "svc", ["encryptor"])
        assert made.user.kind == "client" and made.secret not in repr(made)
        params = {"grant_type": "client_credentials", "client_id": "svc"}
        issued = ids.token(app, self.realm, {**params, "client_secret": made.secret})
        assert issued.refresh_token is None
        principal = ids.authenticate(app, issued.access_token)
        assert (principal.kind, principal.username) == ("client", "svc")
        assert principal.allows("crypto:encrypt") and not principal.allows("keys:create")
        bad = {**params, "client_secret": made.secret[:-2] + "xx"}
        self.refused("invalid_client", ids.token, app, self.realm, bad)
        good = {**params, "client_secret": made.secret}
        self.refused("invalid_client", ids.token, app, self.other_realm, good)
        # A user's password is no client secret; a service account has no password login.
        user = {**params, "client_id": self.add_user(app, "person")}
        user["client_secret"] = contract_password("person")
        self.refused("invalid_client", ids.token, app, self.realm, user)
        self.refused("invalid_grant", self.password_grant, app, self.realm, "svc", made.secret)
        ids.set_user_enabled(app, self.realm, "svc", False)
        self.refused("invalid_client", ids.token, app, self.realm, good)
        self.refused("invalid_token", ids.authenticate, app, issued.access_token)

    # -- audit ------------------------------------------------------------------------

    def test_audit_records_are_written_and_readable(self, app: AppContext) -> None:
        password = contract_password(self.add_user(app, "audited"))
        with pytest.raises(AuthError):
            self.password_grant(app, self.realm, "audited", "wrong-" + password)
        tokens = self.login(app, "audited")
        ids.revoke(app, self.realm, tokens.access_token)
        events = ids.audit_events(app, self.realm)
        seen = [(e.action, e.target, e.outcome) for e in events]
        for expected in [
            ("user.create", "audited", "success"),
            ("login", "audited", "failure"),
            ("login", "audited", "success"),
            ("token.revoke", "access", "success"),
        ]:
            assert expected in seen, seen
        assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
        assert [e.action for e in ids.audit_events(app, self.realm, action="user.create")] == [
            "user.create"
        ]
        text = repr([e.to_dict() for e in events])
        assert password not in text and tokens.access_token not in text
        assert (tokens.refresh_token or "") not in text

    def test_audit_log_is_realm_scoped(self, app: AppContext) -> None:
        self.add_user(app, "only-here")
        assert all(e.realm == self.realm for e in ids.audit_events(app, self.realm))
        assert "only-here" not in repr(ids.audit_events(app, self.other_realm))
        with pytest.raises(NotFoundError):
            ids.audit_events(app, "contract-no-such-realm")

    # -- persistence ------------------------------------------------------------------

    def _reopen(self, app: AppContext, open_backend: OpenBackend, root_key: bytes) -> AppContext:
        if not self.persistent:
            pytest.skip("the store is not persistent (persistent = False)")
        app.close()
        return self.open_app(open_backend, root_key)

    def test_identity_survives_reopening_the_store(
        self, app: AppContext, open_backend: OpenBackend, root_key: bytes
    ) -> None:
        ids.create_role(app, self.realm, "reader", ["keys:read"], "reads keys")
        self.add_user(app, "kept", ["reader"])
        ids.grant_role(app, self.realm, "kept", "encryptor", "payroll-*")
        secret = ids.create_client(app, self.realm, "kept-svc", ["auditor"]).secret
        live = self.login(app, "kept")
        again = self._reopen(app, open_backend, root_key)
        try:
            assert {self.realm, self.other_realm} <= {r.name for r in ids.list_realms(again)}
            assert "reader" in {r.name for r in ids.list_roles(again, self.realm)}
            principal = ids.authenticate(again, live.access_token)  # signing keys kept
            assert principal.allows("crypto:encrypt", "payroll-eu")
            assert not principal.allows("crypto:encrypt", "hr-eu")
            assert self.refresh(again, self.realm, live.refresh_token).subject == live.subject
            creds = {"grant_type": "client_credentials", "client_id": "kept-svc"}
            assert ids.token(again, self.realm, {**creds, "client_secret": secret})
            actions = {e.action for e in ids.audit_events(again, self.realm)}
            assert {"role.create", "user.create", "role.grant", "login"} <= actions
        finally:
            again.close()

    def test_revocations_survive_reopening_the_store(
        self, app: AppContext, open_backend: OpenBackend, root_key: bytes
    ) -> None:
        tokens = self.login(app, self.add_user(app, "cut"))
        family = self.login(app, "cut")
        self.add_user(app, "locked")
        for _ in range(self.lockout_threshold):
            with pytest.raises(AuthError):
                self.password_grant(app, self.realm, "locked", "wrong-password-123")
        ids.revoke(app, self.realm, tokens.access_token)
        ids.revoke(app, self.realm, family.refresh_token or "")
        self.add_user(app, "off")
        off = self.login(app, "off")
        ids.set_user_enabled(app, self.realm, "off", False)
        again = self._reopen(app, open_backend, root_key)
        try:
            for token in (tokens.access_token, off.access_token):
                self.refused("invalid_token", ids.authenticate, again, token)
                assert ids.introspect(again, self.realm, token) == {"active": False}
            self.refused("invalid_grant", self.refresh, again, self.realm, family.refresh_token)
            self.refused("invalid_grant", self.refresh, again, self.realm, off.refresh_token)
            self.refused("invalid_grant", self.login, again, "locked")
            self.refused("invalid_grant", self.login, again, "off")
            assert ids.authenticate(again, self.login(again, "cut").access_token).username == "cut"
        finally:
            again.close()

    def test_two_open_backends_share_identity(
        self, app: AppContext, open_backend: OpenBackend, root_key: bytes
    ) -> None:
        """Two contexts on one store at once (two servers): each sees the other's writes
        at once, not when the other closes (a store that loads a snapshot fails here)."""
        if not self.persistent:
            pytest.skip("the store is not persistent (persistent = False)")
        other = self.open_app(open_backend, root_key)
        try:
            self.add_user(app, "both")
            first = self.login(other, "both")
            assert ids.authenticate(app, first.access_token).username == "both"
            second = self.refresh(app, self.realm, first.refresh_token)
            # Reuse of the used token through the other context revokes the family.
            self.refused("invalid_grant", self.refresh, other, self.realm, first.refresh_token)
            self.refused("invalid_grant", self.refresh, app, self.realm, second.refresh_token)
            assert ids.revoke(other, self.realm, second.access_token)
            self.refused("invalid_token", ids.authenticate, app, second.access_token)
            ids.set_user_enabled(app, self.realm, "both", False)
            self.refused("invalid_grant", self.login, other, "both")
        finally:
            other.close()

    def test_reopening_identity_on_one_backend_keeps_its_data(self, app: AppContext) -> None:
        if not self.persistent:
            pytest.skip("the store is not persistent (persistent = False)")
        self.add_user(app, "stays")
        ids.close_identity(app)  # the next use asks the backend for its database again
        assert self.login(app, "stays").realm == self.realm
        with pytest.raises(ValidationError):
            ids.configure(app, self.identity_settings())  # identity is open again
