"""Stream format v1: files of any size in constant memory (docs/formats.md, "Stream v1").

A stream is a header followed by fixed-size segments::

    header   magic "QMST" ‖ version ‖ algorithm id ‖ segment size ‖ nonce prefix   (core)
             ‖ uint16 W ‖ wrapped data key (envelope v1 under the store key, W bytes)
             ‖ header tag (HMAC-SHA256, 32 bytes)
    segment  AEAD(segment key, prefix ‖ uint32 counter ‖ last flag, plaintext chunk)

Every file gets a fresh random 32-byte *data key*, sealed ("wrapped") by the store key in an
envelope v1. Two keys are derived from it with HKDF-SHA256:

* the **header key** authenticates the whole header (HMAC-SHA256 tag), so any header edit
  is rejected before a segment is opened, and the tag commits to the data key;
* the **segment key** seals the segments; its HKDF ``info`` holds the immutable header core
  and the caller's associated data, so segments are bound to the data key, the core and
  the aad — but not to the wrapped key bytes. :func:`rewrap_header` can therefore replace
  the wrapped key (and recompute the header tag) without touching a single segment byte.

Nonces follow the STREAM construction (as age and Tink do): ``prefix ‖ counter ‖ flag``,
with flag 1 only on the last segment, so reordering, dropping, duplicating, truncating at a
segment boundary and appending are all detected.

This module is the format only. Keys come from a :class:`Keyring`;
:mod:`qimem.services.files` provides one over a key store.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qimem import envelope as env
from qimem.crypto import Algorithm, Cipher, zero
from qimem.errors import DecryptionError, EnvelopeFormatError, ValidationError

MAGIC = b"QMST"
VERSION = 1
#: Plaintext bytes per segment written by default; chosen by measurement (docs/files.md).
DEFAULT_SEGMENT_SIZE = 256 * 1024
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 1 << 24
DATA_KEY_SIZE = 32
HEADER_TAG_SIZE = 32
#: Bytes of the nonce that are not the prefix: uint32 counter ‖ last flag.
NONCE_SUFFIX = 5
MAX_SEGMENTS = 1 << 32
MAX_WRAPPED_KEY = 1024
_CORE = struct.Struct(">4sBBIB")  # magic, version, algorithm id, segment size, prefix length
_U16 = struct.Struct(">H")
_COUNTER = struct.Struct(">I")
_HEADER_INFO = b"qimem stream v1 header key"
_SEGMENT_INFO = b"qimem stream v1 segment key\x00"


class Keyring(Protocol):
    """Where a stream's data keys come from and go to.

    ``new_data_key`` returns ``(algorithm, data_key, wrapped_key)``: the algorithm that
    seals the segments, a fresh random 32-byte key (a ``bytearray`` the caller zeroes) and
    that key sealed by a store key (an envelope v1). ``unwrap`` opens a wrapped key again.
    """

    def new_data_key(self) -> tuple[Algorithm, bytearray, bytes]: ...

    def unwrap(self, wrapped_key: bytes) -> bytearray: ...

    def algorithm(self, algorithm_id: int) -> Algorithm: ...


@dataclass(frozen=True)
class Header:
    """A parsed or built stream header. ``core`` is the immutable part."""

    algorithm_id: int
    segment_size: int
    nonce_prefix: bytes
    wrapped_key: bytes = field(repr=False)
    tag: bytes = field(repr=False)

    @property
    def core(self) -> bytes:
        """magic ‖ version ‖ algorithm id ‖ segment size ‖ prefix length ‖ prefix."""
        return (
            _CORE.pack(MAGIC, VERSION, self.algorithm_id, self.segment_size, len(self.nonce_prefix))
            + self.nonce_prefix
        )

    def authenticated(self) -> bytes:
        """The header bytes the header tag covers (everything before the tag)."""
        return self.core + _U16.pack(len(self.wrapped_key)) + self.wrapped_key

    def encode(self) -> bytes:
        """The exact header bytes on disk."""
        return self.authenticated() + self.tag

    @property
    def size(self) -> int:
        return _CORE.size + len(self.nonce_prefix) + 2 + len(self.wrapped_key) + HEADER_TAG_SIZE

    @property
    def key_id(self) -> str:
        """The store key version (UUID) that wrapped the data key."""
        return env.parse(self.wrapped_key).key_id_str

    @property
    def key_version(self) -> int:
        return env.parse(self.wrapped_key).key_version


@dataclass(frozen=True)
class StreamInfo:
    """What one encrypt/decrypt/rewrap did."""

    key_id: str
    version: int
    plaintext_bytes: int
    ciphertext_bytes: int
    segments: int


# ------------------------------------------------------------------------ key schedule


def _hkdf(data_key: bytes | bytearray, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        bytes(data_key)
    )


def _header_mac(data_key: bytes | bytearray, authenticated: bytes) -> crypto_hmac.HMAC:
    # cryptography's HMAC (and its constant-time verify), not the standard library's
    # hmac: no hashlib/_hashlib import (~3 ms of every CLI call, issue 13). Same
    # HMAC-SHA256.
    mac = crypto_hmac.HMAC(_hkdf(data_key, _HEADER_INFO, 32), hashes.SHA256())
    mac.update(authenticated)
    return mac


def header_tag(data_key: bytes | bytearray, authenticated: bytes) -> bytes:
    """HMAC-SHA256 under the header key over every header byte before the tag."""
    return _header_mac(data_key, authenticated).finalize()


def segment_key(
    data_key: bytes | bytearray, core: bytes, aad: bytes | None, key_size: int
) -> bytes:
    """The key that seals the segments: HKDF(data key, info = label ‖ core ‖ aad)."""
    return _hkdf(data_key, _SEGMENT_INFO + core + (aad or b""), key_size)


def nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """The STREAM nonce of segment ``index``: prefix ‖ uint32 counter ‖ last flag."""
    return prefix + _COUNTER.pack(index) + (b"\x01" if last else b"\x00")


def _check_segment_size(segment_size: int) -> None:
    if type(segment_size) is not int or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValidationError(f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE} bytes")


def build_header(
    algorithm: Algorithm,
    data_key: bytes | bytearray,
    wrapped_key: bytes,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    nonce_prefix: bytes | None = None,
) -> Header:
    """A header for a new stream (random nonce prefix unless one is given, for vectors)."""
    _check_segment_size(segment_size)
    prefix_size = algorithm.nonce_size - NONCE_SUFFIX
    if nonce_prefix is None:
        nonce_prefix = os.urandom(prefix_size)
    if len(nonce_prefix) != prefix_size:
        raise ValidationError(f"{algorithm.name} needs a {prefix_size}-byte nonce prefix")
    if not 0 < len(wrapped_key) <= MAX_WRAPPED_KEY:
        raise ValidationError("wrapped data key has a bad length")
    draft = Header(algorithm.algorithm_id, segment_size, nonce_prefix, wrapped_key, b"")
    return Header(
        algorithm.algorithm_id,
        segment_size,
        nonce_prefix,
        wrapped_key,
        header_tag(data_key, draft.authenticated()),
    )


def rewrap_header(header: Header, data_key: bytes | bytearray, wrapped_key: bytes) -> Header:
    """The same header with a new wrapped key (same data key) and a recomputed tag."""
    verify_header(header, data_key)
    draft = Header(header.algorithm_id, header.segment_size, header.nonce_prefix, wrapped_key, b"")
    if not 0 < len(wrapped_key) <= MAX_WRAPPED_KEY:
        raise ValidationError("wrapped data key has a bad length")
    return Header(
        header.algorithm_id,
        header.segment_size,
        header.nonce_prefix,
        wrapped_key,
        header_tag(data_key, draft.authenticated()),
    )


def verify_header(header: Header, data_key: bytes | bytearray) -> None:
    """Check the header tag (constant time).

    :raises DecryptionError: any header byte was changed, or the data key is not this
        stream's.
    """
    try:
        _header_mac(data_key, header.authenticated()).verify(bytes(header.tag))
    except InvalidSignature:
        raise DecryptionError("stream header failed authentication") from None


# ------------------------------------------------------------------------ header parsing


def _read_exact(src: BinaryIO, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = src.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_header(src: BinaryIO | Callable[[int], bytes]) -> Header:
    """Read and strictly parse a header from a file object (or a ``read(n)`` callable).

    Checks structure only; :func:`verify_header` checks the tag once the data key is known.

    :raises EnvelopeFormatError: not a stream, unknown version, bad field, or truncated.
    """
    read = src if callable(src) else (lambda n: _read_exact(src, n))  # type: ignore[arg-type]
    head = read(_CORE.size)
    if len(head) < 4 or head[:4] != MAGIC:
        if len(head) < 4 and MAGIC.startswith(head) and head:
            raise EnvelopeFormatError("stream header is truncated")
        raise EnvelopeFormatError("not a qimem stream (bad magic)")
    if len(head) > 4 and head[4] != VERSION:
        raise EnvelopeFormatError(f"unsupported stream version {head[4]}")
    if len(head) < _CORE.size:
        raise EnvelopeFormatError("stream header is truncated")
    _, _, algorithm_id, segment_size, prefix_size = _CORE.unpack(head)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise EnvelopeFormatError("stream header has a bad segment size")
    if not 3 <= prefix_size <= 27:
        raise EnvelopeFormatError("stream header has a bad nonce prefix length")
    rest = read(prefix_size + _U16.size)
    if len(rest) < prefix_size + _U16.size:
        raise EnvelopeFormatError("stream header is truncated")
    prefix = rest[:prefix_size]
    (wrapped_size,) = _U16.unpack_from(rest, prefix_size)
    if not env.PREFIX_SIZE < wrapped_size <= MAX_WRAPPED_KEY:
        raise EnvelopeFormatError("stream header has a bad wrapped key length")
    tail = read(wrapped_size + HEADER_TAG_SIZE)
    if len(tail) < wrapped_size + HEADER_TAG_SIZE:
        raise EnvelopeFormatError("stream header is truncated")
    wrapped = tail[:wrapped_size]
    env.parse(wrapped)  # strict: a malformed wrapped key is a format error here
    return Header(algorithm_id, segment_size, prefix, wrapped, tail[wrapped_size:])


def parse_header(data: bytes) -> Header:
    """Parse a header from the start of ``data`` (trailing bytes are the segments)."""
    view = memoryview(bytes(data))
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = bytes(view[pos : pos + n])
        pos += len(chunk)
        return chunk

    return read_header(read)


# ------------------------------------------------------------------------ segments


def ciphertext_size(plaintext_size: int, segment_size: int, tag_size: int) -> int:
    """Bytes of segments (without the header) for a plaintext of ``plaintext_size``."""
    count = segment_count(plaintext_size, segment_size)
    return plaintext_size + count * tag_size


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """Segments for a plaintext: at least one (an empty plaintext is one empty segment)."""
    return max(1, -(-plaintext_size // segment_size))


def plaintext_size(body_size: int, segment_size: int, tag_size: int) -> int:
    """Plaintext bytes behind ``body_size`` bytes of segments.

    :raises EnvelopeFormatError: no segment, or a last segment that cannot exist (shorter
        than a tag, or empty after a full one).
    """
    if body_size < tag_size:
        raise EnvelopeFormatError("stream is truncated")
    full = segment_size + tag_size
    count = -(-body_size // full)
    last = body_size - (count - 1) * full
    if last < tag_size or (count > 1 and last == tag_size):
        raise EnvelopeFormatError("stream is truncated")
    if count > MAX_SEGMENTS:
        raise EnvelopeFormatError("stream has too many segments")
    return body_size - count * tag_size


class SegmentCipher:
    """Seals and opens the segments of one stream (a prepared AEAD and the nonce prefix)."""

    __slots__ = ("_cipher", "prefix", "segment_size", "tag_size", "_into", "_open_into")

    def __init__(self, cipher: Cipher, prefix: bytes, segment_size: int, tag_size: int) -> None:
        self._cipher = cipher
        self.prefix = prefix
        self.segment_size = segment_size
        self.tag_size = tag_size
        self._into = getattr(cipher, "encrypt_into", None)
        self._open_into = getattr(cipher, "decrypt_into", None)

    @classmethod
    def for_header(
        cls,
        header: Header,
        algorithm: Algorithm,
        data_key: bytes | bytearray,
        aad: bytes | None,
    ) -> SegmentCipher:
        """The segment cipher of ``header`` (derives the segment key from the data key)."""
        if algorithm.algorithm_id != header.algorithm_id:
            raise DecryptionError("stream header failed authentication")
        if len(header.nonce_prefix) != algorithm.nonce_size - NONCE_SUFFIX:
            raise EnvelopeFormatError("stream header has a bad nonce prefix length")
        key = bytearray(segment_key(data_key, header.core, aad, algorithm.key_size))
        try:
            cipher = algorithm.cipher(key)
        finally:
            zero(key)
        return cls(cipher, header.nonce_prefix, header.segment_size, algorithm.tag_size)

    def seal(self, index: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        if index >= MAX_SEGMENTS:
            raise ValidationError("stream is too long for its segment size")
        return self._cipher.encrypt(nonce(self.prefix, index, last), plaintext, None)  # type: ignore[arg-type]

    def seal_into(
        self, index: int, plaintext: memoryview, last: bool, out: memoryview
    ) -> memoryview:
        """Seal into ``out`` (cryptography's ``encrypt_into`` when available)."""
        if self._into is None:
            sealed = self.seal(index, plaintext, last)
            out[: len(sealed)] = sealed
            return out[: len(sealed)]
        if index >= MAX_SEGMENTS:
            raise ValidationError("stream is too long for its segment size")
        size = len(plaintext) + self.tag_size
        self._into(nonce(self.prefix, index, last), plaintext, None, out[:size])
        return out[:size]

    def open(self, index: int, sealed: bytes | memoryview, last: bool) -> bytes:
        try:
            return self._cipher.decrypt(nonce(self.prefix, index, last), sealed, None)  # type: ignore[arg-type]
        except Exception:  # the algorithm's integrity error (InvalidTag, DecryptionError)
            raise DecryptionError(f"stream segment {index} failed authentication") from None

    def open_into(self, index: int, sealed: memoryview, last: bool, out: memoryview) -> memoryview:
        size = len(sealed) - self.tag_size
        if self._open_into is None:
            plain = self.open(index, sealed, last)
            out[:size] = plain
            return out[:size]
        try:
            self._open_into(nonce(self.prefix, index, last), sealed, None, out[:size])
        except Exception:
            raise DecryptionError(f"stream segment {index} failed authentication") from None
        return out[:size]


def _readinto_full(src: BinaryIO, buf: memoryview) -> int:
    """Fill ``buf`` unless EOF comes first; returns the bytes read."""
    readinto = getattr(src, "readinto", None)
    total = 0
    while total < len(buf):
        if readinto is not None:
            n = readinto(buf[total:])
        else:
            chunk = src.read(len(buf) - total)
            n = len(chunk)
            buf[total : total + n] = chunk
        if not n:
            break
        total += n
    return total


def _write_all(dst: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = dst.write(view)
        if written is None:  # a non-blocking raw stream; should not happen for files
            written = 0
        view = view[written:]


# ------------------------------------------------------------------------ streaming API


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    keyring: Keyring,
    *,
    aad: bytes | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    nonce_prefix: bytes | None = None,
) -> StreamInfo:
    """Encrypt everything ``src`` yields into ``dst`` in constant memory.

    Nothing is written to ``dst`` before the data key has been created and wrapped, so a
    key error leaves ``dst`` untouched.

    :param keyring: gives the fresh data key and its wrapped form (see :class:`Keyring`).
    :param aad: caller associated data; the same bytes are needed to decrypt.
    :param segment_size: plaintext bytes per segment.
    :param nonce_prefix: only for known-answer vectors; random by default.
    """
    algorithm, data_key, wrapped = keyring.new_data_key()
    try:
        header = build_header(
            algorithm, data_key, wrapped, segment_size=segment_size, nonce_prefix=nonce_prefix
        )
        cipher = SegmentCipher.for_header(header, algorithm, data_key, aad)
    finally:
        zero(data_key)
    parsed = env.parse(wrapped)
    encoded = header.encode()
    first = _read_exact(src, segment_size)
    if len(first) < segment_size:  # one short segment: one write, no segment buffers
        sealed_one = cipher.seal(0, first, True)
        _write_all(dst, encoded + sealed_one)
        return StreamInfo(
            parsed.key_id_str, parsed.key_version, len(first), len(encoded) + len(sealed_one), 1
        )
    _write_all(dst, encoded)
    bufs = [memoryview(bytearray(segment_size)), memoryview(bytearray(segment_size))]
    out = memoryview(bytearray(segment_size + cipher.tag_size))
    bufs[0][:] = first
    del first
    current = segment_size
    index = 0
    total_in = total_out = 0
    while True:
        nxt = _readinto_full(src, bufs[1]) if current == segment_size else 0
        last = nxt == 0
        sealed = cipher.seal_into(index, bufs[0][:current], last, out)
        _write_all(dst, sealed)
        total_in += current
        total_out += len(sealed)
        if last:
            break
        bufs.reverse()
        current = nxt
        index += 1
    return StreamInfo(
        parsed.key_id_str, parsed.key_version, total_in, len(encoded) + total_out, index + 1
    )


def open_header(
    header: Header, keyring: Keyring, aad: bytes | None
) -> tuple[SegmentCipher, env.Envelope]:
    """Unwrap the data key, verify the header tag and prepare the segment cipher.

    The data key is unwrapped before the algorithm is looked up by id: the store knows the
    key's algorithm by name, so a key whose plugin is not enabled is reported as such
    (exit 3, naming the plugin), while an id changed in the header is tampering (exit 7).
    """
    wrapped = env.parse(header.wrapped_key)
    if wrapped.algorithm_id != header.algorithm_id:  # one stream, one algorithm (formats.md)
        raise DecryptionError("stream header failed authentication")
    data_key = keyring.unwrap(header.wrapped_key)
    try:
        algorithm = keyring.algorithm(header.algorithm_id)
        if len(data_key) != DATA_KEY_SIZE:
            raise DecryptionError("stream header failed authentication")
        verify_header(header, data_key)
        cipher = SegmentCipher.for_header(header, algorithm, data_key, aad)
    finally:
        zero(data_key)
    return cipher, wrapped


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    keyring: Keyring,
    *,
    aad: bytes | None = None,
) -> StreamInfo:
    """Decrypt a stream from ``src`` into ``dst`` in constant memory.

    Each segment is authenticated before its plaintext is written, so nothing
    unauthenticated ever reaches ``dst``. A stream that turns out to be truncated or
    extended raises after the segments before the damage were written: callers writing
    to a file must discard it on error (:mod:`qimem.batch` writes to a temp file and
    renames it only on success).

    :raises EnvelopeFormatError: not a stream, or a stream truncated inside its header.
    :raises DecryptionError: a changed header or segment, reordered, dropped, duplicated or
        appended segments, truncation, a wrong ``aad`` or an unusable key.
    """
    header = read_header(src)
    cipher, wrapped = open_header(header, keyring, aad)
    segment_size = header.segment_size
    full = segment_size + cipher.tag_size
    first = _read_exact(src, full)
    if len(first) < full:  # one short segment: no segment-sized buffers at all
        if len(first) < cipher.tag_size:
            raise DecryptionError("stream is truncated")
        plain_one = cipher.open(0, first, True)
        _write_all(dst, plain_one)
        return StreamInfo(
            wrapped.key_id_str, wrapped.key_version, len(plain_one), header.size + len(first), 1
        )
    bufs = [memoryview(bytearray(full)), memoryview(bytearray(full))]
    out = memoryview(bytearray(segment_size))
    bufs[0][:] = first
    del first
    current = full
    index = 0
    total_in = total_out = 0
    while True:
        nxt = _readinto_full(src, bufs[1]) if current == full else 0
        last = nxt == 0
        if current < cipher.tag_size or (last and index > 0 and current == cipher.tag_size):
            raise DecryptionError("stream is truncated")
        if index >= MAX_SEGMENTS:
            raise DecryptionError("stream has too many segments")
        plain = cipher.open_into(index, bufs[0][:current], last, out)
        _write_all(dst, plain)
        total_in += current
        total_out += len(plain)
        if last:
            break
        bufs.reverse()
        current = nxt
        index += 1
    return StreamInfo(
        wrapped.key_id_str, wrapped.key_version, total_out, header.size + total_in, index + 1
    )


