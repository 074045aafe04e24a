"""Request bodies: bounded reading, strict JSON and strict field validation.

Every JSON body goes through :func:`read_json` and one :class:`Spec`, so unknown fields,
missing fields, wrong types and bad base64 all give the same kind of 400, and no input can
reach a service function unchecked. Nothing here echoes a field's *value* back in an error
message (it may be plaintext or key material); only field names appear.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import falcon

from qimem.errors import PayloadTooLargeError, ValidationError
from qimem.keys import parse_uuid

JSON_TYPE = "application/json"
MAX_REF_LENGTH = 128
MAX_BATCH_ITEMS = 1000
_READ_CHUNK = 64 * 1024
# The same patterns as server/openapi.json, so the document and the server agree exactly.
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_PLAIN_RE = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]*\Z")


class UnsupportedMediaTypeError(ValidationError):
    """A request body that is not ``application/json``."""

    http_status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class LimitedStream:
    """A read-only wrapper of ``wsgi.input`` that refuses to yield more than ``limit`` bytes.

    The Content-Length check in :class:`~qimem.server.middleware.BodyLimitMiddleware` stops
    honest large bodies early; this stops a body whose length was not declared (or was
    declared wrongly) while it is being read, so no code path can read past the limit.
    """

    __slots__ = ("_stream", "_left", "limit")

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._left = limit
        self.limit = limit

    def read(self, size: int | None = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._stream.read(want) if want else b""
        self._left -= len(data)
        if self._left < 0:
            raise PayloadTooLargeError(f"request body is over the limit of {self.limit} bytes")
        return data

    def readline(self, size: int | None = -1) -> bytes:  # WSGI input interface
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._stream.readline(want) if want else b""
        self._left -= len(data)
        if self._left < 0:
            raise PayloadTooLargeError(f"request body is over the limit of {self.limit} bytes")
        return data

    def __iter__(self) -> Any:
        return iter(lambda: self.read(_READ_CHUNK), b"")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate object key")
    return result


_decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw request body, never reading more than ``limit`` + 1 bytes from the socket."""
    length = req.content_length
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
    if length is None and not req.env.get("wsgi.input_terminated"):
        return b""  # no declared length and no end marker: per WSGI there is no body
    want = limit + 1 if length is None else length
    parts: list[bytes] = []
    while want > 0:
        chunk = req.stream.read(min(want, _READ_CHUNK) if length is None else want)
        if not chunk:
            break
        parts.append(chunk)
        want -= len(chunk)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) > limit:
        raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
    return data


def read_json(req: falcon.Request, limit: int) -> Any:
    """Parse a JSON request body strictly (UTF-8, no NaN, no duplicate keys).

    :raises UnsupportedMediaTypeError: the Content-Type is not application/json.
    :raises PayloadTooLargeError: the body is over ``limit`` bytes.
    :raises ValidationError: an empty body or malformed JSON (code ``invalid_json``).
    """
    content_type = req.content_type
    if content_type != JSON_TYPE and (
        content_type is None or content_type.split(";", 1)[0].strip().lower() != JSON_TYPE
    ):
        raise UnsupportedMediaTypeError(
            "request bodies must be JSON (Content-Type: application/json)"
        )
    data = read_body(req, limit)
    if not data:
        raise ValidationError(
            "the request body is empty; a JSON object is expected", code="invalid_json"
        )
    try:
        return _decoder.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValidationError("the request body is not valid JSON", code="invalid_json") from None


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"'{name}' must be a string", code="invalid_type")
    return value


def ref_string(name: str, value: Any) -> str:
    """A key reference: a key_id, lineage_id or name (letters, digits, ``.``, ``_``, ``-``;
    at most 128 characters). Anything else cannot name a key, so it is refused before any
    store lookup."""
    text = _string(name, value)
    if not _REF_RE.match(text):
        raise ValidationError(
            f"'{name}' must be a key_id, lineage_id or key name (1 to {MAX_REF_LENGTH} "
            "letters, digits, '.', '_' or '-')",
            code="invalid_value",
        )
    return text


def key_id_string(name: str, value: Any) -> str:
    """A key_id: a canonical (lowercase, hyphenated) UUID string."""
    text = _string(name, value)
    if parse_uuid(text) is None:
        raise ValidationError(f"'{name}' must be a key_id (a UUID)", code="invalid_value")
    return text


