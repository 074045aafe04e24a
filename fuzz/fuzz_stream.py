"""Fuzz target: stream v1 files through the header parser and both decryption paths.

Contract checked for every input (the bytes of a ``.qimem`` file):

* :func:`qimem.stream.parse_header` raises :class:`~qimem.errors.EnvelopeFormatError` or
  returns a header that encodes back to exactly the bytes it was read from;
* the sequential path (:func:`qimem.services.files.decrypt_stream`, used for stdin and small
  files) and the positional path of ``qimem decrypt --jobs`` on large files
  (:func:`~qimem.stream.open_header`, :func:`~qimem.stream.plaintext_size` and
  :func:`~qimem.stream.open_range` over ``pread``/``pwrite``) each raise a qimem error with a
  4xx status or return a plaintext, and they agree: both succeed with the same plaintext or
  both fail;
* a successful decryption consumed the whole input, and encrypting its plaintext again with
  the same data key, wrap nonce, nonce prefix and segment size gives exactly the input:
  nothing but an authentic, complete stream opens.
"""

from __future__ import annotations

import io
import os

from _fuzzlib import BY_KEY_ID, check_typed, open_app

from qimem import envelope as env
from qimem import services, stream
from qimem.errors import EnvelopeFormatError
from qimem.services import files

APP = open_app()
KEYRING = files.StoreKeyring(APP)


def _parse(data: bytes) -> stream.Header | None:
    try:
        header = stream.parse_header(data)
    except EnvelopeFormatError:
        return None
    assert header.encode() == data[: header.size], "header does not re-encode to its bytes"
    assert stream.MIN_SEGMENT_SIZE <= header.segment_size <= stream.MAX_SEGMENT_SIZE
    return header


def _sequential(data: bytes) -> tuple[bytes, stream.StreamInfo] | None:
    out = io.BytesIO()
    try:
        info = files.decrypt_stream(APP, io.BytesIO(data), out)
    except Exception as exc:
        check_typed(exc)
        return None
    return out.getvalue(), info


def _positional(data: bytes) -> bytes | None:
    """What ``qimem decrypt`` does with a file it splits into segment ranges."""
    in_fd = os.memfd_create("fuzz-in")
    out_fd = os.memfd_create("fuzz-out")
    try:
        os.write(in_fd, data)
        os.lseek(in_fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(in_fd), "rb") as fh:
            header = stream.read_header(fh)
        cipher, _ = stream.open_header(header, KEYRING, None)
        body = len(data) - header.size
        plain_size = stream.plaintext_size(body, header.segment_size, cipher.tag_size)
        count = -(-body // (header.segment_size + cipher.tag_size))
        os.ftruncate(out_fd, plain_size)
        done = stream.open_range(
            cipher, in_fd, out_fd, header_size=header.size, body_size=body, start=0, stop=count
        )
        assert done == plain_size, "open_range wrote another size than plaintext_size"
        return os.pread(out_fd, plain_size, 0) if plain_size else b""
    except Exception as exc:
        check_typed(exc)
        return None
    finally:
        os.close(in_fd)
        os.close(out_fd)


def test_one_input(data: bytes) -> None:
    """One fuzz input: the bytes of a stream file."""
    header = _parse(data)
    sequential = _sequential(data)
    positional = _positional(data)
    if sequential is None:
        assert positional is None, "the positional path opened a stream the sequential refused"
        return
    assert positional is not None, "the sequential path opened a stream the positional refused"
    plaintext, info = sequential
    assert positional == plaintext, "the two decryption paths disagree"
    assert header is not None, "decrypt accepted a header the parser refuses"
    assert info.ciphertext_bytes == len(data) and info.plaintext_bytes == len(plaintext)
    wrapped = env.parse(header.wrapped_key)
    key = BY_KEY_ID[wrapped.key_id_str]
    assert key.material is not None and wrapped.key_version == key.version
    data_key = services.decrypt(APP, header.wrapped_key).plaintext
    keyring = stream.RawKeyring(
        APP.registry.algorithm(key.algorithm),
        key.material,
        key.key_id,
        key.version,
        data_key=data_key,
        wrap_nonce=wrapped.nonce,
    )
    again = io.BytesIO()
    stream.encrypt_stream(
        io.BytesIO(plaintext),
        again,
        keyring,
        segment_size=header.segment_size,
        nonce_prefix=header.nonce_prefix,
    )
    assert again.getvalue() == data, "a non-authentic or incomplete stream decrypted"