# ------------------------------------------------------------------------ positional I/O


def _pread_full(fd: int, size: int, offset: int, buf: memoryview) -> int:
    total = 0
    while total < size:
        n = os.preadv(fd, [buf[total:size]], offset + total)
        if not n:
            break
        total += n
    return total


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def seal_range(
    cipher: SegmentCipher,
    in_fd: int,
    out_fd: int,
    *,
    header_size: int,
    size: int,
    start: int,
    stop: int,
) -> int:
    """Seal segments ``[start, stop)`` of a ``size``-byte plaintext at their known offsets.

    Segments are independent, so several processes can seal disjoint ranges of one file
    into one output with ``pread``/``pwrite``. Returns the plaintext bytes sealed.
    """
    seg = cipher.segment_size
    full = seg + cipher.tag_size
    count = segment_count(size, seg)
    buf = memoryview(bytearray(seg))
    out = memoryview(bytearray(full))
    done = 0
    for index in range(start, stop):
        want = min(seg, size - index * seg)
        got = _pread_full(in_fd, want, index * seg, buf)
        if got != want:
            raise ValidationError("input changed while it was being encrypted")
        sealed = cipher.seal_into(index, buf[:want], index == count - 1, out)
        _pwrite_all(out_fd, sealed, header_size + index * full)
        done += want
    return done


