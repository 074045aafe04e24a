"""Stream format v1 (qimem.stream): round trips, tamper detection, strict parsing, vectors.

Small segment sizes (64 bytes) make multi-segment streams tiny, so every boundary and every
header byte can be tried exhaustively.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import struct
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qimem import stream
from qimem.errors import DecryptionError, EnvelopeFormatError, ValidationError
from qimem.registry import Registry, make_plugin_manager

VECTORS = Path(__file__).resolve().parent / "vectors" / "stream_v1.json"
SEG = 64
TAG = 16
KEY_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


@pytest.fixture(params=["aes-256-gcm", "chacha20-poly1305"])
def keyring(request: pytest.FixtureRequest, registry: Registry) -> stream.RawKeyring:
    algorithm = registry.algorithm(request.param)
    return stream.RawKeyring(algorithm, os.urandom(32), KEY_ID, 1)


def seal(keyring: stream.Keyring, data: bytes, aad: bytes | None = None, seg: int = SEG) -> bytes:
    out = io.BytesIO()
    info = stream.encrypt_stream(io.BytesIO(data), out, keyring, aad=aad, segment_size=seg)
    assert info.plaintext_bytes == len(data)
    assert info.ciphertext_bytes == len(out.getvalue())
    return out.getvalue()


def unseal(keyring: stream.Keyring, blob: bytes, aad: bytes | None = None) -> bytes:
    out = io.BytesIO()
    info = stream.decrypt_stream(io.BytesIO(blob), out, keyring, aad=aad)
    assert info.plaintext_bytes == len(out.getvalue())
    return out.getvalue()


def rejects(keyring: stream.Keyring, blob: bytes, aad: bytes | None = None) -> None:
    """The stream is refused with an integrity error (exit code 7 class)."""
    with pytest.raises(DecryptionError):
        unseal(keyring, blob, aad)


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    header = stream.parse_header(blob)
    body = blob[header.size :]
    full = header.segment_size + TAG
    return blob[: header.size], [body[i : i + full] for i in range(0, len(body), full)]


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG, 3 * SEG + 17, 10 * SEG]
)
def test_round_trip_sizes(keyring: stream.RawKeyring, size: int) -> None:
    data = os.urandom(size)
    blob = seal(keyring, data)
    header, segments = split(blob)
    assert len(segments) == max(1, -(-size // SEG))
    assert len(blob) == len(header) + stream.ciphertext_size(size, SEG, TAG)
    assert unseal(keyring, blob) == data
    if size >= 16:
        assert data not in blob


def test_each_stream_has_its_own_data_key_and_prefix(keyring: stream.RawKeyring) -> None:
    a, b = seal(keyring, b"same"), seal(keyring, b"same")
    assert a != b
    assert stream.parse_header(a).nonce_prefix != stream.parse_header(b).nonce_prefix


def test_reads_from_pipes_with_short_reads(keyring: stream.RawKeyring) -> None:
    """Sources that return fewer bytes than asked (pipes) still give full segments."""

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
            n = min(len(buf), 7, len(self.data))
            buf[:n] = self.data[:n]
            self.data = self.data[n:]
            return n

    data = os.urandom(5 * SEG + 3)
    out = io.BytesIO()
    stream.encrypt_stream(Trickle(data), out, keyring, segment_size=SEG)  # type: ignore[arg-type]
    back = io.BytesIO()
    stream.decrypt_stream(Trickle(out.getvalue()), back, keyring)  # type: ignore[arg-type]
    assert back.getvalue() == data


def test_aad_is_bound(keyring: stream.RawKeyring) -> None:
    blob = seal(keyring, b"payload", aad=b"tenant=a")
    assert unseal(keyring, blob, aad=b"tenant=a") == b"payload"
    rejects(keyring, blob, aad=b"tenant=b")
    rejects(keyring, blob)
    rejects(keyring, seal(keyring, b"payload"), aad=b"tenant=a")


# ------------------------------------------------------------------------ segment attacks


@pytest.fixture
def multi(keyring: stream.RawKeyring) -> tuple[stream.RawKeyring, bytes, bytes]:
    data = os.urandom(4 * SEG + 10)  # 5 segments, the last one short
    return keyring, data, seal(keyring, data)


def test_truncation_at_every_segment_boundary_is_rejected(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    header, segments = split(blob)
    for keep in range(len(segments)):  # 0 .. n-1 whole segments kept
        rejects(keyring, header + b"".join(segments[:keep]))


def test_truncation_at_every_byte_is_rejected(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    for cut in range(len(blob)):
        with pytest.raises(DecryptionError):  # format errors are DecryptionErrors too
            unseal(keyring, blob[:cut])


def test_dropping_any_segment_is_rejected(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    header, segments = split(blob)
    for i in range(len(segments)):
        rejects(keyring, header + b"".join(segments[:i] + segments[i + 1 :]))


def test_duplicating_any_segment_is_rejected(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    header, segments = split(blob)
    for i in range(len(segments)):
        rejects(keyring, header + b"".join(segments[: i + 1] + [segments[i]] + segments[i + 1 :]))


def test_swapping_segments_is_rejected(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    header, segments = split(blob)
    for i in range(len(segments)):
        for j in range(i + 1, len(segments)):
            swapped = list(segments)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            rejects(keyring, header + b"".join(swapped))


@pytest.mark.parametrize("extra", [b"\x00", b"garbage!" * 3, b"\x00" * (SEG + TAG)])
def test_appending_bytes_is_rejected(multi, extra: bytes) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    rejects(keyring, blob + extra)


def test_appending_a_copy_of_the_last_segment_is_rejected(keyring: stream.RawKeyring) -> None:
    blob = seal(keyring, os.urandom(2 * SEG))  # full last segment
    header, segments = split(blob)
    rejects(keyring, blob + segments[-1])


def test_every_segment_byte_is_authenticated(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, _, blob = multi
    header_size = stream.parse_header(blob).size
    for i in range(header_size, len(blob), 5):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        rejects(keyring, bytes(tampered))


def test_segments_of_another_stream_with_the_same_key_are_rejected(multi) -> None:  # type: ignore[no-untyped-def]
    keyring, data, blob = multi
    other = seal(keyring, data)
    header, _ = split(blob)
    _, other_segments = split(other)
    rejects(keyring, header + b"".join(other_segments))


def test_an_empty_last_segment_after_a_full_one_is_refused(registry: Registry) -> None:
    """Non-canonical: a valid tag cannot make an encoding the writer never produces."""
    algorithm = registry.algorithm("aes-256-gcm")
    data_key = os.urandom(32)
    keyring = stream.RawKeyring(algorithm, os.urandom(32), KEY_ID, data_key=data_key)
    _, _, wrapped = keyring.new_data_key()
    header = stream.build_header(algorithm, data_key, wrapped, segment_size=SEG)
    cipher = stream.SegmentCipher.for_header(header, algorithm, data_key, None)
    body = cipher.seal(0, b"a" * SEG, False) + cipher.seal(1, b"", True)
    rejects(keyring, header.encode() + body)


# ------------------------------------------------------------------------ header


def test_every_header_byte_is_authenticated(registry: Registry) -> None:
    """Any change of any header byte is refused — including the wrapped key, which rewrap
    legitimately replaces: a changed wrapped key fails when it is unwrapped."""
    algorithm = registry.algorithm("aes-256-gcm")
    keyring = stream.RawKeyring(algorithm, os.urandom(32), KEY_ID)
    blob = seal(keyring, os.urandom(2 * SEG + 5))
    header_size = stream.parse_header(blob).size
    for i in range(header_size):
        for flip in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[i] ^= flip
            out = io.BytesIO()
            with pytest.raises(DecryptionError):
                stream.decrypt_stream(io.BytesIO(bytes(tampered)), out, keyring)
            assert out.getvalue() == b""  # refused before any plaintext is written


def test_header_layout(keyring: stream.RawKeyring) -> None:
    blob = seal(keyring, b"hello")
    header = stream.parse_header(blob)
    magic, version, algorithm_id, segment_size, prefix_len = struct.unpack_from(">4sBBIB", blob)
    assert (magic, version, segment_size, prefix_len) == (b"QMST", 1, SEG, 7)
    assert algorithm_id == header.algorithm_id
    (wrapped_len,) = struct.unpack_from(">H", blob, 11 + prefix_len)
    assert wrapped_len == len(header.wrapped_key) == 91
    assert header.size == 11 + 7 + 2 + 91 + 32
    assert header.key_id == KEY_ID and header.key_version == 1
    assert header.encode() == blob[: header.size]


def test_transplanted_wrapped_key_fails_the_header_tag(keyring: stream.RawKeyring) -> None:
    """A wrapped key from another stream unwraps fine (same store key) but its data key
    does not match this header."""
    a, b = seal(keyring, b"first file"), seal(keyring, b"second file")
    ha, hb = stream.parse_header(a), stream.parse_header(b)
    forged = stream.Header(
        ha.algorithm_id, ha.segment_size, ha.nonce_prefix, hb.wrapped_key, ha.tag
    )
    with pytest.raises(DecryptionError, match="header"):
        unseal(keyring, forged.encode() + a[ha.size :])


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "bad magic"),
        (b"QM", "truncated"),
        (b"QMEV\x01", "bad magic"),
        (b"QMST\x02" + b"\x00" * 40, "unsupported stream version 2"),
        (b"QMST\x01\x01\x00\x00\x00\x01\x07" + b"\x00" * 60, "segment size"),
        (b"QMST\x01\x01\x00\x00\x10\x00\x00" + b"\x00" * 60, "nonce prefix"),
        (b"QMST\x01\x01\x00\x00\x10\x00\x07" + b"\x00" * 7 + b"\x00\x05", "wrapped key length"),
        (b"QMST\x01\x01\x00\x00\x10\x00\x07" + b"\x00" * 7 + b"\x00\x5b" + b"QMEV", "truncated"),
    ],
)
def test_malformed_headers_get_clear_errors(blob: bytes, message: str) -> None:
    with pytest.raises(EnvelopeFormatError, match=message):
        stream.parse_header(blob)


def test_bad_parameters_are_validation_errors(keyring: stream.RawKeyring) -> None:
    for size in (0, 15, 1 << 25):
        with pytest.raises(ValidationError, match="segment size"):
            seal(keyring, b"x", seg=size)
    out = io.BytesIO()
    with pytest.raises(ValidationError, match="nonce prefix"):
        stream.encrypt_stream(io.BytesIO(b"x"), out, keyring, nonce_prefix=b"short")
    assert out.getvalue() == b""


def test_wrong_store_key_is_refused(keyring: stream.RawKeyring, registry: Registry) -> None:
    blob = seal(keyring, b"data")
    other = stream.RawKeyring(registry.algorithm("aes-256-gcm"), os.urandom(32), KEY_ID)
    rejects(other, blob)


# ------------------------------------------------------------------------ rewrap


def test_rewrap_header_keeps_segments_and_still_decrypts(registry: Registry) -> None:
    algorithm = registry.algorithm("aes-256-gcm")
    v1 = stream.RawKeyring(algorithm, os.urandom(32), KEY_ID, 1)
    data = os.urandom(3 * SEG + 1)
    blob = seal(v1, data)
    header = stream.parse_header(blob)
    v2 = stream.RawKeyring(algorithm, os.urandom(32), KEY_ID, 2)
    data_key = v1.unwrap(header.wrapped_key)
    rewrapped_key = stream.RawKeyring(
        algorithm, v2._key, KEY_ID, 2, data_key=bytes(data_key)
    ).new_data_key()[2]
    new_header = stream.rewrap_header(header, data_key, rewrapped_key)
    new_blob = new_header.encode() + blob[header.size :]
    assert new_header.core == header.core and new_header.tag != header.tag
    assert unseal(v2, new_blob) == data
    rejects(v1, new_blob)  # the old version's wrapping is gone from the file
    with pytest.raises(DecryptionError):  # rewrap refuses a data key that is not the file's
        stream.rewrap_header(header, os.urandom(32), rewrapped_key)


# ------------------------------------------------------------------------ positional


@pytest.mark.parametrize("size", [0, 1, SEG, 5 * SEG + 3])
def test_range_sealing_matches_streaming(tmp_path: Path, registry: Registry, size: int) -> None:
    """Workers sealing disjoint ranges at known offsets produce the streaming bytes."""
    algorithm = registry.algorithm("aes-256-gcm")
    data_key = os.urandom(32)
    keyring = stream.RawKeyring(
        algorithm, os.urandom(32), KEY_ID, data_key=data_key, wrap_nonce=os.urandom(12)
    )
    prefix = os.urandom(7)
    data = os.urandom(size)
    expected = io.BytesIO()
    stream.encrypt_stream(
        io.BytesIO(data), expected, keyring, segment_size=SEG, nonce_prefix=prefix
    )
    header = stream.parse_header(expected.getvalue())
    cipher = stream.SegmentCipher.for_header(header, algorithm, data_key, None)
    src, dst, back = tmp_path / "in", tmp_path / "out", tmp_path / "back"
    src.write_bytes(data)
    dst.write_bytes(header.encode())
    count = stream.segment_count(size, SEG)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for start, stop in [(count // 2, count), (0, count // 2)]:  # out of order
            stream.seal_range(
                cipher,
                fin.fileno(),
                fout.fileno(),
                header_size=header.size,
                size=size,
                start=start,
                stop=stop,
            )
    assert dst.read_bytes() == expected.getvalue()
    body = len(expected.getvalue()) - header.size
    back.write_bytes(b"")
    with open(dst, "rb") as fin, open(back, "r+b") as fout:
        stream.open_range(
            cipher,
            fin.fileno(),
            fout.fileno(),
            header_size=header.size,
            body_size=body,
            start=0,
            stop=count,
        )
    assert back.read_bytes() == data


def test_plaintext_size_rejects_impossible_bodies() -> None:
    assert stream.plaintext_size(TAG, SEG, TAG) == 0
    assert stream.plaintext_size(SEG + TAG, SEG, TAG) == SEG
    assert stream.plaintext_size(SEG + 2 * TAG + 1, SEG, TAG) == SEG + 1
    for body in (0, TAG - 1, SEG + TAG + TAG, SEG + TAG + 3):
        with pytest.raises(EnvelopeFormatError):
            stream.plaintext_size(body, SEG, TAG)


# ------------------------------------------------------------------------ vectors


def _vectors() -> list[dict]:  # type: ignore[type-arg]
    return json.loads(VECTORS.read_text("utf-8"))["vectors"]  # type: ignore[no-any-return]


def test_vectors_file_is_up_to_date() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import make_stream_vectors
    finally:
        sys.path.pop(0)
    assert VECTORS.read_text("utf-8") == make_stream_vectors.render()


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_known_answer_vectors(vector: dict, registry: Registry) -> None:  # type: ignore[type-arg]
    algorithm = registry.algorithm(vector["algorithm"])
    keyring = stream.RawKeyring(
        algorithm,
        bytes.fromhex(vector["store_key"]),
        vector["key_id"],
        vector["key_version"],
        data_key=bytes.fromhex(vector["data_key"]),
        wrap_nonce=bytes.fromhex(vector["wrap_nonce"]),
    )
    aad = bytes.fromhex(vector["aad"]) if vector["aad"] is not None else None
    plaintext = bytes.fromhex(vector["plaintext"])
    out = io.BytesIO()
    stream.encrypt_stream(
        io.BytesIO(plaintext),
        out,
        keyring,
        aad=aad,
        segment_size=vector["segment_size"],
        nonce_prefix=bytes.fromhex(vector["nonce_prefix"]),
    )
    assert out.getvalue().hex() == vector["stream"]
    assert unseal(keyring, bytes.fromhex(vector["stream"]), aad) == plaintext


@pytest.mark.parametrize(
    "vector", [v for v in _vectors() if v["algorithm"] == "aes-256-gcm"], ids=lambda v: v["name"]
)
def test_vectors_decode_independently(vector: dict) -> None:  # type: ignore[type-arg]
    """Decode each AES vector with cryptography alone, following docs/formats.md byte by
    byte — no qimem code — so the document, not just the implementation, is checked."""
    blob = bytes.fromhex(vector["stream"])
    store_key = bytes.fromhex(vector["store_key"])
    aad = bytes.fromhex(vector["aad"]) if vector["aad"] is not None else b""
    assert blob[:4] == b"QMST" and blob[4] == 1 and blob[5] == 1
    segment_size = int.from_bytes(blob[6:10], "big")
    p = blob[10]
    prefix = blob[11 : 11 + p]
    core = blob[: 11 + p]
    w = int.from_bytes(blob[11 + p : 13 + p], "big")
    wrapped = blob[13 + p : 13 + p + w]
    tag = blob[13 + p + w : 45 + p + w]
    body = blob[45 + p + w :]
    # The wrapped key: envelope v1 (27-byte prefix, nonce, uint32 length, ciphertext).
    assert wrapped[:4] == b"QMEV" and uuid.UUID(bytes=wrapped[6:22]) == uuid.UUID(vector["key_id"])
    n = wrapped[26]
    env_header = wrapped[: 31 + n]
    data_key = AESGCM(store_key).decrypt(wrapped[27 : 27 + n], wrapped[31 + n :], env_header)
    assert data_key.hex() == vector["data_key"]

    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key)

    header_key = hkdf(b"qimem stream v1 header key")
    expected = hmac.new(header_key, blob[: 13 + p + w], hashlib.sha256).digest()
    assert expected == tag
    seg_key = hkdf(b"qimem stream v1 segment key\x00" + core + aad)
    assert seg_key.hex() == vector["segment_key"]
    full = segment_size + 16
    pieces = [body[i : i + full] for i in range(0, len(body), full)] or [b""]
    plain = b""
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        nonce = prefix + i.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
        assert nonce.hex() == vector["nonces"][i]
        plain += AESGCM(seg_key).decrypt(nonce, piece, None)
    assert plain.hex() == vector["plaintext"]
