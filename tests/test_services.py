"""The service layer over every store (memory, SQLite, PostgreSQL): the functions the CLI and
the HTTP server both call."""

from __future__ import annotations

import base64
import uuid

import pytest

from qimem import services
from qimem.app import AppContext
from qimem.errors import (
    ConflictError,
    DecryptionError,
    KeyNotActiveError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedAlgorithmError,
    ValidationError,
)
from qimem.keys import KeyState
from qimem.services import identity as ids

SECRET = b"the quarterly numbers: 42"


# ----------------------------------------------------------------------- keys


def test_create_defaults(any_app: AppContext) -> None:
    key = services.create_key(any_app)
    assert key.version == 1
    assert key.state is KeyState.ACTIVE and key.active
    assert key.algorithm == "aes-256-gcm"
    assert key.realm == "master"
    assert key.name is None
    assert uuid.UUID(key.key_id) and uuid.UUID(key.lineage_id)
    assert key.key_id != key.lineage_id


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20-poly1305"])
def test_create_each_algorithm_round_trips(any_app: AppContext, algorithm: str) -> None:
    key = services.create_key(any_app, algorithm=algorithm, name=f"k-{algorithm}")
    assert key.algorithm == algorithm
    sealed = services.encrypt(any_app, key.key_id, SECRET)
    assert services.decrypt(any_app, sealed.envelope).plaintext == SECRET


def test_create_unknown_algorithm(any_app: AppContext) -> None:
    with pytest.raises(UnsupportedAlgorithmError, match="available: aes-256-gcm"):
        services.create_key(any_app, algorithm="des")
    assert services.list_keys(any_app) == []


def test_duplicate_name_is_conflict_per_realm(any_app: AppContext) -> None:
    services.create_key(any_app, name="payments")
    with pytest.raises(ConflictError, match="payments"):
        services.create_key(any_app, name="payments")
    ids.create_realm(any_app, "tenant-b")  # a store with identity takes keys only in its realms
    other = services.create_key(any_app, name="payments", realm="tenant-b")
    assert other.realm == "tenant-b"


@pytest.mark.parametrize(
    "name",
    [
        "0b9d6f1e-3c2a-4f7e-9a51-2d8c7e6b4a10",  # would be ambiguous with a key_id
        "",
        "1abc",
        "has space",
        "a/b",
        "x" * 129,
        "ünicode",
    ],
)
def test_invalid_names_refused(memory_app: AppContext, name: str) -> None:
    with pytest.raises(ValidationError) as info:
        services.create_key(memory_app, name=name)
    assert info.value.code == "invalid_name"
    assert services.list_keys(memory_app) == []


def test_valid_name_shapes(any_app: AppContext) -> None:
    for name in ("a", "Payments.v2", "team_a-key", "x" * 128):
        assert services.create_key(any_app, name=name).name == name


@pytest.mark.parametrize("realm", ["", "Master", "has space", "1realm", "r" * 64, "a/b"])
def test_invalid_realms_refused(memory_app: AppContext, realm: str) -> None:
    with pytest.raises(ValidationError) as info:
        services.create_key(memory_app, realm=realm)
    assert info.value.code == "invalid_realm"
    with pytest.raises(ValidationError):
        services.list_keys(memory_app, realm=realm)


def test_list_newest_version_per_lineage_and_realm(any_app: AppContext) -> None:
    a = services.create_key(any_app, name="alpha")
    b = services.create_key(any_app, name="beta")
    ids.create_realm(any_app, "elsewhere")
    services.create_key(any_app, name="gamma", realm="elsewhere")
    a2 = services.rotate_key(any_app, "alpha")
    listed = {k.name: k for k in services.list_keys(any_app)}
    assert set(listed) == {"alpha", "beta"}
    assert listed["alpha"].key_id == a2.key_id and listed["alpha"].version == 2
    assert listed["beta"].key_id == b.key_id
    assert a.key_id not in {k.key_id for k in listed.values()}
    assert [k.name for k in services.list_keys(any_app, realm="elsewhere")] == ["gamma"]
    assert services.list_keys(any_app, realm="empty") == []