def open_range(
    cipher: SegmentCipher,
    in_fd: int,
    out_fd: int,
    *,
    header_size: int,
    body_size: int,
    start: int,
    stop: int,
) -> int:
    """Open segments ``[start, stop)`` of a stream whose segments take ``body_size`` bytes."""
    seg = cipher.segment_size
    full = seg + cipher.tag_size
    count = -(-body_size // full)
    buf = memoryview(bytearray(full))
    out = memoryview(bytearray(seg))
    done = 0
    for index in range(start, stop):
        want = min(full, body_size - index * full)
        got = _pread_full(in_fd, want, header_size + index * full, buf)
        if got != want:
            raise DecryptionError("stream is truncated")
        plain = cipher.open_into(index, buf[:want], index == count - 1, out)
        _pwrite_all(out_fd, plain, index * seg)
        done += len(plain)
    return done


# ------------------------------------------------------------------------ raw keyring


class RawKeyring:
    """A :class:`Keyring` over one explicit key (tests, known-answer vectors, tools).

    Wraps data keys in envelope v1 exactly as the store does. ``data_key`` and
    ``wrap_nonce`` fix the otherwise random values, for vectors only.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        key: bytes | bytearray,
        key_id: str,
        key_version: int = 1,
        *,
        data_key: bytes | None = None,
        wrap_nonce: bytes | None = None,
    ) -> None:
        self._algorithm = algorithm
        self._key = bytes(key)
        self.key_id = key_id
        self.key_version = key_version
        self._data_key = data_key
        self._wrap_nonce = wrap_nonce

    def new_data_key(self) -> tuple[Algorithm, bytearray, bytes]:
        data_key = bytearray(self._data_key or os.urandom(DATA_KEY_SIZE))
        wrap_nonce = self._wrap_nonce or os.urandom(self._algorithm.nonce_size)
        wrapped = env.seal(
            self._algorithm, self._key, self.key_id, self.key_version, wrap_nonce, bytes(data_key)
        )
        return self._algorithm, data_key, wrapped

    def unwrap(self, wrapped_key: bytes) -> bytearray:
        parsed = env.parse(wrapped_key)
        if (
            parsed.key_id_str != self.key_id
            or parsed.key_version != self.key_version
            or parsed.algorithm_id != self._algorithm.algorithm_id
        ):
            raise DecryptionError("the stream was sealed under another key")
        return bytearray(
            self._algorithm.decrypt(self._key, parsed.nonce, parsed.ciphertext, parsed.header)
        )

    def algorithm(self, algorithm_id: int) -> Algorithm:
        if algorithm_id != self._algorithm.algorithm_id:
            raise DecryptionError("stream header failed authentication")
        return self._algorithm

    def __repr__(self) -> str:
        return f"<RawKeyring {self._algorithm.name} {self.key_id} v{self.key_version}>"
