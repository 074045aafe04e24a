"""``memory://``: a thread-safe key store that lives and dies with the process.

Key bytes are held in ``bytearray``s and zeroed when a store is closed or garbage collected
(best effort: Python and OpenSSL may hold other copies, which cannot be reached from here).
"""

from __future__ import annotations

import builtins
import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from qimem.backend import Backend
from qimem.crypto import zero
from qimem.errors import ConflictError, NotFoundError, StoreUnavailableError
from qimem.hooks import hookimpl
from qimem.keys import (
    KeyState,
    KeyVersion,
    LineagePolicy,
    LineageRecord,
    new_id,
    not_active_error,
)
from qimem.keystore import KeyStore, check_transition, destroyed_error
from qimem.registry import RegisterKeyStore

if TYPE_CHECKING:
    from qimem.identity.db import Database
    from qimem.rootkey import KeyWrapper


class InMemoryKeyStore(KeyStore):
    """Keys in process memory; everything is lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._versions: dict[str, KeyVersion] = {}
        self._material: dict[str, bytearray] = {}
        self._lineages: dict[str, list[str]] = {}  # lineage_id -> key_ids, oldest first
        self._names: dict[tuple[str, str], str] = {}  # (realm, name) -> lineage_id
        self._state_changes = 0
        self._policies: dict[str, LineagePolicy] = {}  # lineage_id -> policy (when set)
        self._usage: dict[str, int] = {}  # key_id -> encryptions reserved
        self._lineage_created: dict[str, datetime] = {}

    def create(
        self, realm: str, algorithm: str, material: bytes | bytearray, *, name: str | None = None
    ) -> KeyVersion:
        with self._lock:
            if name is not None and (realm, name) in self._names:
                raise ConflictError(f"a key named {name!r} already exists", code="name_taken")
            version = KeyVersion(
                key_id=new_id(),
                lineage_id=new_id(),
                name=name,
                realm=realm,
                version=1,
                algorithm=algorithm,
                state=KeyState.ACTIVE,
                created_at=datetime.now(UTC),
            )
            self._store(version, material)
            self._lineages[version.lineage_id] = [version.key_id]
            self._lineage_created[version.lineage_id] = version.created_at
            if name is not None:
                self._names[(realm, name)] = version.lineage_id
            return version

    def _store(self, version: KeyVersion, material: bytes | bytearray) -> None:
        self._versions[version.key_id] = version
        self._material[version.key_id] = bytearray(material)

    def get(self, realm: str, key_id: str) -> KeyVersion:
        version = self._versions.get(key_id)
        if version is None or version.realm != realm:
            raise NotFoundError(f"no key {key_id!r}")
        return version

    def find_lineage(self, realm: str, ref: str) -> str:
        with self._lock:
            lineage_id = self._names.get((realm, ref))
            if lineage_id is not None:
                return lineage_id
            key_ids = self._lineages.get(ref)
            if key_ids and self._versions[key_ids[0]].realm == realm:
                return ref
        raise NotFoundError(f"no key {ref!r}")

    def versions(self, realm: str, lineage_id: str) -> list[KeyVersion]:
        with self._lock:
            key_ids = self._lineages.get(lineage_id)
            if not key_ids or self._versions[key_ids[0]].realm != realm:
                raise NotFoundError(f"no key {lineage_id!r}")
            return [self._versions[k] for k in key_ids]

    def list(self, realm: str) -> list[KeyVersion]:
        with self._lock:
            newest = [self._versions[ids[-1]] for ids in self._lineages.values()]
        return [v for v in newest if v.realm == realm]

    def rotate(self, realm: str, key_id: str, material: bytes | bytearray) -> KeyVersion:
        with self._lock:
            current = self.get(realm, key_id)
            if current.state is not KeyState.ACTIVE:
                active = next(
                    (v for v in self.versions(realm, current.lineage_id) if v.active), None
                )
                raise not_active_error(current, active)
            ids = self._lineages[current.lineage_id]
            newest = self._versions[ids[-1]]
            self._versions[key_id] = replace(current, state=KeyState.DECRYPT_ONLY)
            rotated = replace(
                current,
                key_id=new_id(),
                version=newest.version + 1,
                state=KeyState.ACTIVE,
                created_at=datetime.now(UTC),
            )
            self._store(rotated, material)
            ids.append(rotated.key_id)
            self._state_changes += 1
            return rotated

    def material(self, realm: str, key_id: str) -> bytearray:
        with self._lock:
            self.get(realm, key_id)
            buffer = self._material.get(key_id)
            if buffer is None and self._versions[key_id].state is KeyState.DESTROYED:
                raise destroyed_error(self._versions[key_id])
            if buffer is None:  # close() zeroed and dropped it
                raise StoreUnavailableError("the in-memory key store is closed")
            return bytearray(buffer)

    def rotation_marker(self) -> object:
        return self._state_changes

    def policy(self, realm: str, lineage_id: str) -> LineagePolicy:
        with self._lock:
            self.versions(realm, lineage_id)
            return self._policies.get(lineage_id, LineagePolicy())

    def set_policy(self, realm: str, lineage_id: str, policy: LineagePolicy) -> LineagePolicy:
        with self._lock:
            self.versions(realm, lineage_id)
            self._policies[lineage_id] = policy
            self._state_changes += 1
            return policy

    def set_state(self, realm: str, key_id: str, state: KeyState) -> KeyVersion:
        with self._lock:
            current = self.get(realm, key_id)
            check_transition(current, state)
            if current.state is state:
                return current
            changed = replace(current, state=state)
            self._versions[key_id] = changed
            if state is KeyState.DESTROYED:
                buffer = self._material.pop(key_id, None)
                if buffer is not None:
                    zero(buffer)
            self._state_changes += 1
            return changed

    def reserve_usage(self, realm: str, key_id: str, count: int, limit: int) -> int:
        with self._lock:
            self.get(realm, key_id)
            used = self._usage.get(key_id, 0)
            granted = max(0, min(count, limit - used))
            self._usage[key_id] = used + granted
            return granted

    def release_usage(self, realm: str, key_id: str, count: int) -> None:
        with self._lock:
            version = self._versions.get(key_id)
            if version is None or version.realm != realm or count <= 0:
                return
            self._usage[key_id] = max(0, self._usage.get(key_id, 0) - count)

    def usage(self, realm: str, lineage_id: str) -> dict[str, int]:
        with self._lock:
            found = self.versions(realm, lineage_id)
            return {v.key_id: self._usage.get(v.key_id, 0) for v in found}

    def delete_lineage(self, realm: str, lineage_id: str) -> None:
        with self._lock:
            found = self.versions(realm, lineage_id)
            for version in found:
                buffer = self._material.pop(version.key_id, None)
                if buffer is not None:
                    zero(buffer)
                del self._versions[version.key_id]
                self._usage.pop(version.key_id, None)
            del self._lineages[lineage_id]
            self._policies.pop(lineage_id, None)
            self._lineage_created.pop(lineage_id, None)
            if found[0].name is not None:
                self._names.pop((realm, found[0].name), None)
            self._state_changes += 1

    def restore_lineage(self, record: LineageRecord) -> None:
        with self._lock:
            ids = [v.key_id for v in record.versions]
            if record.lineage_id in self._lineages or any(k in self._versions for k in ids):
                raise ConflictError(
                    f"key {record.lineage_id} (or one of its versions) already exists",
                    code="key_exists",
                )
            if record.name is not None and (record.realm, record.name) in self._names:
                raise ConflictError(
                    f"a key named {record.name!r} already exists", code="name_taken"
                )
            for item in sorted(record.versions, key=lambda v: v.version):
                version = record.key_version(item)
                self._versions[item.key_id] = version
                if item.material is not None:
                    self._material[item.key_id] = bytearray(item.material)
                self._usage[item.key_id] = item.encryptions
            self._lineages[record.lineage_id] = sorted(ids, key=lambda k: self._versions[k].version)
            self._lineage_created[record.lineage_id] = record.created_at
            self._policies[record.lineage_id] = record.policy
            if record.name is not None:
                self._names[(record.realm, record.name)] = record.lineage_id
            self._state_changes += 1

    def lineages(self) -> builtins.list[tuple[str, str]]:
        with self._lock:
            return [
                (self._versions[ids[0]].realm, lineage_id)
                for lineage_id, ids in self._lineages.items()
            ]

    def close(self) -> None:
        with self._lock:
            for buffer in self._material.values():
                zero(buffer)
            self._material.clear()

    def __del__(self) -> None:
        for buffer in getattr(self, "_material", {}).values():
            zero(buffer)

    def __repr__(self) -> str:
        return f"<InMemoryKeyStore versions={len(self._versions)}>"


@hookimpl
def qimem_register_keystores(register: RegisterKeyStore) -> None:
    register("memory", open_backend)


def open_backend(url: str, wrapper: KeyWrapper | None) -> Backend:
    """The ``memory`` backend: keys in process memory, an in-memory plugin catalog, and
    (a documented choice, see docs/plugins.md) an identity layer on a private in-memory
    SQLite database, made when identity is first used and lost with the process. Realms
    are checked only once it is open (``identity_with_keys`` is false)."""

    def identity_database() -> Database:
        from qimem.identity.db import Database

        return Database.in_memory()

    return Backend(InMemoryKeyStore(), scheme="memory", identity_database=identity_database)


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "memory-keystore",
        "version": "1.0.0",
        "description": "In-process key store (memory://), for tests and throwaway use",
        "provides": {"keystores": ["memory"]},
        "qimem_api": ">=1,<2",
    }
