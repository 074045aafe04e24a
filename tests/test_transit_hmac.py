"""Vault Transit's ``hmac`` and HMAC verification (qimem.services.transit_hmac): on
encryption keys through a per-version HKDF-derived HMAC key, on MAC keys through their own
material; Vault's ``vault:vN:`` format, key versions, minimum versions and states."""

from __future__ import annotations

import base64
import hashlib
import hmac as std_hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qimem.app import AppContext
from qimem.errors import ConflictError, KeyNotActiveError, NotFoundError, ValidationError
from qimem.services import derived, keys, lifecycle, macs
from qimem.services.transit_hmac import HMAC_INFO, hmac, verify_hmac


def _expected(app: AppContext, key_id: str, data: bytes, digest: str = "sha256") -> bytes:
    """The documented derivation, recomputed independently: HKDF-SHA256(material, no salt,
    info "qimem-transit-hmac-v1" 0x00, 32 bytes), then HMAC."""
    material = bytes(app.store.material("master", key_id))
    info = b"qimem-transit-hmac-v1\x00"
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)
    return std_hmac.new(key, data, digest).digest()


def _tag(text: str) -> bytes:
    return base64.b64decode(text.split(":", 2)[2])


def test_encryption_keys_hmac_with_a_per_version_derived_key(memory_app: AppContext) -> None:
    v1 = keys.create_key(memory_app, name="enc")
    made = hmac(memory_app, "enc", b"hello")
    assert made.hmac.startswith("vault:v1:") and made.version == 1
    assert _tag(made.hmac) == _expected(memory_app, v1.key_id, b"hello")
    assert verify_hmac(memory_app, "enc", b"hello", made.hmac)
    v2 = keys.rotate_key(memory_app, "enc")
    again = hmac(memory_app, "enc", b"hello")
    assert again.hmac.startswith("vault:v2:")
    assert _tag(again.hmac) == _expected(memory_app, v2.key_id, b"hello") != _tag(made.hmac)
    assert hmac(memory_app, "enc", b"hello", key_version=1).hmac == made.hmac
    assert verify_hmac(memory_app, "enc", b"hello", made.hmac)  # old versions verify


def test_the_hmac_key_is_separate_from_derived_subkeys() -> None:
    # HKDF info of a derived subkey is "qimem-derived-v1" 0x00 context: never this label.
    assert HMAC_INFO == b"qimem-transit-hmac-v1\x00"
    assert not HMAC_INFO.startswith(b"qimem-derived-v1\x00")
    material = bytes(range(32))
    for context in (b"transit-hmac-v1\x00", HMAC_INFO, b"x"):
        assert derived.derive_subkey(material, context) != HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=HMAC_INFO
        ).derive(material)


@pytest.mark.parametrize(
    ("algorithm", "digest"),
    [
        ("sha2-224", "sha224"),
        ("sha2-384", "sha384"),
        ("sha2-512", "sha512"),
        ("sha3-256", "sha3_256"),
    ],
)
def test_hash_algorithms(memory_app: AppContext, algorithm: str, digest: str) -> None:
    v1 = keys.create_key(memory_app, name="enc")
    made = hmac(memory_app, "enc", b"m", algorithm=algorithm)
    assert _tag(made.hmac) == _expected(memory_app, v1.key_id, b"m", digest)
    assert verify_hmac(memory_app, "enc", b"m", made.hmac, algorithm=algorithm)
    assert not verify_hmac(memory_app, "enc", b"m", made.hmac)  # another hash: no match


def test_wrong_data_tampered_or_foreign_tags_do_not_verify(memory_app: AppContext) -> None:
    keys.create_key(memory_app, name="a")
    keys.create_key(memory_app, name="b")
    made = hmac(memory_app, "a", b"data").hmac
    raw = bytearray(_tag(made))
    raw[0] ^= 1
    for data, tag in (
        (b"other", made),
        (b"data", "vault:v1:" + base64.b64encode(bytes(raw)).decode()),
        (b"data", "vault:v1:" + base64.b64encode(_tag(made)[:16]).decode()),
        (b"data", "vault:v1:"),
    ):
        assert not verify_hmac(memory_app, "a", data, tag)
    assert not verify_hmac(memory_app, "b", b"data", made)  # key b's v1 has another HMAC key
    with pytest.raises(NotFoundError):
        verify_hmac(memory_app, "a", b"data", made.replace("vault:v1:", "vault:v7:"))


@pytest.mark.parametrize("tag", ["", "vault:v1", "vault:v0:AAAA", "v1:AAAA", "vault:v1:@@", 5])
def test_malformed_hmacs_are_refused(memory_app: AppContext, tag: object) -> None:
    keys.create_key(memory_app, name="a")
    with pytest.raises(ValidationError) as err:
        verify_hmac(memory_app, "a", b"x", tag)  # type: ignore[arg-type]
    assert err.value.code == "invalid_hmac"


