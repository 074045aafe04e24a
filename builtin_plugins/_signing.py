"""The built-in signing algorithms over cryptography's asymmetric primitives.

:mod:`qimem.builtin_plugins.key_purposes` registers these classes by reference, so this module
(and cryptography's asymmetric code) is imported when a signing algorithm is first used.
Private keys are PKCS#8 DER, public keys SubjectPublicKeyInfo DER (see
:class:`qimem.crypto_purposes.SigningAlgorithm`). Nothing here is hand-written crypto: keys,
signatures, padding and encodings are cryptography's.
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from qimem.crypto_purposes import MARSHALINGS
from qimem.errors import UnsupportedAlgorithmError, ValidationError

_BYTES = (bytes, bytearray, memoryview)
_DER = serialization.Encoding.DER
_PKCS8 = serialization.PrivateFormat.PKCS8
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2), as JWK members are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int, size: int | None = None) -> str:
    size = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


class Signer:
    """A private key loaded once (the service layer caches it, like an AEAD ``cipher``)."""

    __slots__ = ("_algorithm", "_key")

    def __init__(self, algorithm: SigningBase, key: Any) -> None:
        self._algorithm = algorithm
        self._key = key

    def sign(self, message: bytes, *, prehashed: bool = False, marshaling: str = "asn1") -> bytes:
        """Sign ``message`` (see :meth:`SigningBase.sign`)."""
        algorithm = self._algorithm
        algorithm._check_options(message, prehashed, marshaling)
        return algorithm._sign(self._key, bytes(message), prehashed, marshaling)

    def public_key(self) -> bytes:
        """The SubjectPublicKeyInfo DER of this key."""
        return self._key.public_key().public_bytes(_DER, _SPKI)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<Signer {self._algorithm.name}>"


class Verifier:
    """A public key loaded once."""

    __slots__ = ("_algorithm", "_key")

    def __init__(self, algorithm: SigningBase, key: Any) -> None:
        self._algorithm = algorithm
        self._key = key

    def verify(
        self, message: bytes, signature: bytes, *, prehashed: bool = False, marshaling: str = "asn1"
    ) -> bool:
        """Whether ``signature`` is valid (see :meth:`SigningBase.verify`)."""
        algorithm = self._algorithm
        algorithm._check_options(message, prehashed, marshaling)
        if not isinstance(signature, _BYTES):
            raise ValidationError(f"{algorithm.name}: the signature must be bytes")
        try:
            algorithm._verify(self._key, bytes(message), bytes(signature), prehashed, marshaling)
        except (InvalidSignature, ValueError, OverflowError):
            return False
        return True

    def __repr__(self) -> str:
        return f"<Verifier {self._algorithm.name}>"


class SigningBase:
    """What every built-in signing algorithm shares; subclasses fill in the primitives."""

    name: ClassVar[str]
    algorithm_id: ClassVar[int]
    purpose: ClassVar[str] = "sign"
    jws_algorithm: ClassVar[str]
    supports_prehashed: ClassVar[bool] = False
    hash_name: ClassVar[str | None] = None
    #: What the key is, for messages ("an Ed25519 key", "a P-256 EC key" ...).
    key_description: ClassVar[str]

    # ------------------------------------------------------------- the primitives
    def _generate(self) -> Any:
        raise NotImplementedError

    def _is_private(self, key: Any) -> bool:
        raise NotImplementedError

    def _is_public(self, key: Any) -> bool:
        raise NotImplementedError

    def _sign(self, key: Any, message: bytes, prehashed: bool, marshaling: str) -> bytes:
        raise NotImplementedError

    def _verify(
        self, key: Any, message: bytes, signature: bytes, prehashed: bool, marshaling: str
    ) -> None:
        """Raise InvalidSignature (or ValueError) unless the signature verifies."""
        raise NotImplementedError

    def _jwk(self, key: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _digest_size(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------- the interface
    def _check_options(self, message: object, prehashed: bool, marshaling: str) -> None:
        if not isinstance(message, _BYTES):
            raise ValidationError(f"{self.name}: the message must be bytes")
        if marshaling not in MARSHALINGS:
            raise ValidationError(
                f"{self.name}: marshaling {marshaling!r} is not one of {', '.join(MARSHALINGS)}"
            )
        if prehashed:
            if not self.supports_prehashed:
                raise ValidationError(f"{self.name} signs the message itself, not a digest")
            if len(message) != self._digest_size():
                raise ValidationError(
                    f"{self.name}: a prehashed input is a {self.hash_name} digest "
                    f"of {self._digest_size()} bytes"
                )

    def _load_private(self, private_key: object, trusted: bool = False) -> Any:
        if not isinstance(private_key, _BYTES):
            raise ValidationError(f"{self.name}: the private key must be bytes (PKCS#8 DER)")
        try:
            key = serialization.load_der_private_key(
                bytes(private_key), password=None, unsafe_skip_rsa_key_validation=trusted
            )
        except UnsupportedAlgorithm:
            key = None
        except (ValueError, TypeError):
            raise ValidationError(
                f"{self.name}: the private key is not a PKCS#8 DER private key"
            ) from None
        if key is None or not self._is_private(key):
            raise ValidationError(f"{self.name}: the private key is not {self.key_description}")
        return key

    def _load_public(self, public_key: object) -> Any:
        if not isinstance(public_key, _BYTES):
            raise ValidationError(f"{self.name}: the public key must be bytes (SPKI DER)")
        try:
            key = serialization.load_der_public_key(bytes(public_key))
        except UnsupportedAlgorithm:
            key = None
        except (ValueError, TypeError):
            raise ValidationError(
                f"{self.name}: the public key is not a SubjectPublicKeyInfo DER public key"
            ) from None
        if key is None or not self._is_public(key):
            raise ValidationError(f"{self.name}: the public key is not {self.key_description}")
        return key

    def generate_private_key(self) -> bytearray:
        """A fresh private key, PKCS#8 DER (unencrypted: qimem wraps it under the root key)."""
        key = self._generate()
        return bytearray(key.private_bytes(_DER, _PKCS8, serialization.NoEncryption()))

    def signer(self, private_key: bytes | bytearray, *, trusted: bool = False) -> Signer:
        """``private_key`` (PKCS#8 DER) loaded and checked once, ready to sign.

        :param trusted: skip cryptography's RSA private key consistency checks (0.2-0.8 s
            for a 3072/4096-bit key; no effect on other key types). Only for a key that was
            checked when it entered the store and comes back authenticated (unwrapped under
            the root key); never for key material a caller hands in.
        """
        return Signer(self, self._load_private(private_key, trusted))

    def verifier(self, public_key: bytes) -> Verifier:
        """``public_key`` (SPKI DER) loaded and checked once, ready to verify."""
        return Verifier(self, self._load_public(public_key))

    def public_key(self, private_key: bytes | bytearray, *, trusted: bool = False) -> bytes:
        """The SubjectPublicKeyInfo DER of ``private_key`` (``trusted``: see :meth:`signer`)."""
        return self.signer(private_key, trusted=trusted).public_key()

    def sign(
        self,
        private_key: bytes | bytearray,
        message: bytes,
        *,
        prehashed: bool = False,
        marshaling: str = "asn1",
        trusted: bool = False,
    ) -> bytes:
        """Sign ``message``, or its digest if ``prehashed`` (for algorithms that hash).

        ``marshaling`` ``"asn1"`` gives ECDSA's DER ``Ecdsa-Sig-Value``, ``"jws"`` the
        fixed-width ``r ‖ s``; other algorithms have one encoding and accept both.
        ``trusted``: see :meth:`signer`.
        """
        return self.signer(private_key, trusted=trusted).sign(
            message, prehashed=prehashed, marshaling=marshaling
        )

    def verify(
        self,
        public_key: bytes,
        message: bytes,
        signature: bytes,
        *,
        prehashed: bool = False,
        marshaling: str = "asn1",
    ) -> bool:
        """Whether ``signature`` is valid; a malformed signature is ``False``, a malformed or
        wrong-type key a :class:`ValidationError`."""
        return self.verifier(public_key).verify(
            message, signature, prehashed=prehashed, marshaling=marshaling
        )

    def public_pem(self, public_key: bytes) -> str:
        """``public_key`` as a ``-----BEGIN PUBLIC KEY-----`` PEM string."""
        key = self._load_public(public_key)
        return key.public_bytes(serialization.Encoding.PEM, _SPKI).decode("ascii")  # type: ignore[no-any-return]

    def public_jwk(self, public_key: bytes) -> dict[str, Any]:
        """``public_key`` as a JWK: public members, ``alg`` and ``use: sig`` only."""
        jwk = self._jwk(self._load_public(public_key))
        jwk.update(alg=self.jws_algorithm, use="sig")
        return jwk

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Ed25519(SigningBase):
    """Ed25519 (RFC 8032): signs the message itself; 64-byte signatures in every marshaling."""

    name = "ed25519"
    algorithm_id = 16
    jws_algorithm = "EdDSA"
    key_description = "an Ed25519 key"

    def _generate(self) -> Any:
        return ed25519.Ed25519PrivateKey.generate()

    def _is_private(self, key: Any) -> bool:
        return isinstance(key, ed25519.Ed25519PrivateKey)

    def _is_public(self, key: Any) -> bool:
        return isinstance(key, ed25519.Ed25519PublicKey)

    def _sign(self, key: Any, message: bytes, prehashed: bool, marshaling: str) -> bytes:
        return key.sign(message)  # type: ignore[no-any-return]

    def _verify(
        self, key: Any, message: bytes, signature: bytes, prehashed: bool, marshaling: str
    ) -> None:
        key.verify(signature, message)

    def _jwk(self, key: Any) -> dict[str, Any]:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