def test_show_by_each_reference(any_app: AppContext) -> None:
    key = services.create_key(any_app, name="shown", algorithm="chacha20-poly1305")
    services.rotate_key(any_app, "shown")
    for ref in ("shown", key.lineage_id, key.key_id):
        details = services.show_key(any_app, ref)
        assert details.lineage_id == key.lineage_id
        assert details.name == "shown"
        assert details.algorithm == "chacha20-poly1305"
        assert [v.version for v in details.versions] == [1, 2]
        assert details.active is not None and details.active.version == 2
    as_dict = services.show_key(any_app, "shown").to_dict()
    assert as_dict["active_version"] == 2
    assert [v["state"] for v in as_dict["versions"]] == ["decrypt-only", "active"]


@pytest.mark.parametrize("ref", ["nobody", "5f0c3b2e-8d41-4e6a-b7c9-1a2b3c4d5e6f"])
def test_show_unknown(any_app: AppContext, ref: str) -> None:
    with pytest.raises(NotFoundError):
        services.show_key(any_app, ref)


@pytest.mark.parametrize("ref", ["", "x" * 129, None, 42])
def test_bad_references(memory_app: AppContext, ref: object) -> None:
    with pytest.raises(ValidationError):
        services.show_key(memory_app, ref)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        services.encrypt(memory_app, ref, SECRET)  # type: ignore[arg-type]


def test_other_realm_is_not_found(any_app: AppContext) -> None:
    key = services.create_key(any_app, name="mine")
    sealed = services.encrypt(any_app, "mine", SECRET)
    for ref in ("mine", key.key_id, key.lineage_id):
        with pytest.raises(NotFoundError):
            services.show_key(any_app, ref, realm="intruder")
        with pytest.raises(NotFoundError):
            services.encrypt(any_app, ref, SECRET, realm="intruder")
        with pytest.raises(NotFoundError):
            services.rotate_key(any_app, ref, realm="intruder")
    with pytest.raises(NotFoundError):
        services.decrypt(any_app, sealed.envelope, realm="intruder")


def test_rotate(any_app: AppContext) -> None:
    v1 = services.create_key(any_app, name="spin")
    v2 = services.rotate_key(any_app, v1.key_id)
    assert (v2.version, v2.lineage_id, v2.name, v2.algorithm) == (
        2,
        v1.lineage_id,
        "spin",
        v1.algorithm,
    )
    assert v2.active and v2.key_id != v1.key_id
    v3 = services.rotate_key(any_app, v1.lineage_id)
    v4 = services.rotate_key(any_app, "spin")
    assert (v3.version, v4.version) == (3, 4)

    with pytest.raises(KeyNotActiveError) as info:
        services.rotate_key(any_app, v2.key_id)
    assert v2.key_id in str(info.value) and v4.key_id in str(info.value)
    assert info.value.code == "key_not_active"
    assert isinstance(info.value, ConflictError)
    states = [v.state for v in services.show_key(any_app, "spin").versions]
    assert states == [KeyState.DECRYPT_ONLY] * 3 + [KeyState.ACTIVE]


# --------------------------------------------------------------------- crypto


def test_encrypt_decrypt_round_trip(any_app: AppContext) -> None:
    key = services.create_key(any_app, name="msg")
    sealed = services.encrypt(any_app, "msg", SECRET)
    assert (sealed.key_id, sealed.version) == (key.key_id, 1)
    assert SECRET not in sealed.envelope
    again = services.encrypt(any_app, "msg", SECRET)
    assert again.envelope != sealed.envelope  # fresh nonce each time
    opened = services.decrypt(any_app, sealed.envelope)
    assert (opened.plaintext, opened.key_id, opened.version) == (SECRET, key.key_id, 1)
    assert (
        services.decrypt(any_app, services.encrypt(any_app, "msg", b"").envelope).plaintext == b""
    )


