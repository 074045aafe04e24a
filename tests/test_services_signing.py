"""Signing keys through the service layer (issue 16), attacker first: signatures of other
keys, realms and lineages, forged headers, tampered, truncated and oversized signatures,
rotated, disabled and destroyed versions, wrong purposes; raw signatures checked by the bare
``cryptography`` library (a third-party verifier); public keys without private members.

One memory app holds a key of every built-in signing algorithm (RSA key generation is slow:
once per module); the other tests use Ed25519 on a fresh store.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterator

import pytest
from conftest import make_app
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from identity_helpers import ADMIN_PASSWORD

from qimem import backup, services
from qimem.app import AppContext
from qimem.crypto_purposes import PRIVATE_JWK_FIELDS
from qimem.errors import (
    ConflictError,
    KeyNotActiveError,
    NotFoundError,
    UnsupportedAlgorithmError,
    ValidationError,
)
from qimem.identity import IdentitySettings
from qimem.services import handles, lifecycle, signing
from qimem.services import identity as ids

MESSAGE = b"pay 100 to bob \x00\xff"
SIGNING = [
    "ed25519",
    "ecdsa-p256",
    "ecdsa-p384",
    "rsa-pss-3072",
    "rsa-pss-4096",
    "rsa-pkcs1-3072",
    "rsa-pkcs1-4096",
    "ml-dsa-65",
]
HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


@pytest.fixture(scope="module")
def every() -> Iterator[tuple[AppContext, dict[str, str]]]:
    """A memory app with one key per signing algorithm the installed cryptography has
    (name = algorithm); ML-DSA-65's absence must be a clear error."""
    app = make_app("memory://", None)
    made = {}
    for algorithm in SIGNING:
        try:
            services.create_key(app, algorithm=algorithm, name=algorithm)
        except UnsupportedAlgorithmError as exc:
            assert algorithm == "ml-dsa-65" and "ML-DSA" in str(exc)
            continue
        made[algorithm] = algorithm
    assert set(SIGNING) - set(made) <= {"ml-dsa-65"}
    yield app, made
    app.close()


@pytest.fixture
def app() -> Iterator[AppContext]:
    app = make_app("memory://", None)
    yield app
    app.close()


def _third_party_verify(algorithm: str, pem: str, message: bytes, signature: bytes) -> None:
    """Verify a raw signature with cryptography alone (raises InvalidSignature)."""
    key = serialization.load_pem_public_key(pem.encode())
    digest = {"p256": "sha256", "p384": "sha384", "3072": "sha256", "4096": "sha512"}
    if algorithm in ("ed25519", "ml-dsa-65"):
        key.verify(signature, message)  # type: ignore[call-arg, union-attr]
    elif algorithm.startswith("ecdsa"):
        h = HASHES[digest[algorithm.rsplit("-", 1)[1]]]
        key.verify(signature, message, ec.ECDSA(h))  # type: ignore[call-arg, union-attr]
    else:
        h = HASHES[digest[algorithm.rsplit("-", 1)[1]]]
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
            if "pss" in algorithm
            else padding.PKCS1v15()
        )
        key.verify(signature, message, pad, h)  # type: ignore[call-arg, union-attr]


@pytest.mark.parametrize("algorithm", SIGNING)
def test_every_algorithm_round_trips_and_raw_verifies_with_bare_cryptography(
    every: tuple[AppContext, dict[str, str]], algorithm: str
) -> None:
    app, made = every
    if algorithm not in made:
        pytest.skip(f"{algorithm}: not in the installed cryptography (its error was checked)")
    framed = signing.sign(app, algorithm, MESSAGE)
    assert framed.algorithm == algorithm and framed.version == 1
    result = signing.verify(app, algorithm, MESSAGE, framed.signature)
    assert (result.valid, result.key_id, result.version) == (True, framed.key_id, 1)
    assert not signing.verify(app, algorithm, MESSAGE + b".", framed.signature).valid
    raw = signing.sign(app, algorithm, MESSAGE, raw=True).signature
    assert signing.verify(app, algorithm, MESSAGE, raw, raw=True).valid
    public = signing.public_key(app, algorithm)
    _third_party_verify(algorithm, public.pem, MESSAGE, raw)
    _third_party_verify(algorithm, public.pem, MESSAGE, framed.signature[handles.HEADER_SIZE :])
    with pytest.raises(InvalidSignature):
        _third_party_verify(algorithm, public.pem, MESSAGE + b".", raw)
    assert not set(public.jwk) & PRIVATE_JWK_FIELDS
    assert public.jwk["kid"] == framed.key_id
    assert "PRIVATE" not in public.pem and public.pem.startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ecdsa-p384"])
