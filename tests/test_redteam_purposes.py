"""Red team, issue 16, service layer: signing, MAC and deterministic keys attacked.

Crafted backups (whoever holds a realm's ``realms:admin`` and a passphrase can seal any
document): ids that are no UUIDs, version numbers the signature header cannot hold,
negative usage counts that would lift a key's nonce bound. Confusions: a MAC tag presented
as a signature and back, a signature header naming another lineage's or realm's version,
an ECDSA DER signature under JWS marshaling, prehashed digests of the wrong length. States:
a disabled or destroyed version neither signs nor verifies. Leaks: no message, signature or
key bytes in errors or reprs.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_app

from qimem import backup, services
from qimem.app import AppContext
from qimem.errors import (
    ConflictError,
    KeyNotActiveError,
    NotFoundError,
    QimemError,
    ValidationError,
)
from qimem.services import deterministic, handles, key_states, lifecycle, macs, signing

PASSPHRASE = "correct horse battery staple 42!"
KDF = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}
SECRET = b"wire 1000 to mallory: secret-marker-9184"


@pytest.fixture
def app() -> Iterator[AppContext]:
    ctx = make_app("memory://", None)
    for name, algorithm in (
        ("ed", "ed25519"),
        ("ed2", "ed25519"),
        ("ec", "ecdsa-p256"),
        ("hm", "hmac-sha256"),
        ("gcm", "aes-256-gcm"),
        ("siv", "aes-256-siv"),
    ):
        services.create_key(ctx, name=name, algorithm=algorithm)
    services.create_key(ctx, name="ed", algorithm="ed25519", realm="beta")
    yield ctx
    ctx.close()


# ---- crafted backups --------------------------------------------------------------------


def _payload(app: AppContext, *names: str) -> dict[str, Any]:
    return backup.open_backup(backup.export_keys(app, list(names), PASSPHRASE, kdf=KDF), PASSPHRASE)


def _import(payload: dict[str, Any]) -> AppContext:
    """A fresh store with ``payload`` imported (the caller closes it)."""
    target = make_app("memory://", None)
    try:
        backup.import_keys(target, backup.seal(payload, PASSPHRASE, KDF), PASSPHRASE)
    except BaseException:
        target.close()
        raise
    return target


def _crafted(app: AppContext, name: str, field: str, value: Any, where: str = "version") -> Any:
    payload = copy.deepcopy(_payload(app, name))
    lineage = payload["lineages"][0]
    (lineage["versions"][0] if where == "version" else lineage)[field] = value
    return payload


@pytest.mark.parametrize(
    ("name", "field", "value", "where"),
    [
        ("ed", "key_id", "not-a-uuid", "version"),
        ("hm", "key_id", "zzz", "version"),
        ("gcm", "key_id", "../../etc", "version"),
        ("ed", "lineage_id", "payroll-x", "lineage"),
        ("ed", "version", 2**33, "version"),
        ("hm", "version", 0, "version"),
        ("ed", "version", -5, "version"),
    ],
)
def test_a_backup_with_ids_or_versions_no_header_can_hold_is_refused(
    app: AppContext, name: str, field: str, value: Any, where: str
) -> None:
    """A signature (tag, envelope) header holds the key id as 16 UUID bytes and the version
    as uint32: a key restored with another id or version made every sign/mac/encrypt a
    ValueError or struct.error (HTTP 500) for good. Refused at import, one clear error."""
    payload = _crafted(app, name, field, value, where)
    with pytest.raises(ValidationError) as caught:
        _import(payload).close()
    assert caught.value.code == "invalid_backup"
    assert str(value) not in str(caught.value) or len(str(value)) < 4


def test_a_backup_with_a_negative_usage_count_is_refused(app: AppContext) -> None:
    """``encryptions: -N`` would give an AES-GCM version N more random nonces than its usage
    limit (and its 2^32 bound) allow: the limit a policy sets is lifted by a forged count."""
    payload = _crafted(app, "gcm", "encryptions", -(2**40))
    with pytest.raises(ValidationError) as caught:
        _import(payload).close()
    assert caught.value.code == "invalid_backup"


def test_a_backup_with_duplicate_or_gapped_versions_is_refused(app: AppContext) -> None:
    services.rotate_key(app, "ed")
    payload = copy.deepcopy(_payload(app, "ed"))
    payload["lineages"][0]["versions"][1]["version"] = 1  # two versions numbered 1
    with pytest.raises(ValidationError):
        _import(payload).close()


def test_a_signing_key_whose_private_key_is_another_algorithms_is_refused(app: AppContext) -> None:
    payload = copy.deepcopy(_payload(app, "ed", "ec"))
    ed, ec = payload["lineages"]
    ed["versions"][0]["material"] = ec["versions"][0]["material"]
    with pytest.raises(ValidationError) as caught:
        _import(payload).close()
    assert caught.value.code == "invalid_backup"
    assert ec["versions"][0]["material"][:12] not in str(caught.value)


def test_an_ecdsa_key_whose_embedded_public_key_is_anothers_is_refused(app: AppContext) -> None:
    """PKCS#8 of an EC key carries its public point: one of another key would make every
    signature fail under the exported public key (or, loaded unchecked, export a key that
    is not the signer's). Refused at import."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    mine, other = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    der = mine.private_bytes(ser.Encoding.DER, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    points = [
        k.public_key().public_bytes(ser.Encoding.X962, ser.PublicFormat.UncompressedPoint)
        for k in (mine, other)
    ]
    assert der.count(points[0]) == 1
    payload = _crafted(app, "ec", "material", base64.b64encode(der.replace(*points)).decode())
    with pytest.raises(ValidationError) as caught:
        _import(payload).close()
    assert caught.value.code == "invalid_backup"