def test_min_versions_and_states(memory_app: AppContext) -> None:
    keys.create_key(memory_app, name="enc")
    old = hmac(memory_app, "enc", b"x").hmac
    keys.rotate_key(memory_app, "enc")
    keys.rotate_key(memory_app, "enc")
    lifecycle.set_policy(memory_app, "enc", min_encryption_version=2)
    with pytest.raises(KeyNotActiveError):
        hmac(memory_app, "enc", b"x", key_version=1)
    with pytest.raises(NotFoundError, match="'enc' has no version 9"):
        hmac(memory_app, "enc", b"x", key_version=9)  # not a version yet
    assert verify_hmac(memory_app, "enc", b"x", old)
    lifecycle.disable_version(memory_app, "enc", version=1)
    with pytest.raises(ConflictError) as err:
        verify_hmac(memory_app, "enc", b"x", old)
    assert err.value.code == "key_disabled"
    lifecycle.enable_version(memory_app, "enc", version=1)
    lifecycle.set_policy(memory_app, "enc", min_decryption_version=2)
    with pytest.raises(ConflictError) as err:
        verify_hmac(memory_app, "enc", b"x", old)
    assert err.value.code == "below_min_decryption_version"
    lifecycle.destroy_version(memory_app, "enc", version=1)
    lifecycle.set_policy(memory_app, "enc", min_decryption_version=1)
    with pytest.raises(ConflictError) as err:
        verify_hmac(memory_app, "enc", b"x", old)
    assert err.value.code == "key_destroyed"


def test_mac_keys_use_their_own_material_and_hash(memory_app: AppContext) -> None:
    keys.create_key(memory_app, name="m256", algorithm="hmac-sha256")
    keys.create_key(memory_app, name="m512", algorithm="hmac-sha512")
    made = hmac(memory_app, "m256", b"payload")
    assert _tag(made.hmac) == macs.mac(memory_app, "m256", b"payload", raw=True).tag
    assert verify_hmac(memory_app, "m256", b"payload", made.hmac)
    assert len(_tag(hmac(memory_app, "m512", b"p").hmac)) == 64  # sha2-512 by default
    with pytest.raises(ValidationError) as err:
        hmac(memory_app, "m256", b"p", algorithm="sha2-512")
    assert err.value.code == "invalid_algorithm"
    keys.rotate_key(memory_app, "m256")
    older = hmac(memory_app, "m256", b"payload", key_version=1)
    assert older.hmac == made.hmac  # the rotated-away version still computes ...
    assert verify_hmac(memory_app, "m256", b"payload", made.hmac)  # ... and verifies


def test_signing_keys_and_bad_input_are_refused(memory_app: AppContext) -> None:
    keys.create_key(memory_app, name="sig", algorithm="ed25519")
    keys.create_key(memory_app, name="enc")
    with pytest.raises(ValidationError) as err:
        hmac(memory_app, "sig", b"x")
    assert err.value.code == "wrong_purpose"
    for bad in ({"algorithm": "md5"}, {"key_version": -1}, {"key_version": "1"}):
        with pytest.raises(ValidationError):
            hmac(memory_app, "enc", b"x", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        hmac(memory_app, "enc", "text")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        hmac(memory_app, "missing", b"x")


def test_the_result_repr_holds_no_tag(memory_app: AppContext) -> None:
    keys.create_key(memory_app, name="enc")
    made = hmac(memory_app, "enc", b"x")
    assert made.hmac not in repr(made) and "vault:v1" not in repr(made)
    assert hashlib.sha256(b"x").hexdigest() not in repr(made)


def test_the_mac_key_fast_path_follows_rotation_policy_and_deletion(
    memory_app: AppContext,
) -> None:
    keys.create_key(memory_app, name="m", algorithm="hmac-sha256")
    first = hmac(memory_app, "m", b"x")  # now cached under "m"
    assert hmac(memory_app, "m", b"x").hmac == first.hmac
    with pytest.raises(ValidationError):  # a cached entry does not skip the hash check
        hmac(memory_app, "m", b"x", algorithm="sha2-512")
    keys.rotate_key(memory_app, "m")
    assert hmac(memory_app, "m", b"x").hmac.startswith("vault:v2:")
    lifecycle.schedule_deletion(memory_app, "m", days=7)
    with pytest.raises(ConflictError) as err:
        hmac(memory_app, "m", b"x")
    assert err.value.code == "key_pending_deletion"


def test_the_encryption_key_cache_follows_rotation_and_deletion(memory_app: AppContext) -> None:
    v1 = keys.create_key(memory_app, name="enc")
    first = hmac(memory_app, "enc", b"x")  # computes, then caches the HMAC key
    again = hmac(memory_app, "enc", b"x", algorithm="sha2-512")  # from the cache
    assert _tag(again.hmac) == _expected(memory_app, v1.key_id, b"x", "sha512")
    assert hmac(memory_app, "enc", b"x").hmac == first.hmac
    v2 = keys.rotate_key(memory_app, "enc")
    second = hmac(memory_app, "enc", b"x")
    assert second.version == 2 and _tag(second.hmac) == _expected(memory_app, v2.key_id, b"x")
    assert hmac(memory_app, "enc", b"x").hmac == second.hmac
    lifecycle.schedule_deletion(memory_app, "enc", days=7)
    with pytest.raises(ConflictError):
        hmac(memory_app, "enc", b"x")
    keys.create_key(memory_app, name="derived", derived=True)  # no cache entry: still works
    for _ in range(2):
        assert hmac(memory_app, "derived", b"x").hmac.startswith("vault:v1:")