def test_ecdsa_jws_marshaling_and_prehashed_pass_through(
    every: tuple[AppContext, dict[str, str]], algorithm: str
) -> None:
    app, _ = every
    size = 32 if algorithm == "ecdsa-p256" else 48
    h = hashlib.sha256 if size == 32 else hashlib.sha384
    jws = signing.sign(app, algorithm, MESSAGE, raw=True, marshaling="jws").signature
    assert len(jws) == 2 * size
    der = encode_dss_signature(int.from_bytes(jws[:size]), int.from_bytes(jws[size:]))
    _third_party_verify(algorithm, signing.public_key(app, algorithm).pem, MESSAGE, der)
    assert signing.verify(app, algorithm, MESSAGE, jws, raw=True, marshaling="jws").valid
    assert not signing.verify(app, algorithm, MESSAGE, jws, raw=True).valid  # not DER
    digest = h(MESSAGE).digest()
    pre = signing.sign(app, algorithm, digest, prehashed=True)
    assert signing.verify(app, algorithm, MESSAGE, pre.signature).valid
    assert signing.verify(app, algorithm, digest, pre.signature, prehashed=True).valid
    with pytest.raises(ValidationError):
        signing.sign(app, algorithm, b"short", prehashed=True)
    with pytest.raises(ValidationError):
        signing.sign(app, algorithm, MESSAGE, marshaling="pem")
    with pytest.raises(ValidationError):
        signing.verify(app, algorithm, MESSAGE, b"garbage", marshaling="pem")


