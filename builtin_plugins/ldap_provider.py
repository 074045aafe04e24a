"""The ``ldap`` provider's code (registered by :mod:`qimem.builtin_plugins.ldap_auth`), on
``ldap3``.

A login is a simple bind *as the user*: the user's DN comes from a template
(``user_dn_template``, the username escaped as an RDN value) or from a search with a
service account (``bind_dn`` + ``bind_password``, ``user_search_base``, ``user_filter``
with the username escaped by :func:`ldap3.utils.conv.escape_filter_chars`). An empty
password is refused before the directory is asked: many directories treat a DN with an
empty password as an anonymous bind that *succeeds*. Then the user's groups are read
(``group_filter`` with ``{user_dn}`` and ``{username}``, escaped) and returned by name
(``group_name_attribute``); the realm's mapping turns them into roles.

Transport: ``ldaps://`` or ``ldap://`` with ``start_tls``; the server certificate is always
verified (``ca_file`` names the CA, else the system's), plain ``ldap://`` without StartTLS
is refused unless ``allow_plain`` (loopback tests, an IPC socket ...). ``timeout`` bounds
the connection and every answer: a directory that is down, refuses the service account or
does not answer in time makes the provider *unavailable* (503), never "wrong password".
"""

from __future__ import annotations

import logging
import math
import secrets
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from qimem.errors import ValidationError
from qimem.identity.providers import Authenticated, LoginAttempt, ProviderUnavailableError

log = logging.getLogger("qimem.identity.ldap")

DEFAULTS: dict[str, Any] = {
    "url": None,
    "start_tls": False,
    "ca_file": None,
    "allow_plain": False,
    "user_dn_template": None,
    "bind_dn": None,
    "bind_password": None,
    "user_search_base": None,
    "user_filter": "(uid={username})",
    "username_attribute": "uid",
    "group_search_base": None,
    "group_filter": "(&(objectClass=groupOfNames)(member={user_dn}))",
    "group_name_attribute": "cn",
    "timeout": 5.0,
}
_INVALID_CREDENTIALS = {48, 49, 50, 53}  # inappropriateAuth, invalidCredentials, ...
_MAX_USERNAME = 128
#: Raised by ldap3 before anything is sent, for credentials it cannot encode.
_BAD_INPUT = (
    ldap_errors.LDAPSASLPrepError,
    ldap_errors.LDAPPasswordIsMandatoryError,
    ldap_errors.LDAPInvalidDnError,
    ldap_errors.LDAPInvalidFilterError,
)


