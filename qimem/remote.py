"""Remote keys: encrypt and decrypt files locally with data keys that a qimem server makes
and unwraps (``qimem --server URL --token T encrypt|decrypt|rewrap``, docs/files.md).

Only data keys cross the network: the server answers ``POST /v1/security/datakey`` with a
fresh data key and the same key wrapped under a stored key, and opens a wrapped data key
with ``POST /v1/security/decrypt``. The file data is sealed and opened here, in stream
format v1, so a file encrypted through a server decrypts locally against the server's
store, and the other way round.

Signatures, MAC tags, public keys and random bytes (issue 16) are the server's: :class:`RemoteKeys`
sends the message to ``/v1/security/sign|verify|mac|verify-mac|random`` and returns the
records of :mod:`qimem.services.signing` and :mod:`qimem.services.macs`, so ``qimem sign
--server`` writes the bytes ``qimem sign`` writes (a signature made through the server
verifies locally against its store, and the other way round).

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
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # the result records; imported on use
    from qimem.services.macs import MacResult
    from qimem.services.signing import PublicKeyResult, SignResult, VerifyResult


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
    """A qimem server as the source of keys: keyrings for the file commands, the key
    commands (create, list, show, rotate), and signatures, MAC tags, public keys and random
    bytes over the HTTP API.

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

    # -- signatures, MAC tags, public keys, random bytes (issue 16) ---------------------------
    # The same calls and results as qimem.services.signing/macs/randomness, through
    # /v1/security/*: the server signs and computes tags, this process sends the message.

    def _answer(self, answer: Any, *fields: str) -> dict[str, Any]:
        if not isinstance(answer, dict) or any(name not in answer for name in fields):
            raise StoreUnavailableError(f"server {self.base_url} sent an unexpected answer")
        return answer

    def sign(
        self,
        ref: str,
        message: bytes,
        *,
        prehashed: bool = False,
        marshaling: str = "asn1",
        raw: bool = False,
    ) -> SignResult:
        """``POST /v1/security/sign``: as :func:`qimem.services.signing.sign`."""
        from qimem.services.signing import SignResult

        body = {"key": ref, "message": _b64(message), "prehashed": prehashed, "raw": raw}
        body["marshaling"] = marshaling
        got = self._answer(
            self.client.request("POST", "/v1/security/sign", body),
            "signature", "key_id", "version", "algorithm",
        )  # fmt: skip
        signature = _unb64(got["signature"], "signature", self.base_url)
        return SignResult(signature, str(got["key_id"]), int(got["version"]), str(got["algorithm"]))

    def verify(
        self,
        ref: str,
        message: bytes,
        signature: bytes,
        *,
        prehashed: bool = False,
        marshaling: str = "asn1",
        raw: bool = False,
        version: int | None = None,
    ) -> VerifyResult:
        """``POST /v1/security/verify``: as :func:`qimem.services.signing.verify`."""
        body: dict[str, Any] = {
            "key": ref,
            "message": _b64(message),
            "signature": _b64(signature),
            "prehashed": prehashed,
            "marshaling": marshaling,
            "raw": raw,
        }
        if version is not None:
            body["version"] = version
        return self._verified(self.client.request("POST", "/v1/security/verify", body))

    def mac(self, ref: str, data: bytes, *, raw: bool = False) -> MacResult:
        """``POST /v1/security/mac``: as :func:`qimem.services.macs.mac`."""
        from qimem.services.macs import MacResult

        body = {"key": ref, "data": _b64(data), "raw": raw}
        got = self._answer(
            self.client.request("POST", "/v1/security/mac", body),
            "tag", "key_id", "version", "algorithm",
        )  # fmt: skip
        tag = _unb64(got["tag"], "tag", self.base_url)
        return MacResult(tag, str(got["key_id"]), int(got["version"]), str(got["algorithm"]))

    def verify_mac(
        self, ref: str, data: bytes, tag: bytes, *, raw: bool = False, version: int | None = None
    ) -> VerifyResult:
        """``POST /v1/security/verify-mac``: as :func:`qimem.services.macs.verify_mac`."""
        body: dict[str, Any] = {"key": ref, "data": _b64(data), "tag": _b64(tag), "raw": raw}
        if version is not None:
            body["version"] = version
        return self._verified(self.client.request("POST", "/v1/security/verify-mac", body))

    def _verified(self, answer: Any) -> VerifyResult:
        from qimem.services.signing import VerifyResult

        got = self._answer(answer, "valid")
        if got["valid"] is not True:  # anything but a JSON true is not a valid signature
            return VerifyResult(False)
        version = got.get("version")
        return VerifyResult(
            True, got.get("key_id"), int(version) if isinstance(version, int) else None
        )

    def public_key(self, ref: str, *, version: int | None = None) -> PublicKeyResult:
        """``GET /v1/security/keys/{ref}/public``: as
        :func:`qimem.services.signing.public_key`."""
        query = "?format=json" + (f"&version={int(version)}" if version is not None else "")
        got = self._answer(
            self.client.request("GET", self._public_path(ref) + query),
            "key_id", "version", "algorithm", "pem", "jwk",
        )  # fmt: skip
        return _public_result(got, self.base_url)

    def public_keys(self, ref: str) -> list[PublicKeyResult]:
        """Every version of ``ref`` that still verifies, oldest first (the server's JWK Set,
        then each of its keys by key_id): as :func:`qimem.services.signing.public_keys`."""
        found = self._answer(
            self.client.request("GET", self._public_path(ref) + "?format=jwks"), "keys"
        )["keys"]
        if not isinstance(found, list) or not all(
            isinstance(jwk, dict) and isinstance(jwk.get("kid"), str) for jwk in found
        ):
            raise StoreUnavailableError(f"server {self.base_url} sent an unexpected answer")
        return [self.public_key(jwk["kid"]) for jwk in found]

    @staticmethod
    def _public_path(ref: str) -> str:
        return "/v1/security/keys/" + urllib.parse.quote(ref, safe="") + "/public"

    def random_bytes(self, n: int) -> bytes:
        """``POST /v1/security/random``: ``n`` bytes from the server's CSPRNG (audited
        there as ``crypto.random``), as :func:`qimem.services.randomness.random_bytes`."""
        got = self._answer(
            self.client.request("POST", "/v1/security/random", {"bytes": n}), "random"
        )
        data = _unb64(got["random"], "random bytes", self.base_url)
        if len(data) != n:
            raise StoreUnavailableError(f"server {self.base_url} sent {len(data)} random bytes")
        return data


def _public_result(got: dict[str, Any], base_url: str) -> PublicKeyResult:
    from qimem.services.signing import PublicKeyResult

    pem, jwk = got["pem"], got["jwk"]
    if not isinstance(pem, str) or not isinstance(jwk, dict):
        raise StoreUnavailableError(f"server {base_url} sent an unexpected public key")
    # A server must never send private members; refuse an answer that has any.
    from qimem.crypto_purposes import PRIVATE_JWK_FIELDS

    if PRIVATE_JWK_FIELDS & set(jwk) or "PRIVATE" in pem:
        raise StoreUnavailableError(f"server {base_url} sent private key material; discarded")
    return PublicKeyResult(str(got["key_id"]), int(got["version"]), str(got["algorithm"]), pem, jwk)
