"""Project Wycheproof AEAD vectors through the algorithm plugins' own interface.

The JSON files in ``tests/vectors/wycheproof/`` are byte-for-byte copies of C2SP/wycheproof
``testvectors_v1`` (Apache-2.0, see the README there). Every applicable case runs as its
own test, named ``<algorithm>-tc<tcId>``:

* AES-GCM groups with ``keySize`` 256, ``ivSize`` 96 and ``tagSize`` 128 → ``aes-256-gcm``;
* ChaCha20-Poly1305 groups with ``ivSize`` 96 → ``chacha20-poly1305``.

``valid``: encrypt gives exactly ``ct ‖ tag`` and decrypt gives ``msg``. ``invalid``:
decrypt raises :class:`DecryptionError`. ``acceptable``: decrypt either gives ``msg`` or
raises :class:`DecryptionError`, nothing else. Groups with another nonce size (the plugins
only take 96-bit nonces) must be refused with :class:`ValidationError` by both encrypt and
decrypt. The algorithms come from a fresh plugin registry, exactly as the service uses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qimem.crypto import Algorithm
from qimem.errors import DecryptionError, ValidationError
from qimem.registry import Registry, make_plugin_manager

WYCHEPROOF = Path(__file__).resolve().parent / "vectors" / "wycheproof"

# (algorithm name, file, key size in bits); nonce and tag sizes are the plugins' 96 / 128.
SOURCES = (
    ("aes-256-gcm", "aes_gcm_test.json", 256),
    ("chacha20-poly1305", "chacha20_poly1305_test.json", 256),
)
# Applicable cases per algorithm in the pinned files. A change means the files or the
# filter changed: look at it instead of silently testing less.
EXPECTED_COUNTS = {"aes-256-gcm": 66, "chacha20-poly1305": 316}


def _load_cases() -> tuple[list[Any], list[Any]]:
    """(applicable cases, other-nonce-size cases) as pytest params named by tcId."""
    applicable: list[Any] = []
    other_nonce: list[Any] = []
    for name, filename, key_bits in SOURCES:
        data = json.loads((WYCHEPROOF / filename).read_text(encoding="utf-8"))
        for group in data["testGroups"]:
            if group["keySize"] != key_bits or group["tagSize"] != 128:
                continue
            target = applicable if group["ivSize"] == 96 else other_nonce
            for case in group["tests"]:
                case_id = f"{name}-tc{case['tcId']}"
                target.append(pytest.param(name, case, id=case_id))
    return applicable, other_nonce


APPLICABLE, OTHER_NONCE = _load_cases()


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


def _fields(case: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    return (
        bytes.fromhex(case["key"]),
        bytes.fromhex(case["iv"]),
        bytes.fromhex(case["aad"]),
        bytes.fromhex(case["msg"]),
        bytes.fromhex(case["ct"]) + bytes.fromhex(case["tag"]),
    )


def test_applicable_case_counts() -> None:
    counts: dict[str, int] = {}
    for param in APPLICABLE:
        counts[param.values[0]] = counts.get(param.values[0], 0) + 1
    assert counts == EXPECTED_COUNTS
    assert sum(counts.values()) > 0
    results = {param.values[1]["result"] for param in APPLICABLE}
    assert {"valid", "invalid"} <= results


@pytest.mark.parametrize(("name", "case"), APPLICABLE)
def test_wycheproof_case(registry: Registry, name: str, case: dict[str, Any]) -> None:
    algorithm: Algorithm = registry.algorithm(name)
    key, nonce, aad, msg, sealed = _fields(case)
    tc = f"{name} tcId {case['tcId']} ({case['result']}, flags {case['flags']})"
    if case["result"] == "valid":
        assert algorithm.encrypt(key, nonce, msg, aad) == sealed, f"{tc}: encrypt mismatch"
        assert algorithm.decrypt(key, nonce, sealed, aad) == msg, f"{tc}: decrypt mismatch"
        # The prepared cipher (the service layer's hot path) agrees with the plugin.
        assert algorithm.cipher(key).decrypt(nonce, sealed, aad) == msg, tc
    elif case["result"] == "invalid":
        with pytest.raises(DecryptionError):
            algorithm.decrypt(key, nonce, sealed, aad)
            pytest.fail(f"{tc}: an invalid ciphertext was accepted")
    else:  # "acceptable": either outcome is allowed, but only these two.
        try:
            assert algorithm.decrypt(key, nonce, sealed, aad) == msg, tc
        except DecryptionError:
            pass


@pytest.mark.parametrize(("name", "case"), OTHER_NONCE)
def test_wycheproof_other_nonce_size_refused(
    registry: Registry, name: str, case: dict[str, Any]
) -> None:
    """Cases with a non-96-bit nonce: the plugin accepts only its own nonce size."""
    algorithm = registry.algorithm(name)
    key, nonce, aad, msg, sealed = _fields(case)
    assert len(nonce) != algorithm.nonce_size
    with pytest.raises(ValidationError, match="12-byte nonce"):
        algorithm.encrypt(key, nonce, msg, aad)
    with pytest.raises(ValidationError, match="12-byte nonce"):
        algorithm.decrypt(key, nonce, sealed, aad)


def test_other_nonce_cases_exist() -> None:
    assert len(OTHER_NONCE) > 0
