"""The key model: lineages, versions and their states (DESIGN.md §3)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
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
