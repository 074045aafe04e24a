"""Signing and MAC keys loaded once: the signature/tag format and the key cache entries
that :mod:`qimem.services.signing` and :mod:`qimem.services.macs` share.

**Format** (docs/formats.md, "Signatures and tags v1"): a qimem signature or tag is a
26-byte header naming the key version, then the algorithm's own bytes (the raw signature a
third-party verifier checks, or the full-length MAC tag)::

    offset  size  field
    0       4     magic  b"QMSG" (signature) or b"QMTG" (MAC tag)
    4       1     format version (1)
    5       1     algorithm id (ed25519 = 16 ... hmac-sha512 = 33)
    6       16    key id (the key version's UUID, 16 raw bytes)
    22      4     key version (uint32, >= 1)
    26      ...   signature or tag

The header is constant for a key version: it is the cache key by which verification finds
the version (one slice, one dict lookup). It is not signed: changing it names another key,
under which the signature does not verify.

**Cache.** Entries (:class:`CachedHandle`) live in :attr:`qimem.keycache.KeyCache.handles`,
so rotation, state and policy changes, the change feed and polling drop them as they drop
encryption keys. Material comes from the store unwrapped under the root key (authenticated),
so signers load with ``trusted=True``.
"""

from __future__ import annotations

import struct
import time
import uuid

from qimem.app import AppContext
from qimem.crypto import zero
from qimem.errors import NotFoundError
from qimem.keys import KeyState, KeyVersion, not_active_error
from qimem.services import lifecycle
from qimem.services.key_refs import check_ref, resolve
from qimem.services.lifecycle_common import require_purpose

_monotonic = time.monotonic

SIGNATURE_MAGIC = b"QMSG"
TAG_MAGIC = b"QMTG"
FORMAT_VERSION = 1
HEADER = struct.Struct(">4sBB16sI")
HEADER_SIZE = HEADER.size  # 26
MAGIC = {"sign": SIGNATURE_MAGIC, "mac": TAG_MAGIC}


class CachedHandle:
    """A signing or MAC key version, loaded once.

    ``handle``: the signer (purpose ``sign``) or the key bytes (``mac``: the MAC plugin
    interface takes the key on every call); ``verifier`` and ``public_key`` (SPKI DER):
    signing keys only. ``prefix``: the header of every signature or tag this version makes
    (see the module docstring). ``signs``: the version passed the signing checks
    (``lifecycle.check_signing``: minimum version, age-based rotation) when it was loaded, so
    ``sign`` and ``mac`` may take it as the active version cached under a ref; an entry a
    verification or a public key read loaded passed ``check_verification`` only (those never
    rotate a key), and signing looks again. Holds no usage counts (``reserved`` is always 0,
    for the key cache's bookkeeping). Its repr names the version only.
    """

    __slots__ = (
        "meta",
        "purpose",
        "algorithm",
        "algorithm_name",
        "handle",
        "verifier",
        "public_key",
        "prefix",
        "key_id",
        "lineage_id",
        "version",
        "realm",
        "expires",
        "hard_expires",
        "signs",
    )

    reserved = 0

    def __init__(
        self,
        meta: KeyVersion,
        purpose: str,
        algorithm: object,
        handle: object,
        prefix: bytes,
        expires: float,
        verifier: object = None,
        public_key: bytes | None = None,
        signs: bool = False,
    ) -> None:
        self.meta = meta
        self.purpose = purpose
        self.algorithm = algorithm
        self.algorithm_name = meta.algorithm
        self.handle = handle
        self.verifier = verifier
        self.public_key = public_key
        self.prefix = prefix
        self.key_id = meta.key_id
        self.lineage_id = meta.lineage_id
        self.version = meta.version
        self.realm = meta.realm
        self.expires = expires
        self.hard_expires = expires
        self.signs = signs

    def __repr__(self) -> str:
        return f"<CachedHandle {self.purpose} {self.key_id} v{self.version}>"


def header(purpose: str, algorithm_id: int, key_id: str, version: int) -> bytes:
    """The 26-byte header of a signature (``sign``) or tag (``mac``) of one key version."""
    return HEADER.pack(
        MAGIC[purpose], FORMAT_VERSION, algorithm_id, uuid.UUID(key_id).bytes, version
    )


def parse_header(purpose: str, blob: bytes) -> tuple[int, str, int] | None:
    """``(algorithm id, key_id, key version)`` from the header at the start of ``blob``, or
    None when it is no qimem signature (``sign``) or tag (``mac``) header of format v1."""
    if len(blob) < HEADER_SIZE:
        return None
    magic, fmt, algorithm_id, raw_id, version = HEADER.unpack_from(blob)
    if magic != MAGIC[purpose] or fmt != FORMAT_VERSION or version < 1:
        return None
    return algorithm_id, str(uuid.UUID(bytes=raw_id)), version