def test_an_honest_backup_still_signs_and_verifies_after_import(app: AppContext) -> None:
    made = signing.sign(app, "ed", SECRET)
    target = _import(_payload(app, "ed", "hm"))
    try:
        assert signing.verify(target, "ed", SECRET, made.signature).valid
        assert signing.sign(target, "ed", SECRET).key_id == made.key_id
        tag = macs.mac(app, "hm", SECRET).tag
        assert macs.verify_mac(target, "hm", SECRET, tag).valid
    finally:
        target.close()


# ---- confusion ------------------------------------------------------------------------


def test_a_mac_tag_is_no_signature_and_a_signature_no_tag(app: AppContext) -> None:
    tag = macs.mac(app, "hm", SECRET).tag
    signature = signing.sign(app, "ed", SECRET).signature
    assert not signing.verify(app, "ed", SECRET, tag).valid
    assert not signing.verify(app, "ed", SECRET, tag[handles.HEADER_SIZE :], raw=True).valid
    assert not macs.verify_mac(app, "hm", SECRET, signature).valid
    # the tag's header with the magic changed to a signature's names the MAC key: invalid
    relabelled = handles.SIGNATURE_MAGIC + tag[4:]
    assert not signing.verify(app, "ed", SECRET, relabelled).valid
    with pytest.raises(ValidationError) as caught:
        signing.verify(app, "hm", SECRET, signature)
    assert caught.value.code == "wrong_purpose"


def test_a_header_naming_another_lineage_or_realm_is_just_invalid(app: AppContext) -> None:
    """A signature of ed2 (same algorithm) or of realm beta's ed, its bytes kept and the
    header rewritten or not: never valid for ed, and the same answer as a bad signature
    (no oracle telling which keys exist)."""
    other = signing.sign(app, "ed2", SECRET).signature
    beta = signing.sign(app, "ed", SECRET, realm="beta").signature
    mine = signing.sign(app, "ed", SECRET).signature
    bad = mine[:-1] + bytes([mine[-1] ^ 1])
    answers = {
        signing.verify(app, "ed", SECRET, blob).to_dict().__repr__()
        for blob in (other, beta, bad, mine[: handles.HEADER_SIZE] + other[handles.HEADER_SIZE :])
    }
    assert answers == {repr({"valid": False, "key_id": None, "version": None})}
    # beta's signature verifies in beta only; acme's ed answers 'invalid', not 'not found'
    assert signing.verify(app, "ed", SECRET, beta, realm="beta").valid
    with pytest.raises(NotFoundError):
        signing.verify(app, "ed2", SECRET, other, realm="beta")


