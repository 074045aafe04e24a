"""The built-in AEAD algorithm plugins, one test class per algorithm (as cryptography's
``TestAESGCM``), all taken from a fresh plugin registry like the service layer does.

Known-answer correctness is covered by ``test_wycheproof.py``; here: round trips, tamper
detection, input validation with qimem errors, ``None`` aad equal to ``b""``, key
generation, and that no repr or exception ever carries key bytes or plaintext.
"""

from __future__ import annotations

import traceback
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qimem.crypto import Algorithm, Cipher
from qimem.errors import DecryptionError, QimemError, UnsupportedAlgorithmError, ValidationError
from qimem.registry import Registry, make_plugin_manager

KEY = bytes(range(0x40, 0x60))
NONCE = bytes.fromhex("0f1e2d3c4b5a69788796a5b4")
SECRET = b"top secret plaintext 0123456789"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


def _secret_forms(*values: bytes) -> list[str]:
    """Ways a byte string could leak into text: repr, hex, latin-1 decoding."""
    forms: list[str] = []
    for value in values:
        forms += [repr(value), value.hex(), value.decode("latin-1")]
        forms.append(repr(bytearray(value)))
    return [f for f in forms if len(f) >= 8]


def _assert_no_secret(exc: BaseException, *secrets: bytes) -> None:
    text = "\n".join(
        [str(exc), repr(exc), repr(exc.args)]
        + traceback.format_exception(type(exc), exc, exc.__traceback__)
        + ([str(exc.to_dict())] if isinstance(exc, QimemError) else [])
    )
    for form in _secret_forms(*secrets):
        assert form not in text, f"{type(exc).__name__} text carries a secret"


