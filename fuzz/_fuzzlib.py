"""Shared pieces of the fuzz targets: a deterministic key store and the error contract.

The targets import nothing from atheris, so ``tests/test_fuzz_corpus.py`` replays the
regression corpus through exactly the functions the fuzzer runs. ``fuzz/run.py`` imports a
target inside ``atheris.instrument_imports()`` so that qimem is instrumented for coverage.

The key store is a real in-memory store (the ``memory://`` plugin) filled with
:data:`LINEAGES` through :meth:`KeyStore.restore_lineage`: fixed key ids and fixed key
material, so seed envelopes and streams made once (``fuzz/make_corpus.py``) decrypt in
every later run, and a successful decryption can be checked by re-sealing the plaintext
with the same key and nonce (AEAD encryption is deterministic given both).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from qimem.app import AppContext
from qimem.config import Config
from qimem.errors import QimemError
from qimem.keys import KeyState, LineagePolicy, LineageRecord, VersionRecord

REALM = "master"
_CREATED = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class FuzzKey:
    """One key version of the deterministic store."""

    name: str
    lineage_id: str
    key_id: str
    version: int
    algorithm: str
    state: KeyState
    derived: bool = False

    @property
    def material(self) -> bytes | None:
        """Fixed material (``None``: destroyed), derived from the key id."""
        if self.state is KeyState.DESTROYED:
            return None
        return hashlib.sha256(b"qimem fuzz key " + self.key_id.encode()).digest()


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


#: Every key version of the fuzz store: rotated, active, disabled, destroyed, both built-in
#: algorithms and a derived key, so decryption reaches each state check.
KEYS: tuple[FuzzKey, ...] = (
    FuzzKey("fuzz-aes", _uuid(0x100), _uuid(0x101), 1, "aes-256-gcm", KeyState.DECRYPT_ONLY),
    FuzzKey("fuzz-aes", _uuid(0x100), _uuid(0x102), 2, "aes-256-gcm", KeyState.ACTIVE),
    FuzzKey("fuzz-chacha", _uuid(0x200), _uuid(0x201), 1, "chacha20-poly1305", KeyState.ACTIVE),
    FuzzKey("fuzz-gone", _uuid(0x300), _uuid(0x301), 1, "aes-256-gcm", KeyState.DESTROYED),
    FuzzKey("fuzz-gone", _uuid(0x300), _uuid(0x302), 2, "aes-256-gcm", KeyState.DISABLED),
    FuzzKey("fuzz-gone", _uuid(0x300), _uuid(0x303), 3, "aes-256-gcm", KeyState.ACTIVE),
    FuzzKey("fuzz-derived", _uuid(0x400), _uuid(0x401), 1, "aes-256-gcm", KeyState.ACTIVE, True),
)
BY_KEY_ID = {k.key_id: k for k in KEYS}


def open_app(**config: object) -> AppContext:
    """A memory-store app holding :data:`KEYS` (no root key: the memory store keeps
    material in the clear, which is what makes the keys fixed)."""
    app = AppContext(Config(store_url="memory://", **config)).open()  # type: ignore[arg-type]
    lineages: dict[str, list[FuzzKey]] = {}
    for key in KEYS:
        lineages.setdefault(key.lineage_id, []).append(key)
    for lineage_id, versions in lineages.items():
        first = versions[0]
        app.store.restore_lineage(
            LineageRecord(
                lineage_id=lineage_id,
                realm=REALM,
                name=first.name,
                algorithm=first.algorithm,
                created_at=_CREATED,
                policy=LineagePolicy(derived=first.derived),
                versions=[
                    VersionRecord(
                        key_id=k.key_id,
                        version=k.version,
                        state=k.state,
                        created_at=_CREATED,
                        encryptions=0,
                        material=None if k.material is None else bytearray(k.material),
                    )
                    for k in versions
                ],
            )
        )
    return app


def check_typed(exc: BaseException) -> None:
    """The error contract of every parser: only a qimem error that is the caller's fault
    (HTTP status below 500) may escape. Anything else is re-raised for the fuzzer to report.
    """
    if not isinstance(exc, QimemError) or exc.http_status >= 500:
        raise exc
    if not exc.message or not exc.code:
        raise AssertionError(f"{type(exc).__name__} without a message or code") from exc
