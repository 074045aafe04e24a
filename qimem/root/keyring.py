"""The root keyring: a store's root versions, each a key-wrapping key (KWK) wrapped by a
root-key provider, kept as one JSON document in the store (``qimem_root_keyring``).

The document::

    {"format": 1, "id": "<uuid>", "check": "<version 1's check value>", "active": 2,
     "derive": {"version": 2, "blob": "<base64>"},
     "versions": [
        {"version": 1, "provider": "file", "settings": {"file": "/etc/qimem/root.key"},
         "direct": true, "check": "...", "created": "2026-12-04T01:00:00Z", "state": "retired"},
        {"version": 2, "provider": "pkcs11", "settings": {...}, "wrapped": "<base64>",
         "check": "...", "created": "...", "state": "active"}]}

* ``direct``: the version's KWK is the provider's root key itself (a store that had no
  keyring, from before root versions, or whose provider is ``file``/``env`` and was never
  rotated); otherwise ``wrapped`` is the KWK as the provider wrapped it, bound to
  :func:`qimem.root.provider.kwk_context` (the keyring id and the version).
* ``check``: a public fingerprint of the version's KWK, so a provider that opens another
  key (another token, label or file) is refused by name instead of failing on every row.
* ``derive``: the key the store's derived keys come from (MACs of authorization data,
  refresh-token hashes, client-secret sealing), sealed under a live version; it is the
  same value for the store's whole life (derived from version 1's KWK), so rotating the
  root re-seals it and nothing derived from it has to change.
* ``state``: ``active`` (new rows are wrapped under it; exactly one, and the newest
  version: a document whose active version is older is refused, as is a ``direct``
  version other than 1), ``draining`` (rows may still be wrapped under it) or
  ``retired`` (a rotation found no row under it).

The document changes only by compare-and-set on the whole text (:class:`RootSlot`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from qimem.errors import ConfigError, DecryptionError
from qimem.root.provider import KWK_SIZE, DirectRootKey, RootKeyProvider, kwk_context

FORMAT = 1
ACTIVE, DRAINING, RETIRED = "active", "draining", "retired"
_STATES = (ACTIVE, DRAINING, RETIRED)
#: A keyring larger than this is refused before parsing (thousands of versions).
MAX_DOCUMENT = 1 << 20
_DERIVE_CONTEXT = b"qimem root derive base v1|"


class RootSlot(Protocol):
    """Where a store keeps its keyring document (one per store)."""

    def read(self) -> str | None:
        """The stored document, or ``None`` if the store has none."""
        ...

    def replace(self, old: str | None, new: str) -> bool:
        """Store ``new`` if the stored document is still ``old`` (``None``: none stored);
        ``False`` if another process changed it first."""
        ...


@dataclass(frozen=True)
class RootVersion:
    """One root version's record (no key material: ``wrapped`` is sealed by its provider)."""

    version: int
    provider: str
    settings: dict[str, Any]
    check: str
    created: str
    state: str = ACTIVE
    direct: bool = False
    wrapped: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "provider": self.provider,
            "settings": self.settings,
            "check": self.check,
            "created": self.created,
            "state": self.state,
        }
        if self.direct:
            doc["direct"] = True
        if self.wrapped is not None:
            doc["wrapped"] = base64.b64encode(self.wrapped).decode()
        return doc