class _AeadContract:
    """Shared checks; subclasses set the algorithm's name, id and reference class."""

    NAME: ClassVar[str]
    ALGORITHM_ID: ClassVar[int]
    REFERENCE: ClassVar[Any]

    @pytest.fixture
    def algorithm(self, registry: Registry) -> Algorithm:
        return registry.algorithm(self.NAME)

    def test_registered_with_its_sizes(self, registry: Registry, algorithm: Algorithm) -> None:
        assert isinstance(algorithm, Algorithm)
        assert algorithm.name == self.NAME
        assert algorithm.algorithm_id == self.ALGORITHM_ID
        assert (algorithm.key_size, algorithm.nonce_size, algorithm.tag_size) == (32, 12, 16)
        assert registry.algorithm_by_id(self.ALGORITHM_ID) is algorithm

    @pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 65536])
    @pytest.mark.parametrize("aad", [None, b"", b"context", bytes(300)])
    def test_roundtrip(self, algorithm: Algorithm, size: int, aad: bytes | None) -> None:
        plaintext = bytes(i % 251 for i in range(size))
        sealed = algorithm.encrypt(KEY, NONCE, plaintext, aad)
        assert len(sealed) == size + algorithm.tag_size
        assert sealed[:size] != plaintext or size == 0
        assert algorithm.decrypt(KEY, NONCE, sealed, aad) == plaintext

    def test_matches_the_reference_implementation(self, algorithm: Algorithm) -> None:
        reference = self.REFERENCE(KEY)
        assert algorithm.encrypt(KEY, NONCE, SECRET, b"ad") == reference.encrypt(
            NONCE, SECRET, b"ad"
        )
        assert algorithm.decrypt(KEY, NONCE, reference.encrypt(NONCE, SECRET, None)) == SECRET

    def test_prepared_cipher_agrees(self, algorithm: Algorithm) -> None:
        cipher = algorithm.cipher(bytearray(KEY))
        assert isinstance(cipher, Cipher)
        sealed = cipher.encrypt(NONCE, SECRET, b"ad")
        assert sealed == algorithm.encrypt(KEY, NONCE, SECRET, b"ad")
        assert cipher.decrypt(NONCE, sealed, b"ad") == SECRET

    def test_key_types(self, algorithm: Algorithm) -> None:
        sealed = algorithm.encrypt(KEY, NONCE, SECRET)
        for key in (bytearray(KEY), memoryview(KEY)):
            assert algorithm.encrypt(key, NONCE, SECRET) == sealed
            assert algorithm.decrypt(key, NONCE, sealed) == SECRET

    def test_every_bit_flip_of_the_ciphertext_fails(self, algorithm: Algorithm) -> None:
        sealed = algorithm.encrypt(KEY, NONCE, b"short msg", b"ad")
        for bit in range(len(sealed) * 8):
            tampered = bytearray(sealed)
            tampered[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(DecryptionError):
                algorithm.decrypt(KEY, NONCE, bytes(tampered), b"ad")

    def test_wrong_key_nonce_or_aad_fails(self, algorithm: Algorithm) -> None:
        sealed = algorithm.encrypt(KEY, NONCE, SECRET, b"ad")
        other_key = bytes(b ^ 1 for b in KEY)
        other_nonce = NONCE[:-1] + bytes([NONCE[-1] ^ 0x80])
        for key, nonce, aad in (
            (other_key, NONCE, b"ad"),
            (KEY, other_nonce, b"ad"),
            (KEY, NONCE, b"aD"),
            (KEY, NONCE, None),
            (KEY, NONCE, b"ad\x00"),
        ):
            with pytest.raises(DecryptionError, match="failed authentication"):
                algorithm.decrypt(key, nonce, sealed, aad)

    @pytest.mark.parametrize("length", [0, 1, 15, 16])
    def test_too_short_or_cut_ciphertext_fails(self, algorithm: Algorithm, length: int) -> None:
        sealed = algorithm.encrypt(KEY, NONCE, b"")
        with pytest.raises(DecryptionError):
            algorithm.decrypt(KEY, NONCE, sealed[:length] if length < 16 else sealed + b"\x00")

    def test_decryption_error_is_the_integrity_class(self, algorithm: Algorithm) -> None:
        with pytest.raises(DecryptionError) as info:
            algorithm.decrypt(KEY, NONCE, bytes(32))
        error = info.value
        assert type(error) is DecryptionError
        assert (error.http_status, error.code) == (422, "decryption_failed")
        assert error.__cause__ is None and error.__suppress_context__

    @pytest.mark.parametrize("size", [0, 1, 16, 24, 31, 33, 64])
    def test_wrong_key_size(self, algorithm: Algorithm, size: int) -> None:
        key = bytes(size)
        with pytest.raises(ValidationError, match="32-byte key"):
            algorithm.encrypt(key, NONCE, SECRET)
        with pytest.raises(ValidationError, match="32-byte key"):
            algorithm.decrypt(key, NONCE, bytes(32))
        with pytest.raises(ValidationError, match="32-byte key"):
            algorithm.cipher(key)

    @pytest.mark.parametrize("size", [0, 1, 8, 11, 13, 16, 24, 32])
    def test_wrong_nonce_size(self, algorithm: Algorithm, size: int) -> None:
        with pytest.raises(ValidationError, match="12-byte nonce"):
            algorithm.encrypt(KEY, bytes(size), SECRET)
        with pytest.raises(ValidationError, match="12-byte nonce"):
            algorithm.decrypt(KEY, bytes(size), bytes(32))

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("key", "k" * 32),
            ("key", None),
            ("nonce", "n" * 12),
            ("nonce", None),
            ("data", "plaintext as str"),
            ("data", None),
            ("aad", "aad as str"),
            ("aad", 5),
        ],
    )
    def test_wrong_types_are_validation_errors(
        self, algorithm: Algorithm, field: str, value: Any
    ) -> None:
        args: dict[str, Any] = {"key": KEY, "nonce": NONCE, "data": SECRET, "aad": None}
        args[field] = value
        for operation in (algorithm.encrypt, algorithm.decrypt):
            with pytest.raises(ValidationError):
                operation(args["key"], args["nonce"], args["data"], args["aad"])

    def test_none_aad_equals_empty(self, algorithm: Algorithm) -> None:
        with_none = algorithm.encrypt(KEY, NONCE, SECRET, None)
        assert algorithm.encrypt(KEY, NONCE, SECRET, b"") == with_none
        assert algorithm.encrypt(KEY, NONCE, SECRET) == with_none
        assert algorithm.decrypt(KEY, NONCE, with_none, b"") == SECRET
        assert algorithm.decrypt(KEY, NONCE, with_none, None) == SECRET

    def test_generate_key(self, algorithm: Algorithm) -> None:
        keys = [algorithm.generate_key() for _ in range(16)]
        for key in keys:
            assert isinstance(key, bytearray)
            assert len(key) == algorithm.key_size
            assert algorithm.decrypt(key, NONCE, algorithm.encrypt(key, NONCE, SECRET)) == SECRET
        assert len({bytes(k) for k in keys}) == len(keys)
        # 16 random 32-byte keys: every byte value position is not constant, and no key
        # is all zeros (a chance of about 2^-256 each).
        assert all(any(k) for k in keys)
        assert all(len({k[i] for k in keys}) > 1 for i in range(algorithm.key_size))

    def test_reprs_carry_no_key(self, algorithm: Algorithm) -> None:
        key = algorithm.generate_key()
        texts = [repr(algorithm), str(algorithm), repr(algorithm.cipher(key))]
        assert self.NAME in repr(algorithm)
        for text in texts:
            for form in _secret_forms(bytes(key)):
                assert form not in text

    def test_exceptions_carry_no_key_or_plaintext(self, algorithm: Algorithm) -> None:
        sealed = algorithm.encrypt(KEY, NONCE, SECRET, b"ad")
        failing = [
            lambda: algorithm.decrypt(KEY, NONCE, sealed, b"wrong"),
            lambda: algorithm.decrypt(bytes(b ^ 1 for b in KEY), NONCE, sealed, b"ad"),
            lambda: algorithm.decrypt(KEY, NONCE, sealed[:-1], b"ad"),
            lambda: algorithm.encrypt(KEY[:-1], NONCE, SECRET),
            lambda: algorithm.encrypt(KEY + b"\x00", NONCE, SECRET),
            lambda: algorithm.encrypt(KEY, NONCE + b"\x00", SECRET),
            lambda: algorithm.encrypt(KEY.hex(), NONCE, SECRET),
            lambda: algorithm.encrypt(KEY, NONCE, SECRET.decode()),
        ]
        for call in failing:
            with pytest.raises(QimemError) as info:
                call()
            _assert_no_secret(info.value, KEY, SECRET, KEY[:-1])
            assert info.value.message


class TestAesGcm(_AeadContract):
    NAME = "aes-256-gcm"
    ALGORITHM_ID = 1
    REFERENCE = AESGCM


class TestChaCha20(_AeadContract):
    NAME = "chacha20-poly1305"
    ALGORITHM_ID = 2
    REFERENCE = ChaCha20Poly1305


def test_algorithms_are_distinct(registry: Registry) -> None:
    aes, chacha = registry.algorithm("aes-256-gcm"), registry.algorithm("chacha20-poly1305")
    assert aes.encrypt(KEY, NONCE, SECRET) != chacha.encrypt(KEY, NONCE, SECRET)
    with pytest.raises(DecryptionError):
        chacha.decrypt(KEY, NONCE, aes.encrypt(KEY, NONCE, SECRET))


def test_unknown_algorithm(registry: Registry) -> None:
    with pytest.raises(UnsupportedAlgorithmError, match="aes-256-gcm, chacha20-poly1305"):
        registry.algorithm("aes-128-cbc")
    with pytest.raises(UnsupportedAlgorithmError, match="unknown algorithm id 99"):
        registry.algorithm_by_id(99)