def test_ecdsa_der_under_jws_and_wrong_prehash_lengths(app: AppContext) -> None:
    import hashlib

    der = signing.sign(app, "ec", SECRET).signature
    jws = signing.sign(app, "ec", SECRET, marshaling="jws").signature
    assert not signing.verify(app, "ec", SECRET, der, marshaling="jws").valid
    assert not signing.verify(app, "ec", SECRET, jws).valid
    assert not signing.verify(app, "ec", SECRET, jws[:-1], marshaling="jws").valid
    digest = hashlib.sha256(SECRET).digest()
    assert signing.verify(app, "ec", digest, der, prehashed=True).valid
    for wrong in (b"", digest[:31], digest + b"\0", hashlib.sha512(SECRET).digest()):
        with pytest.raises(ValidationError) as caught:
            signing.sign(app, "ec", wrong, prehashed=True)
        assert caught.value.code == "invalid_request"
        with pytest.raises(ValidationError):
            signing.verify(app, "ec", wrong, der, prehashed=True)


def test_a_deterministic_envelope_is_no_aead_envelope_and_back(app: AppContext) -> None:
    from qimem import envelope as env

    token = services.encrypt(app, "siv", SECRET).envelope
    sealed = services.encrypt(app, "gcm", SECRET).envelope
    siv_id = env.parse(token).algorithm_id
    gcm_id = env.parse(sealed).algorithm_id
    for blob, new_id in ((token, gcm_id), (sealed, siv_id)):
        at = blob.index(bytes([env.parse(blob).algorithm_id]), 4)
        forged = blob[:at] + bytes([new_id]) + blob[at + 1 :]
        with pytest.raises(QimemError) as caught:
            services.decrypt(app, forged)
        assert SECRET not in str(caught.value).encode()
    assert deterministic.TOKEN_SIZE >= 1


def test_envelope_shapes_of_the_other_kind_fail_as_one_decryption_error(app: AppContext) -> None:
    """An AES-GCM envelope rebuilt without a nonce (the deterministic shape), an AES-SIV
    token given a nonce, empty or short ciphertexts: all the one decryption_failed, never
    a ValueError of the cipher (500), through decrypt and rewrap alike."""
    import struct

    from qimem import envelope as env

    sealed = services.encrypt(app, "gcm", SECRET).envelope
    token = services.encrypt(app, "siv", SECRET).envelope

    def build(blob: bytes, nonce: bytes, body: bytes) -> bytes:
        return blob[:26] + bytes([len(nonce)]) + nonce + struct.pack(">I", len(body)) + body

    gcm, siv = env.parse(sealed), env.parse(token)
    for forged in (
        build(sealed, b"", gcm.ciphertext),
        build(sealed, b"", b""),
        build(sealed, gcm.nonce, b""),
        build(token, b"\0" * 12, siv.ciphertext),
        build(token, b"", b""),
        build(token, b"", b"x" * 15),
    ):
        for call in (services.decrypt, services.rewrap):
            with pytest.raises(QimemError) as caught:
                call(app, forged)
            assert caught.value.code == "decryption_failed", (forged[26:40], caught.value)


# ---- states -----------------------------------------------------------------------------


def test_disabled_and_destroyed_versions_neither_sign_nor_verify(app: AppContext) -> None:
    old = signing.sign(app, "ed", SECRET)
    old_tag = macs.mac(app, "hm", SECRET)
    services.rotate_key(app, "ed")
    services.rotate_key(app, "hm")
    with pytest.raises(KeyNotActiveError):
        signing.sign(app, old.key_id, SECRET)
    key_states.disable_version(app, old.key_id)
    key_states.disable_version(app, old_tag.key_id)
    with pytest.raises(ConflictError) as caught:
        signing.verify(app, "ed", SECRET, old.signature)
    assert caught.value.code == "key_disabled"
    with pytest.raises(ConflictError):
        signing.verify(app, "ed", SECRET, old.signature[handles.HEADER_SIZE :], raw=True, version=1)
    with pytest.raises(ConflictError):
        signing.public_key(app, "ed", version=1)
    with pytest.raises(ConflictError):
        macs.verify_mac(app, "hm", SECRET, old_tag.tag)
    key_states.destroy_version(app, old.key_id)
    with pytest.raises(ConflictError) as caught:
        signing.verify(app, old.key_id, SECRET, old.signature)
    assert caught.value.code == "key_destroyed"
    assert [k.version for k in signing.public_keys(app, "ed")] == [2]


def test_pending_deletion_stops_signing_and_macs(app: AppContext) -> None:
    signature = signing.sign(app, "ed", SECRET).signature
    lifecycle.schedule_deletion(app, "ed", days=7)
    with pytest.raises(ConflictError) as caught:
        signing.sign(app, "ed", SECRET)
    assert caught.value.code == "key_pending_deletion"
    with pytest.raises(ConflictError):
        signing.verify(app, "ed", SECRET, signature)


