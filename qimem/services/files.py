"""File encryption services: stream format v1 over the key store (docs/files.md).

Each stream gets a fresh random data key, wrapped by the active version of a stored key
(:func:`qimem.services.crypto.datakey`); decryption finds the key from the header and
unwraps it (:func:`qimem.services.crypto.decrypt`), so every key state rule of the store
applies (a disabled or destroyed version refuses, another realm's key is not found).

>>> import io, qimem
>>> from qimem.services import files
>>> app = qimem.connect()                                           # doctest: +SKIP
>>> key = qimem.services.create_key(app, name="backups")            # doctest: +SKIP
>>> sealed = io.BytesIO()
>>> files.encrypt_stream(app, io.BytesIO(b"data"), sealed, "backups")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from qimem import envelope as env
from qimem import stream
from qimem.app import AppContext
from qimem.crypto import Algorithm, zero
from qimem.errors import (
    EnvelopeFormatError,
    NotFoundError,
    ValidationError,
)
from qimem.fileio import atomic_output
from qimem.keys import DEFAULT_REALM
from qimem.services import crypto


class StoreKeyring:
    """A :class:`qimem.stream.Keyring` over an application's key store.

    :param ref: the key that wraps new data keys (name, lineage_id or active key_id);
        ``None`` for a keyring that only unwraps.
    :param context: for a derived key (docs/keys.md): the per-context subkey wraps the data
        keys, and the same context is needed to unwrap them.
    """

    def __init__(
        self,
        app: AppContext,
        ref: str | None = None,
        realm: str = DEFAULT_REALM,
        context: bytes | None = None,
    ) -> None:
        self.app = app
        self.ref = ref
        self.realm = realm
        self.context = context

    def new_data_key(self) -> tuple[Algorithm, bytearray, bytes]:
        if self.ref is None:
            raise ValidationError("no key given to encrypt with")
        made = crypto.datakey(
            self.app, self.ref, realm=self.realm, size=stream.DATA_KEY_SIZE, context=self.context
        )
        assert made.plaintext_key is not None  # not wrapped_only
        algorithm = self.app.registry.algorithm_by_id(env.parse(made.wrapped_key).algorithm_id)
        return algorithm, bytearray(made.plaintext_key), made.wrapped_key

    def check(self) -> None:
        """Resolve and load the encryption key without wrapping a data key (no usage
        counted), so a bad ``--key`` fails before any output (:func:`qimem.batch.check_key`)."""
        if self.ref is None:
            raise ValidationError("no key given to encrypt with")
        crypto.check_encryption_key(self.app, self.ref, realm=self.realm, context=self.context)

    def unwrap(self, wrapped_key: bytes) -> bytearray:
        try:
            opened = crypto.decrypt(self.app, wrapped_key, realm=self.realm, context=self.context)
        except NotFoundError as exc:
            raise self._with_realm_hint(exc, wrapped_key) from None
        return bytearray(opened.plaintext)

    def rewrap(self, wrapped_key: bytes) -> bytes:
        """``wrapped_key`` re-sealed under the active version of its key's lineage."""
        try:
            made = crypto.rewrap(self.app, wrapped_key, realm=self.realm, context=self.context)
        except NotFoundError as exc:
            raise self._with_realm_hint(exc, wrapped_key) from None
        return made.envelope

    def _with_realm_hint(self, exc: NotFoundError, wrapped_key: bytes) -> NotFoundError:
        """``exc``, naming the realms that do hold the key, if any, and ``--realm``.

        A local store's user sees every realm, so nothing is disclosed; the HTTP server
        never uses this keyring (its callers see only their own realm's keys)."""
        realms = realms_holding(self.app, wrapped_key, exclude=self.realm)
        if not realms:
            return exc
        names = ", ".join(repr(r) for r in realms)
        return NotFoundError(
            f"{exc.message} in realm {self.realm!r}; it is in realm {names}: "
            f"try --realm {realms[0]}",
            code=exc.code,
        )

    def algorithm(self, algorithm_id: int) -> Algorithm:
        """The algorithm with this envelope id (stream decryption asks only after the data
        key is unwrapped, so the id is authenticated by then).

        :raises UnsupportedAlgorithmError: no enabled plugin provides it (naming an installed
            one that would, and how to enable it).
        """
        return self.app.registry.algorithm_by_id(algorithm_id)

    def __repr__(self) -> str:
        return f"<StoreKeyring ref={self.ref!r} realm={self.realm!r}>"


def realms_holding(app: AppContext, wrapped_key: bytes, *, exclude: str) -> list[str]:
    """The realms other than ``exclude`` whose store holds the key that sealed
    ``wrapped_key`` (an error path: it looks at every realm of the store)."""
    try:
        key_id = env.parse(wrapped_key).key_id_str
    except Exception:  # not an envelope: nothing to hint at
        return []
    found: list[str] = []
    for realm in sorted({realm for realm, _ in app.store.lineages()} - {exclude}):
        try:
            app.store.get(realm, key_id)
        except NotFoundError:
            continue
        found.append(realm)
    return found


@runtime_checkable
class KeySource(Protocol):
    """Where keyrings come from other than a local store: a qimem server
    (:class:`qimem.remote.RemoteKeys`). :mod:`qimem.batch` accepts one in place of an
    :class:`~qimem.app.AppContext`."""

    def keyring(
        self, ref: str | None = None, realm: str | None = None, context: bytes | None = None
    ) -> stream.Keyring: ...

    def for_worker(self) -> KeySource: ...

    def close(self) -> None: ...