class Ecdsa(SigningBase):
    """ECDSA over a NIST curve with its matching SHA-2 hash."""

    supports_prehashed = True
    curve: ClassVar[type[ec.EllipticCurve]]
    hash_class: ClassVar[type[hashes.HashAlgorithm]]
    jwk_curve: ClassVar[str]

    def _size(self) -> int:
        return (self.curve().key_size + 7) // 8

    def _digest_size(self) -> int:
        return self.hash_class().digest_size

    def _generate(self) -> Any:
        return ec.generate_private_key(self.curve())

    def _is_private(self, key: Any) -> bool:
        return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == self.curve.name

    def _is_public(self, key: Any) -> bool:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == self.curve.name

    def _ecdsa(self, prehashed: bool) -> ec.ECDSA:
        hash_algorithm = self.hash_class()
        return ec.ECDSA(Prehashed(hash_algorithm) if prehashed else hash_algorithm)

    def _sign(self, key: Any, message: bytes, prehashed: bool, marshaling: str) -> bytes:
        der: bytes = key.sign(message, self._ecdsa(prehashed))
        if marshaling == "asn1":
            return der
        r, s = decode_dss_signature(der)
        size = self._size()
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    def _verify(
        self, key: Any, message: bytes, signature: bytes, prehashed: bool, marshaling: str
    ) -> None:
        if marshaling == "jws":
            size = self._size()
            if len(signature) != 2 * size:
                raise InvalidSignature
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            signature = encode_dss_signature(r, s)
        key.verify(signature, message, self._ecdsa(prehashed))

    def _jwk(self, key: Any) -> dict[str, Any]:
        numbers = key.public_numbers()
        size = self._size()
        return {
            "kty": "EC",
            "crv": self.jwk_curve,
            "x": _uint(numbers.x, size),
            "y": _uint(numbers.y, size),
        }


