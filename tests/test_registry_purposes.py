"""The registry's purpose rules (plugin API 1.2): every algorithm has one purpose, lookups
name it, a lookup for another purpose fails naming both, an algorithm without a purpose is
an AEAD as before, and a plugin offering a malformed purpose is named. The algorithms'
own attack tests are in tests/test_algorithms_purposes.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from qimem.crypto import Algorithm
from qimem.crypto_purposes import DeterministicAlgorithm, MacAlgorithm, SigningAlgorithm
from qimem.errors import PluginError, UnsupportedAlgorithmError, ValidationError
from qimem.hooks import hookimpl
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


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


def test_every_algorithm_declares_its_purpose(registry: Registry) -> None:
    assert registry.algorithm_purposes == {
        "aes-256-gcm": "encrypt",
        "chacha20-poly1305": "encrypt",
        "aes-256-siv": "deterministic",
        "hmac-sha256": "mac",
        "hmac-sha512": "mac",
        **dict.fromkeys(SIGNING, "sign"),
    }
    # The AEAD view is what it was before plugin API 1.2.
    assert sorted(registry.algorithms) == ["aes-256-gcm", "chacha20-poly1305"]
    for algorithm in registry.algorithms.values():
        assert isinstance(algorithm, Algorithm)
    for algorithm in registry.algorithms_for("sign").values():
        assert isinstance(algorithm, SigningAlgorithm)
    for algorithm in registry.algorithms_for("mac").values():
        assert isinstance(algorithm, MacAlgorithm)
    (siv,) = registry.algorithms_for("deterministic").values()
    assert isinstance(siv, DeterministicAlgorithm)
    ids = [registry.algorithm(n, p).algorithm_id for n, p in registry.algorithm_purposes.items()]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("name", "asked", "actual"),
    [
        ("ed25519", "encrypt", "sign"),
        ("aes-256-gcm", "sign", "encrypt"),
        ("hmac-sha256", "sign", "mac"),
        ("aes-256-siv", "encrypt", "deterministic"),
        ("ecdsa-p256", "mac", "sign"),
    ],
)
def test_asking_for_another_purpose_fails_naming_both(
    registry: Registry, name: str, asked: str, actual: str
) -> None:
    with pytest.raises(ValidationError) as info:
        registry.algorithm(name, asked)
    assert info.value.code == "wrong_purpose"
    assert f"'{name}' serves purpose '{actual}', not '{asked}'" in info.value.message
    algorithm_id = registry.algorithm(name, actual).algorithm_id
    with pytest.raises(ValidationError, match=f"serves purpose '{actual}', not '{asked}'"):
        registry.algorithm_by_id(algorithm_id, asked)


def test_default_lookups_are_aead_only(registry: Registry) -> None:
    """Existing callers (envelopes, files, keys create) ask without a purpose: an envelope
    naming a signing algorithm's id is refused, never handed to the AEAD path."""
    with pytest.raises(ValidationError, match="not 'encrypt'"):
        registry.algorithm_by_id(16)
    with pytest.raises(
        UnsupportedAlgorithmError,
        match=r"available: ecdsa-p256, ecdsa-p384, ed25519, ml-dsa-65, rsa-pkcs1-3072",
    ):
        registry.algorithm("ed448", "sign")


class _LegacyAead:
    """A plugin API 1.1 AEAD: no purpose attribute."""

    name = "legacy-aead"
    algorithm_id = 201
    key_size = 32
    nonce_size = 12
    tag_size = 16

    def generate_key(self) -> bytearray:
        return bytearray(32)

    def cipher(self, key: bytes) -> Any:
        raise NotImplementedError

    def encrypt(
        self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes | None = None
    ) -> bytes:
        raise NotImplementedError

    def decrypt(self, key: bytes, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        raise NotImplementedError


class _HalfSigner:
    """Says it signs, but has no verify()."""

    name = "half-signer"
    algorithm_id = 202
    purpose = "sign"

    def generate_private_key(self) -> bytearray:
        return bytearray()


def _registry_with(register_args: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> Registry:
    class Plugin:
        @hookimpl
        def qimem_register_algorithms(self, register: Any) -> None:
            for args, kwargs in register_args:
                register(*args, **kwargs)

    pm = make_plugin_manager()
    pm.register(Plugin(), name="third-party")
    return Registry(pm)


def test_an_algorithm_without_purpose_is_an_aead() -> None:
    registry = _registry_with([((_LegacyAead(),), {})])
    assert registry.algorithm_purposes["legacy-aead"] == "encrypt"
    assert registry.algorithm("legacy-aead").name == "legacy-aead"
    assert "legacy-aead" in registry.algorithms


@pytest.mark.parametrize(
    ("register_args", "problem"),
    [
        (
            (("mod:Attr",), {"name": "x-sign", "algorithm_id": 203, "purpose": "frob"}),
            "purpose 'frob' is not one of",
        ),
        (((_HalfSigner(),), {}), "sign algorithm 'half-signer' has no signer() method"),
        (((_LegacyAead(),), {"purpose": "sign"}), "go with a 'module:attr' reference only"),
    ],
)
def test_malformed_purposes_name_the_plugin(register_args: Any, problem: str) -> None:
    with pytest.raises(PluginError, match=f"plugin 'third-party': .*{re.escape(problem)}"):
        _registry_with([register_args]).algorithm_purposes  # noqa: B018


def test_a_reference_must_load_the_declared_purpose() -> None:
    """A reference declared as a signing algorithm that loads an AEAD is refused on load."""
    registry = _registry_with(
        [
            (
                ("qimem.builtin_plugins._aead:AesGcm",),
                {"name": "aes-256-gcm-2", "algorithm_id": 204, "purpose": "sign"},
            )
        ]
    )
    assert registry.algorithm_purposes["aes-256-gcm-2"] == "sign"
    with pytest.raises(PluginError, match="is not the algorithm 'aes-256-gcm-2'"):
        registry.algorithm("aes-256-gcm-2", "sign")
