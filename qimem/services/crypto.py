"""Message operations: encrypt, decrypt, rewrap and data keys, in envelope v1.

The hot path is a dict lookup in the key cache, one nonce from the entry's pool and one
AEAD call; the header prefix of each key version is computed once when the key is loaded.
Nonces are random (``os.urandom``), drawn 256 at a time, and each comes with one usage
count already reserved in the store (:func:`qimem.services.lifecycle.reserve`): counting
messages per version costs the hot path nothing, and one ``getrandom`` call per 256
messages costs less than one per message. ``bench/core.py``
measures encrypt and decrypt against a bare ``AESGCM`` call (issue 2's target: half its
speed at 1 KiB). At that size every attribute lookup and allocation shows, so the per-call
code is lean on purpose: the cache lookups are inlined, nothing the cache already vouches
for is checked again, and the result records are plain slotted dataclasses (a frozen
dataclass's ``__init__`` alone costs a third of a bare AES-GCM call).

Keys of purpose ``deterministic`` (AES-256-SIV) take the same path, unchanged: their cache
entry's cipher is a :class:`DeterministicCipher` (the AEAD call shape, nonce ignored), its
header has no nonce (envelope nonce length 0, docs/formats.md), and the "nonce" the entry
hands out is a one-byte usage token: one count reserved in the store, like every AEAD
message. The same plaintext, aad and key version give the same envelope. Signing and MAC
keys are refused here (``wrong_purpose``); data keys and files take encrypt keys only.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any

from qimem import envelope as env
from qimem.app import AppContext
from qimem.errors import DecryptionError, PayloadTooLargeError, ValidationError
from qimem.keycache import CachedKey
from qimem.keys import DEFAULT_REALM
from qimem.services import key_loading, lifecycle
from qimem.services.deterministic import require_data_key_purpose

DATA_KEY_SIZE = 32
_monotonic = time.monotonic
_PREFIX_SIZE = env.PREFIX_SIZE


@dataclass(slots=True)
class EncryptResult:
    """An envelope and the key version that sealed it (a record: treat it as read-only)."""

    envelope: bytes = field(repr=False)
    key_id: str
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "envelope": base64.b64encode(self.envelope).decode("ascii"),
            "key_id": self.key_id,
            "version": self.version,
        }


@dataclass(slots=True)
class DecryptResult:
    """A plaintext and the key version that opened it. Its repr hides the plaintext."""

    plaintext: bytes = field(repr=False)
    key_id: str
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "plaintext": base64.b64encode(self.plaintext).decode("ascii"),
            "key_id": self.key_id,
            "version": self.version,
        }


@dataclass(frozen=True)
class DataKey:
    """A fresh data key, in the clear and sealed under a stored key. Repr hides the key.

    ``plaintext_key`` is None for a wrapped-only data key (``wrapped_only=True``: AWS's
    GenerateDataKeyWithoutPlaintext); ``to_dict`` then gives ``"plaintext_key": None``."""

    plaintext_key: bytes | None = field(repr=False)
    wrapped_key: bytes = field(repr=False)
    key_id: str
    version: int

    def to_dict(self) -> dict[str, Any]:
        plain = self.plaintext_key
        return {
            "plaintext_key": None if plain is None else base64.b64encode(plain).decode("ascii"),
            "wrapped_key": base64.b64encode(self.wrapped_key).decode("ascii"),
            "key_id": self.key_id,
            "version": self.version,
        }


def check_encryption_key(
    app: AppContext, ref: str, *, realm: str = DEFAULT_REALM, context: bytes | None = None
) -> None:
    """Resolve and load the key :func:`datakey` would wrap under for ``ref`` — without
    wrapping anything or counting a use — so a bad key fails before any output is written
    (file encryption: :class:`qimem.services.files.StoreKeyring`).

    :raises NotFoundError: no such key. :raises KeyNotActiveError: ``ref`` is a key_id
        that was rotated away. :raises ValidationError: ``wrong_purpose``: not an encrypt
        key (data keys and files take encrypt keys only, see :func:`datakey`).
    """
    if context is not None:
        context = lifecycle.check_context(context)
    require_data_key_purpose(key_loading.encryption_key(app, ref, realm, context, data_key=True))


def _reserved(
    app: AppContext, key: CachedKey, ref: str, realm: str, context: bytes | None = None
) -> tuple[CachedKey, bytes]:
    """Usage accounting's slow path: reserve more counts (and draw nonces for them), or
    move on to the new version after an automatic rotation."""
    nonce = lifecycle.reserve(app, key)
    while nonce is None:  # the version reached its usage limit and was rotated
        key = key_loading.encryption_key(app, ref, realm, context)
        nonce = lifecycle.reserve(app, key)
    return key, nonce


def _seal(
    app: AppContext,
    key: CachedKey,
    ref: str,
    realm: str,
    context: bytes | None,
    plaintext: bytes,
    aad: bytes | None,
) -> EncryptResult:
    """Seal with the entry ``key`` (encrypt()'s hot path, for the callers off it)."""
    nonce = next(key.nonces, None)
    if nonce is None:
        key, nonce = _reserved(app, key, ref, realm, context)
    head = key.pack_header(key.prefix, nonce, len(plaintext) + key.tag_size)
    sealed = key.cipher.encrypt(nonce, plaintext, head + aad if aad else head)
    return EncryptResult(head + sealed, key.key_id, key.version)


def _encrypt_derived(
    app: AppContext, ref: str, plaintext: bytes, aad: bytes | None, realm: str, context: Any
) -> EncryptResult:
    """encrypt() with a derived key's context: the per-context subkey seals."""
    context = lifecycle.check_context(context)
    key = key_loading.cached_for_encrypt(app, realm, ref, context)
    key = key or key_loading.encryption_key(app, ref, realm, context)
    return _seal(app, key, ref, realm, context, plaintext, aad)


def _check_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValidationError(f"{what} must be bytes")
    return bytes(value)


def encrypt(
    app: AppContext,
    ref: str,
    plaintext: bytes,
    *,
    aad: bytes | None = None,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> EncryptResult:
    """Seal ``plaintext`` in an envelope under the active version of ``ref``.

    :param ref: a key_id (must be active), lineage_id or name.
    :param aad: caller associated data; the same bytes are needed to decrypt.
    :param context: for a derived key (required there, refused elsewhere): the per-context
        subkey seals, and the same context is needed to decrypt.
    :raises KeyNotActiveError: ``ref`` is a key_id that was rotated away (the message names
        the active one).
    :raises PayloadTooLargeError: ``plaintext`` is over ``limits.max_envelope_bytes``.
    """
    if not isinstance(plaintext, bytes):
        plaintext = _check_bytes(plaintext, "plaintext")
    if len(plaintext) > app.config.max_envelope_bytes:
        raise PayloadTooLargeError(
            f"plaintext is over the envelope limit of {app.config.max_envelope_bytes} bytes; "
            "use the stream format for large data"
        )
    if context is not None:
        return _encrypt_derived(app, ref, plaintext, aad, realm, context)
    refs = app.cache.by_ref.get(realm)  # KeyCache.for_encrypt, inlined
    key = refs.get(ref) if refs is not None else None
    if key is None or key.expires <= _monotonic():
        key = key_loading.encryption_key(app, ref, realm)
    # A fresh random nonce, and with it one usage count reserved in the store.
    nonce = next(key.nonces, None)
    if nonce is None:
        key, nonce = _reserved(app, key, ref, realm)
    head = key.pack_header(key.prefix, nonce, len(plaintext) + key.tag_size)  # env.header
    sealed = key.cipher.encrypt(nonce, plaintext, head + aad if aad else head)
    return EncryptResult(head + sealed, key.key_id, key.version)


def _open(
    app: AppContext, blob: bytes, aad: bytes | None, realm: str, context: bytes | None = None
) -> tuple[bytes, CachedKey]:
    """Parse strictly, find the key in the cache or the store, open (decrypt's slow path)."""
    parsed = env.parse(blob)
    key = key_loading.decryption_key(app, parsed, realm, context)
    head = parsed.header
    try:
        plaintext = key.cipher.decrypt(parsed.nonce, parsed.ciphertext, head + aad if aad else head)
    except Exception:  # the algorithm's own integrity error (e.g. InvalidTag)
        raise DecryptionError("ciphertext failed authentication") from None
    return plaintext, key


def decrypt(
    app: AppContext,
    envelope: bytes,
    *,
    aad: bytes | None = None,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> DecryptResult:
    """Open an envelope; any version of the key that is not disabled or destroyed works.

    ``context``: the one the envelope was sealed with, for a derived key (required there,
    refused elsewhere).

    :raises EnvelopeFormatError: the bytes are not a well-formed envelope.
    :raises NotFoundError: the key that sealed it does not exist in ``realm``.
    :raises DecryptionError: tampered bytes, wrong ``aad`` or an unusable key version.
    """
    if not isinstance(envelope, bytes):
        envelope = _check_bytes(envelope, "envelope")
    if context is not None:
        plaintext, opened = _open(app, envelope, aad, realm, lifecycle.check_context(context))
        return DecryptResult(plaintext, opened.key_id, opened.version)
    # Fast path. The first PREFIX_SIZE bytes (magic, format version, algorithm, key id, key
    # version, nonce size) are constant for a key version, and a cached key's prefix passed
    # the parser's checks when it was built, so a cache hit on them stands for those checks.
    # What is left of env.parse: the header must be complete and its length field must
    # match the rest exactly (a ciphertext shorter than the tag fails in the AEAD, as it
    # does on the slow path). On a mismatch the slow path parses and names the error.
    key = app.cache.by_prefix.get(envelope[:_PREFIX_SIZE])  # KeyCache.for_decrypt, inlined
    if key is not None and key.realm == realm and key.expires > _monotonic():
        size = key.header_size
        try:
            nonce, length = key.unpack_header(envelope)
        except env.struct.error:  # shorter than the header
            length = -1
        if length == len(envelope) - size:
            head = envelope[:size]
            try:
                plaintext = key.cipher.decrypt(nonce, envelope[size:], head + aad if aad else head)
            except Exception:  # the algorithm's own integrity error (e.g. InvalidTag)
                raise DecryptionError("ciphertext failed authentication") from None
            return DecryptResult(plaintext, key.key_id, key.version)
    plaintext, key = _open(app, envelope, aad, realm)
    return DecryptResult(plaintext, key.key_id, key.version)


def rewrap(
    app: AppContext,
    envelope: bytes,
    *,
    aad: bytes | None = None,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
    target: str | None = None,
) -> EncryptResult:
    """Re-seal an envelope under the active version of its own lineage (after rotation),
    or, with ``target``, under another key of the same realm (AWS KMS ReEncrypt).

    The plaintext never leaves this function. ``aad`` and ``context`` apply to both the
    envelope opened and the one sealed (a derived key's envelope needs its context; a
    derived source and an underived target do not mix). The target may be an encrypt or a
    deterministic key: rewrapping into a deterministic key makes equal plaintexts visible
    as equal envelopes (docs/deterministic.md). Each call stands alone (batch items).

    :raises NotFoundError: the key that sealed the envelope, or ``target``, is not in
        ``realm``. :raises ValidationError: ``wrong_purpose``: ``target`` is a signing or
        MAC key.
    """
    if context is not None:
        context = lifecycle.check_context(context)
    if target is not None:
        if not isinstance(target, str):
            raise ValidationError("target must be a key name, lineage_id or key_id")
        # The target first: a wrong target costs no decryption (nor an unwrap of the source).
        key_loading.encryption_key(app, target, realm, context)
    plaintext, key = _open(app, _check_bytes(envelope, "envelope"), aad, realm, context)
    ref = key.meta.lineage_id if target is None else target
    return encrypt(app, ref, plaintext, aad=aad, realm=realm, context=context)


def datakey(
    app: AppContext,
    ref: str,
    *,
    realm: str = DEFAULT_REALM,
    size: int = DATA_KEY_SIZE,
    context: bytes | None = None,
    aad: bytes | None = None,
    wrapped_only: bool = False,
) -> DataKey:
    """A fresh random data key and the same key sealed in an envelope under ``ref``.

    Encrypt bulk data locally with ``plaintext_key``, keep ``wrapped_key`` beside it, and
    forget the plaintext key; :func:`decrypt` of ``wrapped_key`` gives it back (with the
    same ``aad``, and the same ``context`` for a derived key). ``wrapped_only``: return no
    plaintext key (``plaintext_key`` None), for a service that stores the wrapped key now
    and lets another one decrypt it later (AWS GenerateDataKeyWithoutPlaintext).

    :raises ValidationError: ``wrong_purpose``: ``ref`` is not an encrypt key (a
        deterministic key included: a data key is random, so it gains nothing from one).
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 64:
        raise ValidationError("data key size must be 16..64 bytes")
    if not isinstance(wrapped_only, bool):
        raise ValidationError("wrapped_only must be true or false")
    if aad is not None:
        aad = _check_bytes(aad, "aad")
    if context is not None:
        context = lifecycle.check_context(context)
    key = key_loading.cached_for_encrypt(app, realm, ref, context)
    key = key or key_loading.encryption_key(app, ref, realm, context, data_key=True)
    require_data_key_purpose(key)
    plaintext_key = os.urandom(size)
    sealed = _seal(app, key, ref, realm, context, plaintext_key, aad)
    return DataKey(
        None if wrapped_only else plaintext_key, sealed.envelope, sealed.key_id, sealed.version
    )
