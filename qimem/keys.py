"""The key model: lineages, versions and their states (DESIGN.md §3)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from qimem.errors import KeyNotActiveError, ValidationError

DEFAULT_REALM = "master"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
_REALM_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class KeyState(StrEnum):
    """State of one key version."""

    ACTIVE = "active"  # the one version of its lineage that encrypts
    DECRYPT_ONLY = "decrypt-only"  # rotated away; still decrypts
    DISABLED = "disabled"  # refuses everything; reversible
    DESTROYED = "destroyed"  # material erased


@dataclass(frozen=True)
class KeyVersion:
    """Metadata of one key version. Never holds key material."""

    key_id: str
    lineage_id: str
    name: str | None
    realm: str
    version: int
    algorithm: str
    state: KeyState
    created_at: datetime

    @property
    def active(self) -> bool:
        return self.state is KeyState.ACTIVE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata, the shape of the CLI ``--json`` and HTTP responses."""
        return {
            "key_id": self.key_id,
            "lineage_id": self.lineage_id,
            "name": self.name,
            "realm": self.realm,
            "version": self.version,
            "algorithm": self.algorithm,
            "state": self.state.value,
            "active": self.active,
            "created_at": self.created_at.isoformat(),
        }


def new_id() -> str:
    """A fresh random key or lineage id (a canonical UUID4 string)."""
    return str(uuid.uuid4())


def parse_uuid(text: str) -> uuid.UUID | None:
    """The UUID ``text`` spells in canonical form, or None if it is not one."""
    try:
        value = uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return None
    return value if str(value) == text else None


