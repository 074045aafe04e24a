"""Compute and verify MAC tags with MAC keys (purpose ``mac``: HMAC-SHA-256/512).

A tag names the key version that made it (the 26-byte header of docs/formats.md
"Signatures and tags v1", magic ``QMTG``), so it verifies after rotation; ``raw=True``
gives and takes the bare tag (for a webhook receiver computing HMAC itself). A tag is
checked by the algorithm's own ``verify`` (constant-time, full-length tags only; see
:class:`qimem.crypto_purposes.MacAlgorithm`), never by comparing with a recomputed ``mac``.
Like :func:`qimem.services.signing.verify`, :func:`verify_mac` answers ``valid=False`` for
any tag that does not verify, and raises only for what the caller controls.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.keys import DEFAULT_REALM
from qimem.services import handles
from qimem.services.lifecycle_common import audit
from qimem.services.signing import VerifyResult, _bytes, _ref

__all__ = ["MacResult", "VerifyResult", "mac", "verify_mac"]

_monotonic = time.monotonic
_HEADER_SIZE = handles.HEADER_SIZE


@dataclass(slots=True)
class MacResult:
    """A MAC tag and the key version that made it (a record: treat it as read-only)."""

    tag: bytes = field(repr=False)
    key_id: str
    version: int
    algorithm: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": base64.b64encode(self.tag).decode("ascii"),
            "key_id": self.key_id,
            "version": self.version,
            "algorithm": self.algorithm,
        }


def mac(
    app: AppContext,
    ref: str,
    data: bytes,
    *,
    realm: str = DEFAULT_REALM,
    raw: bool = False,
    actor: str | None = None,
) -> MacResult:
    """The MAC tag of ``data`` under the active version of the MAC key ``ref``.

    :param ref: a key_id (must be active), lineage_id or name.
    :param raw: the bare tag, without qimem's header.
    :raises ValidationError: ``wrong_purpose`` (not a MAC key).
    :raises KeyNotActiveError: ``ref`` is a key_id that was rotated away.
    """
    entry = handles.for_signing(app, _ref(ref), realm, "mac", "computing a MAC")
    tag = entry.algorithm.mac(entry.handle, data)  # type: ignore[attr-defined]
    if not raw:
        tag = entry.prefix + tag
    if actor is not None:
        audit(app, realm, actor, "crypto.mac", entry.key_id, buffered=True, version=entry.version)
    return MacResult(tag, entry.key_id, entry.version, entry.algorithm_name)


def verify_mac(
    app: AppContext,
    ref: str,
    data: bytes,
    tag: bytes,
    *,
    realm: str = DEFAULT_REALM,
    raw: bool = False,
    version: int | None = None,
    actor: str | None = None,
) -> VerifyResult:
    """Whether ``tag`` is the MAC tag of ``data`` under the MAC key ``ref``.

    A qimem tag names its key version, which must be a version of ``ref``'s lineage (of
    exactly that version, if ``ref`` is a key_id) that may still verify. With ``raw``,
    ``tag`` is a bare full-length tag, checked against ``version`` (default: the version a
    key_id ``ref`` names, else the active one).

    :raises ValidationError: ``wrong_purpose``; ``version`` with a qimem tag.
    :raises NotFoundError: no key ``ref`` (or no such ``version``).
    :raises ConflictError: the version is disabled, destroyed or below the minimum version.
    """
    if type(tag) is not bytes:
        tag = _bytes(tag, "the tag")
    if type(data) is not bytes:
        data = _bytes(data, "the data")
    if type(ref) is not str:
        ref = _ref(ref)
    entry: handles.CachedHandle | None = None
    if not raw and version is None:
        # Hot path (handles.named, inlined): ref's entry and the tag's prefix entry are
        # cached, unexpired, and the prefix names a version of ref's lineage.
        refs = app.cache.handles.get(realm)
        if refs is not None:
            owner = refs.get(ref)
            entry = refs.get(tag[:_HEADER_SIZE])
            now = _monotonic()
            if (
                owner is None
                or entry is None
                or owner.purpose != "mac"
                or owner.expires <= now
                or entry.expires <= now
                or entry.lineage_id != owner.lineage_id
                or (ref == owner.key_id and entry is not owner)
            ):
                entry = None
    if entry is not None:
        payload = tag[_HEADER_SIZE:]
    elif raw:
        entry = handles.version_entry(app, ref, realm, "mac", "MAC verification", version)
        payload = tag
    else:
        if version is not None:
            raise ValidationError("a qimem tag names its key version; give version= only with raw")
        entry = handles.named(app, ref, tag, realm, "mac", "MAC verification")
        payload = tag[_HEADER_SIZE:]
    # The plugin's verify() decides (constant-time by the MacAlgorithm contract; a full-length
    # tag only): no assumption here that mac() is deterministic. The built-in HMAC's verify
    # takes a fast path for exact bytes, as cheap as recomputing mac() and comparing.
    check = entry.algorithm.verify if entry is not None else None  # type: ignore[attr-defined]
    valid = check is not None and check(entry.handle, data, payload) is True  # type: ignore[union-attr]
    if actor is not None:
        target = entry.key_id if entry is not None else ref
        audit(app, realm, actor, "crypto.verify_mac", target, buffered=True, valid=valid)
    if not valid:
        return VerifyResult(False)
    return VerifyResult(True, entry.key_id, entry.version)  # type: ignore[union-attr]
