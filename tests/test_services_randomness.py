"""Random bytes and digests (qimem.services.randomness): sizes, algorithms, and what an
attacker sends instead (zero, negative, huge, non-integer sizes; unknown or odd algorithm
names; non-bytes data)."""

from __future__ import annotations

import hashlib

import pytest
from conftest import make_app
from identity_helpers import with_identity

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.services import identity as ids
from qimem.services.randomness import (
    HASH_ALGORITHMS,
    MAX_RANDOM_BYTES,
    digest,
    generate,
    hasher,
    random_bytes,
)

# Reference digests computed here by hashlib's own names (a wrong mapping in the service,
# e.g. sha3-256 -> sha256, fails).
_REFERENCE = {
    "sha2-224": "sha224",
    "sha2-256": "sha256",
    "sha2-384": "sha384",
    "sha2-512": "sha512",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}


@pytest.mark.parametrize("n", [1, 16, 32, 4096, MAX_RANDOM_BYTES])
def test_random_bytes_has_the_size_asked(memory_app: AppContext, n: int) -> None:
    data = random_bytes(memory_app, n)
    assert isinstance(data, bytes) and len(data) == n


def test_random_bytes_differ_between_calls(memory_app: AppContext) -> None:
    seen = {random_bytes(memory_app, 16) for _ in range(64)}
    assert len(seen) == 64


@pytest.mark.parametrize(
    "n", [0, -1, -(2**63), MAX_RANDOM_BYTES + 1, 2**63, 10**100, True, 1.0, "32", None]
)
def test_random_bytes_refuses_a_bad_size(memory_app: AppContext, n: object) -> None:
    with pytest.raises(ValidationError, match="1 to 1048576") as caught:
        random_bytes(memory_app, n)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_size"
    assert len(str(caught.value)) < 200  # a huge number is not echoed whole
    with pytest.raises(ValidationError):
        generate(n)  # type: ignore[arg-type]


def test_random_bytes_with_an_actor_is_audited_without_the_bytes() -> None:
    app = with_identity(make_app("memory://", None))
    try:
        data = random_bytes(app, 24, actor="alice")
        events = ids.audit_events(app, "master", action="crypto.random")
    finally:
        ids.close_identity(app)
        app.close()
    assert len(events) == 1 and events[0].actor == "alice"
    assert events[0].detail == {"bytes": 24}
    text = repr(events[0].to_dict())
    assert data.hex() not in text and data.hex()[:16] not in text


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 1000])
def test_digest_matches_hashlib(algorithm: str, data: bytes) -> None:
    expected = hashlib.new(_REFERENCE[algorithm], data).digest()
    assert digest(data, algorithm) == expected
    state = hasher(algorithm)
    state.update(data[:7])
    state.update(data[7:])
    assert state.digest() == expected


def test_digest_defaults_to_sha2_256_and_known_answer() -> None:
    # FIPS 180-2 example "abc"; FIPS 202 SHA3-256("abc").
    assert digest(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert digest(b"abc", "sha3-256").hex() == (
        "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
    )
    assert set(HASH_ALGORITHMS) == set(_REFERENCE)


@pytest.mark.parametrize(
    "algorithm",
    ["md5", "sha1", "sha256", "SHA2-256", "sha2-256 ", "shake_128", "", "x" * 10_000, None, 256],
)
def test_digest_refuses_an_unknown_algorithm(algorithm: object) -> None:
    with pytest.raises(ValidationError, match="available: sha2-224") as caught:
        digest(b"abc", algorithm)  # type: ignore[arg-type]
    assert caught.value.code == "unsupported_hash"
    assert len(str(caught.value)) < 300  # a long name is not echoed whole
    with pytest.raises(ValidationError):
        hasher(algorithm)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", ["abc", None, 42, ["a"]])
def test_digest_refuses_data_that_is_not_bytes(data: object) -> None:
    with pytest.raises(ValidationError, match="must be bytes"):
        digest(data)  # type: ignore[arg-type]


def test_digest_takes_bytearray_and_memoryview() -> None:
    assert digest(bytearray(b"abc")) == digest(memoryview(b"abc")) == digest(b"abc")
