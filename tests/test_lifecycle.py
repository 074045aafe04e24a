"""Key lifecycle through the service layer (issue 7): policy, usage limits and
auto-rotation, version states, destroy, scheduled deletion, audit, the cache's marker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD

from qimem import services
from qimem.app import AppContext
from qimem.errors import (
    ConflictError,
    DecryptionError,
    KeyNotActiveError,
    NotFoundError,
    ValidationError,
)
from qimem.identity import IdentitySettings
from qimem.keys import KeyState
from qimem.services import identity as ids
from qimem.services import lifecycle

FAST_IDENTITY = IdentitySettings(argon2_memory_kib=64, argon2_time_cost=1)


def _versions(app: AppContext, ref: str) -> list[tuple[int, KeyState]]:
    return [(v.version, v.state) for v in services.show_key(app, ref).versions]


def test_usage_limit_rotates_and_never_overshoots(any_app: AppContext) -> None:
    lifecycle.configure(any_app, lifecycle.LifecycleSettings(usage_reserve_block=3))
    services.create_key(any_app, name="counted")
    lifecycle.set_policy(any_app, "counted", usage_limit=5)
    sealed = [services.encrypt(any_app, "counted", b"m%d" % i) for i in range(12)]
    used: dict[str, int] = {}
    for item in sealed:
        used[item.key_id] = used.get(item.key_id, 0) + 1
    # No version encrypts more than 5 messages; the first takes exactly 5 (nothing else
    # touched its reservations); later ones may take fewer when a cache entry was dropped
    # at a marker check with unused reservations (counts are conservative).
    versions = [s.version for s in sealed]
    assert versions == sorted(versions)
    assert versions[:6] == [1] * 5 + [2]
    assert all(n <= 5 for n in used.values()), used
    states = _versions(any_app, "counted")
    assert states[-1][1] is KeyState.ACTIVE
    assert all(state is KeyState.DECRYPT_ONLY for _, state in states[:-1])
    counted = lifecycle.key_usage(any_app, "counted")
    for key_id, n in used.items():
        assert n <= counted[key_id] <= 5  # never short, never past the limit
    # Rotation never loses decryptability.
    for i, item in enumerate(sealed):
        assert services.decrypt(any_app, item.envelope).plaintext == b"m%d" % i


def test_usage_is_counted_before_use_across_contexts(sqlite_url: str, root_key_b64: str) -> None:
    """Two contexts on one store (two servers): the limit holds for their sum."""
    apps = [make_app(sqlite_url, root_key_b64) for _ in range(2)]
    try:
        for app in apps:
            lifecycle.configure(app, lifecycle.LifecycleSettings(usage_reserve_block=2))
        services.create_key(apps[0], name="shared")
        lifecycle.set_policy(apps[0], "shared", usage_limit=4)
        seen: dict[int, int] = {}
        for i in range(10):
            result = services.encrypt(apps[i % 2], "shared", b"x")
            seen[result.version] = seen.get(result.version, 0) + 1
        assert all(count <= 4 for count in seen.values()), seen
        assert sum(seen.values()) == 10
        assert max(seen) >= 3
    finally:
        for app in apps:
            app.close()


def test_explicit_key_id_at_its_limit_is_not_active(memory_app: AppContext) -> None:
    lifecycle.configure(memory_app, lifecycle.LifecycleSettings(usage_reserve_block=1))
    v1 = services.create_key(memory_app, name="pinned")
    lifecycle.set_policy(memory_app, "pinned", usage_limit=2)
    services.encrypt(memory_app, v1.key_id, b"a")
    services.encrypt(memory_app, v1.key_id, b"b")
    with pytest.raises(KeyNotActiveError):
        services.encrypt(memory_app, v1.key_id, b"c")
    assert services.encrypt(memory_app, "pinned", b"d").version == 2


def test_auto_rotate_by_age(any_app: AppContext) -> None:
    services.create_key(any_app, name="aging")
    lifecycle.set_policy(any_app, "aging", auto_rotate_seconds=1)
    first = services.encrypt(any_app, "aging", b"x")
    any_app.cache.clear()
    time.sleep(1.1)
    second = services.encrypt(any_app, "aging", b"y")
    assert (first.version, second.version) == (1, 2)
    assert services.decrypt(any_app, first.envelope).plaintext == b"x"


def test_min_decryption_version(any_app: AppContext) -> None:
    services.create_key(any_app, name="floor")
    old = services.encrypt(any_app, "floor", b"old")
    services.rotate_key(any_app, "floor")
    new = services.encrypt(any_app, "floor", b"new")
    assert services.decrypt(any_app, old.envelope).plaintext == b"old"  # cached now
    policy = lifecycle.set_policy(any_app, "floor", min_decryption_version=2)
    assert policy.min_decryption_version == 2
    with pytest.raises(DecryptionError) as info:
        services.decrypt(any_app, old.envelope)
    assert info.value.code == "below_min_decryption_version"
    assert info.value.http_status == 422
    assert services.decrypt(any_app, new.envelope).plaintext == b"new"
    lifecycle.set_policy(any_app, "floor", min_decryption_version=1)
    assert services.decrypt(any_app, old.envelope).plaintext == b"old"


def test_policy_validation(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="p")
    with pytest.raises(ValidationError) as info:
        lifecycle.set_policy(memory_app, "p", min_decryption_version=2)
    assert info.value.code == "invalid_policy"
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValidationError):
            lifecycle.set_policy(memory_app, "p", min_encryption_version=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        lifecycle.set_policy(memory_app, "p", usage_limit=0)
    services.rotate_key(memory_app, "p")
    policy = lifecycle.set_policy(memory_app, "p", min_encryption_version=2, usage_limit=9)
    assert (policy.min_encryption_version, policy.usage_limit) == (2, 9)
    assert lifecycle.get_policy(memory_app, "p") == policy
    cleared = lifecycle.set_policy(memory_app, "p", usage_limit=None)
    assert cleared.usage_limit is None and cleared.min_encryption_version == 2
    with pytest.raises(NotFoundError):
        lifecycle.get_policy(memory_app, "nope")


def test_disable_enable_version(any_app: AppContext) -> None:
    services.create_key(any_app, name="states")
    old = services.encrypt(any_app, "states", b"old")
    services.rotate_key(any_app, "states")
    assert services.decrypt(any_app, old.envelope).plaintext == b"old"
    with pytest.raises(ConflictError) as active:
        lifecycle.disable_version(any_app, "states", version=2)
    assert active.value.code == "key_active"
    disabled = lifecycle.disable_version(any_app, "states", version=1)
    assert disabled.state is KeyState.DISABLED
    with pytest.raises(DecryptionError) as info:
        services.decrypt(any_app, old.envelope)
    assert info.value.code == "key_disabled"
    assert services.encrypt(any_app, "states", b"still works").version == 2
    lifecycle.enable_version(any_app, old.key_id)
    assert services.decrypt(any_app, old.envelope).plaintext == b"old"
    with pytest.raises(ValidationError):
        lifecycle.disable_version(any_app, "states")  # a name needs --version
    with pytest.raises(NotFoundError):
        lifecycle.disable_version(any_app, "states", version=7)
    with pytest.raises(ValidationError):
        lifecycle.disable_version(any_app, old.key_id, version=2)


def test_destroy_version(any_app: AppContext) -> None:
    services.create_key(any_app, name="doomed")
    old = services.encrypt(any_app, "doomed", b"old")
    services.rotate_key(any_app, "doomed")
    with pytest.raises(ConflictError):
        lifecycle.destroy_version(any_app, "doomed", version=2)
    destroyed = lifecycle.destroy_version(any_app, "doomed", version=1)
    assert destroyed.state is KeyState.DESTROYED
    with pytest.raises(DecryptionError) as info:
        services.decrypt(any_app, old.envelope)
    assert info.value.code == "key_destroyed"
    assert "destroyed" in info.value.message
    with pytest.raises(DecryptionError):
        any_app.store.material("master", old.key_id)
    with pytest.raises(ConflictError) as back:
        lifecycle.enable_version(any_app, old.key_id)
    assert back.value.code == "key_destroyed"


def test_deletion_protection(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="guarded")
    services.rotate_key(memory_app, "guarded")
    lifecycle.set_policy(memory_app, "guarded", deletion_protection=True)
    with pytest.raises(ConflictError) as destroy:
        lifecycle.destroy_version(memory_app, "guarded", version=1)
    assert destroy.value.code == "deletion_protected"
    with pytest.raises(ConflictError) as schedule:
        lifecycle.schedule_deletion(memory_app, "guarded", days=7)
    assert schedule.value.code == "deletion_protected"
    assert _versions(memory_app, "guarded")[0] == (1, KeyState.DECRYPT_ONLY)
    lifecycle.set_policy(memory_app, "guarded", deletion_protection=False)
    lifecycle.destroy_version(memory_app, "guarded", version=1)


def test_schedule_cancel_and_purge(any_app: AppContext) -> None:
    services.create_key(any_app, name="leaving")
    sealed = services.encrypt(any_app, "leaving", b"x")
    with pytest.raises(ValidationError):
        lifecycle.schedule_deletion(any_app, "leaving", days=1)  # below the minimum (7)
    policy = lifecycle.schedule_deletion(any_app, "leaving", days=7)
    assert policy.deletion_date is not None
    assert policy.deletion_date - datetime.now(UTC) > timedelta(days=6)
    for call in (
        lambda: services.encrypt(any_app, "leaving", b"y"),
        lambda: services.rotate_key(any_app, "leaving"),
        lambda: lifecycle.schedule_deletion(any_app, "leaving", days=8),
    ):
        with pytest.raises(ConflictError) as info:
            call()
        assert info.value.code == "key_pending_deletion"
    with pytest.raises(DecryptionError) as refused:
        services.decrypt(any_app, sealed.envelope)
    assert refused.value.code == "key_pending_deletion"
    assert lifecycle.purge_due_deletions(any_app) == []  # not due yet
    lifecycle.cancel_deletion(any_app, "leaving")
    assert services.decrypt(any_app, sealed.envelope).plaintext == b"x"
    with pytest.raises(ConflictError) as again:
        lifecycle.cancel_deletion(any_app, "leaving")
    assert again.value.code == "not_pending_deletion"
    lifecycle.schedule_deletion(any_app, "leaving", days=7)
    later = datetime.now(UTC) + timedelta(days=8)
    lineage_id = services.show_key(any_app, "leaving").lineage_id
    assert lifecycle.purge_due_deletions(any_app, now=later) == [lineage_id]
    assert services.list_keys(any_app) == []
    with pytest.raises(NotFoundError):
        services.show_key(any_app, "leaving")
    with pytest.raises(NotFoundError):
        services.decrypt(any_app, sealed.envelope)


def test_lifecycle_operations_are_audited(sqlite_app: AppContext) -> None:
    ids.configure(sqlite_app, FAST_IDENTITY)
    ids.bootstrap(sqlite_app, ADMIN_PASSWORD)
    services.create_key(sqlite_app, name="audited")
    services.rotate_key(sqlite_app, "audited")
    lifecycle.set_policy(sqlite_app, "audited", min_decryption_version=2, actor="alice@master")
    lifecycle.disable_version(sqlite_app, "audited", version=1, actor="alice@master")
    events = ids.audit_events(sqlite_app, "master")
    actions = [(e.actor, e.action) for e in events]
    assert ("alice@master", "keys.policy") in actions
    assert ("alice@master", "keys.disable") in actions


def test_cache_sees_another_context_rotation(sqlite_url: str, root_key_b64: str) -> None:
    """The marker check: a rotation through one context is seen by another at its next
    check (revalidate_seconds=0 checks on every miss; entries then last until a check)."""
    a = make_app(sqlite_url, root_key_b64, cache_revalidate=0.0)
    b = make_app(sqlite_url, root_key_b64, cache_revalidate=0.0)
    try:
        services.create_key(a, name="x")
        assert services.encrypt(b, "x", b"1").version == 1
        services.rotate_key(a, "x")
        assert services.encrypt(b, "x", b"2").version == 2
        services.rotate_key(a, "x")
        lifecycle.disable_version(a, "x", version=1)
        assert services.encrypt(b, "x", b"3").version == 3
    finally:
        a.close()
        b.close()


def test_cache_keeps_serving_when_the_marker_check_fails(memory_app: AppContext) -> None:
    services.create_key(memory_app, name="k")
    services.encrypt(memory_app, "k", b"warm")
    entry = memory_app.cache.for_encrypt("master", "k")
    assert entry is not None

    def unreachable() -> object:
        from qimem.errors import StoreUnavailableError

        raise StoreUnavailableError("down")

    memory_app.cache._valid_until = 0.0  # force the next check
    memory_app.cache.revalidate(unreachable)
    assert memory_app.cache.for_encrypt("master", "k") is entry


def test_lifecycle_events_reach_plugins(memory_app: AppContext) -> None:
    from qimem.events import KeyEvent
    from qimem.hooks import hookimpl

    seen: list[tuple[str, int]] = []

    class Sink:
        @hookimpl
        def qimem_key_event(self, event: KeyEvent) -> None:
            seen.append((event.kind, event.key.version))

    memory_app.registry.pm.register(Sink(), name="test-sink")
    services.create_key(memory_app, name="observed")
    services.rotate_key(memory_app, "observed")
    lifecycle.disable_version(memory_app, "observed", version=1)
    lifecycle.disable_version(memory_app, "observed", version=1)  # no change, no event
    lifecycle.enable_version(memory_app, "observed", version=1)
    lifecycle.destroy_version(memory_app, "observed", version=1)
    lifecycle.schedule_deletion(memory_app, "observed", days=7)
    lifecycle.purge_due_deletions(memory_app, now=datetime.now(UTC) + timedelta(days=8))
    assert seen == [
        ("created", 1),
        ("rotated", 2),
        ("disabled", 1),
        ("enabled", 1),
        ("destroyed", 1),
        ("deleted", 2),
    ]


def test_forked_child_never_reuses_the_parents_nonces(memory_app: AppContext) -> None:
    """Cache entries hold a pool of nonces (and reserved usage counts); a forked child must
    not inherit them, or parent and child would seal with the same nonces."""
    import os

    from qimem import envelope

    services.create_key(memory_app, name="forked")
    services.encrypt(memory_app, "forked", b"warm")  # the parent's entry has a nonce pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one encryption, its nonce to the parent, and out
        try:
            nonce = envelope.parse(services.encrypt(memory_app, "forked", b"x").envelope).nonce
            os.write(write, nonce)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    parent = envelope.parse(services.encrypt(memory_app, "forked", b"x").envelope).nonce
    assert len(child) == len(parent) == 12
    assert child != parent


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_concurrent_encryptions_respect_the_limit_and_never_repeat_a_nonce(
    store: str, tmp_path: Path, root_key_b64: str
) -> None:
    from qimem import envelope
    from qimem.testing import run_concurrently

    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'k.db'}"
    app = make_app(url, root_key_b64 if store == "sqlite" else None)
    try:
        lifecycle.configure(app, lifecycle.LifecycleSettings(usage_reserve_block=4))
        services.create_key(app, name="busy")
        lifecycle.set_policy(app, "busy", usage_limit=25)

        def work(_: int) -> list[tuple[str, bytes]]:
            sealed = [services.encrypt(app, "busy", b"m") for _ in range(20)]
            return [(s.key_id, envelope.parse(s.envelope).nonce) for s in sealed]

        results = run_concurrently(6, work)
        assert all(isinstance(r, list) for r in results), results
        messages = [m for r in results for m in r]
        assert len(messages) == 120
        assert len({nonce for _, nonce in messages}) == 120  # no nonce twice
        per_version: dict[str, int] = {}
        for key_id, _ in messages:
            per_version[key_id] = per_version.get(key_id, 0) + 1
        assert max(per_version.values()) <= 25, per_version
        counted = lifecycle.key_usage(app, "busy")
        assert all(per_version[k] <= counted[k] <= 25 for k in per_version)
        assert len(per_version) >= 5  # 120 messages at <= 25 each
    finally:
        app.close()


def test_derived_keys(any_app: AppContext) -> None:
    from qimem.errors import DecryptionError as Tampered

    services.create_key(any_app, name="tenants", derived=True)
    assert lifecycle.get_policy(any_app, "tenants").derived
    a = services.encrypt(any_app, "tenants", b"for a", context=b"tenant-a")
    b = services.encrypt(any_app, "tenants", b"for b", context=b"tenant-b")
    assert services.decrypt(any_app, a.envelope, context=b"tenant-a").plaintext == b"for a"
    assert services.decrypt(any_app, b.envelope, context=b"tenant-b").plaintext == b"for b"
    with pytest.raises(Tampered) as wrong:  # another tenant's context opens nothing
        services.decrypt(any_app, a.envelope, context=b"tenant-b")
    assert wrong.value.code == "decryption_failed"
    for call in (
        lambda: services.encrypt(any_app, "tenants", b"x"),
        lambda: services.decrypt(any_app, a.envelope),
    ):
        with pytest.raises(ValidationError) as missing:
            call()
        assert missing.value.code == "context_required"
    services.create_key(any_app, name="plain")
    with pytest.raises(ValidationError) as refused:
        services.encrypt(any_app, "plain", b"x", context=b"tenant-a")
    assert refused.value.code == "context_not_allowed"
    with pytest.raises(ValidationError):
        services.encrypt(any_app, "tenants", b"x", context=b"")
    # Rotation, rewrap and data keys keep working per context.
    services.rotate_key(any_app, "tenants")
    rewrapped = services.rewrap(any_app, a.envelope, context=b"tenant-a")
    assert rewrapped.version == 2
    opened = services.decrypt(any_app, rewrapped.envelope, context=b"tenant-a")
    assert opened.plaintext == b"for a"
    made = services.datakey(any_app, "tenants", context=b"tenant-c")
    unwrapped = services.decrypt(any_app, made.wrapped_key, context=b"tenant-c")
    assert unwrapped.plaintext == made.plaintext_key
    # The subkey is the documented HKDF: a third party can recompute it.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from qimem import envelope

    material = bytes(any_app.store.material("master", a.key_id))
    subkey = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"qimem-derived-v1\x00tenant-a",
    ).derive(material)
    parsed = envelope.parse(a.envelope)
    assert AESGCM(subkey).decrypt(parsed.nonce, parsed.ciphertext, parsed.header) == b"for a"
