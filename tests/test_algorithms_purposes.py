"""Signing, MAC and deterministic algorithm plugins (issue 16, algorithm layer): the
attacker's cases (the registry's purpose rules are in tests/test_registry_purposes.py).

Everything goes through the plugin interface from a fresh registry; cryptography is used
only to build hostile inputs (a digest of a huge message, an off-curve point) and to check
that exported public keys are what they claim.
"""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from qimem.crypto_purposes import (
    PRIVATE_JWK_FIELDS,
)
from qimem.errors import DecryptionError, ValidationError
from qimem.registry import Registry, make_plugin_manager

SIGNING = (
    "ed25519",
    "ecdsa-p256",
    "ecdsa-p384",
    "rsa-pss-3072",
    "rsa-pss-4096",
    "rsa-pkcs1-3072",
    "rsa-pkcs1-4096",
    "ml-dsa-65",
)
HASHING = {  # the signing algorithms that take a prehashed input, and their hash
    "ecdsa-p256": hashes.SHA256,
    "ecdsa-p384": hashes.SHA384,
    "rsa-pss-3072": hashes.SHA256,
    "rsa-pss-4096": hashes.SHA512,
    "rsa-pkcs1-3072": hashes.SHA256,
    "rsa-pkcs1-4096": hashes.SHA512,
}
MACS = ("hmac-sha256", "hmac-sha512")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


@pytest.fixture(scope="module")
def keys(registry: Registry) -> dict[str, tuple[bytes, bytes]]:
    """One (private PKCS#8 DER, public SPKI DER) pair per signing algorithm."""
    pairs = {}
    for name in SIGNING:
        algorithm = registry.algorithm(name, "sign")
        private = bytes(algorithm.generate_private_key())
        pairs[name] = (private, algorithm.public_key(private))
    return pairs


def _key_type(name: str) -> str:
    """Algorithms whose keys are the same kind of key (an RSA key has no padding)."""
    return name.replace("rsa-pss-", "rsa-").replace("rsa-pkcs1-", "rsa-")


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ----------------------------------------------------------------- signatures: attacks


