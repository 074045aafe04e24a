"""A contract test suite for the identity layer a store backend provides.

A store plugin's factory returns a :class:`qimem.backend.Backend`; its
``identity_database`` factory is where realms, users, roles, grants, tokens and the audit
log live. :class:`IdentityContract` runs qimem's identity layer through that backend, the
way the CLI and the server use it (:func:`qimem.app.build` with ``backend=``, then the
public :mod:`qimem.services.identity` functions), and checks that it behaves. The built-in
``memory://``, SQLite and PostgreSQL stores pass it (``tests/test_identity_contract.py``).
It needs pytest (``pip install 'qimem[test]'``).

Usage: subclass :class:`IdentityContract` (the name must start with ``Test``) and provide
an ``open_backend`` fixture returning a callable that takes a
:class:`~qimem.rootkey.KeyWrapper` and opens your store, returning its ``Backend``. The
first call of a test must find the store empty; later calls of the same test must open
the same storage (the contract closes a backend and opens it again to check persistence)::

    import pytest
    from qimem.backend import Backend
    from qimem.registry import Registry, make_plugin_manager
    from qimem.testing_identity import IdentityContract


    class TestRedisIdentity(IdentityContract):
        persistent = True  # False: data lives and dies with the process (like memory://)

        @pytest.fixture
        def open_backend(self, redis_url):  # redis_url: a fresh, empty database
            factory = Registry(make_plugin_manager(["my-plugin"])).keystores["redis"]
            return lambda wrapper: Backend.of(factory(redis_url, wrapper), "redis")

What it checks: realms (create, list, delete; a deleted realm's users and tokens are gone
for good, even when a realm of the same name is made again); users (create, disable,
enable; password login; one uniform failure for a wrong password, an unknown user or
realm and a disabled account; lockout after :attr:`IdentityFixtures.lockout_threshold`
failures); built-in and custom roles and key-name-scoped grants; the no-escalation rule
(a helpdesk user holding only ``users:admin`` cannot hand out, or take over an account
holding, what he lacks); refresh-token rotation and reuse revoking the family (also under
concurrent use); revocation and introspection; service accounts; audit records; and that
nothing crosses realms (users, roles, tokens, the audit log). With ``persistent = True``:
everything, revocations and lockouts included, survives closing and re-opening the store,
and two backends open on the same store at once see each other's changes at once.

:class:`NoIdentityContract` is the small check for a backend *without* an identity layer
(``identity_database=None``, or a bare :class:`~qimem.keystore.KeyStore` from a plugin
API 1.0 factory): identity operations fail with a clear
:class:`~qimem.errors.ConfigError`, and keys still work.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest

from qimem import services
from qimem.app import AppContext, build
from qimem.config import Config
from qimem.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ValidationError,
)
from qimem.identity import BUILTIN_ROLES, Principal
from qimem.rootkey import ROOT_KEY_SIZE, KeyWrapper
from qimem.services import identity as ids
from qimem.testing_identity_tokens import (
    FAST_ARGON2,
    IdentityFixtures,
    OpenBackend,
    TokenChecks,
    contract_password,
)

__all__ = [
    "FAST_ARGON2",
    "IdentityContract",
    "IdentityFixtures",
    "NoIdentityContract",
    "OpenBackend",
    "contract_password",
]


class IdentityContract(TokenChecks):
    """The behaviour of the identity layer on a store's backend (see the module docstring).

    Subclass it as ``TestSomething`` with an ``open_backend`` fixture; set
    :attr:`persistent` to False for a store whose data dies with the process.
    """

    #: A realm some checks create and delete (all contract realms start ``contract-``).
    third_realm = "contract-c"

    def principal(self, app: AppContext, username: str, realm: str = "") -> Principal:
        """The principal of a fresh password login of ``username``."""
        return ids.authenticate(app, self.login(app, username, realm).access_token)

    # -- realms -----------------------------------------------------------------------

    def test_realms_create_list_delete(self, app: AppContext) -> None:
        names = {r.name for r in ids.list_realms(app)}
        assert {"master", self.realm, self.other_realm} <= names
        with pytest.raises(ConflictError) as taken:
            ids.create_realm(app, self.realm)
        assert taken.value.code == "realm_exists"
        ids.create_realm(app, self.third_realm)
        ids.delete_realm(app, self.third_realm)
        assert self.third_realm not in {r.name for r in ids.list_realms(app)}
        with pytest.raises(NotFoundError):
            ids.require_realm(app, self.third_realm)
        with pytest.raises(ValidationError):
            ids.delete_realm(app, "master")

    def test_realm_holding_keys_is_not_deleted(self, app: AppContext) -> None:
        services.create_key(app, realm=self.realm, name="pinned")
        with pytest.raises(ConflictError) as info:
            ids.delete_realm(app, self.realm)
        assert info.value.code == "realm_not_empty"
        with pytest.raises(NotFoundError):  # keys only go to realms that exist
            services.create_key(app, realm="contract-no-such-realm")

    def test_deleted_realm_leaves_nothing_behind(self, app: AppContext) -> None:
        ids.create_realm(app, self.third_realm)
        ids.create_role(app, self.third_realm, "ghostly", ["keys:read"])
        self.add_user(app, "ghost", ["admin"], realm=self.third_realm)
        tokens = self.login(app, "ghost", self.third_realm)
        ids.delete_realm(app, self.third_realm)
        ids.create_realm(app, self.third_realm)  # the same name again: a new, empty realm
        assert ids.list_users(app, self.third_realm) == []
        assert {r.name for r in ids.list_roles(app, self.third_realm)} == set(BUILTIN_ROLES)
        self.refused("invalid_token", ids.authenticate, app, tokens.access_token)
        self.refused("invalid_grant", self.refresh, app, self.third_realm, tokens.refresh_token)
        self.refused("invalid_grant", self.login, app, "ghost", self.third_realm)

    # -- users ------------------------------------------------------------------------

    def test_user_create_and_password_login(self, app: AppContext) -> None:
        user = ids.add_user(app, self.realm, "alice", contract_password("alice"), ["encryptor"])
        assert (user.username, user.realm, user.kind, user.enabled) == (
            "alice",
            self.realm,
            "user",
            True,
        )
        assert contract_password("alice") not in repr(user)
        assert [u.username for u in ids.list_users(app, self.realm)] == ["alice"]
        with pytest.raises(ConflictError):
            ids.add_user(app, self.realm, "alice", contract_password("alice"))
        principal = self.principal(app, "alice")
        assert (principal.username, principal.realm, principal.roles) == (
            "alice",
            self.realm,
            ("encryptor",),
        )

    def test_login_failures_are_uniform(self, app: AppContext) -> None:
        self.add_user(app, "bob")
        self.add_user(app, "carol")
        ids.set_user_enabled(app, self.realm, "carol", False)
        right = contract_password("bob")
        attempts = [
            (self.realm, "bob", "wrong-" + right),  # wrong password
            (self.realm, "nobody", right),  # unknown user
            ("contract-no-such-realm", "bob", right),  # unknown realm
            (self.other_realm, "bob", right),  # another realm's user
            (self.realm, "carol", contract_password("carol")),  # disabled, right password
        ]
        messages = {
            str(self.refused("invalid_grant", self.password_grant, app, *a)) for a in attempts
        }
        assert len(messages) == 1, messages

    def test_disabling_a_user_ends_his_tokens(self, app: AppContext) -> None:
        tokens = self.login(app, self.add_user(app, "dave", ["encryptor"]))
        ids.set_user_enabled(app, self.realm, "dave", False)
        assert not ids.list_users(app, self.realm)[0].enabled
        self.refused("invalid_token", ids.authenticate, app, tokens.access_token)
        self.refused("invalid_grant", self.refresh, app, self.realm, tokens.refresh_token)
        self.refused("invalid_grant", self.login, app, "dave")
        ids.set_user_enabled(app, self.realm, "dave", True)
        assert self.principal(app, "dave").username == "dave"

    def test_lockout_after_repeated_failures(self, app: AppContext) -> None:
        self.add_user(app, "erin")
        self.add_user(app, "frank")
        for _ in range(self.lockout_threshold):
            with pytest.raises(AuthError):
                self.password_grant(app, self.realm, "erin", "wrong-password-123")
        self.refused("invalid_grant", self.login, app, "erin")  # the right password
        assert self.login(app, "frank")  # only erin is locked
        ids.set_password(app, self.realm, "erin", contract_password("erin") + "-new")
        assert self.password_grant(app, self.realm, "erin", contract_password("erin") + "-new")

    def test_users_are_realm_scoped(self, app: AppContext) -> None:
        ids.add_user(app, self.realm, "twin", contract_password("twin"), ["admin"])
        ids.add_user(app, self.other_realm, "twin", contract_password("twin") + "-b")
        assert self.principal(app, "twin").allows("keys:create")
        other = self.password_grant(app, self.other_realm, "twin", contract_password("twin") + "-b")
        assert ids.authenticate(app, other.access_token).permissions == {}
        ids.set_user_enabled(app, self.other_realm, "twin", False)
        assert self.login(app, "twin")  # the namesake in the other realm is unaffected
        assert [u.realm for u in ids.list_users(app, self.realm)] == [self.realm]

    # -- roles and grants ---------------------------------------------------------------

    def test_builtin_roles_in_every_realm(self, app: AppContext) -> None:
        for realm in (self.realm, self.other_realm):
            found = {r.name: r for r in ids.list_roles(app, realm)}
            for name, permissions in BUILTIN_ROLES.items():
                assert found[name].builtin and set(found[name].permissions) == set(permissions)

    def test_custom_role_and_scoped_grant(self, app: AppContext) -> None:
        role = ids.create_role(app, self.realm, "reader", ["keys:read", "audit:read"])
        assert (role.name, role.builtin) == ("reader", False)
        self.add_user(app, "gina", ["reader"])
        assert ids.grant_role(app, self.realm, "gina", "encryptor", "payroll-*")
        principal = self.principal(app, "gina")
        assert principal.allows("audit:read") and principal.allows("keys:read")
        assert principal.allows("crypto:encrypt", "payroll-eu")
        assert not principal.allows("crypto:encrypt", "hr-eu")
        assert not principal.allows("crypto:encrypt")  # realm-wide: not by a scoped grant
        assert ids.revoke_role(app, self.realm, "gina", "encryptor")
        assert not self.principal(app, "gina").allows_any("crypto:encrypt")

    def test_custom_roles_are_realm_scoped(self, app: AppContext) -> None:
        ids.create_role(app, self.realm, "local-role", ["keys:read"])
        assert "local-role" not in {r.name for r in ids.list_roles(app, self.other_realm)}
        ids.add_user(app, self.other_realm, "hank", contract_password("hank"))
        with pytest.raises(NotFoundError):
            ids.grant_role(app, self.other_realm, "hank", "local-role")

    # -- no escalation ----------------------------------------------------------------

    def test_helpdesk_cannot_grant_what_it_lacks(self, app: AppContext) -> None:
        ids.create_role(app, self.realm, "helpdesk", ["users:admin"])
        self.add_user(app, "desk", ["helpdesk"])
        self.add_user(app, "boss", ["admin"])
        self.add_user(app, "plain")
        desk = self.principal(app, "desk")
        pw = contract_password("someone-new")
        refusals = [
            lambda: ids.grant_role(app, self.realm, "plain", "admin", principal=desk),
            lambda: ids.grant_role(app, self.realm, "desk", "encryptor", principal=desk),
            lambda: ids.add_user(app, self.realm, "mole", pw, ["key-manager"], principal=desk),
            lambda: ids.create_role(app, self.realm, "sneak", ["keys:create"], principal=desk),
            lambda: ids.create_client(app, self.realm, "bot", ["admin"], principal=desk),
            lambda: ids.set_password(app, self.realm, "boss", pw, principal=desk),
            lambda: ids.set_user_enabled(app, self.realm, "boss", False, principal=desk),
        ]
        for attempt in refusals:
            with pytest.raises(ForbiddenError) as info:
                attempt()
            assert info.value.code == "escalation_denied"
        # Nothing changed: no grant, no account, no role; boss keeps his password.
        assert self.principal(app, "plain").roles == ()
        assert self.principal(app, "desk").roles == ("helpdesk",)
        assert self.principal(app, "boss").allows("realms:admin")
        assert {u.username for u in ids.list_users(app, self.realm)} == {"desk", "boss", "plain"}
        # What he holds he may hand out, so the refusals above were about escalation.
        ids.grant_role(app, self.realm, "plain", "helpdesk", principal=desk)
        assert self.principal(app, "plain").roles == ("helpdesk",)

    def test_realm_admin_cannot_reach_another_realm(self, app: AppContext) -> None:
        self.add_user(app, "chief", ["admin"])
        chief = self.principal(app, "chief")
        self.add_user(app, "victim", realm=self.other_realm)
        attempts = [
            lambda: ids.list_users(app, self.other_realm, principal=chief),
            lambda: ids.grant_role(app, self.other_realm, "victim", "admin", principal=chief),
            lambda: ids.audit_events(app, self.other_realm, principal=chief),
        ]
        for attempt in attempts:
            with pytest.raises((NotFoundError, ForbiddenError)):
                attempt()
        with pytest.raises(ForbiddenError):  # realm administration is for master admins
            ids.create_realm(app, "contract-mine", principal=chief)
        assert ids.list_users(app, self.other_realm)[0].grants == ()


class NoIdentityContract:
    """A backend with no identity layer: identity operations fail with a clear
    :class:`~qimem.errors.ConfigError` naming the store; its keys still work.

    Subclass it (``TestSomething``) with the same ``open_backend`` fixture as
    :class:`IdentityContract`.
    """

    @pytest.fixture
    def app(self, open_backend: OpenBackend) -> Iterator[AppContext]:
        root_key = os.urandom(ROOT_KEY_SIZE)
        backend = open_backend(KeyWrapper(bytearray(root_key)))
        config = Config(
            store_url=f"{backend.scheme}://contract",
            root_key_b64=base64.b64encode(root_key).decode(),
        )
        with build(config, backend=backend) as app:
            yield app

    def test_identity_operations_say_there_is_no_identity_layer(self, app: AppContext) -> None:
        assert not app.backend.has_identity
        calls = [
            lambda: ids.bootstrap(app, "nqzva-contract-password"),
            lambda: ids.list_realms(app),
            lambda: ids.create_realm(app, "contract-a"),
            lambda: ids.token(app, "master", {"grant_type": "client_credentials"}),
            lambda: ids.authenticate(app, "x" * 40),
            lambda: ids.audit_events(app, "master"),
        ]
        for call in calls:
            with pytest.raises(ConfigError) as info:
                call()
            assert "has no identity layer" in str(info.value)
            assert app.backend.scheme in str(info.value)

    def test_keys_work_without_identity(self, app: AppContext) -> None:
        key = services.create_key(app, name="no-identity", realm="anywhere")
        assert key.realm == "anywhere"
        assert not app.has_identity
        assert app.store.get("anywhere", key.key_id) == key
