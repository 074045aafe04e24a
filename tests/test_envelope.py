"""Envelope v1: known-answer vectors, the strict parser, and tamper detection end to end.

* The committed vectors (``tests/vectors/envelope_v1.json``, written by
  ``tests/make_vectors.py``) must be reproduced exactly, by :func:`qimem.envelope.seal` and
  by an independent re-implementation of docs/formats.md on bare ``cryptography``.
* The parser is strict: bad magic, unknown version, truncation at every length, trailing
  bytes, version 0 → :class:`EnvelopeFormatError` with a clear message; random bytes
  never raise anything else. An empty nonce is the deterministic layout: it parses, and
  only a key without a nonce opens it (tests/test_services_deterministic.py).
* Through the service layer on the memory and SQLite stores, every single-bit flip of an
  envelope is rejected with a qimem error, and associated data, rotation and realms behave.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimem import envelope
from qimem.app import AppContext
from qimem.errors import (
    DecryptionError,
    EnvelopeFormatError,
    NotFoundError,
    QimemError,
    UnsupportedAlgorithmError,
    ValidationError,
)
from qimem.registry import Registry, make_plugin_manager
from qimem.services import crypto as svc
from qimem.services import keys as key_svc

TESTS = Path(__file__).resolve().parent
VECTOR_FILE = TESTS / "vectors" / "envelope_v1.json"
ALGORITHMS = ("aes-256-gcm", "chacha20-poly1305")


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("qimem_make_vectors", TESTS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOCUMENT = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
VECTORS = [pytest.param(v, id=v["name"]) for v in DOCUMENT["vectors"]]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


def _inputs(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": bytes.fromhex(v["key"]),
        "key_id": v["key_id"],
        "key_version": v["key_version"],
        "nonce": bytes.fromhex(v["nonce"]),
        "plaintext": bytes.fromhex(v["plaintext"]),
        "aad": None if v["aad"] is None else bytes.fromhex(v["aad"]),
    }


# --------------------------------------------------------------------------- vectors


def test_vector_file_is_committed_and_current() -> None:
    """The committed JSON is exactly what make_vectors.py produces: no silent drift."""
    generator = _load_generator()
    assert VECTOR_FILE.read_text(encoding="utf-8") == generator.render(generator.build_vectors())


def test_vector_file_covers_both_algorithms_and_cases() -> None:
    vectors = DOCUMENT["vectors"]
    assert {v["algorithm"] for v in vectors} == set(ALGORITHMS)
    for name in ALGORITHMS:
        mine = [v for v in vectors if v["algorithm"] == name]
        assert any(v["plaintext"] == "" for v in mine), "an empty plaintext"
        assert any(v["aad"] is None for v in mine), "no caller aad"
        assert any(v["aad"] is not None for v in mine), "with caller aad"
        assert any(v["key_version"] == 0xFFFFFFFF for v in mine), "the largest version"
    assert len({v["envelope"] for v in vectors}) == len(vectors)


@pytest.mark.parametrize("v", VECTORS)
def test_vector_seal(registry: Registry, v: dict[str, Any]) -> None:
    algorithm = registry.algorithm(v["algorithm"])
    assert algorithm.algorithm_id == v["algorithm_id"]
    i = _inputs(v)
    sealed = envelope.seal(
        algorithm, i["key"], i["key_id"], i["key_version"], i["nonce"], i["plaintext"], i["aad"]
    )
    assert sealed.hex() == v["envelope"]


@pytest.mark.parametrize("v", VECTORS)
def test_vector_parse(v: dict[str, Any]) -> None:
    i = _inputs(v)
    blob = bytes.fromhex(v["envelope"])
    parsed = envelope.parse(blob)
    assert parsed.algorithm_id == v["algorithm_id"]
    assert parsed.key_id == bytes.fromhex(v["key_id_hex"])
    assert parsed.key_id_str == v["key_id"]
    assert parsed.key_version == v["key_version"]
    assert parsed.nonce == i["nonce"]
    assert parsed.ciphertext.hex() == v["ciphertext"]
    assert parsed.header.hex() == v["header"]
    assert len(parsed.ciphertext) == len(i["plaintext"]) + 16
    assert parsed.header + parsed.ciphertext == blob
    assert envelope.associated_data(parsed.header, i["aad"]).hex() == v["associated_data"]


@pytest.mark.parametrize("v", VECTORS)
def test_vector_decrypts_with_header_as_aad(registry: Registry, v: dict[str, Any]) -> None:
    algorithm = registry.algorithm(v["algorithm"])
    i = _inputs(v)
    parsed = envelope.parse(bytes.fromhex(v["envelope"]))
    ad = envelope.associated_data(parsed.header, i["aad"])
    assert algorithm.decrypt(i["key"], parsed.nonce, parsed.ciphertext, ad) == i["plaintext"]
    # The header alone (caller aad dropped) or a wrong caller aad does not verify.
    wrong = [b"x"] if i["aad"] is None else [None, i["aad"] + b"x"]
    for aad in wrong:
        with pytest.raises(DecryptionError):
            algorithm.decrypt(
                i["key"],
                parsed.nonce,
                parsed.ciphertext,
                envelope.associated_data(parsed.header, aad),
            )


def _independent_seal(v: dict[str, Any]) -> bytes:
    """docs/formats.md re-implemented on bare cryptography + struct, not qimem code."""
    i = _inputs(v)
    aead = {1: AESGCM, 2: ChaCha20Poly1305}[v["algorithm_id"]](i["key"])
    head = (
        b"QMEV"
        + bytes([1, v["algorithm_id"]])
        + uuid.UUID(i["key_id"]).bytes
        + struct.pack(">I", i["key_version"])
        + bytes([len(i["nonce"])])
        + i["nonce"]
        + struct.pack(">I", len(i["plaintext"]) + 16)
    )
    return head + aead.encrypt(i["nonce"], i["plaintext"], head + (i["aad"] or b""))


@pytest.mark.parametrize("v", VECTORS)
def test_vector_matches_independent_implementation(v: dict[str, Any]) -> None:
    assert _independent_seal(v).hex() == v["envelope"]


def test_header_byte_offsets() -> None:
    """The layout table of docs/formats.md, checked field by field on one vector."""
    v = next(v for v in DOCUMENT["vectors"] if v["name"] == "aes-256-gcm-text-aad")
    blob = bytes.fromhex(v["envelope"])
    assert blob[0:4] == b"QMEV"
    assert blob[4] == 1
    assert blob[5] == 1
    assert blob[6:22] == uuid.UUID(v["key_id"]).bytes
    assert blob[22:26] == (7).to_bytes(4, "big")
    assert blob[26] == 12
    assert blob[27:39].hex() == v["nonce"]
    assert int.from_bytes(blob[39:43], "big") == len(blob) - 43
    assert len(bytes.fromhex(v["header"])) == 43


# --------------------------------------------------------------------------- strict parser

SAMPLE = bytes.fromhex(DOCUMENT["vectors"][2]["envelope"])  # with plaintext and aad


def _with(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value) :]


@pytest.mark.parametrize("magic", [b"QMEW", b"qmev", b"\x00\x00\x00\x00", b"QMSV", b"PK\x03\x04"])
def test_bad_magic(magic: bytes) -> None:
    with pytest.raises(EnvelopeFormatError, match="not a qimem envelope"):
        envelope.parse(_with(SAMPLE, 0, magic))


def test_bad_magic_in_short_input() -> None:
    for blob in (b"X", b"QX", b"QMX", b'{"a": 1}', b"hello world"):
        with pytest.raises(EnvelopeFormatError, match="bad magic"):
            envelope.parse(blob)


@pytest.mark.parametrize("version", [0, 2, 3, 0x7F, 0xFF])
def test_unknown_format_version(version: int) -> None:
    with pytest.raises(EnvelopeFormatError, match=f"unsupported envelope version {version}"):
        envelope.parse(_with(SAMPLE, 4, bytes([version])))


@pytest.mark.parametrize("v", VECTORS)
def test_truncation_at_every_length(v: dict[str, Any]) -> None:
    blob = bytes.fromhex(v["envelope"])
    for length in range(len(blob)):
        with pytest.raises(EnvelopeFormatError, match="truncated") as info:
            envelope.parse(blob[:length])
        assert info.value.code == "invalid_envelope", length


@pytest.mark.parametrize("extra", [b"\x00", b"\xff", b"QMEV", bytes(1000)])
def test_trailing_bytes(extra: bytes) -> None:
    with pytest.raises(EnvelopeFormatError, match="trailing bytes"):
        envelope.parse(SAMPLE + extra)


def test_two_envelopes_concatenated_are_rejected() -> None:
    with pytest.raises(EnvelopeFormatError, match="trailing bytes"):
        envelope.parse(SAMPLE + SAMPLE)


def test_zero_key_version() -> None:
    with pytest.raises(EnvelopeFormatError, match="key version 0"):
        envelope.parse(_with(SAMPLE, 22, bytes(4)))


def test_empty_nonce_is_the_deterministic_layout() -> None:
    # Nonce length 0, then a consistent length field and ciphertext: it parses (a
    # deterministic envelope); an AEAD key refuses it (test_services_deterministic.py).
    blob = SAMPLE[:26] + b"\x00" + struct.pack(">I", 16) + bytes(16)
    parsed = envelope.parse(blob)
    assert parsed.nonce == b"" and parsed.ciphertext == bytes(16) and len(parsed.header) == 31
    with pytest.raises(EnvelopeFormatError, match="truncated"):
        envelope.parse(blob[:-1])


def test_length_field_disagreeing_with_size() -> None:
    length = int.from_bytes(SAMPLE[39:43], "big")
    with pytest.raises(EnvelopeFormatError, match="truncated"):
        envelope.parse(_with(SAMPLE, 39, struct.pack(">I", length + 1)))
    with pytest.raises(EnvelopeFormatError, match="trailing bytes"):
        envelope.parse(_with(SAMPLE, 39, struct.pack(">I", length - 1)))
    with pytest.raises(EnvelopeFormatError, match="truncated"):
        envelope.parse(_with(SAMPLE, 39, b"\xff\xff\xff\xff"))


@pytest.mark.parametrize("value", ["QMEV", None, 42, ["QMEV"]])
def test_non_bytes_input(value: Any) -> None:
    with pytest.raises(EnvelopeFormatError, match="must be bytes"):
        envelope.parse(value)


def test_bytearray_and_memoryview_accepted() -> None:
    assert envelope.parse(bytearray(SAMPLE)) == envelope.parse(SAMPLE)
    assert envelope.parse(memoryview(SAMPLE)) == envelope.parse(SAMPLE)


@pytest.mark.parametrize("nonce_size", [8, 11, 13, 16, 24])
def test_wrong_nonce_length(registry: Registry, nonce_size: int) -> None:
    """A well-formed envelope whose nonce is not the algorithm's size: the parser is
    algorithm-agnostic and reads it, the algorithm refuses it, seal never writes it."""
    algorithm = registry.algorithm("aes-256-gcm")
    key = bytes(32)
    head = envelope.header(
        envelope.header_prefix(1, uuid.UUID(int=1).bytes, 1, nonce_size), bytes(nonce_size), 16
    )
    parsed = envelope.parse(head + bytes(16))
    assert len(parsed.nonce) == nonce_size
    with pytest.raises(ValidationError, match="12-byte nonce"):
        algorithm.decrypt(key, parsed.nonce, parsed.ciphertext, parsed.header)
    with pytest.raises(ValueError, match="nonce size"):
        envelope.seal(algorithm, key, str(uuid.UUID(int=1)), 1, bytes(nonce_size), b"x")


def test_seal_refuses_bad_header_fields(registry: Registry) -> None:
    algorithm = registry.algorithm("chacha20-poly1305")
    key, nonce, key_id = bytes(32), bytes(12), str(uuid.UUID(int=5))
    for version in (0, -1, 2**32, True, 1.0):
        with pytest.raises(ValueError, match="key version"):
            envelope.seal(algorithm, key, key_id, version, nonce, b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        envelope.header_prefix(2, b"short", 1, 12)
    with pytest.raises(ValueError):
        envelope.seal(algorithm, key, "not-a-uuid", 1, nonce, b"x")


def test_empty_caller_aad_equals_none(registry: Registry) -> None:
    algorithm = registry.algorithm("aes-256-gcm")
    args = (algorithm, bytes(32), str(uuid.UUID(int=9)), 3, bytes(12), b"same")
    assert envelope.seal(*args, aad=None) == envelope.seal(*args, aad=b"")


# --------------------------------------------------------------------------- properties

_RANDOM = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_parse(blob: bytes) -> None:
    try:
        parsed = envelope.parse(blob)
    except EnvelopeFormatError as exc:
        assert str(exc)
        return
    # Accepted: exactly one encoding, so re-encoding the fields gives the same bytes.
    prefix = envelope.header_prefix(
        parsed.algorithm_id, parsed.key_id, parsed.key_version, len(parsed.nonce)
    )
    rebuilt = envelope.header(prefix, parsed.nonce, len(parsed.ciphertext)) + parsed.ciphertext
    assert rebuilt == blob


@_RANDOM
@given(st.binary(max_size=200))
def test_parse_random_bytes_only_raises_format_errors(blob: bytes) -> None:
    _check_parse(blob)


@_RANDOM
@given(
    version=st.sampled_from([1, 1, 1, 0, 2]),
    algorithm_id=st.integers(0, 255),
    key_version=st.sampled_from([0, 1, 2, 0xFFFFFFFF]),
    nonce_size=st.integers(0, 40),
    length=st.integers(0, 80),
    tail=st.binary(max_size=160),
    data=st.data(),
)
def test_parse_near_valid_headers(
    version: int,
    algorithm_id: int,
    key_version: int,
    nonce_size: int,
    length: int,
    tail: bytes,
    data: st.DataObject,
) -> None:
    """Inputs with a real magic, so the checks past the magic are reached often."""
    key_id = data.draw(st.binary(min_size=16, max_size=16))
    nonce = data.draw(st.binary(min_size=nonce_size, max_size=nonce_size))
    blob = (
        struct.pack(">4sBB16sIB", b"QMEV", version, algorithm_id, key_id, key_version, nonce_size)
        + nonce
        + struct.pack(">I", length)
        + tail
    )
    cut = data.draw(st.integers(0, len(blob)))
    _check_parse(blob[:cut])


@_RANDOM
@given(
    name=st.sampled_from(ALGORITHMS),
    key=st.binary(min_size=32, max_size=32),
    key_id=st.uuids(),
    key_version=st.integers(1, 0xFFFFFFFF),
    nonce=st.binary(min_size=12, max_size=12),
    plaintext=st.binary(max_size=300),
    aad=st.none() | st.binary(max_size=64),
)
def test_seal_parse_roundtrip(
    registry: Registry,
    name: str,
    key: bytes,
    key_id: uuid.UUID,
    key_version: int,
    nonce: bytes,
    plaintext: bytes,
    aad: bytes | None,
) -> None:
    algorithm = registry.algorithm(name)
    blob = envelope.seal(algorithm, key, str(key_id), key_version, nonce, plaintext, aad)
    parsed = envelope.parse(blob)
    assert parsed.algorithm_id == algorithm.algorithm_id
    assert parsed.key_id == key_id.bytes
    assert parsed.key_id_str == str(key_id)
    assert parsed.key_version == key_version
    assert parsed.nonce == nonce
    assert len(parsed.header) == envelope.PREFIX_SIZE + 12 + 4
    assert parsed.header + parsed.ciphertext == blob
    ad = envelope.associated_data(parsed.header, aad)
    assert algorithm.decrypt(key, parsed.nonce, parsed.ciphertext, ad) == plaintext


# --------------------------------------------------------------------------- service layer

REJECTIONS = (DecryptionError, EnvelopeFormatError, NotFoundError, UnsupportedAlgorithmError)


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest) -> Iterator[AppContext]:
    yield request.getfixturevalue(f"{request.param}_app")


def _flip(blob: bytes, bit: int) -> bytes:
    changed = bytearray(blob)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_bit_flip_is_rejected(app: AppContext, algorithm: str) -> None:
    key = key_svc.create_key(app, algorithm=algorithm)
    plaintext = b"sixteen byte msg"
    for aad in (None, b"context: unit test"):
        sealed = svc.encrypt(app, key.key_id, plaintext, aad=aad).envelope
        assert len(sealed) == 43 + len(plaintext) + 16
        outcomes: dict[str, int] = {}
        for bit in range(len(sealed) * 8):
            try:
                svc.decrypt(app, _flip(sealed, bit), aad=aad)
            except REJECTIONS as exc:
                assert isinstance(exc, QimemError)
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                continue
            except Exception as exc:  # pragma: no cover - a failure path
                pytest.fail(f"bit {bit}: unexpected {type(exc).__name__}: {exc}")
            pytest.fail(f"bit {bit} (byte {bit // 8}) flipped and the envelope still decrypted")
        assert sum(outcomes.values()) == len(sealed) * 8
        # Each kind of field produces its own error: format, missing key, integrity.
        assert {"EnvelopeFormatError", "NotFoundError", "DecryptionError"} <= set(outcomes)
        # The untouched envelope still opens (so the rejections were not for another reason).
        assert svc.decrypt(app, sealed, aad=aad).plaintext == plaintext


def test_associated_data_must_match(app: AppContext) -> None:
    key = key_svc.create_key(app, algorithm="chacha20-poly1305")
    sealed = svc.encrypt(app, key.key_id, b"payload", aad=b"tenant=a").envelope
    assert svc.decrypt(app, sealed, aad=b"tenant=a").plaintext == b"payload"
    for aad in (None, b"", b"tenant=b", b"tenant=a ", b"tenant="):
        with pytest.raises(DecryptionError) as info:
            svc.decrypt(app, sealed, aad=aad)
        assert type(info.value) is DecryptionError
        assert "payload" not in str(info.value)
    # Sealed without aad: supplying one is as wrong as omitting one.
    plain = svc.encrypt(app, key.key_id, b"payload").envelope
    assert svc.decrypt(app, plain, aad=b"").plaintext == b"payload"
    with pytest.raises(DecryptionError):
        svc.decrypt(app, plain, aad=b"tenant=a")


def test_swapped_header_fields_are_detected(app: AppContext) -> None:
    """Two versions of one lineage: relabelling an envelope with the other key id fails."""
    first = key_svc.create_key(app)
    old = svc.encrypt(app, first.key_id, b"old").envelope
    second = key_svc.rotate_key(app, first.key_id)
    relabelled = _with(old, 6, uuid.UUID(second.key_id).bytes)
    with pytest.raises(DecryptionError):
        svc.decrypt(app, relabelled)
    relabelled = _with(relabelled, 22, struct.pack(">I", second.version))
    with pytest.raises(DecryptionError):  # the header is authenticated, not just checked
        svc.decrypt(app, relabelled)


def test_envelope_decrypts_after_rotation(app: AppContext) -> None:
    key = key_svc.create_key(app, name="rotating")
    sealed_v1 = svc.encrypt(app, "rotating", b"first", aad=b"ctx").envelope
    v2 = key_svc.rotate_key(app, "rotating")
    sealed_v2 = svc.encrypt(app, "rotating", b"second").envelope
    key_svc.rotate_key(app, v2.key_id)
    opened = svc.decrypt(app, sealed_v1, aad=b"ctx")
    assert (opened.plaintext, opened.key_id, opened.version) == (b"first", key.key_id, 1)
    opened = svc.decrypt(app, sealed_v2)
    assert (opened.plaintext, opened.key_id, opened.version) == (b"second", v2.key_id, 2)
    assert envelope.parse(sealed_v2).key_version == 2


def test_envelope_of_another_realm_is_not_found(app: AppContext) -> None:
    from qimem.services import identity as ids

    ids.create_realm(app, "tenant-a")  # a store with identity takes keys only in its realms
    key = key_svc.create_key(app, realm="tenant-a")
    sealed = svc.encrypt(app, key.key_id, b"secret of a", realm="tenant-a").envelope
    with pytest.raises(NotFoundError, match="does not exist") as info:
        svc.decrypt(app, sealed, realm="tenant-b")
    assert "secret of a" not in str(info.value)
    with pytest.raises(NotFoundError):
        svc.decrypt(app, sealed)  # the default realm is another realm too
    assert svc.decrypt(app, sealed, realm="tenant-a").plaintext == b"secret of a"


def test_service_envelope_has_the_documented_layout(app: AppContext) -> None:
    """What the service writes is exactly envelope.seal with the same nonce."""
    for name in ALGORITHMS:
        key = key_svc.create_key(app, algorithm=name)
        for aad in (None, b"ctx"):
            sealed = svc.encrypt(app, key.key_id, b"layout check", aad=aad).envelope
            parsed = envelope.parse(sealed)
            material = app.store.material(key.realm, key.key_id)
            algorithm = app.registry.algorithm(name)
            expected = envelope.seal(
                algorithm, material, key.key_id, 1, parsed.nonce, b"layout check", aad
            )
            assert sealed == expected


def test_service_rejects_format_errors_with_the_parser_message(app: AppContext) -> None:
    key = key_svc.create_key(app)
    sealed = svc.encrypt(app, key.key_id, b"x").envelope
    cases = {
        b"": "truncated",
        sealed[:-1]: "truncated",
        sealed + b"\x00": "trailing bytes",
        _with(sealed, 0, b"XXXX"): "bad magic",
        _with(sealed, 4, b"\x02"): "unsupported envelope version 2",
        _with(sealed, 22, bytes(4)): "key version 0",
    }
    for blob, message in cases.items():
        with pytest.raises(EnvelopeFormatError, match=message) as info:
            svc.decrypt(app, blob)
        assert info.value.http_status == 422 and info.value.code == "invalid_envelope"


def test_service_rejects_wrong_nonce_length(app: AppContext) -> None:
    """Well-formed bytes whose nonce length differs from the key's algorithm."""
    key = key_svc.create_key(app)
    sealed = svc.encrypt(app, key.key_id, b"x").envelope
    parsed = envelope.parse(sealed)
    for size in (8, 16):
        prefix = envelope.header_prefix(
            parsed.algorithm_id, parsed.key_id, parsed.key_version, size
        )
        blob = envelope.header(prefix, bytes(size), len(parsed.ciphertext)) + parsed.ciphertext
        with pytest.raises(DecryptionError):
            svc.decrypt(app, blob)