@dataclass(frozen=True)
class Keyring:
    """A parsed keyring document."""

    id: str
    check: str
    active: int
    derive_version: int
    derive_blob: bytes
    versions: tuple[RootVersion, ...] = field(default_factory=tuple)
    #: version -> HMAC-SHA256 (hex) of :meth:`body` under that version's keyring MAC key
    #: (:func:`qimem.root.kwk.keyring_mac_key`): who holds a version's KWK vouches for the
    #: whole document, recorded provider settings included.
    tags: dict[int, str] = field(default_factory=dict, compare=False)

    def version(self, number: int) -> RootVersion:
        for record in self.versions:
            if record.version == number:
                return record
        raise DecryptionError(f"root version {number} is not in this store's root keyring")

    @property
    def active_version(self) -> RootVersion:
        return self.version(self.active)

    def body(self) -> bytes:
        """What the tags authenticate: the document without its tags."""
        return replace(self, tags={}).dump().encode()

    def tag(self, mac_key: bytes) -> str:
        """This document's tag under a version's keyring MAC key."""
        import hashlib
        import hmac

        return hmac.new(mac_key, self.body(), hashlib.sha256).hexdigest()

    def signed(self, mac_keys: Mapping[int, bytes]) -> Keyring:
        """The same document tagged by every version in ``mac_keys`` it holds."""
        numbers = {r.version for r in self.versions}
        unsigned = replace(self, tags={})
        return replace(
            unsigned,
            tags={v: unsigned.tag(k) for v, k in sorted(mac_keys.items()) if v in numbers},
        )

    def dump(self) -> str:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "id": self.id,
            "check": self.check,
            "active": self.active,
            "derive": {
                "version": self.derive_version,
                "blob": base64.b64encode(self.derive_blob).decode(),
            },
            "versions": [record.to_json() for record in self.versions],
        }
        if self.tags:
            doc["tags"] = {str(v): t for v, t in sorted(self.tags.items())}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def with_states(self, states: Mapping[int, str]) -> Keyring:
        """The same keyring with some versions' states changed."""
        return replace(
            self,
            versions=tuple(replace(r, state=states.get(r.version, r.state)) for r in self.versions),
        )


def _bad(what: str) -> ConfigError:
    return ConfigError(f"the store's root keyring is damaged ({what}); restore it from a backup")


def parse(text: str) -> Keyring:
    """Parse and validate a keyring document.

    :raises ConfigError: not a keyring this qimem understands (the message says which part).
    """
    if len(text) > MAX_DOCUMENT:
        raise _bad("too large")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise _bad("not JSON") from None
    if not isinstance(doc, dict) or type(doc.get("format")) is not int or doc["format"] != FORMAT:
        raise _bad("unknown format")
    try:
        derive = doc["derive"]
        versions = tuple(_parse_version(v) for v in doc["versions"])
        keyring = Keyring(
            id=_text(doc["id"]),
            check=_text(doc["check"]),
            active=_int(doc["active"]),
            derive_version=_int(derive["version"]),
            derive_blob=_b64(derive["blob"]),
            versions=versions,
            tags=_parse_tags(doc.get("tags", {})),
        )
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise _bad("missing or malformed fields") from None
    numbers = [r.version for r in versions]
    if not versions or len(set(numbers)) != len(numbers):
        raise _bad("duplicate or no versions")
    if [r.version for r in versions if r.state == ACTIVE] != [keyring.active]:
        raise _bad("exactly one version must be active")
    if keyring.derive_version not in numbers:
        raise _bad("the derive version is not in the keyring")
    # A rotation always adds max+1 as the active version, and only a store's first version
    # can be its root key itself: a document that says otherwise was edited to bring back
    # an older root version (one the operator rotated away from) for new rows.
    if keyring.active != max(numbers):
        raise _bad("the active version is not the newest one")
    if any(r.direct and r.version != 1 for r in versions):
        raise _bad("only version 1 can be the root key itself")
    return keyring


def _parse_tags(value: Any) -> dict[int, str]:
    if not isinstance(value, dict) or len(value) > 1000:
        raise ValueError
    tags: dict[int, str] = {}
    for key, tag in value.items():
        if not isinstance(key, str) or not key.isdigit() or len(key) > 10:
            raise ValueError
        if not isinstance(tag, str) or len(tag) != 64:
            raise ValueError
        int(tag, 16)
        tags[_int(int(key))] = tag
    return tags


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError
    return value


def _int(value: Any) -> int:
    if type(value) is not int or not 1 <= value < 2**31:
        raise ValueError
    return value


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError
    return base64.b64decode(value, validate=True)


def _parse_version(doc: Any) -> RootVersion:
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise ValueError
    state = doc.get("state", ACTIVE)
    if state not in _STATES:
        raise ValueError
    direct = doc.get("direct", False) is True
    wrapped = None if direct else _b64(doc["wrapped"])
    return RootVersion(
        version=_int(doc["version"]),
        provider=_text(doc["provider"]),
        settings=dict(doc["settings"]),
        check=_text(doc["check"]),
        created=_text(doc["created"]),
        state=state,
        direct=direct,
        wrapped=wrapped,
    )


# -- opening versions -------------------------------------------------------------------

#: ``open_provider(name, recorded_settings)``: the provider to open a version with.
ProviderOpener = Callable[[str, Mapping[str, Any]], RootKeyProvider]


