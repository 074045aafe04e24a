"""The ``qimem`` root-key provider ("auto-unseal"): key-wrapping keys are sealed by an
encryption key on another qimem server (the *upstream*), through its ordinary
``POST /v1/security/encrypt`` and ``/decrypt`` with a service account's credentials. The
root secret never leaves the upstream; its audit log records every unwrap.

Settings (``[root_key]`` with ``provider = "qimem"``; :meth:`QimemRootKeyProvider.describe`
returns them, never a credential):

* ``url``: the upstream's base URL (``https://``; plain ``http://`` only to loopback);
* ``key``: the upstream key (name, lineage id or key id) that wraps, an encryption key;
* ``realm``: the upstream realm (default: the token's realm; required with ``client_id``);
* credentials, exactly one of: ``token_file`` (a file holding a bearer access token, used
  as is and read again after a 401) or ``client_id`` + ``secret_file`` (a service
  account's client secret: the provider logs in with the ``client_credentials`` grant and
  logs in again when the access token expires). Either file must be mode 0600 or stricter;
* ``ca_file``: the PEM CA(s) to trust for ``https://`` instead of the system store;
* ``timeout``: seconds for each connect, send and read (default 10).

The transport is :class:`qimem.http_client.HttpClient` (no redirects, bounded reads, TLS).
Errors: an upstream that cannot be reached, refuses the credentials, lacks the key or the
permission, or answers something unexpected raises :class:`~qimem.errors.ConfigError` (a
startup error, never a fallback); a blob that the upstream will not open under this key
and context, a blob sealed by another upstream key, or an answer of the wrong size raises
:class:`~qimem.errors.DecryptionError`. Messages name the URL, never a credential.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
import urllib.parse
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qimem import envelope
from qimem.errors import (
    AuthError,
    ConfigError,
    DecryptionError,
    ForbiddenError,
    NotFoundError,
    QimemError,
    StoreUnavailableError,
    ValidationError,
)
from qimem.http_client import HttpClient, check_url, is_loopback, tls_context
from qimem.root.provider import KWK_SIZE

_NAME = "the qimem root provider"
_FORMAT = 1  # the blob: format byte || the upstream's envelope
_AAD = b"qimem root provider v1\x00"  # domain separation from the key's other uses
_PROBE_AAD = b"qimem root provider probe v1"
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CREDENTIAL = re.compile(r"^[A-Za-z0-9._~+/=-]{1,8192}$")  # a header-safe token or secret
_MAX_CREDENTIAL_FILE = 16 * 1024
_SETTINGS = {"url", "key", "realm", "token_file", "client_id", "secret_file", "ca_file", "timeout"}
_RENEW_MARGIN = 30.0  # log in again this long before the access token expires
_MAX_ANSWER = 1024 * 1024  # encrypt/decrypt answers of a 32-byte key are a few hundred bytes
_LIVE: weakref.WeakSet[QimemRootKeyProvider] = weakref.WeakSet()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def read_credential(path: Path, what: str) -> str:
    """The token or secret in ``path``: a regular file of mode 0600 or stricter holding one
    header-safe line. Messages name the file, never its content.

    :raises ConfigError: missing, not a regular file, readable or writable by group or
        others, too large, or not one token.
    """
    from qimem.fileio import read_private_file

    raw = read_private_file(path, f"{_NAME}'s {what}", _MAX_CREDENTIAL_FILE)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if len(raw) > _MAX_CREDENTIAL_FILE or not _CREDENTIAL.match(text):
        raise ConfigError(f"{_NAME}'s {what} {path} does not hold one token on one line")
    return text


class QimemRootKeyProvider:
    """Wraps key-wrapping keys with an encryption key on an upstream qimem server.

    Thread-safe (one request at a time per provider; they are rare: one per root version
    when a store opens) and fork-safe (a forked child opens its own connection).
    """

    name = "qimem"

    def __init__(
        self,
        url: str,
        key: str,
        *,
        realm: str | None = None,
        token_file: Path | None = None,
        client_id: str | None = None,
        secret_file: Path | None = None,
        ca_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.key = key
        self.realm = realm
        self.token_file = token_file
        self.client_id = client_id
        self.secret_file = secret_file
        self.ca_file = ca_file
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._client: HttpClient | None = None
        self._expires = 0.0  # when the access token of _client runs out (client_id only)
        if token_file is not None:
            read_credential(token_file, "token_file")  # fail at startup, not first use
        elif secret_file is not None:
            read_credential(secret_file, "secret_file")
        if ca_file is not None:
            try:
                tls_context(ca_file)
            except ValidationError:
                raise ConfigError(
                    f"{_NAME}'s ca_file {ca_file} is not a readable PEM CA certificate file"
                ) from None
        self._plain(None)  # non-loopback plain http fails here too
        _LIVE.add(self)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], base_dir: Path) -> QimemRootKeyProvider:
        """The provider ``[root_key]`` (or a keyring record) describes; relative paths are
        relative to ``base_dir``.

        :raises ConfigError: a missing, unknown or malformed setting, a credential file that
            is missing or readable by others, an unusable ``ca_file``.
        """
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise ConfigError(f"{_NAME} does not know the setting(s) {', '.join(unknown)}")
        url = settings.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError(f'{_NAME} needs [root_key] url = "https://host:port"')
        parsed = urllib.parse.urlsplit(url)
        if parsed.username is not None or parsed.password is not None or "@" in parsed.netloc:
            raise ConfigError(f"{_NAME}'s url must not hold credentials: use token_file")
        if parsed.query or parsed.fragment:
            raise ConfigError(f"{_NAME}'s url must not have a query or fragment")
        try:
            url = check_url(url)
        except ValidationError:
            raise ConfigError(f"{_NAME}'s url must be an http:// or https:// URL") from None
        key = settings.get("key")
        if not isinstance(key, str) or not _REF.match(key):
            raise ConfigError(f"{_NAME} needs [root_key] key = the upstream key's name or id")
        realm = _optional_str(settings, "realm")
        if realm is not None and not _REF.match(realm):
            raise ConfigError(f"{_NAME}'s realm is not a realm name")
        client_id = _optional_str(settings, "client_id")
        if client_id is not None and not _REF.match(client_id):
            raise ConfigError(f"{_NAME}'s client_id is not a service account name")
        token_file, secret_file, ca_file = (
            _path(settings, name, base_dir) for name in ("token_file", "secret_file", "ca_file")
        )
        if (token_file is None) == (client_id is None):
            raise ConfigError(
                f"{_NAME} needs exactly one credential: token_file, or client_id and secret_file"
            )
        if (client_id is None) != (secret_file is None):
            raise ConfigError(f"{_NAME}'s client_id and secret_file go together")
        if client_id is not None and realm is None:
            raise ConfigError(f"{_NAME} needs the service account's realm with client_id")
        timeout = settings.get("timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ConfigError(f"{_NAME}'s timeout must be a number of seconds")
        if not 0 < timeout <= 300:
            raise ConfigError(f"{_NAME}'s timeout must be more than 0 and at most 300 seconds")
        return cls(
            url,
            key,
            realm=realm,
            token_file=token_file,
            client_id=client_id,
            secret_file=secret_file,
            ca_file=ca_file,
            timeout=float(timeout),
        )

    # ---- the contract ---------------------------------------------------------------

    def wrap(self, key: bytes, context: bytes) -> bytes:
        """``key`` sealed by the upstream key, bound to ``context``.

        :raises ConfigError: the upstream cannot be reached or refuses.
        """
        if len(key) != KWK_SIZE:
            raise ValidationError(f"{_NAME} wraps {KWK_SIZE}-byte keys only")
        with self._guard():
            sealed, _ = self._encrypt(self.key, bytes(key), self._aad(context))
        return bytes([_FORMAT]) + sealed

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """The key :meth:`wrap` sealed with ``context``.

        :raises DecryptionError: a damaged blob, another context, or a blob sealed by
            another key (of this upstream or another one).
        :raises ConfigError: the upstream cannot be reached or refuses.
        """
        blob = bytes(blob)
        if len(blob) < 2 or blob[0] != _FORMAT:
            raise DecryptionError(f"{_NAME}'s wrapped key is damaged")
        sealed = blob[1:]
        try:
            sealed_by = envelope.parse(sealed).key_id_str
        except (QimemError, ValueError):
            raise DecryptionError(f"{_NAME}'s wrapped key is damaged") from None
        body = {"envelope": _b64(sealed), "aad": _b64(self._aad(context))}
        with self._guard():
            try:
                answer = self._post("/v1/security/decrypt", body)
            except ConfigError as exc:
                if exc.code not in ("forbidden", "not_found"):
                    raise
                raise self._foreign(exc) from None
        plaintext = self._field(answer, "plaintext")
        if answer.get("key_id") != sealed_by:
            raise ConfigError(f"{_NAME}: {self.url} answered a decrypt for another key")
        if len(plaintext) != KWK_SIZE:
            raise DecryptionError(
                f"{_NAME}: {self.url} unwrapped {len(plaintext)} bytes, not a "
                f"{KWK_SIZE}-byte key-wrapping key"
            )
        return bytearray(plaintext)

    def describe(self) -> dict[str, Any]:
        """The settings (paths to the credential files, never their content)."""
        found: dict[str, Any] = {"url": self.url, "key": self.key}
        for name in ("realm", "client_id"):
            if getattr(self, name) is not None:
                found[name] = getattr(self, name)
        for name in ("token_file", "secret_file", "ca_file"):
            if getattr(self, name) is not None:
                found[name] = str(getattr(self, name))
        found["timeout"] = self.timeout
        return found

    def close(self) -> None:
        """Close the connection to the upstream."""
        with self._guard():
            if self._client is not None:
                self._client.close()
            self._client = None

    def __repr__(self) -> str:
        return f"<QimemRootKeyProvider {self.url} key={self.key!r}>"

    # ---- the upstream -----------------------------------------------------------------

    def _guard(self) -> threading.Lock:
        if self._pid != os.getpid():  # forked: a new lock and a connection of its own
            self._after_fork()
        return self._lock

    def _after_fork(self) -> None:
        self._lock, self._pid, self._client = threading.Lock(), os.getpid(), None

    def _plain(self, token: str | None) -> HttpClient:
        """An HttpClient for the upstream speaking with ``token`` (None: no token)."""
        if urllib.parse.urlsplit(self.url).scheme == "http" and not is_loopback(
            urllib.parse.urlsplit(self.url).hostname or ""
        ):
            raise ConfigError(
                f"{_NAME} refuses plain http to {self.url}: the token and key-wrapping keys "
                "would cross the network unencrypted; use https://"
            )
        try:
            return HttpClient(
                self.url,
                token,
                realm=self.realm,
                timeout=self.timeout,
                ca_cert=self.ca_file,
                max_response_bytes=_MAX_ANSWER,
            )
        except ValidationError:
            raise ConfigError(
                f"{_NAME}'s ca_file {self.ca_file} is not a readable PEM CA certificate file"
            ) from None

    def _session(self, *, renew: bool = False) -> HttpClient:
        """The client with a current token: the token file's, or a fresh login's."""
        fresh = self.client_id is None or time.monotonic() < self._expires
        if self._client is not None and not renew and fresh:
            return self._client
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.token_file is not None:
            self._client = self._plain(read_credential(self.token_file, "token_file"))
        else:
            self._client = self._plain(self._login())
        return self._client

    def _login(self) -> str:
        """An access token from the ``client_credentials`` grant."""
        assert self.secret_file is not None and self.realm is not None
        secret = read_credential(self.secret_file, "secret_file")
        login = self._plain(None)
        path = f"/v1/auth/realms/{urllib.parse.quote(self.realm, safe='')}/token"
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": secret,
        }
        started = time.monotonic()
        try:
            answer = login.request("POST", path, form, form=True, auth=False)
        except AuthError:
            raise ConfigError(
                f"{_NAME}: {self.url} refused the login of service account {self.client_id!r} "
                f"in realm {self.realm!r} (wrong secret, disabled or deleted account)"
            ) from None
        except QimemError as exc:
            raise self._refused(exc) from None
        finally:
            login.close()
        token = answer.get("access_token") if isinstance(answer, dict) else None
        lifetime = answer.get("expires_in") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not _CREDENTIAL.match(token):
            raise ConfigError(f"{_NAME}: {self.url} answered the login with no usable token")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
            lifetime = 60
        self._expires = started + max(float(lifetime) - _RENEW_MARGIN, 1.0)
        return token

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request, logging in again (or re-reading the token file) once on a 401."""
        for attempt in (1, 2):
            try:
                answer = self._session(renew=attempt == 2).request("POST", path, body)
            except AuthError as exc:
                if isinstance(exc, ForbiddenError):
                    raise self._refused(exc) from None
                if attempt == 1:
                    continue
                raise self._refused(exc) from None
            except QimemError as exc:
                raise self._refused(exc) from None
            if not isinstance(answer, dict):
                raise ConfigError(f"{_NAME}: {self.url} answered something unexpected")
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _encrypt(self, ref: str, plaintext: bytes, aad: bytes) -> tuple[bytes, str]:
        """The envelope and the key_id of ``ref``'s active version that sealed it."""
        body = {"key": ref, "plaintext": _b64(plaintext), "aad": _b64(aad)}
        answer = self._post("/v1/security/encrypt", body)
        sealed = self._field(answer, "envelope")
        key_id = answer.get("key_id")
        try:
            parsed = envelope.parse(sealed).key_id_str
        except (QimemError, ValueError):
            parsed = None
        if not isinstance(key_id, str) or parsed != key_id:
            raise ConfigError(f"{_NAME}: {self.url} answered an encrypt with a malformed envelope")
        return sealed, key_id

    def _aad(self, context: bytes) -> bytes:
        """The associated data of a KWK sealed for ``context``: it also names the
        configured key, so a blob sealed through another upstream key does not open even
        with a token that may decrypt under both."""
        name = self.key.encode()
        return _AAD + len(name).to_bytes(1, "big") + name + context

    def _foreign(self, refusal: QimemError) -> QimemError:
        """What a 403 or 404 to a decrypt means: if this token can seal and open under the
        configured key (one probe round trip), the blob is another key's (a
        DecryptionError); else the probe's own error (wrong token, permission, key)."""
        sealed, _ = self._encrypt(self.key, b"", _PROBE_AAD)
        self._post("/v1/security/decrypt", {"envelope": _b64(sealed), "aad": _b64(_PROBE_AAD)})
        return DecryptionError(
            f"the wrapped key was not sealed by the key {self.key!r} of {self.url} "
            f"(the upstream answered {refusal.code})"
        )

    def _field(self, answer: dict[str, Any], name: str) -> bytes:
        value = answer.get(name)
        try:
            if not isinstance(value, str):
                raise ValueError(name)
            return base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise ConfigError(f"{_NAME}: {self.url} answered without a valid {name}") from None

    def _refused(self, exc: QimemError) -> QimemError:
        """The error of the provider's contract for an upstream's error."""
        code = exc.code
        if isinstance(exc, StoreUnavailableError):
            detail = str(exc).replace("--ca-cert", "ca_file")
            return ConfigError(f"{_NAME} cannot reach {self.url} ({detail})", code="unreachable")
        if isinstance(exc, DecryptionError) and code in ("decryption_failed", "invalid_envelope"):
            return DecryptionError(
                f"the wrapped key does not unwrap under the key {self.key!r} of {self.url} "
                "(damaged, or sealed for another context)"
            )
        if isinstance(exc, ForbiddenError):
            return ConfigError(
                f"{_NAME}: {self.url} refused: the token lacks crypto:encrypt and "
                f"crypto:decrypt on the key {self.key!r}"
                + (f" in realm {self.realm!r}" if self.realm else ""),
                code="forbidden",
            )
        if isinstance(exc, AuthError):
            return ConfigError(
                f"{_NAME}: {self.url} refused the token (expired, revoked, or of another "
                "realm or server)",
                code="unauthorized",
            )
        if isinstance(exc, NotFoundError):
            what = f"realm {self.realm!r}" if code == "realm_not_found" else f"key {self.key!r}"
            return ConfigError(f"{_NAME}: {self.url} has no {what}", code="not_found")
        detail = exc.message.removeprefix(f"server {self.url}: ")
        return ConfigError(f"{_NAME}: {self.url} refused the request ({code}): {detail}", code=code)


def _optional_str(settings: Mapping[str, Any], name: str) -> str | None:
    value = settings.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_NAME}'s {name} must be a non-empty string")
    return value


def _path(settings: Mapping[str, Any], name: str, base_dir: Path) -> Path | None:
    value = _optional_str(settings, name)
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _reset_after_fork() -> None:
    for provider in list(_LIVE):
        provider._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