class EcdsaP256(Ecdsa):
    """ECDSA P-256 with SHA-256 (JWS ES256)."""

    name = "ecdsa-p256"
    algorithm_id = 17
    jws_algorithm = "ES256"
    hash_name = "sha256"
    key_description = "a P-256 EC key"
    curve = ec.SECP256R1
    hash_class = hashes.SHA256
    jwk_curve = "P-256"


class EcdsaP384(Ecdsa):
    """ECDSA P-384 with SHA-384 (JWS ES384)."""

    name = "ecdsa-p384"
    algorithm_id = 18
    jws_algorithm = "ES384"
    hash_name = "sha384"
    key_description = "a P-384 EC key"
    curve = ec.SECP384R1
    hash_class = hashes.SHA384
    jwk_curve = "P-384"


class Rsa(SigningBase):
    """RSA of a fixed modulus size with one SHA-2 hash; PSS or PKCS#1 v1.5 padding."""

    supports_prehashed = True
    bits: ClassVar[int]
    hash_class: ClassVar[type[hashes.HashAlgorithm]]
    pss: ClassVar[bool]

    def _digest_size(self) -> int:
        return self.hash_class().digest_size

    def _generate(self) -> Any:
        return rsa.generate_private_key(public_exponent=65537, key_size=self.bits)

    def _is_private(self, key: Any) -> bool:
        return isinstance(key, rsa.RSAPrivateKey) and key.key_size == self.bits

    def _is_public(self, key: Any) -> bool:
        return isinstance(key, rsa.RSAPublicKey) and key.key_size == self.bits

    def _padding(self) -> padding.AsymmetricPadding:
        if self.pss:
            # JWS PS256/PS512 (RFC 7518 §3.5): MGF1 with the same hash, salt = digest size.
            return padding.PSS(mgf=padding.MGF1(self.hash_class()), salt_length=self._digest_size())
        return padding.PKCS1v15()

    def _hash(self, prehashed: bool) -> Any:
        hash_algorithm = self.hash_class()
        return Prehashed(hash_algorithm) if prehashed else hash_algorithm

    def _sign(self, key: Any, message: bytes, prehashed: bool, marshaling: str) -> bytes:
        return key.sign(message, self._padding(), self._hash(prehashed))  # type: ignore[no-any-return]

    def _verify(
        self, key: Any, message: bytes, signature: bytes, prehashed: bool, marshaling: str
    ) -> None:
        key.verify(signature, message, self._padding(), self._hash(prehashed))

    def _jwk(self, key: Any) -> dict[str, Any]:
        numbers = key.public_numbers()
        return {"kty": "RSA", "n": _uint(numbers.n), "e": _uint(numbers.e)}