def keyring_for(
    app: AppContext | KeySource,
    ref: str | None = None,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> stream.Keyring:
    """The keyring of a local store (:class:`StoreKeyring`) or of a :class:`KeySource`;
    ``context`` for a derived key."""
    if isinstance(app, AppContext):
        return StoreKeyring(app, ref, realm, context)
    return app.keyring(ref, realm, context)


def _aad(aad: bytes | str | None) -> bytes | None:
    if aad is None:
        return None
    if isinstance(aad, str):
        return aad.encode("utf-8")
    if not isinstance(aad, bytes | bytearray | memoryview):
        raise ValidationError("aad must be bytes or text")
    return bytes(aad) or None


def encrypt_stream(
    app: AppContext,
    src: BinaryIO,
    dst: BinaryIO,
    key_ref: str,
    *,
    aad: bytes | str | None = None,
    realm: str = DEFAULT_REALM,
    segment_size: int = stream.DEFAULT_SEGMENT_SIZE,
    context: bytes | None = None,
) -> stream.StreamInfo:
    """Encrypt file object ``src`` into ``dst`` (stream format v1) under ``key_ref``.

    Constant memory; any size. Nothing is written before the key has been found.

    :raises NotFoundError: no such key in ``realm``.
    :raises KeyNotActiveError: ``key_ref`` is a key_id that was rotated away.
    """
    keyring = StoreKeyring(app, key_ref, realm, context)
    return stream.encrypt_stream(src, dst, keyring, aad=_aad(aad), segment_size=segment_size)


def decrypt_stream(
    app: AppContext,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    aad: bytes | str | None = None,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> stream.StreamInfo:
    """Decrypt a stream from ``src`` into ``dst``; the key is found from the header
    (``context``: the one it was encrypted with, for a derived key).

    Each segment is authenticated before it is written; on an error ``dst`` may hold the
    segments before the damage, so write to a temp file (as :mod:`qimem.batch` does).

    :raises EnvelopeFormatError: not a stream, or truncated inside the header.
    :raises DecryptionError: tampering, truncation, a wrong ``aad``, an unusable key.
    :raises NotFoundError: the key in the header does not exist in ``realm``.
    """
    keyring = StoreKeyring(app, None, realm, context)
    return stream.decrypt_stream(src, dst, keyring, aad=_aad(aad))


def rewrap_header(
    app: AppContext | KeySource,
    header: stream.Header,
    *,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> tuple[stream.Header, bool]:
    """The header re-sealed under the active version of its key's lineage.

    Returns ``(header, changed)``; ``changed`` is false when the data key already is under
    the newest version (the header is returned as is). The data key never leaves here.
    """
    keyring = keyring_for(app, None, realm, context)
    data_key = keyring.unwrap(header.wrapped_key)
    try:
        stream.verify_header(header, data_key)
        old = env.parse(header.wrapped_key)
        envelope = keyring.rewrap(header.wrapped_key)  # type: ignore[attr-defined]
        new = env.parse(envelope)
        if new.key_id_str == old.key_id_str and new.key_version == old.key_version:
            return header, False
        return stream.rewrap_header(header, data_key, envelope), True
    finally:
        zero(data_key)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``src_fd``@``offset`` to ``dst_fd``'s position, in the
    kernel where possible (``copy_file_range`` shares extents on reflink filesystems)."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    while done < count:
        n = 0
        if copy is not None:
            try:
                n = copy(src_fd, dst_fd, count - done, offset + done)
            except OSError:
                copy = None
                continue
        else:
            chunk = os.pread(src_fd, min(1 << 20, count - done), offset + done)
            n = os.write(dst_fd, chunk) if chunk else 0
        if n == 0:
            raise ValidationError("input changed while it was being rewrapped")
        done += n


def rewrap_file(
    app: AppContext | KeySource,
    path: str | os.PathLike[str],
    *,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> tuple[stream.StreamInfo, bool]:
    """Re-seal a stream file's data key under the newest version of its key, in place.

    Only the header changes: the segments are copied byte for byte (not re-encrypted) into
    a temp file next to ``path``, which is fsynced and renamed over ``path``; a crash
    leaves the old file intact. Returns the new info and whether anything changed.
    """
    path = Path(path)
    with path.open("rb") as fh:
        header = stream.read_header(fh)
        new_header, changed = rewrap_header(app, header, realm=realm, context=context)
        size = os.fstat(fh.fileno()).st_size
        body = size - header.size
        new_env = env.parse(new_header.wrapped_key)
        algorithm = keyring_for(app, None, realm).algorithm(header.algorithm_id)
        plain = stream.plaintext_size(body, header.segment_size, algorithm.tag_size)
        info = stream.StreamInfo(
            new_env.key_id_str,
            new_env.key_version,
            plain,
            new_header.size + body,
            stream.segment_count(plain, header.segment_size),
        )
        if not changed:
            return info, False
        mode = os.fstat(fh.fileno()).st_mode & 0o7777
        with atomic_output(path, force=True) as out:
            out.write(new_header.encode())
            out.flush()
            _copy_range(fh.fileno(), out.fileno(), header.size, body)
            os.fchmod(out.fileno(), mode)
    return info, True


def describe(header: stream.Header) -> dict[str, object]:
    """Public facts of a header (no key material), e.g. for ``--json`` output."""
    try:
        parsed = env.parse(header.wrapped_key)
    except EnvelopeFormatError:  # pragma: no cover - read_header already checked it
        raise
    return {
        "key_id": parsed.key_id_str,
        "version": parsed.key_version,
        "algorithm_id": header.algorithm_id,
        "segment_size": header.segment_size,
    }
