"""The OpenAPI schemas and parameters of the signing, MAC, public key, random and hash
operations (:mod:`qimem.server.signing` declares the operations)."""

from __future__ import annotations

from typing import Any

from qimem.server.crypto import KEY_REF_SCHEMA
from qimem.server.keys import KEY_PARAMETER
from qimem.server.operations import batch_result

B64 = {
    "type": "string",
    "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
    "contentEncoding": "base64",
}
KEY_ID = {
    "type": "string",
    "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
}
MARSHALINGS = ("asn1", "jws")
PUBLIC_FORMATS = ("json", "pem", "jwk", "jwks")
PEM_TYPE = "application/x-pem-file"


def _request(*required: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(required),
        "oneOf": [{"required": ["key_id"]}, {"required": ["key"]}],
        "properties": {**KEY_REF_SCHEMA, **properties},
    }


def _described(schema: dict[str, Any], text: str, *, null: bool = False) -> dict[str, Any]:
    result = {**schema, "description": text}
    if null:
        result["type"] = [schema["type"], "null"]
    return result


_BOOL = {"type": "boolean"}
_SIGN_PROPS = {
    "prehashed": _described(
        _BOOL, "The message is already the digest the algorithm signs (ECDSA, RSA).", null=True
    ),
    "marshaling": {
        "type": ["string", "null"],
        "enum": [*MARSHALINGS, None],
        "description": "ECDSA signature encoding: asn1 (DER, default) or jws (r || s).",
    },
    "raw": _described(_BOOL, "The algorithm's bare signature or tag (no qimem header).", null=True),
}
_VERSION_PROP = {
    "type": ["integer", "null"],
    "minimum": 1,
    "description": "With raw: the key version to check against (default: active).",
}
_RESULT_PROPS = {"key_id": KEY_ID, "version": {"type": "integer", "minimum": 1}}
SCHEMAS: dict[str, Any] = {
    "SignRequest": _request(
        "message", message=_described(B64, "The message (or its digest), base64."), **_SIGN_PROPS
    ),
    "VerifyRequest": _request(
        "message",
        "signature",
        message=_described(B64, "The signed message (or its digest), base64."),
        signature=_described(B64, "The signature, base64."),
        version=_VERSION_PROP,
        **_SIGN_PROPS,
    ),
    "MacRequest": _request(
        "data", data=_described(B64, "The data, base64."), raw=_SIGN_PROPS["raw"]
    ),
    "VerifyMacRequest": _request(
        "data",
        "tag",
        data=_described(B64, "The data, base64."),
        tag=_described(B64, "The tag, base64."),
        raw=_SIGN_PROPS["raw"],
        version=_VERSION_PROP,
    ),
    "SignResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["signature", "key_id", "version", "algorithm"],
        "properties": {"signature": B64, **_RESULT_PROPS, "algorithm": {"type": "string"}},
    },
    "MacResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["tag", "key_id", "version", "algorithm"],
        "properties": {"tag": B64, **_RESULT_PROPS, "algorithm": {"type": "string"}},
    },
    "VerifyResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["valid", "key_id", "version"],
        "properties": {
            "valid": _BOOL,
            "key_id": {**KEY_ID, "type": ["string", "null"]},
            "version": {"type": ["integer", "null"], "minimum": 1},
        },
    },
    "SignBatchResult": batch_result("SignResult"),
    "MacBatchResult": batch_result("MacResult"),
    "VerifyBatchResult": batch_result("VerifyResult"),
    "RandomRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["bytes"],
        "properties": {
            "bytes": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
        },
    },
    "RandomResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["random"],
        "properties": {"random": B64},
    },
    "HashRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["data"],
        "properties": {
            "data": _described(B64, "The data to hash, base64."),
            "algorithm": {
                "type": ["string", "null"],
                "enum": [
                    *(f"sha{f}-{n}" for f in ("2", "3") for n in (224, 256, 384, 512)),
                    None,
                ],
                "description": "Default sha2-256.",
            },
        },
    },
    "HashResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["digest", "algorithm"],
        "properties": {"digest": B64, "algorithm": {"type": "string"}},
    },
    "PublicJwk": {
        "type": "object",
        "required": ["kty"],
        "properties": {"kty": {"type": "string"}, "kid": {"type": "string"}},
        "not": {"anyOf": [{"required": [m]} for m in ("d", "p", "q", "k", "priv", "seed")]},
    },
    "PublicKey": {
        "type": "object",
        "additionalProperties": False,
        "required": ["key_id", "version", "algorithm", "pem", "jwk"],
        "properties": {
            **_RESULT_PROPS,
            "algorithm": {"type": "string"},
            "pem": {"type": "string"},
            "jwk": {"$ref": "#/components/schemas/PublicJwk"},
        },
    },
    "PublicJwks": {
        "type": "object",
        "additionalProperties": False,
        "required": ["keys"],
        "properties": {
            "keys": {"type": "array", "items": {"$ref": "#/components/schemas/PublicJwk"}}
        },
    },
}
PUBLIC_PARAMETERS = (
    KEY_PARAMETER,
    {
        "name": "format",
        "in": "query",
        "required": False,
        "description": "json (default): PublicKey; pem: the PEM text; jwk: the JWK; "
        "jwks: a JWK Set of every version that can still verify.",
        "schema": {"type": "string", "enum": list(PUBLIC_FORMATS)},
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "description": "The key version (default: the active one); not with jwks.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 999999999},
    },
)
