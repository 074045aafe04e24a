"""The login-provider half of :class:`~qimem.identity.logins.Logins`: the registered
providers, asking a realm's chain, mapping external identities to roles, and the realms'
sealed login configuration (:mod:`qimem.identity.providers` defines the interface)."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Connection

from qimem.errors import AuthError, DecryptionError, StoreUnavailableError, ValidationError
from qimem.identity import realms, roles, users
from qimem.identity.base import IdentityBase
from qimem.identity.db import Database
from qimem.identity.passwords import LoginBusyError
from qimem.identity.providers import (
    EXTERNAL_MARKER,
    PASSWORD,
    Authenticated,
    LoginAttempt,
    ProviderUnavailableError,
    RealmAuth,
    RoleMapping,
    decode_config,
    default_providers,
    external_marker,
    parse_config,
    resolve_providers,
)
from qimem.identity.settings import IdentitySettings
from qimem.identity.users import User
from qimem.rootkey import KeyWrapper

log = logging.getLogger("qimem.identity")


def _auth_context(realm: str) -> bytes:
    """What a realm's sealed login configuration is bound to (not movable to another realm)."""
    return b"qimem realm auth v1|" + realm.encode("utf-8")


def _keep_secrets(document: dict[str, Any], current: RealmAuth) -> dict[str, Any]:
    """``document`` with each option shown as ``"(set)"`` replaced by its stored value."""
    merged = dict(document)
    for name, options in document.items():
        if not isinstance(options, dict) or name in ("providers", "mapping", "mappings"):
            continue
        stored = current.options.get(name, {})
        merged[name] = {
            k: (stored.get(k) if v == "(set)" and k in stored else v) for k, v in options.items()
        }
    return merged


def _could_accept(name: str, local: bool, user: User | None) -> bool:
    """Whether provider ``name`` could log ``user`` (None: no qimem user yet) in."""
    if user is None:
        return True
    if user.secret_hash.startswith(EXTERNAL_MARKER):
        return user.secret_hash == external_marker(name)
    return local


def _decoy_password() -> str:
    """What a provider that could not log this user in is asked with instead of his
    password (the same work, so no timing tells which kind of user a name is; his password
    never goes to a directory that is not his: a local user's to the LDAP server)."""
    return "decoy-" + secrets.token_urlsafe(24)