# ---- leaks ------------------------------------------------------------------------------


def test_reprs_and_errors_hold_no_message_signature_or_key_bytes(app: AppContext) -> None:
    made = signing.sign(app, "ed", SECRET)
    tag = macs.mac(app, "hm", SECRET)
    data_key = services.datakey(app, "gcm", aad=b"ctx")
    shown = repr(made) + repr(tag) + repr(data_key) + repr(app.cache.handles)
    shown += "".join(repr(e.handle) for t in app.cache.handles.values() for e in t.values())
    for secret in (made.signature, tag.tag, data_key.wrapped_key, data_key.plaintext_key):
        assert secret is not None
        for form in (secret[-16:].hex(), base64.b64encode(secret[-12:]).decode()):
            assert form not in shown
    assert "secret-marker" not in shown
    errors: list[str] = []
    for call in (
        lambda: signing.sign(app, "hm", SECRET),
        lambda: signing.sign(app, "ec", SECRET, prehashed=True),
        lambda: macs.mac(app, "ed", SECRET),
        lambda: signing.verify(app, "nope", SECRET, made.signature),
        lambda: signing.verify(app, "ed", SECRET, made.signature, version=1),
    ):
        with pytest.raises(QimemError) as caught:
            call()
        errors.append(str(caught.value))
    text = " ".join(errors)
    assert "secret-marker" not in text and made.signature[-16:].hex() not in text


# ---- DoS ----------------------------------------------------------------------------------


def test_concurrent_signers_of_an_expired_key_generate_one_new_key(app: AppContext) -> None:
    """Age-based rotation happens on the first use after the period: every signer racing
    it used to generate a private key of its own and throw all but one away (6 RSA-3072
    keygens for one rotation, 3.9 s, measured with /tmp probes); a keys:sign caller could
    time a burst at the expiry. One process generates one."""
    import threading
    import time

    lifecycle.set_policy(app, "ed", auto_rotate_seconds=1)
    algorithm = app.registry.algorithm("ed25519", "sign")
    generate = algorithm.generate_private_key
    racers = 4
    inside = threading.Barrier(racers)
    calls: list[int] = []

    def counted() -> bytes:
        calls.append(1)
        try:  # without the fix every racer is in here together; with it, one is
            inside.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            pass
        return generate()  # type: ignore[no-any-return]

    time.sleep(1.1)
    app.cache.clear()
    algorithm.generate_private_key = counted  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def sign_once() -> None:
        try:
            signing.sign(app, "ed", SECRET)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=sign_once) for _ in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        del algorithm.generate_private_key
    assert not errors
    assert len(calls) == 1
    assert [v.version for v in services.show_key(app, "ed").versions] == [1, 2]


def test_a_header_with_a_forged_algorithm_id_loads_no_key(app: AppContext) -> None:
    """A header naming a real version of the lineage with another algorithm id was only
    refused after the version's private key was unwrapped and loaded, and, refused, never
    cached: every such item of a 1000-item verify batch unwrapped and loaded the key again
    (ML-DSA-65: 1.13 ms per item against 0.016 ms for a tampered signature; 2-3 store
    reads each on SQL stores). The id is known from the version's algorithm: refused before
    loading, as cheaply as a header naming no key at all."""
    signature = signing.sign(app, "ed", SECRET).signature
    tag = macs.mac(app, "hm", SECRET).tag
    app.cache.clear()
    unwraps: list[str] = []
    material = app.store.material

    def counted(realm: str, key_id: str) -> bytearray:
        unwraps.append(key_id)
        return material(realm, key_id)

    app.store.material = counted  # type: ignore[method-assign]
    try:
        for forged_id in (0x7F, 0x00, 33, 16 ^ 1):
            forged = signature[:5] + bytes([forged_id]) + signature[6:]
            assert not signing.verify(app, "ed", SECRET, forged).valid
            forged_tag = tag[:5] + bytes([forged_id]) + tag[6:]
            assert not macs.verify_mac(app, "hm", SECRET, forged_tag).valid
    finally:
        del app.store.material
    # 'ed' and 'hm' themselves are loaded once each (the owner lookup); no more
    assert sorted(unwraps) == sorted({v.key_id for n in ("ed", "hm") for v in _versions(app, n)})
    assert signing.verify(app, "ed", SECRET, signature).valid  # the honest one still is
    assert macs.verify_mac(app, "hm", SECRET, tag).valid