def validate_name(name: str) -> str:
    """Check a lineage name: a letter, then letters, digits, ``.``, ``_``, ``-`` (≤128)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or parse_uuid(name):
        raise ValidationError(
            "key name must start with a letter and contain only letters, digits, '.', '_' "
            "or '-' (at most 128 characters), and must not look like a key id",
            code="invalid_name",
        )
    return name


def validate_realm(realm: str) -> str:
    """Check a realm name: lowercase letter, then lowercase letters, digits, ``_``, ``-``."""
    if not isinstance(realm, str) or not _REALM_RE.match(realm):
        raise ValidationError(
            "realm must be lowercase letters, digits, '_' or '-', starting with a letter",
            code="invalid_realm",
        )
    return realm


def not_active_error(current: KeyVersion, active: KeyVersion | None) -> KeyNotActiveError:
    """The error for using ``current`` where an active version is needed, naming ``active``."""
    label = f"key {current.key_id} (version {current.version}"
    label += f" of {current.name!r})" if current.name else ")"
    if active is None:
        return KeyNotActiveError(
            f"{label} is {current.state.value}, and its lineage has no active version"
        )
    return KeyNotActiveError(
        f"{label} is no longer active; the active version is {active.key_id} "
        f"(version {active.version})"
    )


#: The default usage limit: messages one version may encrypt before it is rotated. Random
#: 96-bit nonces are safe up to about 2^32 messages per key (NIST SP 800-38D); at 2^31 the
#: chance of any nonce collision is below 2^-35.
DEFAULT_USAGE_LIMIT = 2**31

#: The most messages one key may encrypt with random 96-bit nonces (NIST SP 800-38D
#: §8.3: 2^32 invocations); also what an algorithm that declares no bound of its own gets.
RANDOM_NONCE_MESSAGE_BOUND = 2**32


def max_messages_per_key(algorithm: Any) -> int:
    """The most messages one key version of ``algorithm`` may encrypt: its optional
    ``max_messages_per_key`` attribute (an algorithm with longer or deterministic nonces
    may declare more, one with a weaker bound less), else :data:`RANDOM_NONCE_MESSAGE_BOUND`.

    :raises PluginError: the attribute is there but not a positive integer.
    """
    value = getattr(algorithm, "max_messages_per_key", None)
    if value is None:
        return RANDOM_NONCE_MESSAGE_BOUND
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        from qimem.errors import PluginError

        name = getattr(algorithm, "name", "?")
        raise PluginError(f"algorithm {name!r}: max_messages_per_key must be a positive integer")
    return value


def message_bound_reason(algorithm: Any) -> str:
    """Why :func:`max_messages_per_key` is what it is, for error messages."""
    nonces = (
        "random 96-bit nonces repeat with non-negligible probability beyond 2^32 "
        "messages per key (NIST SP 800-38D)"
    )
    if getattr(algorithm, "max_messages_per_key", None) is not None:
        reason = getattr(algorithm, "max_messages_reason", None)  # optional, its own words
        return (
            reason
            if isinstance(reason, str) and reason
            else "the algorithm declares it (max_messages_per_key)"
        )
    if getattr(algorithm, "nonce_size", None) == 12:
        return nonces
    return f"the algorithm declares no max_messages_per_key, so the default applies: {nonces}"


@dataclass(frozen=True)
class LineagePolicy:
    """Lifecycle settings of a lineage (DESIGN.md §3, issue 7).

    ``min_decryption_version``: older versions refuse to decrypt. ``min_encryption_version``:
    the active version must be at least this (encryption always uses the active version).
    ``usage_limit``: messages one version may encrypt before it is rotated automatically
    (``None``: the deployment default). ``auto_rotate_seconds``: rotate the active version
    once it is this old (``None``: never). ``deletion_protection``: refuse destroying
    versions and scheduling deletion. ``deletion_date``: when a scheduled deletion happens.
    ``derived``: set at creation, never changed: every encryption and decryption needs a
    context, and uses a per-context subkey derived with HKDF (Vault's ``derived``).
    ``vault_layout_versions``: set when a Vault Transit key is imported, never changed:
    versions 1 to this number were Vault's, and the Transit facade reads and writes their
    ``vault:vN:`` ciphertexts in Vault's raw layout (nonce, ciphertext, tag; AAD = the
    caller's associated data) instead of qimem envelopes (0: none; docs/transit.md).
    Ciphertexts are never sniffed: only this number decides.
    """

    min_decryption_version: int = 1
    min_encryption_version: int = 1
    usage_limit: int | None = None
    auto_rotate_seconds: int | None = None
    deletion_protection: bool = False
    deletion_date: datetime | None = None
    derived: bool = False
    vault_layout_versions: int = 0

    @property
    def vault_layout(self) -> bool:
        """Whether some versions of this lineage use Vault's raw ciphertext layout."""
        return self.vault_layout_versions > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version,
            "usage_limit": self.usage_limit,
            "auto_rotate_seconds": self.auto_rotate_seconds,
            "deletion_protection": self.deletion_protection,
            "deletion_date": self.deletion_date.isoformat() if self.deletion_date else None,
            "derived": self.derived,
            "vault_layout_versions": self.vault_layout_versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LineagePolicy:
        """The inverse of :meth:`to_dict` (used by backups)."""
        date = data.get("deletion_date")
        return cls(
            min_decryption_version=int(data.get("min_decryption_version", 1)),
            min_encryption_version=int(data.get("min_encryption_version", 1)),
            usage_limit=None if data.get("usage_limit") is None else int(data["usage_limit"]),
            auto_rotate_seconds=(
                None
                if data.get("auto_rotate_seconds") is None
                else int(data["auto_rotate_seconds"])
            ),
            deletion_protection=bool(data.get("deletion_protection", False)),
            deletion_date=datetime.fromisoformat(date) if date else None,
            derived=bool(data.get("derived", False)),
            vault_layout_versions=int(data.get("vault_layout_versions", 0)),
        )


@dataclass(frozen=True)
class VersionRecord:
    """One version with its material, as a backup holds it (``material`` None: destroyed)."""

    key_id: str
    version: int
    state: KeyState
    created_at: datetime
    encryptions: int
    material: bytearray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LineageRecord:
    """A whole lineage with material, for :meth:`qimem.keystore.KeyStore.restore_lineage`."""

    lineage_id: str
    realm: str
    name: str | None
    algorithm: str
    created_at: datetime
    policy: LineagePolicy
    versions: list[VersionRecord]

    def key_version(self, item: VersionRecord) -> KeyVersion:
        """The metadata of one of this lineage's versions, as a store returns it."""
        return KeyVersion(
            key_id=item.key_id,
            lineage_id=self.lineage_id,
            name=self.name,
            realm=self.realm,
            version=item.version,
            algorithm=self.algorithm,
            state=item.state,
            created_at=item.created_at,
        )
