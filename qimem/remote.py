"""Remote keys: encrypt and decrypt files locally with data keys that a qimem server makes
and unwraps (``qimem --server URL --token T encrypt|decrypt|rewrap``, docs/files.md).

Only data keys cross the network: the server answers ``POST /v1/security/datakey`` with a
fresh data key and the same key wrapped under a stored key, and opens a wrapped data key
with ``POST /v1/security/decrypt``. The file data is sealed and opened here, in stream
format v1, so a file encrypted through a server decrypts locally against the server's
store, and the other way round.

The transport is :class:`qimem.http_client.HttpClient` (shared with ``qauth --server``):
one keep-alive connection per client, no redirects, bounded reads, TLS verified against
the system store or ``ca_cert``. Server errors become the qimem error class of the same
local operation, with a one-line message naming the server; the bearer token is never part
of a message or repr.

>>> from qimem.remote import RemoteKeys
>>> remote = RemoteKeys("http://127.0.0.1:8080", token)            # doctest: +SKIP
>>> keyring = remote.keyring("backups")                             # doctest: +SKIP
>>> qimem.stream.encrypt_stream(src, dst, keyring)                  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import copy
import os
import urllib.parse
from datetime import datetime
from typing import Any

from qimem import envelope as env
from qimem import stream
from qimem.crypto import Algorithm, zero
from qimem.errors import (
    StoreUnavailableError,
    ValidationError,
)
from qimem.http_client import HttpClient
from qimem.keys import KeyState, KeyVersion
from qimem.registry import Registry, make_plugin_manager
from qimem.services.keys import KeyDetails


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
        client: HttpClient,
        registry: Registry,
        ref: str | None = None,
        context: bytes | None = None,
    ) -> None:
        self.client = client
        self.registry = registry
        self.ref = ref
        self.context = context
        self._prefetched: tuple[Algorithm, bytearray, bytes] | None = None

    def _body(self, **fields: Any) -> dict[str, Any]:
        if self.context is not None:  # a derived key's context (base64, as the API takes it)
            fields["context"] = _b64(self.context)
        return fields

    def check(self) -> None:
        """Get the first data key now, so a bad key fails before any output; the next
        :meth:`new_data_key` hands it out (no data key is wrapped and counted for nothing,
        :func:`qimem.batch.check_key`)."""
        if self._prefetched is None:
            self._prefetched = self.new_data_key()

    def new_data_key(self) -> tuple[Algorithm, bytearray, bytes]:
        if self._prefetched is not None:
            made_before, self._prefetched = self._prefetched, None
            return made_before
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
        """The algorithm with this envelope id (stream decryption asks only after the data
        key is unwrapped, so the id is authenticated by then).

        :raises UnsupportedAlgorithmError: no enabled plugin provides it (naming an installed
            one that would, and how to enable it).
        """
        return self.registry.algorithm_by_id(algorithm_id)

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
    :param ca_cert: PEM file of the CA(s) to trust for ``https://`` (default: system store).
    :param insecure_plain_http: allow ``http://`` to a host that is not loopback.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        realm: str | None = None,
        plugins: list[str] | None = None,
        registry: Registry | None = None,
        ca_cert: str | os.PathLike[str] | None = None,
        insecure_plain_http: bool = False,
    ) -> None:
        self.client = HttpClient(
            base_url,
            token,
            realm=realm,
            ca_cert=ca_cert,
            insecure_plain_http=insecure_plain_http,
        )
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
        worker = copy.copy(self)
        worker.client = self.client.clone()
        return worker

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
            purpose=data.get("purpose", "encrypt"),  # a server from before issue 16: none
        )

    def rotate_key(self, ref: str) -> KeyVersion:
        return _version(self.client.request("POST", "/v1/security/rotate", {"key": ref}))
