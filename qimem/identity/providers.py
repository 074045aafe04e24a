"""Login providers: the interface a ``qimem_register_auth_providers`` plugin implements, a
realm's provider chain and how external identities become qimem users with roles.

A provider is any object with ``authenticate(attempt) -> Authenticated | None``:

* return :class:`Authenticated` when the credentials are right;
* return ``None`` when they are not (or the user is not the provider's): the next provider
  of the realm's chain is asked, and if none accepts, the login gets the one uniform
  ``invalid_grant`` answer, whichever provider refused and why;
* raise :class:`ProviderUnavailableError` when it cannot decide (a directory is down or too
  slow): if no later provider accepts, the login is 503 with ``Retry-After``, never "wrong
  password", and no failure is counted against the user.

Optional: ``check_options(options) -> dict`` validates (and normalizes) the provider's
options when an administrator sets a realm's configuration; ``local = True`` marks a
provider that checks qimem's own stored password hash (it is still asked for a locked user,
so a locked login costs the same time; external providers are not asked then).

The host (:mod:`qimem.identity.logins`) does the rest the same way for every provider:
lockout (one counter per qimem user, whichever provider failed), the uniform answer, the
audit record naming the provider, and, for external identities, the mapping: groups and
claims to roles, default roles, just-in-time creation of the qimem user, each provider's
(and each trusted issuer's) own (:meth:`RealmAuth.mapping_for`). A qimem user made
for an external identity has no password (its stored secret is the marker
``!external:<provider>``), so the password provider never accepts it, and an external
identity never logs in as a local password user of the same name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qimem import references
from qimem.errors import PluginError, QimemError, ValidationError

PASSWORD = "password"  # noqa: S105 (the built-in provider's name, not a secret)
EXTERNAL_MARKER = "!external:"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SECRET_OPTION = re.compile(r"pass|secret|token|credential", re.I)
_MAX_CONFIG = 64 * 1024


class ProviderUnavailableError(QimemError):
    """A login provider cannot decide right now (its directory is down or too slow)."""

    http_status = 503
    exit_code = 10
    code = "provider_unavailable"
    title = "Service unavailable"
    retry_after = 10  # seconds (HTTP Retry-After)


@dataclass(frozen=True)
class LoginAttempt:
    """What a provider is asked to check. Its repr shows no password or option values.

    :ivar options: this provider's options from the realm's configuration.
    :ivar stored_hash: the stored secret of the realm's qimem user of this name (a password
        hash, or an external marker), None if there is none: for local providers.
    :ivar hashing: qimem's :class:`~qimem.identity.passwords.PasswordHashing` (Argon2id
        behind the bounded, per-source fair gate).
    """

    realm: str
    username: str
    password: str = field(repr=False)
    source: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    stored_hash: str | None = field(default=None, repr=False)
    hashing: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Authenticated:
    """A provider's yes.

    :ivar username: the qimem username this identity logs in as.
    :ivar groups: the identity's groups (mapped to roles by its provider's ``groups``).
    :ivar claims: other attributes (mapped by its provider's ``claims``).
    :ivar verified_hash: for a local provider only: the stored hash the password was
        verified against (the login succeeds only if it is still the user's hash).
    :ivar new_hash: a local provider's re-hash of the password with current parameters.
    """

    username: str
    groups: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    verified_hash: str | None = field(default=None, repr=False)
    new_hash: str | None = field(default=None, repr=False)
    #: The trusted issuer that vouched for this identity (an assertion provider's, e.g.
    #: the JWT's verified ``iss``): its own mapping applies (``mappings.<provider>.issuers``).
    issuer: str | None = None

    @property
    def local(self) -> bool:
        return self.verified_hash is not None


class AuthProvider(Protocol):
    """What ``register(name, provider)`` is given (or a ``"module:attr"`` naming it)."""

    def authenticate(self, attempt: LoginAttempt) -> Authenticated | None: ...


def external_marker(provider: str) -> str:
    """The stored secret of a qimem user owned by the external provider ``provider``."""
    return EXTERNAL_MARKER + provider


# -- realm configuration --------------------------------------------------------------


@dataclass(frozen=True)
class RoleMapping:
    """How external identities map to qimem users and roles."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    claims: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    default_roles: tuple[str, ...] = ()
    jit_users: bool = False

    def roles_for(self, who: Authenticated) -> list[str]:
        """The roles ``who`` gets: the default roles, then each mapped group's and claim's."""
        found = list(self.default_roles)
        wanted = {g.lower() for g in who.groups}
        for group, roles in self.groups.items():
            if group.lower() in wanted:
                found.extend(roles)
        for claim, values in self.claims.items():
            got = who.claims.get(claim)
            got_values = got if isinstance(got, list | tuple) else [got]
            for value, roles in values.items():
                if value in [str(v) for v in got_values if v is not None]:
                    found.extend(roles)
        return list(dict.fromkeys(found))

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": {g: list(r) for g, r in self.groups.items()},
            "claims": {c: {v: list(r) for v, r in vs.items()} for c, vs in self.claims.items()},
            "default_roles": list(self.default_roles),
            "jit_users": self.jit_users,
        }

    def roles(self) -> set[str]:
        """Every role this mapping names."""
        named = set(self.default_roles)
        for roles in self.groups.values():
            named.update(roles)
        for values in self.claims.values():
            for roles in values.values():
                named.update(roles)
        return named


@dataclass(frozen=True)
class ProviderMapping:
    """One provider's mapping (``mappings.<provider>``): ``base`` for its identities, and
    for an assertion provider, one mapping per trusted issuer (``issuers``). An issuer with
    an entry gets only that entry; one without gets ``base``."""

    base: RoleMapping = field(default_factory=RoleMapping)
    issuers: dict[str, RoleMapping] = field(default_factory=dict)

    def for_issuer(self, issuer: str | None) -> RoleMapping:
        if issuer is not None and issuer in self.issuers:
            return self.issuers[issuer]
        return self.base

    def roles(self) -> set[str]:
        named = self.base.roles()
        for mapping in self.issuers.values():
            named |= mapping.roles()
        return named

    def to_dict(self) -> dict[str, Any]:
        body = self.base.to_dict()
        if self.issuers:
            body["issuers"] = {i: m.to_dict() for i, m in self.issuers.items()}
        return body


@dataclass(frozen=True)
class RealmAuth:
    """A realm's login configuration. Its repr shows no option values.

    The mapping of external identities to roles is per provider (``mappings``, keyed by
    provider name, and for the JWT provider by trusted issuer too): an LDAP group and a
    JWT claim value of the same name, or two issuers' claims, map only where configured.
    ``mapping`` is the older realm-wide form, still read (it applies to every external
    provider and issuer alike; ``mappings`` is None then)."""

    providers: tuple[str, ...] = (PASSWORD,)
    options: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    mapping: RoleMapping = field(default_factory=RoleMapping)
    mappings: dict[str, ProviderMapping] | None = None

    def mapping_for(self, provider: str | None, issuer: str | None = None) -> RoleMapping:
        """The mapping of an identity from ``provider`` (vouched for by ``issuer``): its
        provider's (its issuer's if that has one), none for a provider without one; with
        the realm-wide form, that one for all."""
        if self.mappings is None:
            return self.mapping
        found = self.mappings.get(provider or "")
        return found.for_issuer(issuer) if found is not None else RoleMapping()

    def roles(self, provider: str | None = None) -> set[str]:
        """Every role the mapping names (of ``provider``'s identities only, if given)."""
        if self.mappings is None:
            return self.mapping.roles()
        named: set[str] = set()
        for name, mapping in self.mappings.items():
            if provider is None or name == provider:
                named |= mapping.roles()
        return named

    def jit_anywhere(self) -> bool:
        """Whether any identity may be created just in time."""
        if self.mappings is None:
            return self.mapping.jit_users
        return any(
            m.base.jit_users or any(i.jit_users for i in m.issuers.values())
            for m in self.mappings.values()
        )

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The JSON shape (``qauth realm providers``, ``GET .../providers``); secret-looking
        options are shown as ``"(set)"`` unless ``redact=False`` (storage only)."""
        body: dict[str, Any] = {"providers": list(self.providers)}
        for name, options in self.options.items():
            body[name] = {
                k: ("(set)" if redact and _SECRET_OPTION.search(k) and v else v)
                for k, v in options.items()
            }
        if self.mappings is None:
            body["mapping"] = self.mapping.to_dict()
        else:
            body["mappings"] = {n: m.to_dict() for n, m in self.mappings.items()}
        return body

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(redact=False), sort_keys=True).encode("utf-8")


def _roles_value(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValidationError(f"{where} must be a role name or a list of role names")
    if len(value) > 32:
        raise ValidationError(f"{where} names too many roles")
    return tuple(dict.fromkeys(value))


_MAPPING_FIELDS = {"groups", "claims", "default_roles", "jit_users"}


def _mapping(
    value: Any, where: str = "mapping", extra: frozenset[str] = frozenset()
) -> RoleMapping:
    if value is None:
        return RoleMapping()
    if not isinstance(value, dict):
        raise ValidationError(f"'{where}' must be an object")
    unknown = set(value) - _MAPPING_FIELDS - extra
    if unknown:
        raise ValidationError(f"'{where}' has unknown field(s): {', '.join(sorted(unknown))}")
    groups_in = value.get("groups", {})
    claims_in = value.get("claims", {})
    if not isinstance(groups_in, dict) or len(groups_in) > 256:
        raise ValidationError(f"'{where}.groups' must be an object of group → role(s)")
    if not isinstance(claims_in, dict) or len(claims_in) > 64:
        raise ValidationError(f"'{where}.claims' must be an object of claim → {{value → role(s)}}")
    groups = {str(g): _roles_value(f"{where}.groups[{g!r}]", r) for g, r in groups_in.items() if g}
    claims: dict[str, dict[str, tuple[str, ...]]] = {}
    for claim, values in claims_in.items():
        if not isinstance(values, dict):
            raise ValidationError(f"{where}.claims[{claim!r}] must be an object of value → role(s)")
        claims[str(claim)] = {
            str(v): _roles_value(f"{where}.claims[{claim!r}][{v!r}]", r) for v, r in values.items()
        }
    jit = value.get("jit_users", False)
    if not isinstance(jit, bool):
        raise ValidationError(f"'{where}.jit_users' must be true or false")
    defaults = _roles_value(f"{where}.default_roles", value.get("default_roles", []))
    return RoleMapping(groups, claims, defaults, jit)


def _mappings(value: Any, chain: list[str]) -> dict[str, ProviderMapping]:
    """``mappings``: provider name → its mapping (and ``issuers``: issuer → mapping)."""
    if not isinstance(value, dict):
        raise ValidationError("'mappings' must be an object of provider name → mapping")
    result: dict[str, ProviderMapping] = {}
    for name, entry in value.items():
        if name not in chain:
            raise ValidationError(f"'mappings' names {name!r}, which is not in 'providers'")
        where = f"mappings.{name}"
        base = _mapping(entry, where, frozenset({"issuers"}))
        issuers_in = entry.get("issuers", {}) if isinstance(entry, dict) else {}
        if not isinstance(issuers_in, dict) or len(issuers_in) > 16:
            raise ValidationError(f"'{where}.issuers' must be an object of issuer → mapping")
        issuers: dict[str, RoleMapping] = {}
        for issuer, mapping in issuers_in.items():
            if not isinstance(issuer, str) or not 0 < len(issuer) <= 1024:
                raise ValidationError(f"'{where}.issuers' keys must be issuer names")
            issuers[issuer] = _mapping(mapping, f"{where}.issuers[{issuer!r}]")
        result[name] = ProviderMapping(base, issuers)
    return result


def parse_config(
    document: Any,
    lookup: Callable[[str], Any] | None = None,
    available: Iterable[str] = (),
    *,
    check: bool = True,
) -> RealmAuth:
    """A realm's login configuration from its JSON document.

    ``{"providers": ["password", "ldap", "jwt"], "ldap": {...options...}, "jwt": {...},
    "mappings": {"ldap": {"groups": {"kim-admins": "admin"}, "default_roles": [...],
    "jit_users": true}, "jwt": {"issuers": {"https://ci.example": {"claims": {...},
    "jit_users": true}}}}}``: each provider's identities are mapped by its own entry only
    (and a trusted issuer's by its own, if it has one). The older realm-wide ``"mapping":
    {...}`` (the same fields, one for every provider and issuer) is still read.

    :param lookup: the registered provider of a name (None if there is none); each provider
        the chain names must exist, and its ``check_options`` (if any) validates its options.
    :param available: the registered providers' names (for the error message).
    :raises ValidationError: naming what is wrong.
    """
    if not isinstance(document, dict):
        raise ValidationError("the provider configuration must be a JSON object")
    chain = document.get("providers")
    if (
        not isinstance(chain, list)
        or not chain
        or len(chain) > 8
        or not all(isinstance(n, str) and _NAME.match(n) for n in chain)
    ):
        raise ValidationError("'providers' must be a non-empty list of provider names")
    if len(set(chain)) != len(chain):
        raise ValidationError("'providers' names a provider twice")
    options: dict[str, dict[str, Any]] = {}
    for key, value in document.items():
        if key in ("providers", "mapping", "mappings"):
            continue
        if key not in chain:
            raise ValidationError(f"options for {key!r}, which is not in 'providers'")
        if not isinstance(value, dict):
            raise ValidationError(f"the options of {key!r} must be an object")
        options[key] = dict(value)
    if check and lookup is not None:
        for name in chain:
            provider = lookup(name)
            if provider is None:
                names = ", ".join(sorted(available)) or "none"
                raise ValidationError(
                    f"no login provider {name!r} is loaded (available: {names})",
                    code="unknown_provider",
                )
            checker = getattr(provider, "check_options", None)
            if callable(checker):
                options[name] = dict(checker(options.get(name, {})))
            elif options.get(name):
                raise ValidationError(f"provider {name!r} takes no options")
    if "mapping" in document and "mappings" in document:
        raise ValidationError(
            "give 'mappings' (per provider) or the older realm-wide 'mapping', not both"
        )
    if "mappings" in document:
        per_provider = _mappings(document["mappings"], chain)
        return RealmAuth(tuple(chain), options, RoleMapping(), per_provider)
    return RealmAuth(tuple(chain), options, _mapping(document.get("mapping")))


def decode_config(data: bytes) -> RealmAuth:
    """A stored configuration (already unsealed); not re-checked against providers."""
    return parse_config(json.loads(data.decode("utf-8")), check=False)


def read_config_document(text: str | bytes) -> Any:
    """Parse a configuration's JSON text. :raises ValidationError: not JSON, or too big."""
    if len(text) > _MAX_CONFIG:
        raise ValidationError("the provider configuration is too large")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"the provider configuration is not valid JSON ({exc})") from None


# -- the registered providers ---------------------------------------------------------


def resolve_providers(registered: Mapping[str, Any]) -> dict[str, Any]:
    """Provider name → provider object: ``"module:attr"`` references are imported (a class
    is instantiated); anything without ``authenticate`` is the plugin's error."""
    result: dict[str, Any] = {}
    for name, provider in registered.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"login provider name {name!r} is not a lowercase name")
        if references.is_reference(provider):
            provider = references.resolve(provider, name)
            if isinstance(provider, type):
                provider = provider()
        if not callable(getattr(provider, "authenticate", None)):
            raise PluginError(f"login provider {name!r} has no authenticate() method")
        result[name] = provider
    return result


def default_providers() -> Callable[[], Mapping[str, Any]]:
    """The registered providers of the built-in plugins (for an identity built without an
    application context's registry)."""

    def load() -> Mapping[str, Any]:
        from qimem.registry import Registry, make_plugin_manager

        return Registry(make_plugin_manager()).auth_providers

    return load
