"""Transit ``random(/:source)(/:bytes)`` and ``hash(/:algorithm)``: no key involved; bound
to ``/v1/security``'s ``random`` and ``hash`` (any valid token, as there).

``random``: ``bytes`` (default 32, 1 byte to 1 MiB), ``format`` base64 (default) or hex,
``source`` ``platform`` or ``all`` (both the operating system's CSPRNG here: qimem has no
seal entropy source, so ``seal`` is refused). A single path segment after ``random/`` is the
byte count when it is a number, else the source (Vault's routing).

``hash``: ``input`` (base64), ``algorithm`` sha2-224 ... sha3-512 (default sha2-256; the URL's
wins), ``format`` hex (Vault's default) or base64 → ``{"sum": ...}``.
"""

from __future__ import annotations

import base64
from typing import Any

from qimem.server.transit.framework import (
    TransitOperation,
    TransitRequest,
    VaultError,
    b64_field,
    integer,
    string,
)
from qimem.services import randomness

_SOURCES = ("platform", "all")


def _format(request: TransitRequest, data: bytes, default: str) -> str:
    fmt = string(request.body, "format") or default
    if fmt == "hex":
        return data.hex()
    if fmt == "base64":
        return base64.b64encode(data).decode("ascii")
    raise VaultError(f"unsupported encoding format {fmt}; must be hex or base64")


def _random(request: TransitRequest) -> dict[str, Any]:
    source = request.params.get("source") or string(request.body, "source") or "platform"
    url_bytes = request.params.get("bytes")
    # /random/64: a byte count, not a source (ASCII digits: int() refuses "²")
    if url_bytes is None and source.isascii() and source.isdigit():
        source, url_bytes = string(request.body, "source") or "platform", source
    if source not in _SOURCES:
        raise VaultError(
            f"unsupported entropy source {source!r}: qimem draws from the operating system's "
            "CSPRNG (platform, all); it has no seal source"
        )
    if url_bytes is not None:
        if not (url_bytes.isascii() and url_bytes.isdigit()) or len(url_bytes) > 9:
            raise VaultError(f"error parsing URL bytes: {url_bytes[:20]!r} is not a number")
        count: int | None = int(url_bytes)
    else:
        count = integer(request.body, "bytes", 32)
    data = randomness.random_bytes(request.app, count)  # type: ignore[arg-type]
    return {"random_bytes": _format(request, data, "base64")}


def _hash(request: TransitRequest) -> dict[str, Any]:
    data = b64_field(request.body, "input", empty_is_none=False)
    if data is None:
        raise VaultError("missing input to process")
    algorithm = (
        request.params.get("algorithm")
        or string(request.body, "algorithm")
        or randomness.DEFAULT_HASH
    )
    return {"sum": _format(request, randomness.digest(data, algorithm), "hex")}


_RANDOM_FIELDS = ("bytes", "format", "source")
_HASH_FIELDS = ("input", "algorithm", "format")


def _random_op(name: str, path: str) -> TransitOperation:
    return TransitOperation(name, "POST", path, _random, "random", _RANDOM_FIELDS, key_names=None)


OPERATIONS = (
    _random_op("transitRandom", "/random"),
    _random_op("transitRandomSource", "/random/{source}"),
    _random_op("transitRandomSourceBytes", "/random/{source}/{bytes}"),
    TransitOperation("transitHash", "POST", "/hash", _hash, "hash", _HASH_FIELDS, key_names=None),
    TransitOperation(
        "transitHashAlgorithm",
        "POST",
        "/hash/{algorithm}",
        _hash,
        "hash",
        _HASH_FIELDS,
        key_names=None,
    ),
)