class ProviderLogins(IdentityBase):
    """Login providers and the realms' login configuration.

    :param auth_providers: returns the registered login providers (name → provider or
        ``"module:attr"``), e.g. an application context's
        :attr:`qimem.registry.Registry.auth_providers`; called on first login. Default:
        the built-in plugins' providers.
    """

    def __init__(
        self,
        database: Database,
        wrapper: KeyWrapper,
        settings: IdentitySettings | None = None,
        *,
        auth_providers: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(database, wrapper, settings)
        self._provider_source = auth_providers or default_providers()
        self._registered: dict[str, Any] | None = None
        self._providers: dict[str, Any] = {}
        self._providers_lock = threading.RLock()

    def _ask_providers(
        self,
        realm: str,
        username: str,
        password: str,
        source: str | None,
        config: RealmAuth,
        user: User | None,
        locked: bool,
    ) -> tuple[Authenticated | None, str, ProviderUnavailableError | None]:
        """Ask the realm's providers in order; the first yes, its provider's name, and the
        last "cannot decide" that matters (if any). A locked user's login asks only local
        providers. A provider that fails otherwise counts as unavailable (logged).

        "Cannot decide" matters only from a provider that could have logged this user in:
        any, for a name without a qimem user; only local providers for a local password
        user (an external identity never takes over his account); only the owning provider
        for an external user. So a directory outage never turns the refusal of a local
        user's wrong password into an uncounted 503 (an oracle for guessing it). The other
        providers are still asked (the same time for every kind of name), but with a decoy
        password: a local user's password never goes to the directory."""
        unavailable: ProviderUnavailableError | None = None
        last = config.providers[-1]
        for name in config.providers:
            last = name
            provider = self._provider(name)
            local = bool(getattr(provider, "local", False)) or (
                provider is None and name == PASSWORD
            )
            relevant = _could_accept(name, local, user)
            failure: ProviderUnavailableError | None = None
            found: Any = None
            if provider is None:
                failure = ProviderUnavailableError(
                    f"the login provider {name!r} of this realm is not loaded"
                )
            elif locked and not local:
                continue
            else:
                attempt = LoginAttempt(
                    realm,
                    username,
                    password if relevant else _decoy_password(),
                    source,
                    config.options.get(name, {}),
                    user.secret_hash if user is not None else None,
                    self.hashing,
                )
                try:
                    found = provider.authenticate(attempt)
                except ProviderUnavailableError as exc:
                    failure = exc
                except (AuthError, LoginBusyError, StoreUnavailableError):
                    raise
                except Exception as exc:
                    log.warning(
                        "login provider %r failed: %s (treated as unavailable)",
                        name,
                        type(exc).__name__,
                    )
                    failure = ProviderUnavailableError(
                        f"the login provider {name!r} failed; retry later"
                    )
                if found is not None and not isinstance(found, Authenticated):
                    log.warning("login provider %r returned a %s", name, type(found).__name__)
                    found = None
                    failure = ProviderUnavailableError(
                        f"the login provider {name!r} failed; retry later"
                    )
            if found is not None:
                return found, name, None
            if failure is not None and relevant:
                unavailable = failure
        return None, last, unavailable

    def _provider(self, name: str) -> Any:
        """The registered provider ``name``, resolved (imported) on first use; or None."""
        with self._providers_lock:
            found = self._providers.get(name)
            if found is None:
                if self._registered is None:
                    self._registered = dict(self._provider_source())
                if name not in self._registered:
                    return None
                found = resolve_providers({name: self._registered[name]})[name]
                self._providers[name] = found
            return found

    def provider_names(self) -> list[str]:
        """The names of the registered login providers (nothing imported)."""
        self._provider("")
        return sorted(self._registered or {})

    def auth_providers(self) -> dict[str, Any]:
        """Every registered login provider, resolved (name → provider; imports each)."""
        return {name: self._provider(name) for name in self.provider_names()}

    def _sync_roles(
        self, conn: Connection, realm: str, user: User, found: Authenticated, mapping: RoleMapping
    ) -> float:
        """Make an external user's grants the ones ``mapping`` (his provider's, or his
        issuer's: :meth:`RealmAuth.mapping_for`) gives ``found`` (roles the realm lacks are
        skipped). Returns the token cut-off time if a role was taken away (tokens naming it
        stop working), else 0."""
        known = set(roles.permissions_by_role(conn, realm, self.sealer))
        wanted = {(r, "") for r in mapping.roles_for(found) if r in known}
        held = set(roles.grants_of(conn, self.sealer, realm, user.user_id))
        rows = set(roles.grants_of_rows(conn, realm, user.user_id))
        cutoff = 0.0
        stale = rows - wanted
        if stale:
            for role, scope in stale:
                roles.revoke(conn, realm, user.user_id, role, scope)
            cutoff = self.tokens.cut_off(conn, user.user_id) + 0.002
            users.reseal(conn, self.sealer, user.user_id)
            roles.reseal_grants(conn, self.sealer, realm, user.user_id, sorted(held & wanted))
        for role, scope in sorted(wanted - held):
            roles.grant(conn, self.sealer, realm, user.user_id, role, scope or None)
        return cutoff

    def realm_auth(self, realm: str, conn: Connection | None = None) -> RealmAuth:
        """The login configuration of ``realm`` (password only if none was set). A stored
        configuration that does not unseal under the root key (written without it) is
        ignored: the realm falls back to passwords only, and the violation is reported."""
        if conn is None:
            with self.db.read() as own:
                return self.realm_auth(realm, own)
        return self.realm_auth_of(realm, realms.auth_config_blob(conn, realm))

    def realm_auth_of(self, realm: str, blob: bytes | None) -> RealmAuth:
        """The login configuration sealed in ``blob`` (None: password only); see
        :meth:`realm_auth`."""
        if blob is None:
            return RealmAuth()
        try:
            data = self._wrapper.unwrap(blob, _auth_context(realm))
            return decode_config(bytes(data))
        except (DecryptionError, ValidationError, ValueError):
            self._integrity_violation(realm, "realm_auth", f"login configuration of {realm}")
            return RealmAuth()

    def set_realm_auth(self, realm: str, document: Any, *, actor: str = "local") -> RealmAuth:
        """Validate and store ``realm``'s login configuration (``None``: back to passwords
        only). Secret options the document shows as ``"(set)"`` keep their stored value.

        :raises ValidationError: a bad document, an unknown provider or role.
        """
        with self.db.begin() as conn:
            realms.require(conn, realm)
            if document is None:
                realms.set_auth_config_blob(conn, realm, None)
                self.audit.record(realm, actor, "realm.providers", realm, conn=conn, reset=True)
                return RealmAuth()
            current = self.realm_auth(realm, conn)
            if isinstance(document, dict):
                document = _keep_secrets(document, current)
            config = parse_config(document, self._provider, self.provider_names())
            known = set(roles.permissions_by_role(conn, realm, self.sealer))
            missing = sorted(config.roles() - known)
            if missing:
                raise ValidationError(
                    f"the mapping names role(s) realm {realm!r} does not have: "
                    + ", ".join(missing),
                    code="role_not_found",
                )
            blob = self._wrapper.wrap(config.encode(), _auth_context(realm))
            realms.set_auth_config_blob(conn, realm, blob)
            self.audit.record(
                realm,
                actor,
                "realm.providers",
                realm,
                conn=conn,
                chain=list(config.providers),
                jit=config.jit_anywhere(),
                per_provider=config.mappings is not None,
            )
        return config

    def add_external_user(
        self, realm: str, username: str, provider: str, *, actor: str = "local"
    ) -> User:
        """Provision ``username`` for the external provider ``provider`` (no password; its
        roles come from the realm's mapping at each login): how an external identity logs
        in to a realm whose ``jit_users`` is off."""
        if provider == PASSWORD or self._provider(provider) is None:
            raise ValidationError(
                f"{provider!r} is not a loaded external login provider", code="unknown_provider"
            )
        with self.db.begin() as conn:
            realms.require(conn, realm)
            made = users.create(
                conn, self.sealer, realm, username, external_marker(provider), "user"
            )
            self.audit.record(realm, actor, "user.create", username, conn=conn, provider=provider)
        return made