def _versions(app: AppContext, name: str) -> list[Any]:
    return list(services.show_key(app, name).versions)


# ---- a check or a read never writes ---------------------------------------------------------


def _expire(app: AppContext, *names: str) -> None:
    """Make ``names`` due for an age-based rotation, with an empty key cache."""
    import time

    for name in names:
        lifecycle.set_policy(app, name, auto_rotate_seconds=1)
    time.sleep(1.2)
    app.cache.clear()


def test_verifying_or_reading_a_public_key_never_rotates(app: AppContext) -> None:
    """verify, verify_mac and public key reads found the active version through the
    signing path (``lifecycle.check_signing``): past ``auto_rotate_seconds`` a caller
    holding only keys:verify, keys:verify-mac or keys:read generated a new key version (a
    keygen, a store write, a keys.auto_rotate audit record). A check or a read never
    writes."""
    signature = signing.sign(app, "ed", SECRET).signature
    tag = macs.mac(app, "hm", SECRET).tag
    raw_signature = signing.sign(app, "ed", SECRET, raw=True).signature
    raw_tag = macs.mac(app, "hm", SECRET, raw=True).tag
    _expire(app, "ed", "hm")
    key_id = _versions(app, "ed")[0].key_id
    assert signing.verify(app, "ed", SECRET, signature).valid
    assert macs.verify_mac(app, "hm", SECRET, tag).valid
    app.cache.clear()  # each path on a cold cache too
    assert signing.verify(app, "ed", SECRET, raw_signature, raw=True).valid
    app.cache.clear()
    assert macs.verify_mac(app, "hm", SECRET, raw_tag, raw=True).valid
    app.cache.clear()
    assert signing.verify(app, key_id, SECRET, raw_signature, raw=True).valid
    app.cache.clear()
    assert signing.public_key(app, "ed").version == 1
    app.cache.clear()
    assert [k.version for k in signing.public_keys(app, "ed")] == [1]
    assert len(_versions(app, "ed")) == 1
    assert len(_versions(app, "hm")) == 1


def test_a_key_loaded_to_verify_still_rotates_when_it_signs() -> None:
    """The other side of the above: an entry a verification (or a public key read) cached
    under the key's name passed no signing check, so sign and mac must not take it as
    their cached active version: past ``auto_rotate_seconds`` the first signature or tag
    after a verification still comes from a new version (also through transit's hmac,
    which takes macs' cached entry), and what the old version made still verifies. (Entries
    are not revalidated during the test: a rotation elsewhere cannot drop them.)"""
    from qimem.services import transit_hmac

    app = make_app("memory://", None, cache_revalidate=600.0)
    try:
        for name, algorithm in (("ed", "ed25519"), ("hm", "hmac-sha256"), ("hm2", "hmac-sha256")):
            services.create_key(app, name=name, algorithm=algorithm)
        signature = signing.sign(app, "ed", SECRET).signature
        tag = macs.mac(app, "hm", SECRET).tag
        tag2 = macs.mac(app, "hm2", SECRET).tag
        _expire(app, "ed", "hm", "hm2")
        assert signing.verify(app, "ed", SECRET, signature).valid
        signing.public_key(app, "ed")
        assert macs.verify_mac(app, "hm", SECRET, tag).valid
        assert macs.verify_mac(app, "hm2", SECRET, tag2).valid
        assert macs.mac(app, "hm", SECRET).version == 2
        assert transit_hmac.hmac(app, "hm2", SECRET).version == 2
        made = signing.sign(app, "ed", SECRET)
        assert made.version == 2
        assert signing.verify(app, "ed", SECRET, signature).version == 1
        assert signing.verify(app, "ed", SECRET, made.signature).version == 2
        assert macs.verify_mac(app, "hm", SECRET, tag).version == 1
        assert signing.public_key(app, "ed").version == 2
        services.create_key(app, name="ed3", algorithm="ed25519")  # no policy: not due
        signature = signing.sign(app, "ed3", SECRET).signature
        app.cache.clear()
        assert signing.verify(app, "ed3", SECRET, signature).valid  # loaded to verify
        made = signing.sign(app, "ed3", SECRET)  # checked to sign, the same version serves
        assert made.version == 1 and signing.verify(app, "ed3", SECRET, made.signature).valid
    finally:
        app.close()