class RsaPss3072(Rsa):
    """RSASSA-PSS, 3072-bit keys, SHA-256, MGF1-SHA-256, 32-byte salt (JWS PS256)."""

    name = "rsa-pss-3072"
    algorithm_id = 19
    jws_algorithm = "PS256"
    hash_name = "sha256"
    key_description = "a 3072-bit RSA key"
    bits = 3072
    hash_class = hashes.SHA256
    pss = True


class RsaPss4096(Rsa):
    """RSASSA-PSS, 4096-bit keys, SHA-512, MGF1-SHA-512, 64-byte salt (JWS PS512)."""

    name = "rsa-pss-4096"
    algorithm_id = 20
    jws_algorithm = "PS512"
    hash_name = "sha512"
    key_description = "a 4096-bit RSA key"
    bits = 4096
    hash_class = hashes.SHA512
    pss = True


class RsaPkcs1v15_3072(Rsa):  # noqa: N801 - the standard's name
    """RSASSA-PKCS1-v1_5, 3072-bit keys, SHA-256 (JWS RS256), for compatibility."""

    name = "rsa-pkcs1-3072"
    algorithm_id = 21
    jws_algorithm = "RS256"
    hash_name = "sha256"
    key_description = "a 3072-bit RSA key"
    bits = 3072
    hash_class = hashes.SHA256
    pss = False


class RsaPkcs1v15_4096(Rsa):  # noqa: N801 - the standard's name
    """RSASSA-PKCS1-v1_5, 4096-bit keys, SHA-512 (JWS RS512), for compatibility."""

    name = "rsa-pkcs1-4096"
    algorithm_id = 22
    jws_algorithm = "RS512"
    hash_name = "sha512"
    key_description = "a 4096-bit RSA key"
    bits = 4096
    hash_class = hashes.SHA512
    pss = False


class MlDsa65(SigningBase):
    """ML-DSA-65 (FIPS 204), pure mode with an empty context string.

    Needs a cryptography built with ML-DSA (wheels from 48.0 with OpenSSL 3.5+, or AWS-LC);
    otherwise every operation raises :class:`UnsupportedAlgorithmError` saying so.
    """

    name = "ml-dsa-65"
    algorithm_id = 23
    jws_algorithm = "ML-DSA-65"
    key_description = "an ML-DSA-65 key"

    @staticmethod
    def _module() -> Any:
        try:
            from cryptography.hazmat.primitives.asymmetric import mldsa
        except ImportError:
            mldsa = None  # type: ignore[assignment]
        if mldsa is None or not hasattr(mldsa, "MLDSA65PrivateKey"):
            raise UnsupportedAlgorithmError(
                "ml-dsa-65 is not available: the installed cryptography has no ML-DSA "
                "(it needs cryptography >= 48 built with OpenSSL 3.5+ or AWS-LC)"
            )
        return mldsa

    def _generate(self) -> Any:
        try:
            return self._module().MLDSA65PrivateKey.generate()
        except UnsupportedAlgorithm:
            raise UnsupportedAlgorithmError(
                "ml-dsa-65 is not available: this cryptography's backend has no ML-DSA"
            ) from None

    def _is_private(self, key: Any) -> bool:
        return isinstance(key, self._module().MLDSA65PrivateKey)

    def _is_public(self, key: Any) -> bool:
        return isinstance(key, self._module().MLDSA65PublicKey)

    def _sign(self, key: Any, message: bytes, prehashed: bool, marshaling: str) -> bytes:
        return key.sign(message)  # type: ignore[no-any-return]

    def _verify(
        self, key: Any, message: bytes, signature: bytes, prehashed: bool, marshaling: str
    ) -> None:
        key.verify(signature, message)

    def _jwk(self, key: Any) -> dict[str, Any]:
        # draft-ietf-cose-dilithium: key type "AKP", the raw public key in "pub".
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "AKP", "pub": b64url(raw)}
