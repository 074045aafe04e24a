"""Remote keys: encrypt and decrypt files locally with data keys that a qimem server makes
and unwraps (``qimem --server URL --token T encrypt|decrypt|rewrap``, docs/files.md).

Only data keys cross the network: the server answers ``POST /v1/security/datakey`` with a
fresh data key and the same key wrapped under a stored key, and opens a wrapped data key
with ``POST /v1/security/decrypt``. The file data is sealed and opened here, in stream
format v1, so a file encrypted through a server decrypts locally against the server's
store, and the other way round.

Standard library only (``http.client``, one keep-alive connection per client; a forked
worker opens its own). Server errors become the qimem error class of the same local
operation, with a one-line message naming the server; the bearer token is never part of a
message or repr.

>>> from qimem.remote import RemoteKeys
>>> remote = RemoteKeys("http://127.0.0.1:8080", token)            # doctest: +SKIP
>>> keyring = remote.keyring("backups")                             # doctest: +SKIP
>>> qimem.stream.encrypt_stream(src, dst, keyring)                  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import ssl
import urllib.parse
from datetime import datetime
from typing import Any

from qimem import envelope as env
from qimem import stream
from qimem.crypto import Algorithm, zero
from qimem.errors import (
    AuthError,
    ConflictError,
    DecryptionError,
    EnvelopeFormatError,
    ForbiddenError,
    KeyNotActiveError,
    NotFoundError,
    PayloadTooLargeError,
    QimemError,
    StoreUnavailableError,
    ValidationError,
)
from qimem.keys import KeyState, KeyVersion
from qimem.registry import Registry, make_plugin_manager
from qimem.services.keys import KeyDetails

REALM_HEADER = "X-Qimem-Realm"

_BY_STATUS: dict[int, type[QimemError]] = {
    400: ValidationError,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: DecryptionError,
}
_BY_CODE: dict[str, type[QimemError]] = {
    "key_not_active": KeyNotActiveError,
    "invalid_envelope": EnvelopeFormatError,
}
#: Connection failures after which one retry on a fresh connection is safe (the server
#: closed an idle keep-alive connection).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an ``http://`` or ``https://`` URL.

    :raises ValidationError: any other scheme, or no host.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValidationError("--server must be an http:// or https:// URL")
    return url.rstrip("/")


def insecure_warning(url: str) -> str | None:
    """A one-line warning when ``url`` is plain http to a host that is not loopback."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "http":
        return None
    host = parsed.hostname or ""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"qimem: warning: {check_url(url)} is plain http: data keys and the token travel "
        "unencrypted; use https://"
    )


class RemoteClient:
    """JSON over HTTP(S) to one qimem server, with an optional bearer token.

    :param realm: sent as ``X-Qimem-Realm`` (default: the token's realm).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        realm: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = check_url(base_url)
        parsed = urllib.parse.urlparse(self.base_url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or ""
        self._port = parsed.port
        self._prefix = parsed.path.rstrip("/")
        self._token = token
        self.realm = realm
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<RemoteClient {self.base_url}>"

    def _connection(self) -> http.client.HTTPConnection:
        if self._pid != os.getpid():  # forked: never share the parent's socket
            self._conn, self._pid = None, os.getpid()
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host,
                    self._port,
                    timeout=self._timeout,
                    context=ssl.create_default_context(),
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def close(self) -> None:
        """Close the kept-alive connection (a later request opens a new one)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON answer (None for an empty body).

        :raises StoreUnavailableError: the server cannot be reached or answered 5xx.
        :raises QimemError: the class of the server's error (401/403 → AuthError, ...).
        """
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self.realm:
            headers[REALM_HEADER] = self.realm
        for attempt in (1, 2):
            reused = self._conn is not None and self._pid == os.getpid()
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except _STALE:
                self.close()
                if reused and attempt == 1:
                    continue
                raise self._unreachable("the connection was closed") from None
            except ssl.SSLError as exc:
                self.close()
                raise self._unreachable(f"TLS error ({type(exc).__name__})") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise self._unreachable(type(exc).__name__) from None
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            if resp.status >= 400:
                raise self._error(resp.status, raw)
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                raise StoreUnavailableError(
                    f"server {self.base_url} answered something that is not JSON"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, reason: str) -> StoreUnavailableError:
        return StoreUnavailableError(f"cannot reach server {self.base_url}: {reason}")

    def _error(self, status: int, raw: bytes) -> QimemError:
        try:
            detail = json.loads(raw)["error"]
            code, message = str(detail["code"]), str(detail["message"])
        except Exception:
            code, message = "", f"HTTP {status}"
        if status >= 500:
            cls: type[QimemError] = StoreUnavailableError
            message = f"server {self.base_url} failed: {message}"
        else:
            cls = _BY_CODE.get(code) or _BY_STATUS.get(status, QimemError)
            message = f"server {self.base_url}: {message}"
        return cls(message, code=code) if code else cls(message)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str, base_url: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except Exception:
        raise StoreUnavailableError(f"server {base_url} sent an invalid {what}") from None


class RemoteKeyring:
    """A :class:`qimem.stream.Keyring` whose data keys come from a qimem server.

    :param ref: the key that wraps new data keys (name, lineage_id or active key_id);
        ``None`` for a keyring that only unwraps.
    """

    def __init__(
        self,
        client: RemoteClient,
        registry: Registry,
        ref: str | None = None,
        context: bytes | None = None,
    ) -> None:
        self.client = client
        self.registry = registry
        self.ref = ref
        self.context = context

    def _body(self, **fields: Any) -> dict[str, Any]:
        if self.context is not None:  # a derived key's context (base64, as the API takes it)
            fields["context"] = _b64(self.context)
        return fields

    def new_data_key(self) -> tuple[Algorithm, bytearray, bytes]:
        if self.ref is None:
            raise ValidationError("no key given to encrypt with")
        made = self.client.request("POST", "/v1/security/datakey", self._body(key=self.ref))
        data_key = bytearray(_unb64(made.get("plaintext_key"), "data key", self.client.base_url))
        try:
            wrapped = _unb64(made.get("wrapped_key"), "wrapped key", self.client.base_url)
            if len(data_key) != stream.DATA_KEY_SIZE:
                raise StoreUnavailableError(
                    f"server {self.client.base_url} sent a data key of the wrong size"
                )
            algorithm = self.algorithm(env.parse(wrapped).algorithm_id)
        except BaseException:
            zero(data_key)
            raise
        return algorithm, data_key, wrapped

    def unwrap(self, wrapped_key: bytes) -> bytearray:
        opened = self.client.request(
            "POST", "/v1/security/decrypt", self._body(envelope=_b64(wrapped_key))
        )
        return bytearray(_unb64(opened.get("plaintext"), "data key", self.client.base_url))

    def rewrap(self, wrapped_key: bytes) -> bytes:
        """``wrapped_key`` re-sealed under the active version of its key's lineage."""
        resealed = self.client.request(
            "POST", "/v1/security/rewrap", self._body(envelope=_b64(wrapped_key))
        )
        return _unb64(resealed.get("envelope"), "envelope", self.client.base_url)

    def algorithm(self, algorithm_id: int) -> Algorithm:
        try:
            return self.registry.algorithm_by_id(algorithm_id)
        except Exception:
            raise DecryptionError(f"stream uses unknown algorithm id {algorithm_id}") from None

    def __repr__(self) -> str:
        return f"<RemoteKeyring {self.client.base_url} ref={self.ref!r}>"


