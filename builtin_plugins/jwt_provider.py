"""The ``jwt`` provider's code (registered by :mod:`qimem.builtin_plugins.jwt_auth`), on
PyJWT: ``jwt.decode`` checks signatures and claims, ``jwt.PyJWKClient`` fetches and caches
an issuer's JWKS. No JOSE code of qimem's own.

A realm's ``jwt`` options name the issuers it trusts; each has exactly one key source:
``discovery_url`` (OpenID discovery; its ``issuer`` must be the configured one, its
``jwks_uri`` gives the keys), ``jwks_url``, or ``public_key_pem``. A token is accepted only
if all hold:

* its size is at most ``max_assertion_bytes``; its ``iss`` is exactly a configured issuer;
* its ``alg`` is on that issuer's allow-list: asymmetric algorithms only (``none`` and
  ``HS*`` are refused when the realm is configured, so a public key can never serve as an
  HMAC secret: no algorithm confusion); a JWKS key is used with its own algorithm;
* its ``kid`` names a key of the issuer's JWKS: the cached set, refreshed on an unknown
  ``kid`` at most once per ``jwks_refresh_min_seconds`` (a spray of random ``kid`` values
  costs the issuer one fetch per interval), and every ``jwks_cache_seconds``;
* the signature verifies; ``exp`` is present and not past, ``nbf``/``iat`` not in the
  future (``leeway`` seconds of clock skew), ``exp`` at most ``max_lifetime`` after ``iat``
  (or now); ``aud`` names one of ``audiences``; each of ``bound_claims`` has its value (or
  one of its list of values; a list-valued claim matches if one element does);
* ``user_claim`` (default ``sub``), after ``username_prefix``, is a valid qimem username.

Claim names may be paths into nested objects (``kubernetes.io/namespace``), in
``user_claim``, ``groups_claim``, ``bound_claims`` and the realm's mapping ``claims``. The
identity names its issuer (``Authenticated.issuer``), so the realm's ``mappings.jwt.issuers``
entry of that issuer (if any) maps it, never another issuer's.

URLs must be ``https://`` (``ca_file`` names a private CA); plain ``http://`` is accepted
only for a loopback host with ``allow_http_loopback`` (tests). An issuer that cannot be
reached (or answers nonsense) makes the provider *unavailable* (503), never "invalid".
A token is not single-use: it may be presented again until it expires (as with Vault's
JWT auth); keep ``max_lifetime`` short.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from qimem.errors import ValidationError
from qimem.identity.assertion_logins import AssertionRejected
from qimem.identity.providers import Authenticated, LoginAttempt, ProviderUnavailableError
from qimem.identity.users import validate_username

log = logging.getLogger("qimem.identity.jwt")

#: Asymmetric JWS algorithms an issuer may be allowed (never ``none``, never ``HS*``).
ASYMMETRIC = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
DEFAULT_ALGORITHMS = ["RS256", "ES256", "EdDSA"]
TOP_DEFAULTS: dict[str, Any] = {"issuers": None, "max_assertion_bytes": 8192}
ISSUER_DEFAULTS: dict[str, Any] = {
    "issuer": None,
    "discovery_url": None,
    "jwks_url": None,
    "public_key_pem": None,
    "audiences": None,
    "algorithms": DEFAULT_ALGORITHMS,
    "bound_claims": {},
    "user_claim": "sub",
    "username_prefix": "",
    "groups_claim": None,
    "leeway": 30,
    "max_lifetime": 86400,
    "jwks_cache_seconds": 300,
    "jwks_refresh_min_seconds": 10,
    "timeout": 5.0,
    "ca_file": None,
    "allow_http_loopback": False,
}
_SOURCES = ("discovery_url", "jwks_url", "public_key_pem")
_MAX_DOCUMENT = 256 * 1024
_MAX_CLIENTS = 64
_BACKOFF = 2.0  # seconds of 503 without asking, after an issuer could not be reached


def _fail(message: str) -> ValidationError:
    return ValidationError(f"jwt: {message}")


def _number(where: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(f"{where} must be a number in [{low:g}, {high:g}]")
    return float(value)


def _strings(where: str, value: Any, *, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or (not value and not allow_empty)
        or len(value) > 64
        or not all(isinstance(v, str) and 0 < len(v) <= 1024 for v in value)
    ):
        raise _fail(f"{where} must be a non-empty string or list of strings")
    return list(value)


def _loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(where: str, url: Any, allow_http_loopback: bool) -> str:
    """``url`` if it is https (or http to a loopback host when allowed).

    :raises ValidationError: naming ``where``."""
    if not isinstance(url, str) or len(url) > 2048:
        raise _fail(f"{where} must be a URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and allow_http_loopback and _loopback(parts.hostname):
        return url
    raise _fail(
        f"{where} must be an https:// URL (http:// only to a loopback host with "
        "allow_http_loopback, for tests)"
    )


def _check_bound(value: Any) -> dict[str, list[Any]]:
    if not isinstance(value, dict) or len(value) > 32:
        raise _fail("bound_claims must be an object of claim → value or list of values")
    bound: dict[str, list[Any]] = {}
    for claim, wanted in value.items():
        items = wanted if isinstance(wanted, list) else [wanted]
        if not items or not all(isinstance(v, str | int | bool) for v in items):
            raise _fail(f"bound_claims[{claim!r}] must be a string, number, boolean or a list")
        bound[str(claim)] = items
    return bound


def _is_file(path: Any) -> bool:
    """``path`` names a regular file (a name too long for the system is not one: no 500)."""
    if not isinstance(path, str) or not 0 < len(path) <= 4096:
        return False
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _check_issuer(index: int, options: Any) -> dict[str, Any]:
    where = f"issuers[{index}]"
    if not isinstance(options, dict):
        raise _fail(f"{where} must be an object")
    unknown = set(options) - set(ISSUER_DEFAULTS)
    if unknown:
        raise _fail(f"{where} has unknown option(s) {', '.join(sorted(unknown))}")
    result = {**ISSUER_DEFAULTS, **options}
    issuer = result["issuer"]
    if not isinstance(issuer, str) or not 0 < len(issuer) <= 1024:
        raise _fail(f"{where}.issuer is required (the exact 'iss' of its tokens)")
    if not isinstance(result["allow_http_loopback"], bool):
        raise _fail(f"{where}.allow_http_loopback must be true or false")
    given = [s for s in _SOURCES if result[s] not in (None, "")]
    if len(given) != 1:
        raise _fail(f"{where} needs exactly one of {', '.join(_SOURCES)}")
    source = given[0]
    if source == "public_key_pem":
        try:
            load_pem_public_key(str(result[source]).encode("ascii"))
        except (ValueError, TypeError, UnicodeError):
            raise _fail(f"{where}.public_key_pem is not a PEM public key") from None
    else:
        check_url(f"{where}.{source}", result[source], result["allow_http_loopback"])
    result["audiences"] = _strings(f"{where}.audiences", result["audiences"])
    algorithms = _strings(f"{where}.algorithms", result["algorithms"])
    bad = [a for a in algorithms if a not in ASYMMETRIC]
    if bad:
        raise _fail(
            f"{where}.algorithms: {', '.join(bad)} not allowed (asymmetric only: "
            f"{', '.join(ASYMMETRIC)}; never none or HS*)"
        )
    result["algorithms"] = algorithms
    result["bound_claims"] = _check_bound(result["bound_claims"])
    for name in ("user_claim", "groups_claim"):
        value = result[name]
        if not (value is None and name == "groups_claim") and (
            not isinstance(value, str) or not 0 < len(value) <= 128
        ):
            raise _fail(f"{where}.{name} must be a claim name")
    prefix = result["username_prefix"]
    if not isinstance(prefix, str) or len(prefix) > 64:
        raise _fail(f"{where}.username_prefix must be a short string")
    result["leeway"] = _number(f"{where}.leeway", result["leeway"], 0, 300)
    result["max_lifetime"] = _number(f"{where}.max_lifetime", result["max_lifetime"], 1, 7 * 86400)
    result["jwks_cache_seconds"] = _number(
        f"{where}.jwks_cache_seconds", result["jwks_cache_seconds"], 1, 86400
    )
    result["jwks_refresh_min_seconds"] = _number(
        f"{where}.jwks_refresh_min_seconds", result["jwks_refresh_min_seconds"], 0, 3600
    )
    result["timeout"] = _number(f"{where}.timeout", result["timeout"], 0.1, 60)
    ca_file = result["ca_file"]
    if ca_file is not None and not _is_file(ca_file):
        raise _fail(f"{where}.ca_file is not a readable file")
    return result


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and complete a realm's ``jwt`` options.

    :raises ValidationError: naming the option.
    """
    unknown = set(options) - set(TOP_DEFAULTS)
    if unknown:
        raise _fail(f"unknown option(s) {', '.join(sorted(unknown))}")
    result = {**TOP_DEFAULTS, **options}
    issuers = result["issuers"]
    if not isinstance(issuers, list) or not 0 < len(issuers) <= 16:
        raise _fail("'issuers' must be a list of 1 to 16 trusted issuers")
    result["issuers"] = [_check_issuer(i, o) for i, o in enumerate(issuers)]
    names = [o["issuer"] for o in result["issuers"]]
    if len(set(names)) != len(names):
        raise _fail("an issuer is configured twice")
    prefixes = [str(o["username_prefix"]) for o in result["issuers"]]
    for i, mine in enumerate(prefixes):
        for j, other in enumerate(prefixes):
            if i != j and other.startswith(mine):
                raise _fail(
                    f"issuers[{i}] and issuers[{j}] have overlapping username_prefix values "
                    f"({mine!r}, {other!r}): one issuer's subject could name another's user; "
                    "give each issuer a prefix that is not the start of another's"
                )
    limit = result["max_assertion_bytes"]
    result["max_assertion_bytes"] = int(_number("max_assertion_bytes", limit, 512, 65536))
    return result


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer we do not follow (it is an error below)


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file or None)


