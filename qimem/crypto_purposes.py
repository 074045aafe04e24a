"""Key purposes beyond encryption: the signing, MAC and deterministic algorithm interfaces.

Plugin API 1.2 extends ``qimem_register_algorithms``: an algorithm may declare a
``purpose`` attribute, one of :data:`PURPOSES`. An algorithm without one is an AEAD
(:class:`qimem.crypto.Algorithm`, purpose ``"encrypt"``), so plugins written for plugin
API 1.0/1.1 keep working unchanged. The other purposes have their own protocols here:

* ``"sign"`` — :class:`SigningAlgorithm` (Ed25519, ECDSA, RSA-PSS, RSA PKCS#1 v1.5, ML-DSA);
* ``"mac"`` — :class:`MacAlgorithm` (HMAC);
* ``"deterministic"`` — :class:`DeterministicAlgorithm` (AES-SIV: the same plaintext and
  associated data always give the same ciphertext, so it leaks equality by design).

This module imports no cryptography library: it is only the contract. The registry does
not import it either (it reads :data:`PURPOSES` from :mod:`qimem.crypto`) until a plugin
offers an algorithm object of another purpose.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from qimem.crypto import DEFAULT_PURPOSE, PURPOSES, purpose_of

__all__ = [
    "DEFAULT_PURPOSE",
    "MARSHALINGS",
    "PRIVATE_JWK_FIELDS",
    "PURPOSES",
    "REQUIRED",
    "DeterministicAlgorithm",
    "MacAlgorithm",
    "Marshaling",
    "PreparedDeterministic",
    "Signer",
    "SigningAlgorithm",
    "Verifier",
    "purpose_of",
]
#: Signature encodings: ``asn1`` is DER (ECDSA's ``Ecdsa-Sig-Value``), ``jws`` the
#: fixed-width ``r ‖ s`` of JWS/IEEE P1363. Algorithms with one encoding ignore the choice.
MARSHALINGS = ("asn1", "jws")
Marshaling = Literal["asn1", "jws"]
#: JWK members that carry private material; :meth:`SigningAlgorithm.public_jwk` never
#: returns any of them.
PRIVATE_JWK_FIELDS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth", "priv", "seed"})


class Signer(Protocol):
    """A private key loaded once (what :meth:`SigningAlgorithm.signer` returns): the
    service layer caches it like an AEAD's ``cipher(key)``. Its repr shows no key."""

    def sign(
        self, message: bytes, *, prehashed: bool = False, marshaling: Marshaling = "asn1"
    ) -> bytes: ...

    def public_key(self) -> bytes: ...


class Verifier(Protocol):
    """A public key loaded once (what :meth:`SigningAlgorithm.verifier` returns)."""

    def verify(
        self,
        message: bytes,
        signature: bytes,
        *,
        prehashed: bool = False,
        marshaling: Marshaling = "asn1",
    ) -> bool: ...


@runtime_checkable
class SigningAlgorithm(Protocol):
    """An asymmetric signature algorithm (purpose ``"sign"``).

    Private keys travel as PKCS#8 DER (unencrypted; qimem wraps them under the root key like
    any other key material), public keys as SubjectPublicKeyInfo DER. Every method raises
    :class:`qimem.errors.ValidationError` for a key of the wrong type, size or encoding and
    for options the algorithm does not support; ``verify`` returns ``False`` for any
    signature that does not verify (malformed ones included) and never raises for one.
    """

    name: str
    algorithm_id: int
    purpose: str  # "sign"
    #: The JWS ``alg`` this algorithm's signatures are (``EdDSA``, ``ES256``, ``PS256`` ...).
    jws_algorithm: str
    #: Whether ``sign``/``verify`` take ``prehashed=True`` (a digest instead of the message).
    supports_prehashed: bool
    #: The digest algorithm name (``"sha256"`` ...) a prehashed input must come from, or None.
    hash_name: str | None

    def generate_private_key(self) -> bytearray:
        """A fresh private key, PKCS#8 DER."""
        ...

    def signer(self, private_key: bytes | bytearray, *, trusted: bool = False) -> Signer:
        """``private_key`` (PKCS#8 DER) loaded and checked once. ``trusted=True`` may skip
        expensive consistency checks (RSA: 0.2-0.8 s) for a key that was checked when it
        entered the store and comes back authenticated; never for caller-supplied keys."""
        ...

    def verifier(self, public_key: bytes) -> Verifier:
        """``public_key`` (SPKI DER) loaded and checked once."""
        ...

    def public_key(self, private_key: bytes | bytearray, *, trusted: bool = False) -> bytes:
        """The SubjectPublicKeyInfo DER of ``private_key`` (PKCS#8 DER)."""
        ...

    def sign(
        self,
        private_key: bytes | bytearray,
        message: bytes,
        *,
        prehashed: bool = False,
        marshaling: Marshaling = "asn1",
        trusted: bool = False,
    ) -> bytes:
        """Sign ``message`` (or, with ``prehashed``, its digest under :attr:`hash_name`)."""
        ...

    def verify(
        self,
        public_key: bytes,
        message: bytes,
        signature: bytes,
        *,
        prehashed: bool = False,
        marshaling: Marshaling = "asn1",
    ) -> bool:
        """Whether ``signature`` is valid for ``message`` under ``public_key`` (SPKI DER)."""
        ...

    def public_pem(self, public_key: bytes) -> str:
        """``public_key`` (SPKI DER) as a ``-----BEGIN PUBLIC KEY-----`` PEM string."""
        ...

    def public_jwk(self, public_key: bytes) -> dict[str, Any]:
        """``public_key`` (SPKI DER) as a JWK (RFC 7517) with public members only."""
        ...