def load(app: AppContext, version: KeyVersion, purpose: str, signs: bool = False) -> CachedHandle:
    """Unwrap ``version``'s material once and load it (the caller checked its purpose;
    ``signs``: and ran ``check_signing`` on it)."""
    algorithm = app.registry.algorithm(version.algorithm, purpose)
    material = app.store.material(version.realm, version.key_id)
    verifier = public_key = None
    try:
        if purpose == "sign":
            handle: object = algorithm.signer(material, trusted=True)
            public_key = handle.public_key()  # type: ignore[attr-defined]
            verifier = algorithm.verifier(public_key)
        else:
            handle = bytes(material)
    finally:
        zero(material)
    prefix = header(purpose, algorithm.algorithm_id, version.key_id, version.version)
    return CachedHandle(
        version, purpose, algorithm, handle, prefix, app.cache.expiry(), verifier, public_key, signs
    )


def for_signing(
    app: AppContext, ref: str, realm: str, purpose: str, operation: str
) -> CachedHandle:
    """The entry that signs or computes a MAC with ``ref``: the one cached under ``ref``
    when it is of ``purpose``, fresh and was loaded to sign (``signs``); otherwise
    :func:`active`, which checks the policy (a verification never rotates a key, so its
    entries do not serve here). The sign and MAC hot path: no store access on a hit."""
    refs = app.cache.handles.get(realm)
    entry = refs.get(ref) if refs is not None else None
    if entry is None or entry.purpose != purpose or not entry.signs:
        return active(app, ref, realm, purpose, operation)
    if entry.expires <= _monotonic():
        entry = active(app, ref, realm, purpose, operation)
    return entry


def active(
    app: AppContext, ref: str, realm: str, purpose: str, operation: str, *, signing: bool = True
) -> CachedHandle:
    """The loaded active version ``ref`` names (a key_id, which must be active, a
    lineage_id or a name), from the cache or the store; cached under ``ref``.

    ``signing``: to sign or compute a MAC, after ``lifecycle.check_signing`` (which may
    rotate the key by age: the new version is returned); False: to verify or read a public
    key, after ``check_verification`` only, which never writes. An entry cached for that
    is not ``signs`` and does not serve signing (see :class:`CachedHandle`).

    :raises ValidationError: ``wrong_purpose``.
    :raises KeyNotActiveError: ``ref`` is a key_id that was rotated away, or (``signing``)
        the version is below the lineage's minimum version.
    :raises ConflictError: ``key_pending_deletion``.
    """
    app.cache.revalidate(app.store.rotation_marker)  # other servers' changes
    cached = app.cache.for_handle(realm, ref)
    if cached is not None and cached.purpose == purpose and (cached.signs or not signing):
        return cached
    generation = app.cache.generation  # before reading the store: see KeyCache.put
    lineage_id, exact = resolve(app, check_ref(ref), realm)
    version = exact or app.store.active_version(realm, lineage_id)
    require_purpose(app, version, purpose, operation)
    if exact is not None and exact.state is not KeyState.ACTIVE:
        versions = app.store.versions(realm, lineage_id)
        raise not_active_error(exact, next((v for v in versions if v.active), None))
    if not signing:
        lifecycle.check_verification(app, version)
        checked = version
    else:
        checked = lifecycle.check_signing(app, version)
        if checked is not version and exact is not None:  # rotated away by age just now
            raise not_active_error(exact, checked)
    if (
        signing
        and cached is not None
        and cached.purpose == purpose
        and cached.key_id == checked.key_id
    ):
        # loaded to verify, now checked to sign: the loaded key serves, nothing unwrapped
        entry = CachedHandle(
            checked,
            purpose,
            cached.algorithm,
            cached.handle,
            cached.prefix,
            app.cache.expiry(),
            cached.verifier,
            cached.public_key,
            signs=True,
        )
    else:
        entry = load(app, checked, purpose, signs=signing)
    app.cache.put_handle(realm, entry, ref=ref, generation=generation)
    return entry


def owner(
    app: AppContext, ref: str, realm: str, purpose: str, operation: str
) -> tuple[str, str | None]:
    """``(lineage_id, key_id or None)``: the lineage ``ref`` names, and the one version a
    key_id ``ref`` allows (None: any version of the lineage). From the cache when ``ref``
    has signed (or verified) here before.

    :raises ValidationError: ``wrong_purpose``. :raises NotFoundError: no such key.
    """
    entry = app.cache.for_handle(realm, ref)
    if entry is None or entry.purpose != purpose:
        lineage_id, exact = resolve(app, check_ref(ref), realm)
        if exact is not None and exact.state is not KeyState.ACTIVE:  # an older key_id
            require_purpose(app, exact, purpose, operation)
            return lineage_id, exact.key_id
        entry = active(app, ref, realm, purpose, operation, signing=False)
    return entry.lineage_id, (ref if ref == entry.key_id else None)