def fetch_json(url: str, timeout: float, ca_file: str | None) -> dict[str, Any]:
    """A JSON object from ``url`` (no redirects, bounded size).

    :raises ProviderUnavailableError: unreachable, not 200, not a JSON object."""
    opener = urllib.request.build_opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=_ssl_context(ca_file))
    )
    try:
        request = urllib.request.Request(url)  # noqa: S310 (https, or loopback http: check_url)
        with opener.open(request, timeout=timeout) as answer:
            data = answer.read(_MAX_DOCUMENT + 1)
        if len(data) > _MAX_DOCUMENT:
            raise ValueError("too large")
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not an object")
        return document
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        log.warning("jwt: issuer document unavailable (%s)", type(exc).__name__)
        raise ProviderUnavailableError("the token issuer is not reachable; retry later") from None


class _IssuerKeys:
    """One issuer's JWKS: the discovery document read once, then a ``PyJWKClient``."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._options = dict(options)
        self._client: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()
        #: After a failed fetch, logins get 503 at once until then (monotonic): a flood of
        #: tokens during an outage does not hold a server thread per fetch timeout.
        self._down_until = 0.0

    def _unavailable(self) -> ProviderUnavailableError:
        self._down_until = time.monotonic() + _BACKOFF
        return ProviderUnavailableError("the token issuer is not reachable; retry later")

    def _jwks_client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is not None:
                return self._client
            o = self._options
            url = o["jwks_url"]
            if time.monotonic() < self._down_until:
                raise ProviderUnavailableError("the token issuer is not reachable; retry later")
            if not url:
                try:
                    meta = fetch_json(o["discovery_url"], o["timeout"], o["ca_file"])
                except ProviderUnavailableError:
                    raise self._unavailable() from None
                if meta.get("issuer") != o["issuer"]:
                    log.warning("jwt: the discovery document names another issuer")
                    raise ProviderUnavailableError("the token issuer's discovery is inconsistent")
                try:
                    url = check_url("jwks_uri", meta.get("jwks_uri"), o["allow_http_loopback"])
                except ValidationError:
                    log.warning("jwt: the discovery document's jwks_uri is not acceptable")
                    raise ProviderUnavailableError(
                        "the token issuer's discovery is inconsistent"
                    ) from None
            self._client = jwt.PyJWKClient(
                url,
                lifespan=o["jwks_cache_seconds"],
                timeout=o["timeout"],
                ssl_context=_ssl_context(o["ca_file"]),
                cooldown_duration=o["jwks_refresh_min_seconds"],
            )
            return self._client

    def key(self, kid: str) -> jwt.PyJWK:
        """The issuer's key ``kid``. :raises AssertionRejected: no such key (after at most
        one rate-limited refresh). :raises ProviderUnavailableError: issuer unreachable."""
        client = self._jwks_client()
        if time.monotonic() < self._down_until:
            raise ProviderUnavailableError("the token issuer is not reachable; retry later")
        try:
            return client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            log.warning("jwt: the issuer's JWKS is not reachable")
            raise self._unavailable() from None
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.PyJWKError):
            raise AssertionRejected("unknown_kid", self._options["issuer"]) from None


def _flat(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims whose values are scalars or lists of scalars, nested objects' included
    as ``outer/inner`` paths (e.g. ``kubernetes.io/serviceaccount/name``), at most 256.

    A name reached twice (a top-level claim literally named ``a/b`` and the path ``a`` →
    ``b``) is ambiguous and left out: which value a bound claim or the mapping sees must not
    depend on the order of the token's JSON object, nor let a claim its holder can set stand
    in for the issuer's nested one."""
    found: dict[str, Any] = {}
    ambiguous: set[str] = set()

    def walk(part: Mapping[str, Any], prefix: str, depth: int) -> None:
        for key, value in part.items():
            if len(found) + len(ambiguous) >= 256:
                return
            name = prefix + str(key)
            if isinstance(value, str | int | float | bool) or (
                isinstance(value, list)
                and all(isinstance(x, str | int | float | bool) for x in value)
            ):
                if name in found or name in ambiguous:
                    found.pop(name, None)
                    ambiguous.add(name)
                else:
                    found[name] = value
            elif isinstance(value, dict) and depth < 3:
                walk(value, name + "/", depth + 1)

    walk(claims, "", 0)
    return found