def test_service_rejects_non_bytes(app: AppContext) -> None:
    with pytest.raises(ValidationError, match="must be bytes"):
        svc.decrypt(app, "QMEV...")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- docs

DOCS = TESTS.parent / "docs" / "formats.md"


def _envelope_docs() -> str:
    text = DOCS.read_text(encoding="utf-8")
    start = text.index("## Envelope v1")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_docs_worked_vector_is_a_committed_vector() -> None:
    section = _envelope_docs()
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    hex_blocks = [
        "".join(body.split())
        for lang, body in blocks
        if not lang and re.fullmatch(r"[0-9a-f\s]+", body)
    ]
    v = next(v for v in DOCUMENT["vectors"] if v["name"] == "aes-256-gcm-text-aad")
    assert v["envelope"] in hex_blocks
    assert v["ciphertext"] in hex_blocks
    assert v["associated_data"] in hex_blocks
    for field in ("key", "nonce", "key_id", "key_id_hex"):
        assert f"`{v[field]}`" in section or f"bytes `{v[field]}`" in section, field
    assert base64.b64encode(bytes.fromhex(v["envelope"])).decode() in section


def test_docs_python_snippet_runs() -> None:
    section = _envelope_docs()
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/formats.md", "exec"), namespace)
    v = next(v for v in DOCUMENT["vectors"] if v["name"] == "aes-256-gcm-text-aad")
    assert namespace["envelope"].hex() == v["envelope"]


def test_docs_list_every_parser_message() -> None:
    section = _envelope_docs()
    blobs = [
        "not bytes",
        b"XXXX" + SAMPLE[4:],
        SAMPLE[:10],
        _with(SAMPLE, 4, b"\x02"),
        _with(SAMPLE, 22, bytes(4)),
        SAMPLE + b"\x00",
    ]
    for blob in blobs:
        with pytest.raises(EnvelopeFormatError) as info:
            envelope.parse(blob)  # type: ignore[arg-type]
        documented = re.sub(r"^(unsupported envelope version) \d+$", r"\1 N", str(info.value))
        assert f"`{documented}`" in section, documented