@runtime_checkable
class MacAlgorithm(Protocol):
    """A message authentication code (purpose ``"mac"``) over a secret key of ``key_size``
    bytes. ``verify`` compares in constant time and accepts a truncated tag only when the
    caller names the truncated length (``tag_size=``), never shorter than
    ``min_tag_size``.

    How qimem uses it (:mod:`qimem.services.macs`): ``mac`` makes every tag, and
    ``verify(key, data, tag)`` (no ``tag_size``) alone decides whether a tag is valid; qimem
    never compares a tag with a recomputed ``mac`` itself, and counts only a return value
    that ``is True`` as valid. The key is passed as ``bytes`` of ``key_size`` on every call
    (the loaded key of a cache entry), so ``verify`` should be cheap for exact ``bytes``: it
    is on the hot path (the built-in HMAC checks types with ``type(x) is bytes`` first).

    Tags should be deterministic (the same key and data give the same tag): ``--raw`` tags
    are meant for receivers that recompute them (webhooks), and the Wycheproof tests
    require ``mac`` to reproduce the vectors' tags. A MAC whose tags carry their own
    randomness still verifies correctly in qimem, as long as ``verify`` accepts them.
    """

    name: str
    algorithm_id: int
    purpose: str  # "mac"
    key_size: int
    tag_size: int
    min_tag_size: int

    def generate_key(self) -> bytearray:
        """Fresh random key material of ``key_size`` bytes."""
        ...

    def mac(self, key: bytes | bytearray, data: bytes) -> bytes:
        """The full-length tag (``tag_size`` bytes) of ``data``."""
        ...

    def verify(
        self, key: bytes | bytearray, data: bytes, tag: bytes, *, tag_size: int | None = None
    ) -> bool:
        """Whether ``tag`` is the tag of ``data`` (its first ``tag_size`` bytes, if given)."""
        ...


class PreparedDeterministic(Protocol):
    """One deterministic key, loaded once: what the optional
    :meth:`DeterministicAlgorithm.cipher` returns. The service calls it with ``bytes`` it
    has checked. Its repr shows no key."""

    def encrypt(self, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """As :meth:`DeterministicAlgorithm.encrypt`, with the bound key."""
        ...

    def decrypt(self, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        """As :meth:`DeterministicAlgorithm.decrypt`, with the bound key (raises
        :class:`qimem.errors.DecryptionError` on any failure)."""
        ...


@runtime_checkable
class DeterministicAlgorithm(Protocol):
    """A deterministic AEAD (purpose ``"deterministic"``): no nonce, so equal plaintexts
    under equal associated data give equal ciphertexts (use it only where that equality is
    wanted: lookups and joins on encrypted columns).

    Optional, since plugin API 1.2 (not part of this protocol's required members, so a
    plugin without it keeps working):

    * ``cipher(key) -> PreparedDeterministic``: ``key`` loaded and checked once. The
      service's cache entry then holds that object and no key bytes (the unwrapped key is
      zeroed as soon as it returns), and saves building the primitive on every call.
      Without it, the entry keeps a copy of the key bytes and calls ``encrypt(key, ...)``.
      Raise :class:`qimem.errors.ValidationError` for a key of the wrong size.
    * ``max_messages_per_key`` (int) and ``max_messages_reason`` (str): the most messages one
      key version may seal, and why, shown when a usage limit above it is refused (default:
      the 2^32 bound of random 96-bit nonces, :func:`qimem.keys.max_messages_per_key`).
    """

    name: str
    algorithm_id: int
    purpose: str  # "deterministic"
    key_size: int
    tag_size: int

    def generate_key(self) -> bytearray:
        """Fresh random key material of ``key_size`` bytes."""
        ...

    def encrypt(self, key: bytes | bytearray, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Seal ``plaintext``; returns synthetic IV ‖ ciphertext. ``None`` aad is ``b""``."""
        ...

    def decrypt(self, key: bytes | bytearray, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        """Open; raises :class:`qimem.errors.DecryptionError` on any failure."""
        ...


#: For each purpose other than ``encrypt``: the methods and integer attributes (with their
#: allowed range) an object must have. The registry validates plugins against this.
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[tuple[str, int, int], ...]]] = {
    "sign": (
        (
            "generate_private_key",
            "signer",
            "verifier",
            "public_key",
            "sign",
            "verify",
            "public_pem",
            "public_jwk",
        ),
        (),
    ),
    "mac": (("generate_key", "mac", "verify"), (("key_size", 16, 128), ("tag_size", 16, 64))),
    "deterministic": (
        ("generate_key", "encrypt", "decrypt"),
        (("key_size", 32, 64), ("tag_size", 16, 32)),
    ),
}