def test_ed25519_refuses_prehashed_input(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    with pytest.raises(ValidationError, match="not a digest"):
        signing.sign(app, "s", hashlib.sha256(MESSAGE).digest(), prehashed=True)


def test_signature_header_layout(app: AppContext) -> None:
    key = services.create_key(app, algorithm="ed25519", name="s")
    signature = signing.sign(app, "s", MESSAGE).signature
    magic, fmt, algorithm_id, raw_id, version = struct.unpack(">4sBB16sI", signature[:26])
    assert (magic, fmt, algorithm_id, version) == (b"QMSG", 1, 16, 1)
    assert str(uuid.UUID(bytes=raw_id)) == key.key_id
    assert len(signature) == 26 + 64


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_tampered_truncated_oversized_and_garbage_signatures_are_invalid(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    signature = signing.sign(app, "s", MESSAGE).signature
    forms = [_flip(signature, i) for i in range(len(signature))]
    forms += [signature[:n] for n in range(len(signature))]
    forms += [signature + b"\x00", signature + signature, b"\x00" * 90, b"QMSG" + b"\xff" * 86]
    for form in forms:
        result = signing.verify(app, "s", MESSAGE, form)
        assert (result.valid, result.key_id, result.version) == (False, None, None), form
        if form[26:] != signature[26:]:  # the bare signature changed too
            assert not signing.verify(app, "s", MESSAGE, form[26:], raw=True).valid


def test_signatures_of_other_keys_lineages_and_realms_are_invalid_not_errors(
    app: AppContext,
) -> None:
    services.create_key(app, algorithm="ed25519", name="a")
    other = services.create_key(app, algorithm="ed25519", name="b")
    services.create_key(app, algorithm="ed25519", name="a", realm="tenant")
    by_b = signing.sign(app, "b", MESSAGE).signature
    by_a_elsewhere = signing.sign(app, "a", MESSAGE, realm="tenant").signature
    for signature in (by_b, by_a_elsewhere):
        result = signing.verify(app, "a", MESSAGE, signature)
        assert (result.valid, result.key_id) == (False, None)
    assert not signing.verify(app, "a", MESSAGE, by_b[26:], raw=True).valid
    # b's signature with a's key id written into the header: verified under a's key: invalid
    mine = signing.sign(app, "a", MESSAGE).signature
    forged = mine[:26] + by_b[26:]
    assert not signing.verify(app, "a", MESSAGE, forged).valid
    # a header naming b (a real key of this realm) is invalid for a, whatever b's state
    lifecycle.schedule_deletion(app, "b", days=30)
    assert not signing.verify(app, "a", MESSAGE, by_b).valid
    # and for a header naming a key id that exists nowhere
    nowhere = by_b[:6] + uuid.uuid4().bytes + by_b[22:]
    assert not signing.verify(app, "a", MESSAGE, nowhere).valid
    assert other.key_id not in repr(signing.verify(app, "a", MESSAGE, by_b))


def test_forged_header_version_or_algorithm_is_invalid(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    services.rotate_key(app, "s")
    signature = signing.sign(app, "s", MESSAGE).signature  # version 2
    as_v1 = signature[:22] + struct.pack(">I", 1) + signature[26:]
    as_v9 = signature[:22] + struct.pack(">I", 9) + signature[26:]
    as_ecdsa = signature[:5] + bytes([17]) + signature[6:]
    as_tag = b"QMTG" + signature[4:]
    as_v2_format = signature[:4] + b"\x02" + signature[5:]
    for form in (as_v1, as_v9, as_ecdsa, as_tag, as_v2_format):
        assert not signing.verify(app, "s", MESSAGE, form).valid


def test_rotation_old_signatures_verify_and_raw_needs_the_version(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    old = signing.sign(app, "s", MESSAGE)
    old_raw = signing.sign(app, "s", MESSAGE, raw=True)
    services.rotate_key(app, "s")
    new = signing.sign(app, "s", MESSAGE)
    assert new.version == 2 and new.key_id != old.key_id
    assert signing.verify(app, "s", MESSAGE, old.signature).version == 1
    assert signing.verify(app, "s", MESSAGE, new.signature).version == 2
    assert not signing.verify(app, "s", MESSAGE, old_raw.signature, raw=True).valid
    assert signing.verify(app, "s", MESSAGE, old_raw.signature, raw=True, version=1).valid
    assert signing.verify(app, old.key_id, MESSAGE, old_raw.signature, raw=True).valid
    with pytest.raises(ValidationError):
        signing.verify(app, "s", MESSAGE, old.signature, version=1)
    with pytest.raises(NotFoundError):
        signing.verify(app, "s", MESSAGE, old_raw.signature, raw=True, version=3)
    with pytest.raises(KeyNotActiveError):
        signing.sign(app, old.key_id, MESSAGE)
    # a key_id reference verifies that version only
    assert signing.verify(app, old.key_id, MESSAGE, old.signature).valid
    assert not signing.verify(app, old.key_id, MESSAGE, new.signature).valid
    assert not signing.verify(app, new.key_id, MESSAGE, old.signature).valid


def test_disabled_destroyed_and_below_minimum_versions_refuse_to_verify(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    old = signing.sign(app, "s", MESSAGE).signature
    assert signing.verify(app, "s", MESSAGE, old).valid  # cached now
    services.rotate_key(app, "s")
    lifecycle.disable_version(app, "s", version=1)
    with pytest.raises(ConflictError) as disabled:
        signing.verify(app, "s", MESSAGE, old)
    assert disabled.value.code == "key_disabled"
    with pytest.raises(ConflictError):
        signing.public_key(app, "s", version=1)
    assert [p.version for p in signing.public_keys(app, "s")] == [2]
    lifecycle.enable_version(app, "s", version=1)
    assert signing.verify(app, "s", MESSAGE, old).valid
    lifecycle.set_policy(app, "s", min_decryption_version=2)
    with pytest.raises(ConflictError) as below:
        signing.verify(app, "s", MESSAGE, old)
    assert below.value.code == "below_min_decryption_version"
    lifecycle.set_policy(app, "s", min_decryption_version=1)
    lifecycle.destroy_version(app, "s", version=1)
    with pytest.raises(ConflictError) as destroyed:
        signing.verify(app, "s", MESSAGE, old)
    assert destroyed.value.code == "key_destroyed"
    assert signing.sign(app, "s", MESSAGE).version == 2


def test_min_encryption_version_and_pending_deletion_refuse_signing(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    signature = signing.sign(app, "s", MESSAGE).signature
    lifecycle.schedule_deletion(app, "s", days=30)
    for call in (
        lambda: signing.sign(app, "s", MESSAGE),
        lambda: signing.verify(app, "s", MESSAGE, signature),
        lambda: signing.public_key(app, "s"),
    ):
        with pytest.raises(ConflictError) as pending:
            call()
        assert pending.value.code == "key_pending_deletion"
    lifecycle.cancel_deletion(app, "s")
    assert signing.verify(app, "s", MESSAGE, signature).valid


def test_wrong_purpose_keys_are_refused_clearly(app: AppContext) -> None:
    services.create_key(app, name="aead")
    services.create_key(app, algorithm="hmac-sha256", name="mac")
    services.create_key(app, algorithm="ed25519", name="s")
    signature = signing.sign(app, "s", MESSAGE).signature
    for ref in ("aead", "mac"):
        for call in (
            lambda ref=ref: signing.sign(app, ref, MESSAGE),
            lambda ref=ref: signing.verify(app, ref, MESSAGE, signature),
            lambda ref=ref: signing.public_key(app, ref),
            lambda ref=ref: signing.public_keys(app, ref),
        ):
            with pytest.raises(ValidationError) as wrong:
                call()
            assert wrong.value.code == "wrong_purpose", ref
            assert "needs a signing key" in wrong.value.message
    for call in (
        lambda: services.encrypt(app, "s", b"x"),
        lambda: services.datakey(app, "s"),
    ):
        with pytest.raises(ValidationError) as wrong:
            call()
        assert wrong.value.code == "wrong_purpose"


def test_create_purpose_must_agree_and_derived_is_for_encryption(app: AppContext) -> None:
    with pytest.raises(ValidationError) as wrong:
        services.create_key(app, algorithm="ed25519", purpose="encrypt")
    assert wrong.value.code == "wrong_purpose"
    with pytest.raises(ValidationError) as derived:
        services.create_key(app, algorithm="ed25519", derived=True)
    assert derived.value.code == "derived_not_supported"
    with pytest.raises(ValidationError):
        services.create_key(app, algorithm="ed25519", purpose="bogus")
    key = services.create_key(app, algorithm="ed25519", purpose="sign", name="s")
    assert services.keys.key_dict(app, key)["purpose"] == "sign"
    assert services.show_key(app, "s").to_dict()["purpose"] == "sign"
    assert services.show_key(app, services.create_key(app).key_id).purpose == "encrypt"
    with pytest.raises(ValidationError) as limit:
        lifecycle.set_policy(app, "s", usage_limit=10)
    assert limit.value.code == "invalid_policy"
    lifecycle.set_policy(app, "s", auto_rotate_seconds=3600)  # rotation by age applies


def test_verify_result_is_not_a_truth_value(app: AppContext) -> None:
    services.create_key(app, algorithm="ed25519", name="s")
    result = signing.verify(app, "s", MESSAGE, b"garbage")
    with pytest.raises(TypeError):
        bool(result)
    assert result.to_dict() == {"valid": False, "key_id": None, "version": None}


def test_another_context_disabling_a_version_reaches_the_cached_verifier(
    sqlite_url: str, root_key_b64: str
) -> None:
    a = make_app(sqlite_url, root_key_b64, cache_revalidate=0.0)
    b = make_app(sqlite_url, root_key_b64, cache_revalidate=30.0)
    try:
        services.create_key(a, algorithm="ed25519", name="s")
        old = signing.sign(b, "s", MESSAGE)  # b caches version 1 (for signing and verifying)
        services.rotate_key(a, "s")
        lifecycle.disable_version(a, "s", version=1)
        b.cache.recheck()  # what a change notice (or the next poll) does
        with pytest.raises(ConflictError):
            signing.verify(b, "s", MESSAGE, old.signature)
        assert signing.sign(b, "s", MESSAGE).version == 2
    finally:
        a.close()
        b.close()


def test_backup_round_trip_keeps_signatures_verifying(
    app: AppContext, sqlite_url: str, root_key_b64: str
) -> None:
    services.create_key(app, algorithm="ecdsa-p256", name="s")
    signature = signing.sign(app, "s", MESSAGE).signature
    services.rotate_key(app, "s")
    kdf = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}
    sealed = backup.export_keys(app, ["s"], "correct horse", kdf=kdf)
    other = make_app(sqlite_url, root_key_b64)
    try:
        backup.import_keys(other, sealed, "correct horse")
        assert signing.verify(other, "s", MESSAGE, signature).version == 1
        assert services.show_key(other, "s").purpose == "sign"
        assert signing.public_key(other, "s").pem == signing.public_key(app, "s").pem
    finally:
        other.close()


def test_backup_with_unusable_signing_material_is_refused(app: AppContext) -> None:
    """Whoever knows a passphrase can seal any payload: material that is no private key of
    the algorithm (here an AES key and a P-256 key labelled ed25519) is refused."""
    services.create_key(app, algorithm="ecdsa-p256", name="p256")
    kdf = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}
    sealed = backup.export_keys(app, ["p256"], "passphrase", kdf=kdf)
    payload = backup.open_backup(sealed, "passphrase")
    item = payload["lineages"][0]
    for material in (item["versions"][0]["material"], "AAAA" * 8):
        item.update(algorithm="ed25519", lineage_id=str(uuid.uuid4()), name="forged")
        item["versions"][0].update(material=material, key_id=str(uuid.uuid4()))
        with pytest.raises(ValidationError) as bad:
            backup.import_keys(app, backup.seal(payload, "passphrase", kdf), "passphrase")
        assert bad.value.code == "invalid_backup"
    with pytest.raises(NotFoundError):
        services.show_key(app, "forged")


def test_sign_and_verify_are_audited_with_an_actor(sqlite_app: AppContext) -> None:
    ids.configure(sqlite_app, IdentitySettings(argon2_memory_kib=64, argon2_time_cost=1))
    ids.bootstrap(sqlite_app, ADMIN_PASSWORD)
    services.create_key(sqlite_app, algorithm="ed25519", name="s")
    signature = signing.sign(sqlite_app, "s", MESSAGE, actor="alice@master").signature
    signing.verify(sqlite_app, "s", MESSAGE, signature, actor="alice@master")
    signing.verify(sqlite_app, "s", MESSAGE + b"!", signature, actor="alice@master")
    signing.sign(sqlite_app, "s", MESSAGE)  # no actor: the HTTP server audits itself
    ids.identity(sqlite_app).audit.flush()
    events = [e for e in ids.audit_events(sqlite_app, "master") if e.action.startswith("crypto.")]
    assert [(e.actor, e.action) for e in events].count(("alice@master", "crypto.sign")) == 1
    assert [e.action for e in events].count("crypto.verify") == 2


def test_loaded_keys_are_bounded_and_dropped_with_their_lineage(app: AppContext) -> None:
    app.cache.max_entries = 4
    for i in range(6):
        services.create_key(app, algorithm="ed25519", name=f"k{i}")
        signature = signing.sign(app, f"k{i}", MESSAGE).signature
        assert signing.verify(app, f"k{i}", MESSAGE, signature).valid
        assert sum(len(table) for table in app.cache.handles.values()) <= 4
    key = services.create_key(app, algorithm="hmac-sha256", name="m")
    macs_tag = services.macs.mac(app, "m", MESSAGE).tag
    entry = app.cache.handles["master"]["m"]
    assert repr(entry) == f"<CachedHandle mac {key.key_id} v1>"
    assert macs_tag[26:].hex() not in repr(entry)
    services.rotate_key(app, "m")  # the signing entry goes, the verifying one stays
    assert "m" not in app.cache.handles["master"]
    assert macs_tag[:26] in app.cache.handles["master"]
    lifecycle.disable_version(app, "m", version=1)
    assert all(e.lineage_id != key.lineage_id for e in app.cache.handles["master"].values())


def test_deterministic_keys_rotate_and_take_a_usage_limit(app: AppContext) -> None:
    """Usage limits look the algorithm up with its own purpose (AES-SIV is no AEAD of
    purpose encrypt: the lookup used to fail with wrong_purpose)."""
    services.create_key(app, algorithm="aes-256-siv", name="d")
    assert lifecycle.set_policy(app, "d", usage_limit=1000).usage_limit == 1000
    assert services.rotate_key(app, "d").version == 2
    assert services.show_key(app, "d").purpose == "deterministic"
    with pytest.raises(ValidationError) as derived:
        services.create_key(app, algorithm="aes-256-siv", derived=True)
    assert derived.value.code == "derived_not_supported"