def for_prefix(
    app: AppContext, realm: str, prefix: bytes, purpose: str, lineage_id: str, key_id: str | None
) -> CachedHandle | None:
    """The loaded version a signature's (tag's) header names, if it is a version of
    ``lineage_id`` (and ``key_id``, if given) with the header's algorithm and version
    number; None otherwise, whatever the reason (no such key, another lineage or realm, a
    forged header): the caller answers "invalid" and learns nothing about other keys.

    :raises ConflictError: the named version of this lineage cannot verify (disabled,
        destroyed, below the minimum version, pending deletion).
    """
    entry = app.cache.for_handle(realm, prefix)
    if entry is None:
        app.cache.revalidate(app.store.rotation_marker)
        entry = app.cache.for_handle(realm, prefix)
    if entry is not None:
        if entry.lineage_id != lineage_id or (key_id is not None and entry.key_id != key_id):
            return None
        return entry
    parsed = parse_header(purpose, prefix)
    if parsed is None:
        return None
    algorithm_id, named, number = parsed
    if key_id is not None and named != key_id:
        return None
    generation = app.cache.generation
    try:
        version = app.store.get(realm, named)
    except NotFoundError:
        return None
    if version.lineage_id != lineage_id or version.version != number:
        return None
    if app.registry.algorithm(version.algorithm, purpose).algorithm_id != algorithm_id:
        return None  # a forged header: refused before anything is unwrapped or loaded
    lifecycle.check_verification(app, version)
    entry = load(app, version, purpose)
    if entry.prefix != prefix:  # cannot happen (checked above): a guard
        return None
    app.cache.put_handle(realm, entry, generation=generation)
    return entry


def version_entry(
    app: AppContext, ref: str, realm: str, purpose: str, operation: str, version: int | None
) -> CachedHandle:
    """The loaded version for a raw verification or a public key: ``version`` of the
    lineage, else the version a key_id ``ref`` names, else the active one.

    :raises NotFoundError: no such key or version. :raises ConflictError: it cannot verify.
    """
    from qimem.services.lifecycle_common import version_of

    if version is None:
        lineage_id, key_id = owner(app, ref, realm, purpose, operation)
        if key_id is None:
            return active(app, ref, realm, purpose, operation, signing=False)
        target = app.store.get(realm, key_id)
    else:
        target = version_of(app, ref, version, realm)
        require_purpose(app, target, purpose, operation)
    if target.state is KeyState.ACTIVE:
        return active(app, target.key_id, realm, purpose, operation, signing=False)
    algorithm = app.registry.algorithm(target.algorithm, purpose)
    prefix = header(purpose, algorithm.algorithm_id, target.key_id, target.version)
    entry = for_prefix(app, realm, prefix, purpose, target.lineage_id, target.key_id)
    if entry is None:  # cannot happen: the prefix is the version's own
        raise NotFoundError(f"key {ref!r} has no usable version {target.version}")
    return entry


def named(
    app: AppContext, ref: str, blob: bytes, realm: str, purpose: str, operation: str
) -> CachedHandle | None:
    """The loaded version a qimem signature's (tag's) header names, if it may verify it for
    ``ref``: a version of ``ref``'s lineage (exactly the version a key_id ``ref`` names);
    None when it is not (the signature is invalid). The hot path is two dict lookups.

    :raises ValidationError: ``wrong_purpose``. :raises NotFoundError: no key ``ref``.
    :raises ConflictError: the named version of this lineage cannot verify.
    """
    now = time.monotonic()
    refs = app.cache.handles.get(realm)
    owner_entry = refs.get(ref) if refs is not None else None
    if owner_entry is None or owner_entry.purpose != purpose or owner_entry.expires <= now:
        lineage_id, key_id = owner(app, ref, realm, purpose, operation)
        refs = app.cache.handles.get(realm)
    else:
        lineage_id = owner_entry.lineage_id
        key_id = ref if ref == owner_entry.key_id else None
    if len(blob) <= HEADER_SIZE:
        return None
    prefix = blob[:HEADER_SIZE]
    entry = refs.get(prefix) if refs is not None else None
    if entry is not None and entry.expires > now:
        if entry.lineage_id != lineage_id or (key_id is not None and entry.key_id != key_id):
            return None
        return entry
    return for_prefix(app, realm, prefix, purpose, lineage_id, key_id)