def base64_bytes(name: str, value: Any) -> bytes:
    """Standard base64 (RFC 4648 §4, padded, no whitespace) decoded strictly.

    binascii's strict mode refuses characters outside the alphabet, padding anywhere but
    at the end and a missing pad; it lets through a pad after a whole quantum ("QUJD=",
    "QUJD===="), which the length and "===" checks refuse. A third of the time the regular
    expression this replaces took on a 16 KiB plaintext (41 µs against 138)."""
    text = _string(name, value)
    if len(text) % 4 == 0 and text.isascii() and not text.endswith("==="):
        try:
            return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        except binascii.Error:
            pass
    raise ValidationError(f"'{name}' is not valid standard base64", code="invalid_base64")


def plain_string(name: str, value: Any) -> str:
    """A string of at most 128 characters without control characters (services validate
    the content further)."""
    text = _string(name, value)
    if len(text) > MAX_REF_LENGTH or not _PLAIN_RE.match(text):
        raise ValidationError(
            f"'{name}' must be at most {MAX_REF_LENGTH} printable characters", code="invalid_value"
        )
    return text


def boolean(name: str, value: Any) -> bool:
    """A JSON ``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValidationError(f"'{name}' must be true or false", code="invalid_type")
    return value


def integer(name: str, value: Any) -> int:
    """A JSON integer (not a boolean, not a float)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"'{name}' must be an integer", code="invalid_type")
    return value


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Field:
    """One body field: its name, a parser that validates and converts it, and whether it is
    required. ``nullable`` optional fields may be sent as ``null`` meaning "absent", or with
    ``clears`` meaning "no value" (kept as None: a policy limit removed)."""

    name: str
    parse: Callable[[str, Any], Any]
    required: bool = False
    nullable: bool = False
    clears: bool = False


class Spec:
    """The exact shape of a JSON object body: known fields only, each validated.

    ``one_of`` names groups of fields of which exactly one must be present (``key_id`` or
    ``key``).
    """

    def __init__(self, *fields: Field, one_of: tuple[str, ...] = ()) -> None:
        self.fields = {f.name: f for f in fields}
        self.one_of = one_of
        self._names = frozenset(self.fields)
        self._required = tuple(f.name for f in fields if f.required)

    def parse(self, body: Any) -> dict[str, Any]:
        """Validate ``body`` and return its converted fields (absent optional ones omitted).

        Checked in this order: an object at all, unknown fields, each given field's type and
        value, missing required fields, the ``one_of`` rule.
        """
        if type(body) is not dict:
            raise ValidationError("the request body must be a JSON object", code="invalid_type")
        if not self._names.issuperset(body):
            unknown = sorted(name for name in body if name not in self._names)
            listed = ", ".join(repr(n[:40]) for n in unknown[:5])
            raise ValidationError(f"unknown field(s): {listed}", code="unknown_field")
        fields = self.fields
        result: dict[str, Any] = {}
        for name, value in body.items():
            field = fields[name]
            if value is None and field.nullable:
                if field.clears:
                    result[name] = None
                continue
            result[name] = field.parse(name, value)
        for name in self._required:
            if name not in result:
                raise ValidationError(f"missing required field '{name}'", code="missing_field")
        if self.one_of:
            present = [n for n in self.one_of if n in result]
            if len(present) != 1:
                names = " or ".join(f"'{n}'" for n in self.one_of)
                problem = "missing" if not present else "more than one of"
                raise ValidationError(
                    f"{problem} {names}: give exactly one",
                    code="missing_field" if not present else "invalid_request",
                )
        return result


def batch_items(body: Any) -> list[Any] | None:
    """The ``items`` of a batch body ``{"items": [...]}``, or None for a single-item body."""
    if not isinstance(body, dict) or "items" not in body:
        return None
    if len(body) != 1:
        extra = ", ".join(repr(n[:40]) for n in sorted(n for n in body if n != "items")[:5])
        raise ValidationError(
            f"a batch body has only 'items'; unknown field(s): {extra}",
            code="unknown_field",
        )
    items = body["items"]
    if not isinstance(items, list):
        raise ValidationError("'items' must be an array", code="invalid_type")
    if not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise ValidationError(
            f"'items' must hold 1 to {MAX_BATCH_ITEMS} entries", code="invalid_value"
        )
    return items