def open_version(keyring: Keyring, record: RootVersion, open_provider: ProviderOpener) -> bytearray:
    """The KWK of ``record``, checked against its recorded fingerprint.

    :raises ConfigError: the provider is unavailable, or opens another key than the one
        this version was made with.
    """
    from qimem.root.kwk import check_value

    provider = open_provider(record.provider, record.settings)
    try:
        if record.direct:
            if not isinstance(provider, DirectRootKey):
                raise _bad(
                    f"version {record.version}: provider {record.provider!r} has no direct key"
                )
            kwk = provider.read_direct()
        else:
            assert record.wrapped is not None
            try:
                kwk = provider.unwrap(record.wrapped, kwk_context(keyring.id, record.version))
            except DecryptionError:
                raise ConfigError(
                    f"root version {record.version}: the {record.provider} root provider "
                    "cannot unwrap its key (another root key, token key or upstream key than "
                    "the one this version was made with, or a damaged keyring)"
                ) from None
    finally:
        provider.close()
    if len(kwk) != KWK_SIZE or check_value(kwk) != record.check:
        kwk[:] = bytes(len(kwk))
        raise ConfigError(
            f"root version {record.version}: the {record.provider} root provider opened a "
            "different key than the one this version was made with (wrong file, token, label "
            "or upstream key)"
        )
    return kwk


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_wrapped_version(
    keyring_id: str, version: int, provider: RootKeyProvider
) -> tuple[RootVersion, bytearray]:
    """A fresh random KWK for ``version``, wrapped by ``provider``; returns the record and
    the KWK (the caller zeroes it)."""
    from qimem.root.kwk import check_value

    kwk = bytearray(os.urandom(KWK_SIZE))
    wrapped = provider.wrap(bytes(kwk), kwk_context(keyring_id, version))
    record = RootVersion(
        version=version,
        provider=provider.name,
        settings=dict(provider.describe()),
        check=check_value(kwk),
        created=now_text(),
        wrapped=bytes(wrapped),
    )
    return record, kwk


def seal_derive_base(keyring_id: str, check: str, kwk: bytes | bytearray, base: bytes) -> bytes:
    """The store's derive base sealed under a version's KWK."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from qimem.root.kwk import wrapping_key

    nonce = os.urandom(12)
    aad = _DERIVE_CONTEXT + f"{keyring_id}|{check}".encode()
    return nonce + AESGCM(wrapping_key(kwk)).encrypt(nonce, base, aad)


def open_derive_base(keyring: Keyring, kwk: bytes | bytearray) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from qimem.root.kwk import wrapping_key

    blob = keyring.derive_blob
    aad = _DERIVE_CONTEXT + f"{keyring.id}|{keyring.check}".encode()
    try:
        return AESGCM(wrapping_key(kwk)).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise _bad("the derive base does not open") from None


def new_keyring(provider: RootKeyProvider) -> tuple[Keyring, bytearray]:
    """A keyring for a new store whose root is ``provider``: version 1 is a fresh KWK that
    the provider wraps. Returns the keyring and version 1's KWK."""
    from qimem.root.kwk import check_value, derive_base, keyring_mac_key

    keyring_id = str(uuid.uuid4())
    record, kwk = new_wrapped_version(keyring_id, 1, provider)
    check = check_value(kwk)
    sealed = seal_derive_base(keyring_id, check, kwk, derive_base(kwk))
    keyring = Keyring(
        id=keyring_id,
        check=check,
        active=1,
        derive_version=1,
        derive_blob=sealed,
        versions=(record,),
    )
    return keyring.signed({1: keyring_mac_key(kwk)}), kwk


def direct_record(provider: RootKeyProvider, check: str) -> RootVersion:
    """Version 1 of a store that had no keyring: the root key itself, read by ``provider``."""
    return RootVersion(
        version=1,
        provider=provider.name,
        settings=dict(provider.describe()),
        check=check,
        created=now_text(),
        direct=True,
    )


def base_dir_of(config_path: Path | None) -> Path:
    return config_path.parent if config_path is not None else Path.cwd()


class MemorySlot:
    """A keyring slot in process memory (the ``memory://`` store, tests)."""

    def __init__(self) -> None:
        import threading

        self._document: str | None = None
        self._lock = threading.Lock()

    def read(self) -> str | None:
        return self._document

    def replace(self, old: str | None, new: str) -> bool:
        with self._lock:
            if self._document != old:
                return False
            self._document = new
            return True
