"""Deterministic encryption (keys of purpose ``deterministic``, AES-256-SIV) through
qimem.services.crypto, on every store: the same key version, plaintext and aad give the same
envelope; anything else differs; tampering, other realms, other purposes, states and
usage limits behave as for AEAD keys."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
from conftest import make_app

from qimem import backup, services
from qimem import envelope as env
from qimem.app import AppContext
from qimem.crypto import zero
from qimem.errors import DecryptionError, NotFoundError, ValidationError
from qimem.keys import KeyVersion
from qimem.services import crypto, lifecycle
from qimem.services import identity as ids

SECRET = b"4111 1111 1111 1111"
SIV_ID = 48
HEADER = env.PREFIX_SIZE + env.LENGTH.size  # 31: no nonce
_FAST_KDF = {"time_cost": 1, "memory_kib": 8 * 1024, "parallelism": 1}  # the lowest allowed


def make_key(app: AppContext, algorithm: str, name: str, realm: str = "master") -> KeyVersion:
    """A key of ``algorithm``, whatever its purpose."""
    return services.create_key(app, algorithm=algorithm, name=name, realm=realm)


def siv_key(app: AppContext, name: str = "tokens", realm: str = "master") -> KeyVersion:
    key = make_key(app, "aes-256-siv", name, realm)
    assert services.show_key(app, key.key_id, realm=realm).purpose == "deterministic"
    return key


def flip(blob: bytes, index: int, bit: int = 0) -> bytes:
    return blob[:index] + bytes([blob[index] ^ (1 << bit)]) + blob[index + 1 :]


# --------------------------------------------------------------------------- determinism


def test_equal_inputs_give_byte_identical_envelopes(any_app: AppContext) -> None:
    key = siv_key(any_app)
    first = services.encrypt(any_app, "tokens", SECRET, aad=b"customers.card")
    again = services.encrypt(any_app, "tokens", SECRET, aad=b"customers.card")
    by_id = services.encrypt(any_app, key.key_id, SECRET, aad=b"customers.card")
    assert first.envelope == again.envelope == by_id.envelope
    assert (first.key_id, first.version) == (key.key_id, 1)
    opened = services.decrypt(any_app, first.envelope, aad=b"customers.card")
    assert (opened.plaintext, opened.key_id, opened.version) == (SECRET, key.key_id, 1)


def test_anything_different_gives_a_different_envelope(any_app: AppContext) -> None:
    siv_key(any_app)
    siv_key(any_app, "other")
    base = services.encrypt(any_app, "tokens", SECRET, aad=b"a").envelope
    others = [
        services.encrypt(any_app, "tokens", SECRET, aad=b"b").envelope,
        services.encrypt(any_app, "tokens", SECRET).envelope,
        services.encrypt(any_app, "tokens", SECRET[:-1] + b"2", aad=b"a").envelope,
        services.encrypt(any_app, "other", SECRET, aad=b"a").envelope,
    ]
    assert len({base, *others}) == 5
    # Omitted and empty aad are the same associated data (as for AEAD keys).
    assert services.encrypt(any_app, "tokens", SECRET, aad=b"").envelope == others[1]


def test_rotation_gives_a_new_envelope_and_the_old_one_still_opens(any_app: AppContext) -> None:
    old_key = siv_key(any_app)
    old = services.encrypt(any_app, "tokens", SECRET).envelope
    new_key = services.rotate_key(any_app, "tokens")
    assert new_key.version == 2 and new_key.algorithm == "aes-256-siv"
    new = services.encrypt(any_app, "tokens", SECRET).envelope
    assert new != old and services.encrypt(any_app, "tokens", SECRET).envelope == new
    assert services.decrypt(any_app, old).key_id == old_key.key_id
    assert services.decrypt(any_app, new).version == 2
    # rewrap brings the old envelope to exactly what the new version makes.
    assert services.rewrap(any_app, old).envelope == new


def test_envelope_layout_is_the_documented_one(memory_app: AppContext) -> None:
    """Nonce length 0, the SIV output after a 31-byte header bound as associated data:
    the bytes equal envelope.seal_deterministic with the stored key."""
    key = siv_key(memory_app)
    sealed = services.encrypt(memory_app, "tokens", SECRET, aad=b"ctx").envelope
    parsed = env.parse(sealed)
    assert parsed.algorithm_id == SIV_ID and parsed.nonce == b""
    assert sealed[26] == 0 and len(parsed.header) == HEADER
    assert len(sealed) == HEADER + 16 + len(SECRET)
    assert struct.unpack(">I", sealed[27:31])[0] == 16 + len(SECRET)
    algorithm = memory_app.registry.algorithm("aes-256-siv", "deterministic")
    material = memory_app.store.material("master", key.key_id)
    try:
        assert env.seal_deterministic(algorithm, material, key.key_id, 1, SECRET, b"ctx") == sealed
        # The associated data is header ‖ aad: the plugin alone opens it only with both.
        assert algorithm.decrypt(material, sealed[HEADER:], sealed[:HEADER] + b"ctx") == SECRET
        with pytest.raises(DecryptionError):
            algorithm.decrypt(material, sealed[HEADER:], b"ctx")
    finally:
        zero(material)


def test_empty_and_large_plaintexts(memory_app: AppContext) -> None:
    siv_key(memory_app)
    for plaintext in (b"", bytes(range(256)) * 4096):
        sealed = services.encrypt(memory_app, "tokens", plaintext).envelope
        assert services.decrypt(memory_app, sealed).plaintext == plaintext


def test_threads_agree_and_every_encryption_is_counted(sqlite_app: AppContext) -> None:
    siv_key(sqlite_app)
    results: list[bytes] = []

    def work() -> None:
        for _ in range(50):
            results.append(services.encrypt(sqlite_app, "tokens", SECRET).envelope)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 200 and len(set(results)) == 1
    counted = sum(lifecycle.key_usage(sqlite_app, "tokens").values())
    assert counted >= 200  # reserved counts: never fewer than the messages sealed


# --------------------------------------------------------------------------- tampering


def test_every_bit_flip_is_refused(any_app: AppContext) -> None:
    siv_key(any_app)
    sealed = services.encrypt(any_app, "tokens", b"short", aad=b"x").envelope
    for index in range(len(sealed)):
        for bit in range(8):
            with pytest.raises((DecryptionError, NotFoundError)):
                services.decrypt(any_app, flip(sealed, index, bit), aad=b"x")
    assert services.decrypt(any_app, sealed, aad=b"x").plaintext == b"short"


def test_wrong_aad_truncation_and_extension_are_refused(any_app: AppContext) -> None:
    siv_key(any_app)
    sealed = services.encrypt(any_app, "tokens", SECRET, aad=b"row-1").envelope
    for bad_aad in (None, b"", b"row-2", b"row-1\x00"):
        with pytest.raises(DecryptionError, match="failed authentication"):
            services.decrypt(any_app, sealed, aad=bad_aad)
    for blob in (sealed[:-1], sealed + b"\x00", sealed[:HEADER], sealed[: HEADER + 15]):
        with pytest.raises(DecryptionError):
            services.decrypt(any_app, blob, aad=b"row-1")


def test_a_header_relabelled_between_aead_and_deterministic_is_refused(
    memory_app: AppContext,
) -> None:
    """An attacker cannot make an AEAD key open a nonce-less envelope, nor a deterministic
    key open one with a nonce: the header must match the stored key exactly."""
    aead = services.create_key(memory_app, name="aead")
    siv_key(memory_app)
    sealed = services.encrypt(memory_app, "aead", SECRET).envelope
    body = sealed[env.PREFIX_SIZE + 12 + 4 :]
    as_siv = (
        sealed[:5] + bytes([SIV_ID]) + sealed[6:26] + b"\x00" + struct.pack(">I", len(body)) + body
    )
    with pytest.raises(DecryptionError, match="failed authentication"):
        services.decrypt(memory_app, as_siv)
    nonceless = sealed[:26] + b"\x00" + struct.pack(">I", len(body)) + body
    with pytest.raises(DecryptionError, match="failed authentication"):
        services.decrypt(memory_app, nonceless)
    det = services.encrypt(memory_app, "tokens", SECRET).envelope
    body = det[HEADER:]
    with_nonce = (
        det[:5] + b"\x01" + det[6:26] + b"\x0c" + bytes(12) + struct.pack(">I", len(body)) + body
    )
    with pytest.raises(DecryptionError, match="failed authentication"):
        services.decrypt(memory_app, with_nonce)
    assert services.decrypt(memory_app, sealed).key_id == aead.key_id


def test_the_cached_fast_path_refuses_tampering_too(memory_app: AppContext) -> None:
    siv_key(memory_app)
    sealed = services.encrypt(memory_app, "tokens", SECRET).envelope
    services.decrypt(memory_app, sealed)
    assert sealed[: env.PREFIX_SIZE] in memory_app.cache.by_prefix  # hits from here on
    for index in (HEADER - 1, HEADER, len(sealed) - 1):
        with pytest.raises(DecryptionError):
            services.decrypt(memory_app, flip(sealed, index))
    assert services.decrypt(memory_app, sealed).plaintext == SECRET


# --------------------------------------------------------------------------- purposes


def test_signing_and_mac_keys_neither_encrypt_nor_decrypt(memory_app: AppContext) -> None:
    signer = make_key(memory_app, "ed25519", "signer")
    make_key(memory_app, "hmac-sha256", "webhooks")
    for ref in ("signer", "webhooks", signer.key_id):
        with pytest.raises(ValidationError, match="encrypt or deterministic key") as caught:
            services.encrypt(memory_app, ref, SECRET)
        assert caught.value.code == "wrong_purpose"
        with pytest.raises(ValidationError) as caught:
            services.datakey(memory_app, ref)
        assert caught.value.code == "wrong_purpose"
    assert lifecycle.key_usage(memory_app, "signer") == {signer.key_id: 0}
    # An envelope forged to name the signing key's id is refused by purpose, not opened.
    siv_key(memory_app)
    sealed = services.encrypt(memory_app, "tokens", SECRET).envelope
    forged = sealed[:6] + env.header_prefix(SIV_ID, signer.key_id, 1, 0)[6:] + sealed[27:]
    with pytest.raises(ValidationError) as caught:
        services.decrypt(memory_app, forged)
    assert caught.value.code == "wrong_purpose"


def test_data_keys_and_files_refuse_a_deterministic_key(memory_app: AppContext) -> None:
    key = siv_key(memory_app)
    for call in (
        lambda: services.datakey(memory_app, "tokens"),
        lambda: services.datakey(memory_app, "tokens", wrapped_only=True),
        lambda: crypto.check_encryption_key(memory_app, "tokens"),
    ):
        with pytest.raises(ValidationError, match="need an encrypt key") as caught:
            call()
        assert caught.value.code == "wrong_purpose"
    assert lifecycle.key_usage(memory_app, "tokens") == {key.key_id: 0}


def test_a_context_is_refused_for_a_deterministic_key(memory_app: AppContext) -> None:
    siv_key(memory_app)
    with pytest.raises(ValidationError) as caught:
        services.encrypt(memory_app, "tokens", SECRET, context=b"tenant-a")
    assert caught.value.code == "context_not_allowed"
    sealed = services.encrypt(memory_app, "tokens", SECRET).envelope
    with pytest.raises(ValidationError) as caught:
        services.decrypt(memory_app, sealed, context=b"tenant-a")
    assert caught.value.code == "context_not_allowed"


# --------------------------------------------------------------------------- realms, states, limits


def test_another_realm_cannot_open_or_use_the_key(memory_app: AppContext) -> None:
    siv_key(memory_app, realm="tenant-a")
    sealed = services.encrypt(memory_app, "tokens", SECRET, realm="tenant-a").envelope
    with pytest.raises(NotFoundError):
        services.decrypt(memory_app, sealed, realm="tenant-b")
    with pytest.raises(NotFoundError):
        services.encrypt(memory_app, "tokens", SECRET, realm="tenant-b")
    # Same name in the other realm: another key, so another envelope.
    siv_key(memory_app, realm="tenant-b")
    other = services.encrypt(memory_app, "tokens", SECRET, realm="tenant-b").envelope
    assert other != sealed
    with pytest.raises(NotFoundError):
        services.decrypt(memory_app, other, realm="tenant-a")


def test_disabled_and_destroyed_versions(any_app: AppContext) -> None:
    siv_key(any_app)
    sealed = services.encrypt(any_app, "tokens", SECRET).envelope
    services.decrypt(any_app, sealed)  # cached now: the state change must still win
    services.rotate_key(any_app, "tokens")
    lifecycle.disable_version(any_app, "tokens", version=1)
    with pytest.raises(DecryptionError) as caught:
        services.decrypt(any_app, sealed)
    assert caught.value.code == "key_disabled"
    lifecycle.enable_version(any_app, "tokens", version=1)
    assert services.decrypt(any_app, sealed).plaintext == SECRET
    lifecycle.destroy_version(any_app, "tokens", version=1)
    with pytest.raises(DecryptionError) as caught:
        services.decrypt(any_app, sealed)
    assert caught.value.code == "key_destroyed"


def test_a_usage_limit_rotates_a_deterministic_key(sqlite_app: AppContext) -> None:
    siv_key(sqlite_app)
    lifecycle.set_policy(sqlite_app, "tokens", usage_limit=3)
    versions = [services.encrypt(sqlite_app, "tokens", SECRET).version for _ in range(5)]
    assert versions == [1, 1, 1, 2, 2]
    usage = lifecycle.key_usage(sqlite_app, "tokens")
    assert sorted(usage.values())[-1] <= 3


def test_min_decryption_version_applies(memory_app: AppContext) -> None:
    siv_key(memory_app)
    old = services.encrypt(memory_app, "tokens", SECRET).envelope
    services.rotate_key(memory_app, "tokens")
    lifecycle.set_policy(memory_app, "tokens", min_decryption_version=2)
    with pytest.raises(DecryptionError) as caught:
        services.decrypt(memory_app, old)
    assert caught.value.code == "below_min_decryption_version"


def test_identity_realms_are_enforced(sqlite_app: AppContext) -> None:
    """On a store with realms, an unknown realm is refused before anything is sealed."""
    ids.create_realm(sqlite_app, "tenant-b")
    siv_key(sqlite_app, realm="tenant-b")
    sealed = services.encrypt(sqlite_app, "tokens", SECRET, realm="tenant-b").envelope
    with pytest.raises(NotFoundError):
        services.decrypt(sqlite_app, sealed)


def test_file_encryption_refuses_a_deterministic_key_before_writing(
    memory_app: AppContext,
) -> None:
    import io

    from qimem.services import files

    siv_key(memory_app)
    out = io.BytesIO()
    with pytest.raises(ValidationError, match="need an encrypt key") as caught:
        files.encrypt_stream(memory_app, io.BytesIO(b"a file"), out, "tokens")
    assert caught.value.code == "wrong_purpose"
    assert out.getvalue() == b""


# --------------------------------------------------------------------------- datakey


def test_datakey_aad_is_bound(any_app: AppContext) -> None:
    services.create_key(any_app, name="kek")
    made = services.datakey(any_app, "kek", aad=b"bucket/object-1")
    assert made.plaintext_key is not None and len(made.plaintext_key) == 32
    opened = services.decrypt(any_app, made.wrapped_key, aad=b"bucket/object-1")
    assert opened.plaintext == made.plaintext_key
    for wrong in (None, b"bucket/object-2"):
        with pytest.raises(DecryptionError):
            services.decrypt(any_app, made.wrapped_key, aad=wrong)
    with pytest.raises(ValidationError, match="aad must be bytes"):
        services.datakey(any_app, "kek", aad="text")  # type: ignore[arg-type]


def test_datakey_wrapped_only_never_returns_the_plaintext(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="kek")
    made = services.datakey(memory_app, "kek", wrapped_only=True, size=48)
    assert made.plaintext_key is None
    as_dict = made.to_dict()
    assert as_dict["plaintext_key"] is None and set(as_dict) == {
        "plaintext_key",
        "wrapped_key",
        "key_id",
        "version",
    }
    unwrapped = services.decrypt(memory_app, made.wrapped_key).plaintext
    assert len(unwrapped) == 48
    shown = repr(made) + str(as_dict)
    assert unwrapped.hex()[:16] not in shown and "wrapped_key=" not in repr(made)
    for bad in (1, "yes", None):
        with pytest.raises(ValidationError, match="wrapped_only"):
            services.datakey(memory_app, "kek", wrapped_only=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 15, 65, -1, True, 32.0])
def test_datakey_size_bounds(memory_app: AppContext, size: object) -> None:
    services.create_key(memory_app, name="kek")
    with pytest.raises(ValidationError, match="16..64"):
        services.datakey(memory_app, "kek", size=size)  # type: ignore[arg-type]


def test_datakey_with_aad_and_context_on_a_derived_key(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="tenants", derived=True)
    made = services.datakey(memory_app, "tenants", context=b"t1", aad=b"a", wrapped_only=True)
    assert made.plaintext_key is None
    assert (
        len(services.decrypt(memory_app, made.wrapped_key, context=b"t1", aad=b"a").plaintext) == 32
    )
    with pytest.raises(DecryptionError):
        services.decrypt(memory_app, made.wrapped_key, context=b"t2", aad=b"a")


# --------------------------------------------------------------------------- rewrap target


def test_rewrap_to_another_key(any_app: AppContext) -> None:
    source = services.create_key(any_app, name="old-kek")
    target = services.create_key(any_app, name="new-kek", algorithm="chacha20-poly1305")
    sealed = services.encrypt(any_app, "old-kek", SECRET, aad=b"r").envelope
    moved = services.rewrap(any_app, sealed, aad=b"r", target="new-kek")
    assert (moved.key_id, moved.version) == (target.key_id, 1)
    opened = services.decrypt(any_app, moved.envelope, aad=b"r")
    assert (opened.plaintext, opened.key_id) == (SECRET, target.key_id)
    # Without a target: the source's own lineage, as before.
    assert services.rewrap(any_app, sealed, aad=b"r").key_id == source.key_id


def test_rewrap_into_and_out_of_a_deterministic_key(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="aead")
    siv_key(memory_app)
    randomized = services.encrypt(memory_app, "aead", SECRET).envelope
    tokenized = services.rewrap(memory_app, randomized, target="tokens")
    assert tokenized.envelope == services.encrypt(memory_app, "tokens", SECRET).envelope
    back = services.rewrap(memory_app, tokenized.envelope, target="aead")
    assert services.decrypt(memory_app, back.envelope).plaintext == SECRET
    assert env.parse(back.envelope).nonce != b""


def test_rewrap_target_of_another_realm_is_not_found(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="kek")
    services.create_key(memory_app, name="theirs", realm="tenant-b")
    theirs_id = services.show_key(memory_app, "theirs", realm="tenant-b").versions[0].key_id
    sealed = services.encrypt(memory_app, "kek", SECRET).envelope
    for target in ("theirs", theirs_id, "no-such-key"):
        with pytest.raises(NotFoundError):
            services.rewrap(memory_app, sealed, target=target)
    assert lifecycle.key_usage(memory_app, "theirs", realm="tenant-b") == {theirs_id: 0}


def test_rewrap_target_of_another_purpose_is_refused(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="kek")
    signer = make_key(memory_app, "ed25519", "signer")
    make_key(memory_app, "hmac-sha512", "tags")
    sealed = services.encrypt(memory_app, "kek", SECRET).envelope
    for target in ("signer", "tags", signer.key_id):
        with pytest.raises(ValidationError) as caught:
            services.rewrap(memory_app, sealed, target=target)
        assert caught.value.code == "wrong_purpose"
    with pytest.raises(ValidationError, match="target must be"):
        services.rewrap(memory_app, sealed, target=42)  # type: ignore[arg-type]


def test_rewrap_with_a_target_still_needs_a_good_envelope(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="kek")
    services.create_key(memory_app, name="other")
    sealed = services.encrypt(memory_app, "kek", SECRET, aad=b"a").envelope
    with pytest.raises(DecryptionError):
        services.rewrap(memory_app, sealed, aad=b"b", target="other")
    with pytest.raises(DecryptionError):
        services.rewrap(memory_app, flip(sealed, len(sealed) - 1), aad=b"a", target="other")
    # An envelope of another realm cannot be moved into this one's key.
    services.create_key(memory_app, name="kek", realm="tenant-b")
    foreign = services.encrypt(memory_app, "kek", SECRET, realm="tenant-b").envelope
    with pytest.raises(NotFoundError):
        services.rewrap(memory_app, foreign, target="other")


# --------------------------------------------------------------------------- across stores


def test_tokens_survive_a_second_process_and_a_backup(tmp_path: Path, root_key_b64: str) -> None:
    """Lookups keep working for another process on the same store, and after a restore
    into another store: the tokens depend on the key version only."""
    url = f"sqlite:///{tmp_path}/a.db"
    first, second = make_app(url, root_key_b64), make_app(url, root_key_b64)
    restored = make_app("memory://", None)
    try:
        siv_key(first)
        token = services.encrypt(first, "tokens", SECRET, aad=b"c").envelope
        assert services.encrypt(second, "tokens", SECRET, aad=b"c").envelope == token
        sealed = backup.export_keys(first, ["tokens"], "correct horse", kdf=_FAST_KDF)
        backup.import_keys(restored, sealed, "correct horse")
        assert services.encrypt(restored, "tokens", SECRET, aad=b"c").envelope == token
        assert services.decrypt(restored, token, aad=b"c").plaintext == SECRET
    finally:
        for app in (first, second, restored):
            app.close()