def _claim_matches(got: Any, wanted: list[Any]) -> bool:
    values = got if isinstance(got, list) else [got]
    return any(type(v) is type(w) and v == w for v in values for w in wanted if v is not None)


_DECODE_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidIssuerError, "issuer"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidIssuedAtError, "not_yet_valid"),
    (jwt.InvalidAlgorithmError, "algorithm"),
)


class JwtProvider:
    """Identities from JWTs of trusted issuers (the token endpoint's assertion grants)."""

    local = False

    def __init__(self) -> None:
        self._keys: OrderedDict[tuple[Any, ...], _IssuerKeys] = OrderedDict()
        self._lock = threading.Lock()

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return check_options(options)

    def authenticate(self, attempt: LoginAttempt) -> Authenticated | None:
        return None  # not a password provider: a JWT comes through the assertion grants

    def _issuer_keys(self, o: Mapping[str, Any]) -> _IssuerKeys:
        """The (process-wide, bounded) key cache of one issuer configuration."""
        ident = tuple(
            o[k] for k in ("issuer", "discovery_url", "jwks_url", "allow_http_loopback", "ca_file")
        ) + (o["jwks_cache_seconds"], o["jwks_refresh_min_seconds"], o["timeout"])
        with self._lock:
            found = self._keys.get(ident)
            if found is None:
                found = self._keys[ident] = _IssuerKeys(o)
                while len(self._keys) > _MAX_CLIENTS:
                    self._keys.popitem(last=False)
            self._keys.move_to_end(ident)
            return found

    def authenticate_assertion(self, attempt: LoginAttempt) -> Authenticated:
        """The identity a JWT names. :raises AssertionRejected: not acceptable (reason).
        :raises ProviderUnavailableError: the issuer's keys cannot be fetched."""
        options = {**TOP_DEFAULTS, **attempt.options}
        token = attempt.password
        if len(token.encode("utf-8", "replace")) > int(options["max_assertion_bytes"]):
            raise AssertionRejected("oversized")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AssertionRejected("malformed") from None
        iss = unverified.get("iss")
        issuer = next((i for i in options["issuers"] or [] if i["issuer"] == iss), None)
        if issuer is None:
            raise AssertionRejected("unknown_issuer")
        name = str(issuer["issuer"])
        alg = header.get("alg")
        if alg not in issuer["algorithms"] or alg not in ASYMMETRIC:
            raise AssertionRejected("algorithm", name)
        key: Any
        if issuer["public_key_pem"]:
            key = load_pem_public_key(str(issuer["public_key_pem"]).encode("ascii"))
        else:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid or len(kid) > 256:
                raise AssertionRejected("no_kid", name)
            key = self._issuer_keys(issuer).key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=issuer["audiences"],
                issuer=name,
                leeway=issuer["leeway"],
                options={"require": ["exp", "iss", "aud"], "verify_sub": False},
            )
        except jwt.PyJWTError as exc:
            reason = next((r for t, r in _DECODE_REASONS if isinstance(exc, t)), "invalid")
            raise AssertionRejected(reason, name) from None
        return self._identity(claims, issuer, name)

    def _identity(
        self, claims: dict[str, Any], issuer: Mapping[str, Any], name: str
    ) -> Authenticated:
        flat = _flat(claims)  # an ambiguous name ("a/b" and a → b) is absent
        now = time.time()
        exp = claims["exp"]
        start = claims.get("iat", now)
        if not isinstance(start, int | float) or exp - start > issuer["max_lifetime"]:
            raise AssertionRejected("lifetime", name)
        for claim, wanted in issuer["bound_claims"].items():
            if not _claim_matches(flat.get(claim), wanted):
                raise AssertionRejected("bound_claim", name)
        subject = flat.get(issuer["user_claim"])
        if not isinstance(subject, str) or not subject:
            raise AssertionRejected("missing_claim", name)
        username = str(issuer["username_prefix"]) + subject
        try:
            validate_username(username)
        except ValidationError:
            raise AssertionRejected("bad_username", name) from None
        groups: list[str] = []
        if issuer["groups_claim"]:
            raw = flat.get(issuer["groups_claim"], [])
            raw = [raw] if isinstance(raw, str) else raw
            if isinstance(raw, list):
                groups = [g for g in raw if isinstance(g, str)][:256]
        return Authenticated(username, groups=tuple(groups), claims=flat, issuer=name)

    def __repr__(self) -> str:
        return "<JwtProvider pyjwt>"
