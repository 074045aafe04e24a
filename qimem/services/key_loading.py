"""Loading a key into the cache on a miss (:mod:`qimem.services.crypto`'s slow path): read
the version, its lineage's policy and (where the store can) its wrapped material in one
store call, check purpose, state and policy, and only then unwrap and build the cache entry
(a refused request costs no root-key call). Threads that miss the same slot together load
once (:mod:`qimem.services.single_flight`)."""

from __future__ import annotations

from functools import partial

from qimem import envelope as env
from qimem.app import AppContext
from qimem.crypto import DEFAULT_PURPOSE, zero
from qimem.errors import DecryptionError, NotFoundError
from qimem.keycache import CachedKey
from qimem.keys import KeyState, KeyVersion, not_active_error
from qimem.keystore import Unwrap
from qimem.services import lifecycle
from qimem.services.deterministic import (
    TOKEN_SIZE,
    DeterministicCipher,
    require_data_key_version,
    require_envelope_purpose,
)
from qimem.services.key_refs import exact_version
from qimem.services.lifecycle_common import key_purpose
from qimem.services.single_flight import one_load


def load(
    app: AppContext,
    version: KeyVersion,
    context: bytes | None = None,
    unwrap: Unwrap | None = None,
) -> CachedKey:
    """Unwrap a version's material once and prepare its cipher and header prefix; with a
    ``context`` (derived keys), the cipher of the per-context subkey. A deterministic key
    gets a :class:`DeterministicCipher`, a nonce-less header and one-byte usage tokens.
    ``unwrap``: the version's material, read with it (KeyStore.encryption_state); None:
    read it from the store."""
    purpose = key_purpose(app, version)
    algorithm = app.registry.algorithm(version.algorithm, purpose)
    deterministic = purpose != DEFAULT_PURPOSE
    if unwrap is None:
        unwrap = partial(app.store.material, version.realm, version.key_id)
    material = unwrap()
    try:
        if context is not None:
            subkey = bytearray(lifecycle.derive_subkey(material, context))
            zero(material)
            material = subkey
        cipher = (
            DeterministicCipher(algorithm, material)
            if deterministic
            else algorithm.cipher(material)
        )
    finally:
        zero(material)
    nonce_size = 0 if deterministic else algorithm.nonce_size
    return CachedKey(
        meta=version,
        cipher=cipher,
        prefix=env.header_prefix(
            algorithm.algorithm_id, version.key_id, version.version, nonce_size
        ),
        algorithm_id=algorithm.algorithm_id,
        nonce_size=TOKEN_SIZE if deterministic else nonce_size,
        tag_size=algorithm.tag_size,
        header_size=env.header_size(nonce_size),
        pack_header=env.header_packer(nonce_size),
        unpack_header=env.header_unpacker(nonce_size),
        key_id=version.key_id,
        version=version.version,
        realm=version.realm,
        expires=app.cache.expiry(),
    )


def encryption_key(
    app: AppContext, ref: str, realm: str, context: bytes | None = None, data_key: bool = False
) -> CachedKey:
    """Resolve, check and load the key for ``ref`` from the store (on a cache miss).
    ``data_key``: for a data key or a file: encrypt keys only, checked before the load."""
    app.cache.revalidate(app.store.rotation_marker)  # other servers' rotations
    app.cache.flush_retired(app.store.release_usage)  # dropped entries' unused counts
    cached = cached_for_encrypt(app, realm, ref, context)
    if cached is not None:
        return cached
    with one_load(("encrypt", realm, ref, context)):  # threads missing together load once
        cached = cached_for_encrypt(app, realm, ref, context)
        slot = (realm, ref, context) if context is not None else None
        return cached or _load_for_encrypt(app, ref, realm, context, slot, data_key)


def cached_for_encrypt(
    app: AppContext, realm: str, ref: str, context: bytes | None
) -> CachedKey | None:
    """The cache entry an encryption under ``ref`` (with ``context``, a derived key's)
    would use, if the cache holds it."""
    if context is None:
        return app.cache.for_encrypt(realm, ref)
    return app.cache.for_derived((realm, ref, context))


def _load_for_encrypt(
    app: AppContext,
    ref: str,
    realm: str,
    context: bytes | None,
    slot: tuple[str, str, bytes] | None,
    data_key: bool = False,
) -> CachedKey:
    generation = app.cache.generation  # before reading the store: see KeyCache.put
    exact = exact_version(app, ref, realm)
    unwrap: Unwrap | None = None
    policy = None
    if exact is None:  # a name or lineage id: version, policy, material in one read
        version, policy, unwrap = app.store.encryption_state(realm, ref)
    elif exact.state is not KeyState.ACTIVE:
        versions = app.store.versions(realm, exact.lineage_id)
        raise not_active_error(exact, next((v for v in versions if v.active), None))
    else:
        version = exact
    # The checks come before any unwrapping: a refused request costs no root-key call.
    require_envelope_purpose(app, version)  # before any policy side effect (rotation)
    if data_key:
        require_data_key_version(app, version)
    checked, limit = lifecycle.check_encryption(app, version, context, policy=policy)
    if checked is not version and exact is not None:  # rotated away by age just now
        raise not_active_error(exact, checked)
    entry = load(app, checked, context, unwrap if checked is version else None)
    entry.limit = limit
    if slot is None:
        app.cache.put(realm, entry, ref=ref, generation=generation)
    else:
        app.cache.put_derived(slot, entry, generation=generation)
    return entry


def _cached_for_decrypt(
    app: AppContext, realm: str, prefix: bytes, slot: tuple[str, object, bytes] | None
) -> CachedKey | None:
    if slot is None:
        return app.cache.for_decrypt(realm, prefix)
    return app.cache.for_derived(slot)


def decryption_key(
    app: AppContext, parsed: env.Envelope, realm: str, context: bytes | None = None
) -> CachedKey:
    """The key that sealed a parsed envelope, from the cache or the store."""
    prefix = parsed.header[: env.PREFIX_SIZE]
    slot = (realm, prefix, context) if context is not None else None
    entry = _cached_for_decrypt(app, realm, prefix, slot)
    if entry is None:
        app.cache.revalidate(app.store.rotation_marker)  # other servers' state changes
        entry = _cached_for_decrypt(app, realm, prefix, slot)
    if entry is None:
        with one_load(("decrypt", realm, prefix, context)):  # threads missing together
            entry = _cached_for_decrypt(app, realm, prefix, slot)
            entry = entry or _load_for_decrypt(app, parsed, realm, context, slot)
    # The key id matched; the algorithm, key version or nonce size may not.
    if entry.prefix != prefix or len(parsed.ciphertext) < entry.tag_size:
        raise DecryptionError("ciphertext failed authentication")
    return entry


def _load_for_decrypt(
    app: AppContext,
    parsed: env.Envelope,
    realm: str,
    context: bytes | None,
    slot: tuple[str, object, bytes] | None,
) -> CachedKey:
    generation = app.cache.generation  # before reading the store: see KeyCache.put
    try:
        version, policy, unwrap = app.store.decryption_state(realm, parsed.key_id_str)
    except NotFoundError:
        raise NotFoundError(
            f"the key {parsed.key_id_str} that sealed this envelope does not exist"
        ) from None
    # The checks come before any unwrapping: a refused request costs no root-key call.
    require_envelope_purpose(app, version)
    lifecycle.check_decryption(app, version, context, policy=policy)  # state, minimum ...
    entry = load(app, version, context, unwrap)
    if slot is None:
        app.cache.put(realm, entry, generation=generation)
    else:
        app.cache.put_derived(slot, entry, generation=generation)
    return entry