def _version(data: dict[str, Any]) -> KeyVersion:
    return KeyVersion(
        key_id=data["key_id"],
        lineage_id=data["lineage_id"],
        name=data.get("name"),
        realm=data["realm"],
        version=int(data["version"]),
        algorithm=data["algorithm"],
        state=KeyState(data["state"]),
        created_at=datetime.fromisoformat(data["created_at"]),
    )


class RemoteKeys:
    """A qimem server as the source of keys: keyrings for the file commands and the key
    commands (create, list, show, rotate) over the HTTP API.

    Usable wherever :mod:`qimem.batch` takes an application (see
    :class:`qimem.services.files.KeySource`); each forked worker gets its own client.

    :param realm: sent as ``X-Qimem-Realm`` (default: the token's realm).
    :param plugins: third-party plugins to enable for local algorithms.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        realm: str | None = None,
        plugins: list[str] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.client = RemoteClient(base_url, token, realm=realm)
        self._token = token
        self._plugins = list(plugins or [])
        self._registry = registry

    @property
    def base_url(self) -> str:
        return self.client.base_url

    @property
    def registry(self) -> Registry:
        """The local plugin registry: the algorithms that seal and open the file data."""
        if self._registry is None:
            self._registry = Registry(make_plugin_manager(self._plugins))
        return self._registry

    def __repr__(self) -> str:
        return f"<RemoteKeys {self.client.base_url}>"

    def keyring(
        self, ref: str | None = None, realm: str | None = None, context: bytes | None = None
    ) -> RemoteKeyring:
        """A keyring over this server (``realm`` is the client's; the argument is ignored)."""
        return RemoteKeyring(self.client, self.registry, ref, context)

    def for_worker(self) -> RemoteKeys:
        """A copy with its own connection, for a forked worker process."""
        return RemoteKeys(
            self.client.base_url,
            self._token,
            realm=self.client.realm,
            plugins=self._plugins,
            registry=self._registry,
        )

    def close(self) -> None:
        self.client.close()

    # -- keys ----------------------------------------------------------------------------

    def create_key(self, *, algorithm: str, name: str | None = None) -> KeyVersion:
        body: dict[str, Any] = {"algorithm": algorithm}
        if name is not None:
            body["name"] = name
        return _version(self.client.request("POST", "/v1/security/keys", body))

    def list_keys(self) -> list[KeyVersion]:
        found = self.client.request("GET", "/v1/security/keys")
        return [_version(k) for k in found["keys"]]

    def show_key(self, ref: str) -> KeyDetails:
        path = "/v1/security/keys/" + urllib.parse.quote(ref, safe="")
        data = self.client.request("GET", path)
        return KeyDetails(
            lineage_id=data["lineage_id"],
            name=data.get("name"),
            realm=data["realm"],
            algorithm=data["algorithm"],
            versions=[_version(v) for v in data["versions"]],
        )

    def rotate_key(self, ref: str) -> KeyVersion:
        return _version(self.client.request("POST", "/v1/security/rotate", {"key": ref}))