def _text(options: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = options.get(name)
    if value is None or value == "":
        if required:
            raise ValidationError(f"ldap: '{name}' is required")
        return None
    if not isinstance(value, str) or len(value) > 1024:
        raise ValidationError(f"ldap: '{name}' must be a string")
    return value


def _is_file(path: str) -> bool:
    """``path`` names a regular file (a name the system cannot look up is not one)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and complete the ``ldap`` options of a realm.

    :raises ValidationError: naming the option.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValidationError(f"ldap: unknown option(s) {', '.join(sorted(unknown))}")
    result = {**DEFAULTS, **options}
    url = _text(result, "url", required=True)
    assert url is not None
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("ldap", "ldaps") or "://" not in url:
        raise ValidationError("ldap: 'url' must be ldap://host[:port] or ldaps://host[:port]")
    for flag in ("start_tls", "allow_plain"):
        if not isinstance(result[flag], bool):
            raise ValidationError(f"ldap: '{flag}' must be true or false")
    if scheme == "ldaps" and result["start_tls"]:
        raise ValidationError("ldap: 'start_tls' goes with ldap://, not ldaps://")
    if scheme == "ldap" and not result["start_tls"] and not result["allow_plain"]:
        raise ValidationError(
            "ldap: passwords would cross the network in the clear; use ldaps:// or "
            "start_tls (or allow_plain for a loopback directory)"
        )
    ca_file = _text(result, "ca_file")
    if ca_file is not None and not _is_file(ca_file):
        raise ValidationError(f"ldap: ca_file {ca_file!r} is not a readable file")
    template = _text(result, "user_dn_template")
    if template is not None:
        if template.count("{username}") != 1:
            raise ValidationError("ldap: 'user_dn_template' must contain {username} once")
    else:
        for name in ("bind_dn", "bind_password", "user_search_base"):
            _text(result, name, required=True)
        if "{username}" not in (_text(result, "user_filter", required=True) or ""):
            raise ValidationError("ldap: 'user_filter' must contain {username}")
    for name in ("username_attribute", "group_filter", "group_name_attribute"):
        _text(result, name, required=True)
    _text(result, "group_search_base")
    timeout = result["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ValidationError("ldap: 'timeout' must be a number of seconds in (0, 60]")
    result["timeout"] = float(timeout)
    return result


def _acceptable_username(name: str) -> bool:
    return 0 < len(name) <= _MAX_USERNAME and all(ord(c) >= 32 for c in name)


class LdapProvider:
    """Users of an LDAP directory (simple bind as the user; groups → roles)."""

    local = False

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return check_options(options)

    def authenticate(self, attempt: LoginAttempt) -> Authenticated | None:
        options = {**DEFAULTS, **attempt.options}
        username, password = attempt.username, attempt.password
        if not password or not _acceptable_username(username):
            return None  # never an unauthenticated bind; never a control character
        try:
            return self._login(options, username, password)
        except ProviderUnavailableError:
            raise
        except _BAD_INPUT:
            return None  # a password or name the protocol cannot carry: refused, not an outage
        except (ldap_errors.LDAPException, OSError, ssl.SSLError) as exc:
            log.warning("ldap: directory unavailable (%s)", type(exc).__name__)
            raise ProviderUnavailableError(
                "the login directory is not reachable; retry later"
            ) from None

    # -- the directory conversation -------------------------------------------------

    def _server(self, options: Mapping[str, Any]) -> ldap3.Server:
        url = str(options["url"])
        tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            version=ssl.PROTOCOL_TLS_CLIENT,
            ca_certs_file=options.get("ca_file") or None,
        )
        return ldap3.Server(
            url,
            use_ssl=url.lower().startswith("ldaps://"),
            tls=tls,
            connect_timeout=float(options["timeout"]),
            get_info=ldap3.NONE,
        )

    def _connect(
        self, options: Mapping[str, Any], user: str | None, password: str | None
    ) -> tuple[ldap3.Connection, bool]:
        """An open connection (StartTLS done) and whether the simple bind succeeded.

        :raises ProviderUnavailableError: the directory is busy or unwilling for other reasons.
        """
        conn = ldap3.Connection(
            self._server(options),
            user=user,
            password=password,
            authentication=ldap3.SIMPLE,
            receive_timeout=max(1, math.ceil(float(options["timeout"]))),  # whole seconds
            read_only=True,
            raise_exceptions=False,
            auto_referrals=False,
        )
        conn.open()
        if options.get("start_tls") and not conn.start_tls():
            conn.unbind()
            raise ProviderUnavailableError("the login directory refused StartTLS")
        ok = bool(conn.bind())
        if not ok:
            code = (conn.result or {}).get("result")
            if code not in _INVALID_CREDENTIALS:
                conn.unbind()
                log.warning("ldap: bind failed with result %s", code)
                raise ProviderUnavailableError("the login directory cannot answer; retry later")
        return conn, ok

    def _service(self, options: Mapping[str, Any]) -> ldap3.Connection:
        conn, ok = self._connect(options, options["bind_dn"], options["bind_password"])
        if not ok:
            conn.unbind()
            log.warning("ldap: the service account's bind was refused (check bind_dn/password)")
            raise ProviderUnavailableError("the login directory cannot answer; retry later")
        return conn

    def _search(
        self, conn: ldap3.Connection, base: str, query: str, attributes: list[str], limit: int
    ) -> list[Any]:
        ok = conn.search(
            base,
            query,
            search_scope=ldap3.SUBTREE,
            attributes=attributes,
            size_limit=limit,
            time_limit=int(max(1, float(conn.receive_timeout or 5))),
        )
        code = (conn.result or {}).get("result")
        if not ok and code not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
            log.warning("ldap: search failed with result %s", code)
            raise ProviderUnavailableError("the login directory cannot answer; retry later")
        return list(conn.response or [])

    def _login(
        self, options: Mapping[str, Any], username: str, password: str
    ) -> Authenticated | None:
        template = options.get("user_dn_template")
        reader: ldap3.Connection | None = None
        try:
            if template:
                user_dn = str(template).replace("{username}", escape_rdn(username))
            else:
                reader = self._service(options)
                query = str(options["user_filter"]).replace(
                    "{username}", escape_filter_chars(username)
                )
                found = [
                    e
                    for e in self._search(reader, options["user_search_base"], query, ["1.1"], 2)
                    if e.get("type") == "searchResEntry"
                ]
                if len(found) != 1:  # unknown, or ambiguous: never guess which one
                    self._decoy_bind(options, password)
                    return None
                user_dn = str(found[0]["dn"])
            conn, ok = self._connect(options, user_dn, password)
            try:
                if not ok:
                    return None
                if not self._same_name(conn, user_dn, options, username):
                    return None
                groups = self._groups(reader or conn, options, user_dn, username)
            finally:
                conn.unbind()
        finally:
            if reader is not None:
                reader.unbind()
        return Authenticated(username, groups=tuple(groups), claims={"dn": user_dn})

    def _decoy_bind(self, options: Mapping[str, Any], password: str) -> None:
        """A bind as an entry that does not exist, so a name the search did not find costs
        about what a wrong password does (no timing tells which names exist)."""
        decoy = f"cn={secrets.token_hex(12)},{options['user_search_base']}"
        conn, _ = self._connect(options, decoy, password)
        conn.unbind()

    def _same_name(
        self, conn: ldap3.Connection, user_dn: str, options: Mapping[str, Any], username: str
    ) -> bool:
        """The entry's ``username_attribute`` holds exactly ``username`` (directories match
        case-insensitively; qimem usernames are exact, so 'Alice' is not 'alice')."""
        attribute = str(options["username_attribute"])
        ok = conn.search(
            user_dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[attribute]
        )
        if not ok:
            return False
        for entry in conn.response or []:
            values = (entry.get("attributes") or {}).get(attribute) or []
            if isinstance(values, str):
                values = [values]
            if username in [str(v) for v in values]:
                return True
        return False

    def _groups(
        self, conn: ldap3.Connection, options: Mapping[str, Any], user_dn: str, username: str
    ) -> list[str]:
        base = options.get("group_search_base")
        if not base:
            return []
        query = (
            str(options["group_filter"])
            .replace("{user_dn}", escape_filter_chars(user_dn))
            .replace("{username}", escape_filter_chars(username))
        )
        attribute = str(options["group_name_attribute"])
        names: list[str] = []
        for entry in self._search(conn, base, query, [attribute], 1000):
            if entry.get("type") != "searchResEntry":
                continue
            values = (entry.get("attributes") or {}).get(attribute) or []
            names.extend([values] if isinstance(values, str) else [str(v) for v in values])
        return sorted(set(names))

    def __repr__(self) -> str:
        return "<LdapProvider ldap3>"