@pytest.mark.parametrize("name", SIGNING)
def test_tampered_or_foreign_signatures_do_not_verify(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    signature = algorithm.sign(private, b"pay 10 EUR to alice")
    assert algorithm.verify(public, b"pay 10 EUR to alice", signature)
    assert not algorithm.verify(public, b"pay 10 EUR to mallory", signature)  # other message
    for index in (0, len(signature) // 2, len(signature) - 1):
        assert not algorithm.verify(public, b"pay 10 EUR to alice", _flip(signature, index))
    assert not algorithm.verify(public, b"pay 10 EUR to alice", signature[:-1])  # truncated
    assert not algorithm.verify(public, b"pay 10 EUR to alice", signature + b"\x00")
    for garbage in (b"", b"\x30", b"\x30\x00", b"\x00" * len(signature), os.urandom(8)):
        assert not algorithm.verify(public, b"pay 10 EUR to alice", garbage)  # malformed
    # Another key of the same kind does not verify it (the RSA siblings' keys are used
    # instead of generating more RSA keys).
    sibling = [n for n in keys if n != name and _key_type(n) == _key_type(name)]
    other_public = (
        keys[sibling[0]][1]
        if sibling
        else algorithm.public_key(bytes(algorithm.generate_private_key()))
    )
    assert not algorithm.verify(other_public, b"pay 10 EUR to alice", signature)


@pytest.mark.parametrize("name", SIGNING)
def test_empty_message_signs_and_verifies(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    signature = algorithm.sign(private, b"")
    assert algorithm.verify(public, b"", signature)
    assert not algorithm.verify(public, b"\x00", signature)


@pytest.mark.parametrize("name", SIGNING)
def test_wrong_key_types_are_refused_clearly(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    signature = algorithm.sign(private, b"m")
    for other, (other_private, other_public) in keys.items():
        if _key_type(other) == _key_type(name):
            continue  # rsa-pss-3072 and rsa-pkcs1-3072 keys are both 3072-bit RSA keys
        with pytest.raises(ValidationError, match=f"{name}: the private key is not"):
            algorithm.sign(other_private, b"m")
        with pytest.raises(ValidationError, match=f"{name}: the public key is not"):
            algorithm.verify(other_public, b"m", signature)
    with pytest.raises(ValidationError, match="not a PKCS#8 DER private key"):
        algorithm.sign(public, b"m")  # a public key where the private one goes
    with pytest.raises(ValidationError, match="not a SubjectPublicKeyInfo"):
        algorithm.verify(private, b"m", signature)  # a private key where the public one goes
    for garbage in (b"", b"\x30\x03\x02\x01\x01", os.urandom(40)):
        with pytest.raises(ValidationError):
            algorithm.sign(garbage, b"m")
        with pytest.raises(ValidationError):
            algorithm.verify(garbage, b"m", signature)
    with pytest.raises(ValidationError, match="must be bytes"):
        algorithm.sign("not bytes", b"m")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="message must be bytes"):
        algorithm.sign(private, "text")  # type: ignore[arg-type]


def test_inconsistent_rsa_private_key_is_refused_unless_trusted(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    """A private key with a wrong CRT exponent would sign faultily (and a faulty CRT
    signature reveals a factor of n): refused by default. ``trusted=True`` (keys that come
    back authenticated from the store, checked when they entered it) skips the check."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    algorithm = registry.algorithm("rsa-pss-3072", "sign")
    private, public = keys["rsa-pss-3072"]
    loaded = serialization.load_der_private_key(private, None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    good = loaded.private_numbers()
    bad = rsa.RSAPrivateNumbers(
        p=good.p,
        q=good.q,
        d=good.d,
        dmp1=good.dmp1 ^ 2,
        dmq1=good.dmq1,
        iqmp=good.iqmp,
        public_numbers=good.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)
    der = bad.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValidationError, match="not a PKCS#8 DER private key"):
        algorithm.sign(der, b"m")
    with pytest.raises(ValidationError):
        algorithm.signer(der)
    signature = algorithm.signer(private, trusted=True).sign(b"m")
    assert algorithm.verify(public, b"m", signature)


def test_invalid_curve_point_is_refused(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    """An uncompressed P-256 point moved off the curve (invalid-curve attack) is not a key.
    High-S and other ECDSA edge cases are Wycheproof's (tests/test_wycheproof_purposes.py)."""
    algorithm = registry.algorithm("ecdsa-p256", "sign")
    private, public = keys["ecdsa-p256"]
    off_curve = _flip(public, len(public) - 1)  # the last byte of y
    with pytest.raises(ValidationError, match="not a SubjectPublicKeyInfo"):
        algorithm.verify(off_curve, b"m", algorithm.sign(private, b"m"))


@pytest.mark.parametrize("name", ["ecdsa-p256", "ecdsa-p384"])
def test_ecdsa_marshalings_are_not_interchangeable(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    der = algorithm.sign(private, b"m", marshaling="asn1")
    jws = algorithm.sign(private, b"m", marshaling="jws")
    assert len(jws) == 2 * (32 if name == "ecdsa-p256" else 48)
    assert der[0] == 0x30
    assert algorithm.verify(public, b"m", der) and algorithm.verify(
        public, b"m", jws, marshaling="jws"
    )
    assert not algorithm.verify(public, b"m", der, marshaling="jws")
    assert not algorithm.verify(public, b"m", jws, marshaling="asn1")
    with pytest.raises(ValidationError, match="marshaling 'p1363' is not one of asn1, jws"):
        algorithm.sign(private, b"m", marshaling="p1363")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(HASHING))
def test_huge_message_through_prehash(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    """A 64 MiB message is hashed by the caller in pieces and signed as a digest; the
    signature is the message's own signature (it verifies over the whole message)."""
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    chunk = os.urandom(1 << 20)
    digest = hashes.Hash(HASHING[name]())
    for _ in range(64):
        digest.update(chunk)
    signature = algorithm.sign(private, digest.finalize(), prehashed=True)
    assert algorithm.verify(public, chunk * 64, signature)
    assert not algorithm.verify(public, chunk * 63, signature)
    assert algorithm.supports_prehashed and algorithm.hash_name
    with pytest.raises(ValidationError, match="digest of"):
        algorithm.sign(private, b"too short", prehashed=True)
    with pytest.raises(ValidationError, match="digest of"):
        algorithm.verify(public, b"x" * 100, signature, prehashed=True)


@pytest.mark.parametrize("name", ["ed25519", "ml-dsa-65"])
def test_prehashed_refused_where_the_algorithm_hashes_itself(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    assert not algorithm.supports_prehashed
    with pytest.raises(ValidationError, match="signs the message itself"):
        algorithm.sign(private, b"\x00" * 32, prehashed=True)
    with pytest.raises(ValidationError, match="signs the message itself"):
        algorithm.verify(public, b"\x00" * 32, b"\x00" * 64, prehashed=True)


# ---------------------------------------------------------------- public key export


@pytest.mark.parametrize("name", SIGNING)
def test_public_exports_hold_no_private_material(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, public = keys[name]
    jwk = algorithm.public_jwk(public)
    assert not PRIVATE_JWK_FIELDS & set(jwk), jwk
    assert jwk["alg"] == algorithm.jws_algorithm and jwk["use"] == "sig"
    pem = algorithm.public_pem(public)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----") and "PRIVATE" not in pem
    assert (
        serialization.load_pem_public_key(pem.encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public
    )
    # Exporting refuses a private key outright rather than deriving from it.
    with pytest.raises(ValidationError):
        algorithm.public_jwk(private)
    with pytest.raises(ValidationError):
        algorithm.public_pem(private)


def test_jwks_name_the_key(registry: Registry, keys: dict[str, tuple[bytes, bytes]]) -> None:
    def unb64(value: str) -> bytes:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))

    ed = registry.algorithm("ed25519", "sign").public_jwk(keys["ed25519"][1])
    assert (
        ed["kty"] == "OKP" and ed["crv"] == "Ed25519" and unb64(ed["x"]) == keys["ed25519"][1][-32:]
    )
    ec = registry.algorithm("ecdsa-p384", "sign").public_jwk(keys["ecdsa-p384"][1])
    assert ec["kty"] == "EC" and ec["crv"] == "P-384"
    assert b"\x04" + unb64(ec["x"]) + unb64(ec["y"]) == keys["ecdsa-p384"][1][-97:]
    rsa = registry.algorithm("rsa-pss-3072", "sign").public_jwk(keys["rsa-pss-3072"][1])
    assert rsa["kty"] == "RSA" and rsa["e"] == "AQAB" and len(unb64(rsa["n"])) == 384
    assert rsa["alg"] == "PS256"


@pytest.mark.parametrize("name", SIGNING)
def test_private_keys_never_in_reprs(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    algorithm = registry.algorithm(name, "sign")
    private, _ = keys[name]
    signer = algorithm.signer(private)
    for shown in (repr(algorithm), repr(signer), str(signer)):
        assert name in shown and len(shown) < 60, shown
        for leak in (private.hex()[-16:], base64.b64encode(private)[-16:].decode()):
            assert leak not in shown


# ----------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("name", MACS)
def test_mac_attacks(registry: Registry, name: str) -> None:
    algorithm = registry.algorithm(name, "mac")
    key = bytes(algorithm.generate_key())
    tag = algorithm.mac(key, b"webhook body")
    assert len(tag) == algorithm.tag_size == algorithm.key_size
    assert algorithm.verify(key, b"webhook body", tag)
    assert not algorithm.verify(key, b"webhook body!", tag)  # another message
    assert not algorithm.verify(bytes(algorithm.generate_key()), b"webhook body", tag)
    for index in (0, len(tag) - 1):
        assert not algorithm.verify(key, b"webhook body", _flip(tag, index))
    # Truncated tags: refused unless the caller names the length, never below 16 bytes.
    for short in (b"", tag[:1], tag[:16], tag[:-1]):
        assert not algorithm.verify(key, b"webhook body", short)
    assert algorithm.verify(key, b"webhook body", tag[:16], tag_size=16)
    assert not algorithm.verify(key, b"webhook body", _flip(tag[:16], 3), tag_size=16)
    assert not algorithm.verify(key, b"webhook body", tag[:17], tag_size=16)
    for bad_size in (0, 1, 8, 15, algorithm.tag_size + 1):
        with pytest.raises(ValidationError, match="truncated tag has 16 to"):
            algorithm.verify(key, b"webhook body", tag[:bad_size], tag_size=bad_size)
    # Empty data is data.
    assert algorithm.verify(key, b"", algorithm.mac(key, b""))
    assert algorithm.mac(key, b"") != algorithm.mac(key, b"\x00")


@pytest.mark.parametrize("name", MACS)
def test_mac_keys_of_the_wrong_size_or_type_are_refused(
    registry: Registry, keys: dict[str, tuple[bytes, bytes]], name: str
) -> None:
    """HS256-with-the-RSA-public-key confusion cannot happen: a MAC key is exactly
    ``key_size`` secret bytes, and no exported public key (nor private key) has that size;
    the algorithm is chosen by the key, never by the message or signature."""
    algorithm = registry.algorithm(name, "mac")
    for bad in (b"", b"k" * 16, b"k" * (algorithm.key_size - 1), b"k" * (algorithm.key_size + 1)):
        with pytest.raises(ValidationError, match=f"needs a {algorithm.key_size}-byte key"):
            algorithm.mac(bad, b"m")
        with pytest.raises(ValidationError, match=f"needs a {algorithm.key_size}-byte key"):
            algorithm.verify(bad, b"m", b"t" * algorithm.tag_size)
    for private, public in keys.values():
        for material in (public, private):
            with pytest.raises(ValidationError, match="-byte key"):
                algorithm.verify(material, b"m", b"t" * algorithm.tag_size)
    with pytest.raises(ValidationError):
        algorithm.mac("k" * algorithm.key_size, b"m")  # type: ignore[arg-type]
    # And a MAC key is no signing key.
    mac_key = bytes(algorithm.generate_key())
    for signing_name in ("ed25519", "ecdsa-p256"):
        with pytest.raises(ValidationError):
            registry.algorithm(signing_name, "sign").sign(mac_key, b"m")


# --------------------------------------------------------------------- deterministic


def test_aes_siv_is_deterministic_and_authenticated(registry: Registry) -> None:
    siv = registry.algorithm("aes-256-siv", "deterministic")
    key = bytes(siv.generate_key())
    assert len(key) == 64
    one = siv.encrypt(key, b"alice@example.com", b"users.email")
    assert siv.encrypt(key, b"alice@example.com", b"users.email") == one  # equality leaks
    assert siv.encrypt(key, b"bob@example.com", b"users.email") != one
    assert siv.encrypt(key, b"alice@example.com", b"admins.email") != one  # AAD binds
    assert siv.encrypt(bytes(siv.generate_key()), b"alice@example.com", b"users.email") != one
    assert siv.decrypt(key, one, b"users.email") == b"alice@example.com"
    assert siv.encrypt(key, b"x") == siv.encrypt(key, b"x", b"")  # None is empty AAD
    assert siv.decrypt(key, siv.encrypt(key, b""), None) == b""
    for tampered in (_flip(one, 0), _flip(one, len(one) - 1), one[:-1], one[:15], b""):
        with pytest.raises(DecryptionError, match="failed authentication"):
            siv.decrypt(key, tampered, b"users.email")
    with pytest.raises(DecryptionError):
        siv.decrypt(key, one, b"admins.email")
    for bad in (b"", os.urandom(32), os.urandom(48), os.urandom(65)):
        with pytest.raises(ValidationError, match="needs a 64-byte key"):
            siv.encrypt(bad, b"x")
        with pytest.raises(ValidationError, match="needs a 64-byte key"):
            siv.decrypt(bad, one)
    with pytest.raises(ValidationError, match="associated data"):
        siv.encrypt(key, b"x", "aad")  # type: ignore[arg-type]
