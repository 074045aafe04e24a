"""MAC keys through the service layer (issue 16), attacker first: tags of other keys and
realms, forged headers, tampered, truncated and oversized tags, rotated and disabled
versions, wrong purposes. The key never leaves the store, so the third-party check is that
a raw tag is exactly the bytes after a qimem tag's header, and the same for equal data."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator

import pytest
from conftest import make_app

from qimem import services
from qimem.app import AppContext
from qimem.errors import ConflictError, KeyNotActiveError, ValidationError
from qimem.services import lifecycle, macs, signing

DATA = b'{"event": "paid", "amount": 100}'


@pytest.fixture
def app() -> Iterator[AppContext]:
    app = make_app("memory://", None)
    yield app
    app.close()


@pytest.mark.parametrize(
    ("algorithm", "size", "algorithm_id"), [("hmac-sha256", 32, 32), ("hmac-sha512", 64, 33)]
)
def test_every_mac_algorithm_round_trips(
    app: AppContext, algorithm: str, size: int, algorithm_id: int
) -> None:
    key = services.create_key(app, algorithm=algorithm, name="m")
    tag = macs.mac(app, "m", DATA)
    assert (tag.algorithm, tag.version, tag.key_id) == (algorithm, 1, key.key_id)
    magic, fmt, ident, raw_id, version = struct.unpack(">4sBB16sI", tag.tag[:26])
    assert (magic, fmt, ident, version) == (b"QMTG", 1, algorithm_id, 1)
    assert uuid.UUID(bytes=raw_id) == uuid.UUID(key.key_id) and len(tag.tag) == 26 + size
    raw = macs.mac(app, "m", DATA, raw=True).tag
    assert raw == tag.tag[26:]  # deterministic: the same data gives the same tag
    result = macs.verify_mac(app, "m", DATA, tag.tag)
    assert (result.valid, result.key_id, result.version) == (True, key.key_id, 1)
    assert macs.verify_mac(app, "m", DATA, raw, raw=True).valid
    assert not macs.verify_mac(app, "m", DATA + b" ", tag.tag).valid
    assert tag.to_dict()["tag"] and "tag" not in repr(tag).replace("MacResult", "")


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x80]) + data[index + 1 :]


def test_tampered_truncated_oversized_and_garbage_tags_are_invalid(app: AppContext) -> None:
    services.create_key(app, algorithm="hmac-sha256", name="m")
    tag = macs.mac(app, "m", DATA).tag
    raw = tag[26:]
    forms = [_flip(tag, i) for i in range(len(tag))] + [tag[:n] for n in range(len(tag))]
    forms += [tag + b"\x00", tag + tag, b"\x00" * 58, b"QMTG" + b"\xff" * 54]
    for form in forms:
        result = macs.verify_mac(app, "m", DATA, form)
        assert (result.valid, result.key_id, result.version) == (False, None, None), form
    for form in [raw[:16], raw[:31], raw + b"\x00", _flip(raw, 0), b""]:  # no truncation
        assert not macs.verify_mac(app, "m", DATA, form, raw=True).valid


def test_tags_of_other_keys_realms_and_signatures_are_invalid(app: AppContext) -> None:
    services.create_key(app, algorithm="hmac-sha256", name="a")
    services.create_key(app, algorithm="hmac-sha256", name="b")
    services.create_key(app, algorithm="hmac-sha256", name="a", realm="tenant")
    services.create_key(app, algorithm="ed25519", name="s")
    by_b = macs.mac(app, "b", DATA).tag
    by_a_elsewhere = macs.mac(app, "a", DATA, realm="tenant").tag
    mine = macs.mac(app, "a", DATA).tag
    forged = mine[:26] + by_b[26:]  # b's tag under a's header: checked with a's key
    signature = signing.sign(app, "s", DATA).signature
    for form in (by_b, by_a_elsewhere, forged, signature, b"QMTG" + signature[4:]):
        assert not macs.verify_mac(app, "a", DATA, form).valid
    assert not macs.verify_mac(app, "a", DATA, by_b[26:], raw=True).valid
    assert macs.verify_mac(app, "a", DATA, mine).valid


def test_rotation_states_and_key_id_references(app: AppContext) -> None:
    services.create_key(app, algorithm="hmac-sha512", name="m")
    old = macs.mac(app, "m", DATA)
    services.rotate_key(app, "m")
    new = macs.mac(app, "m", DATA)
    assert new.version == 2 and new.tag[26:] != old.tag[26:]
    assert macs.verify_mac(app, "m", DATA, old.tag).version == 1
    assert not macs.verify_mac(app, "m", DATA, old.tag[26:], raw=True).valid
    assert macs.verify_mac(app, "m", DATA, old.tag[26:], raw=True, version=1).valid
    assert not macs.verify_mac(app, new.key_id, DATA, old.tag).valid
    with pytest.raises(KeyNotActiveError):
        macs.mac(app, old.key_id, DATA)
    lifecycle.disable_version(app, "m", version=1)
    with pytest.raises(ConflictError) as disabled:
        macs.verify_mac(app, "m", DATA, old.tag)
    assert disabled.value.code == "key_disabled"
    lifecycle.destroy_version(app, "m", version=1)
    with pytest.raises(ConflictError) as destroyed:
        macs.verify_mac(app, "m", DATA, old.tag[26:], raw=True, version=1)
    assert destroyed.value.code == "key_destroyed"
    assert macs.verify_mac(app, "m", DATA, new.tag).valid


def test_wrong_purpose_keys_are_refused(app: AppContext) -> None:
    services.create_key(app, name="aead")
    services.create_key(app, algorithm="ed25519", name="s")
    services.create_key(app, algorithm="hmac-sha256", name="m")
    tag = macs.mac(app, "m", DATA).tag
    for ref in ("aead", "s"):
        for call in (
            lambda ref=ref: macs.mac(app, ref, DATA),
            lambda ref=ref: macs.verify_mac(app, ref, DATA, tag),
            lambda ref=ref: macs.verify_mac(app, ref, DATA, tag[26:], raw=True),
        ):
            with pytest.raises(ValidationError) as wrong:
                call()
            assert wrong.value.code == "wrong_purpose"
    for call in (
        lambda: services.encrypt(app, "m", b"x"),
        lambda: services.datakey(app, "m"),
        lambda: signing.public_key(app, "m"),
    ):
        with pytest.raises(ValidationError) as wrong:
            call()
        assert wrong.value.code == "wrong_purpose"
    with pytest.raises(ValidationError):
        macs.verify_mac(app, "m", DATA, tag, version=1)  # a qimem tag names its version
    with pytest.raises(ValidationError):
        macs.verify_mac(app, "m", "not bytes", tag)  # type: ignore[arg-type]