def test_inputs_may_be_bytearray_or_memoryview(any_app: AppContext) -> None:
    services.create_key(any_app, name="buf")
    sealed = services.encrypt(any_app, "buf", bytearray(SECRET))
    assert services.decrypt(any_app, memoryview(sealed.envelope)).plaintext == SECRET


@pytest.mark.parametrize("value", ["text", 123, None])
def test_non_bytes_inputs(memory_app: AppContext, value: object) -> None:
    services.create_key(memory_app, name="typed")
    with pytest.raises(ValidationError, match="plaintext must be bytes"):
        services.encrypt(memory_app, "typed", value)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="envelope must be bytes"):
        services.decrypt(memory_app, value)  # type: ignore[arg-type]


def test_associated_data(any_app: AppContext) -> None:
    services.create_key(any_app, name="ctx")
    sealed = services.encrypt(any_app, "ctx", SECRET, aad=b"tenant=7")
    assert services.decrypt(any_app, sealed.envelope, aad=b"tenant=7").plaintext == SECRET
    for wrong in (None, b"", b"tenant=8"):
        with pytest.raises(DecryptionError):
            services.decrypt(any_app, sealed.envelope, aad=wrong)


def test_tampering_and_garbage(any_app: AppContext) -> None:
    services.create_key(any_app, name="t")
    envelope = services.encrypt(any_app, "t", SECRET).envelope
    for index in (len(envelope) - 1, len(envelope) - 20, len(envelope) // 2):
        flipped = bytearray(envelope)
        flipped[index] ^= 0x04
        with pytest.raises(DecryptionError) as info:
            services.decrypt(any_app, bytes(flipped))
        assert "quarterly" not in str(info.value)
    for garbage in (b"", b"\x00" * 80, envelope[:-1], envelope + b"\x00"):
        with pytest.raises(DecryptionError):
            services.decrypt(any_app, garbage)


def test_rotation_story(any_app: AppContext) -> None:
    v1 = services.create_key(any_app, name="story")
    old = services.encrypt(any_app, "story", SECRET, aad=b"a")
    v2 = services.rotate_key(any_app, "story")
    # Old ciphertext still decrypts, with the version that sealed it.
    opened = services.decrypt(any_app, old.envelope, aad=b"a")
    assert (opened.plaintext, opened.key_id, opened.version) == (SECRET, v1.key_id, 1)
    # Encrypting with the old key_id is refused, naming the active one.
    with pytest.raises(KeyNotActiveError) as info:
        services.encrypt(any_app, v1.key_id, SECRET)
    assert v2.key_id in str(info.value)
    # Name, lineage and the new key_id all encrypt with version 2.
    for ref in ("story", v1.lineage_id, v2.key_id):
        assert services.encrypt(any_app, ref, SECRET).version == 2


def test_rewrap_moves_to_the_active_version(any_app: AppContext) -> None:
    v1 = services.create_key(any_app, name="re")
    old = services.encrypt(any_app, "re", SECRET, aad=b"ctx")
    v2 = services.rotate_key(any_app, "re")
    rewrapped = services.rewrap(any_app, old.envelope, aad=b"ctx")
    assert (rewrapped.key_id, rewrapped.version) == (v2.key_id, 2)
    assert rewrapped.envelope != old.envelope
    opened = services.decrypt(any_app, rewrapped.envelope, aad=b"ctx")
    assert (opened.plaintext, opened.key_id) == (SECRET, v2.key_id)
    with pytest.raises(DecryptionError):
        services.decrypt(any_app, rewrapped.envelope)  # the aad is still bound
    with pytest.raises(DecryptionError):
        services.rewrap(any_app, old.envelope, aad=b"wrong")
    assert v1.key_id not in rewrapped.to_dict().values()


def test_datakey(any_app: AppContext) -> None:
    key = services.create_key(any_app, name="dk")
    data_key = services.datakey(any_app, "dk")
    assert len(data_key.plaintext_key) == 32
    assert (data_key.key_id, data_key.version) == (key.key_id, 1)
    assert data_key.plaintext_key not in data_key.wrapped_key
    assert services.decrypt(any_app, data_key.wrapped_key).plaintext == data_key.plaintext_key
    assert services.datakey(any_app, "dk").plaintext_key != data_key.plaintext_key
    assert len(services.datakey(any_app, "dk", size=16).plaintext_key) == 16
    for size in (0, 8, 65):
        with pytest.raises(ValidationError):
            services.datakey(any_app, "dk", size=size)
    as_dict = data_key.to_dict()
    assert base64.b64decode(as_dict["plaintext_key"]) == data_key.plaintext_key


def test_payload_limit(any_app: AppContext) -> None:
    import dataclasses

    from qimem.app import build

    services.create_key(any_app, name="small")
    small = build(
        dataclasses.replace(any_app.config, max_envelope_bytes=1000), backend=any_app.backend
    )
    assert services.encrypt(small, "small", b"x" * 1000).version == 1
    with pytest.raises(PayloadTooLargeError) as info:
        services.encrypt(small, "small", b"x" * 1001)
    assert info.value.http_status == 413
    assert "1000" in str(info.value)


# ----------------------------------------------------------------- key cache


def test_cache_never_encrypts_with_a_rotated_away_version(any_app: AppContext) -> None:
    assert any_app.cache.ttl > 0  # the cache is on
    v1 = services.create_key(any_app, name="cached")
    by_key_id = services.encrypt(any_app, v1.key_id, SECRET)  # cached under the key_id
    for ref in ("cached", v1.lineage_id):
        assert services.encrypt(any_app, ref, SECRET).version == 1  # cached under ref
    v2 = services.rotate_key(any_app, "cached")
    for ref in ("cached", v1.lineage_id):
        sealed = services.encrypt(any_app, ref, SECRET)
        assert (sealed.key_id, sealed.version) == (v2.key_id, 2)
    with pytest.raises(KeyNotActiveError):
        services.encrypt(any_app, v1.key_id, SECRET)
    # Decrypting with the old version still works after its cache entry was dropped.
    assert services.decrypt(any_app, by_key_id.envelope).version == 1
    v3 = services.rotate_key(any_app, v2.key_id)
    assert services.encrypt(any_app, "cached", SECRET).key_id == v3.key_id


# --------------------------------------------------------------------- reprs


def test_reprs_hide_secrets(any_app: AppContext) -> None:
    key = services.create_key(any_app, name="quiet")
    sealed = services.encrypt(any_app, "quiet", SECRET)
    opened = services.decrypt(any_app, sealed.envelope)
    data_key = services.datakey(any_app, "quiet")
    material = bytes(any_app.store.material(key.realm, key.key_id))
    texts = [
        repr(sealed),
        repr(opened),
        str(opened),
        repr(data_key),
        repr(key),
        repr(services.show_key(any_app, "quiet")),
        repr(any_app),
        repr(any_app.store),
        repr(any_app.config),
        repr(any_app.wrapper),
    ]
    texts += [repr(entry) for entry in any_app.cache.by_prefix.values()]
    joined = "\n".join(texts)
    assert "quarterly" not in joined
    assert repr(SECRET) not in joined
    for secret in (material, data_key.plaintext_key):
        assert secret.hex() not in joined
        assert repr(secret) not in joined
        assert base64.b64encode(secret).decode() not in joined
    if any_app.config.root_key_b64:
        assert any_app.config.root_key_b64 not in joined
    assert "key_id=" in repr(opened) and opened.key_id in repr(opened)
