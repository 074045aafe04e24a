"""Signing, MAC, public key, random and hash operations (issue 16), declared once
(:mod:`qimem.server.operations`).

Signatures and tags are qimem's format by default (they name the key version that made
them, so they verify after rotation); ``"raw": true`` gives and takes the algorithm's bare
signature or tag. ``verify`` and ``verify-mac`` answer ``{"valid": false, ...}`` (200) for
a signature or tag that does not verify, never an error. Random and hash use no key: any
valid token may call them (see docs/http.md).
"""

from __future__ import annotations

from typing import Any

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.server import key_names
from qimem.server.crypto import KEY_FIELDS
from qimem.server.keys import KEY_PARAM, ref_of
from qimem.server.media import Field, Spec, b64, base64_bytes, boolean, integer, plain_string
from qimem.server.operations import Doc, Operation
from qimem.server.signing_openapi import (
    MARSHALINGS,
    PEM_TYPE,
    PUBLIC_FORMATS,
    PUBLIC_PARAMETERS,
    SCHEMAS,
)


def _version(name: str, value: Any) -> int:
    number = integer(name, value)
    if number < 1:
        raise ValidationError(f"'{name}' must be a version number", code="invalid_value")
    return number


def _query_version(name: str, value: Any) -> int:
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 9:
        raise ValidationError(f"'{name}' must be a version number", code="invalid_value")
    return _version(name, int(value))


def _choice(*choices: str) -> Any:
    def parse(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValidationError(
                f"'{name}' must be one of: {', '.join(choices)}", code="invalid_value"
            )
        return value

    return parse


_OPTIONS = (Field("raw", boolean, nullable=True),)
_SIGN_OPTIONS = (
    Field("prehashed", boolean, nullable=True),
    Field("marshaling", _choice(*MARSHALINGS), nullable=True),
    *_OPTIONS,
)
_VERSION = Field("version", _version, nullable=True)
SIGN_SPEC = Spec(
    *KEY_FIELDS,
    Field("message", base64_bytes, required=True),
    *_SIGN_OPTIONS,
    one_of=("key_id", "key"),
)
VERIFY_SPEC = Spec(
    *KEY_FIELDS,
    Field("message", base64_bytes, required=True),
    Field("signature", base64_bytes, required=True),
    *_SIGN_OPTIONS,
    _VERSION,
    one_of=("key_id", "key"),
)
MAC_SPEC = Spec(
    *KEY_FIELDS, Field("data", base64_bytes, required=True), *_OPTIONS, one_of=("key_id", "key")
)
VERIFY_MAC_SPEC = Spec(
    *KEY_FIELDS,
    Field("data", base64_bytes, required=True),
    Field("tag", base64_bytes, required=True),
    *_OPTIONS,
    _VERSION,
    one_of=("key_id", "key"),
)
RANDOM_SPEC = Spec(Field("bytes", integer, required=True))
HASH_SPEC = Spec(
    Field("data", base64_bytes, required=True), Field("algorithm", plain_string, nullable=True)
)
PUBLIC_QUERY = Spec(Field("format", _choice(*PUBLIC_FORMATS)), Field("version", _query_version))


def _sign_options(args: dict[str, Any]) -> dict[str, Any]:
    return {
        "prehashed": args.get("prehashed", False),
        "marshaling": args.get("marshaling", "asn1"),
        "raw": args.get("raw", False),
    }


def _sign(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    from qimem.services import signing

    return signing.sign(
        app, ref_of(args), args["message"], realm=realm, **_sign_options(args)
    ).to_dict()


def _verify(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    from qimem.services import signing

    return signing.verify(
        app,
        ref_of(args),
        args["message"],
        args["signature"],
        realm=realm,
        version=args.get("version"),
        **_sign_options(args),
    ).to_dict()


def _mac(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    from qimem.services import macs

    return macs.mac(
        app, ref_of(args), args["data"], realm=realm, raw=args.get("raw", False)
    ).to_dict()


def _verify_mac(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    from qimem.services import macs

    return macs.verify_mac(
        app,
        ref_of(args),
        args["data"],
        args["tag"],
        realm=realm,
        raw=args.get("raw", False),
        version=args.get("version"),
    ).to_dict()


def _random(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    from qimem.services import randomness

    return {"random": b64(randomness.random_bytes(app, args["bytes"]))}


def _hash(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    from qimem.services import randomness

    algorithm = args.get("algorithm") or randomness.DEFAULT_HASH
    return {"digest": b64(randomness.digest(args["data"], algorithm)), "algorithm": algorithm}


def _public(app: AppContext, realm: str, args: dict[str, Any]) -> Any:
    from qimem.services import signing

    form = args.get("format", "json")
    if form == "jwks":
        if "version" in args:
            raise ValidationError(
                "'version' names one key; format=jwks gives every verifying version",
                code="invalid_request",
            )
        return {"keys": [k.jwk for k in signing.public_keys(app, args["key_id"], realm=realm)]}
    found = signing.public_key(app, args["key_id"], realm=realm, version=args.get("version"))
    if form == "pem":
        return found.pem  # text: QueryResource sends it as application/x-pem-file
    return found.jwk if form == "jwk" else found.to_dict()


def _pick(*names: str) -> dict[str, Any]:
    return {name: SCHEMAS[name] for name in names}


def _message_op(
    name: str,
    path: str,
    call: Any,
    spec: Spec,
    permission: str,
    request: str,
    response: str,
    summary: str,
) -> Operation:
    """A key operation on a message, single or batch (sign, verify, mac, verify-mac)."""
    return Operation(
        name,
        "POST",
        path,
        call,
        Doc(
            summary,
            response,
            "The result (or one result or error per batch item).",
            request=request,
            batch_response=response.replace("Result", "BatchResult"),
            schemas=_pick(request, response, response.replace("Result", "BatchResult")),
        ),
        spec=spec,
        permission=permission,
        key_names=key_names.ref_names,
        audit="crypto." + path[1:].replace("-", "_"),
        batch=True,
        metric=path[1:],
    )


OPERATIONS = (
    _message_op(
        "sign", "/sign", _sign, SIGN_SPEC, "keys:sign", "SignRequest", "SignResult",
        "Sign a message (or a batch) with a signing key's active version.",
    ),
    _message_op(
        "verify", "/verify", _verify, VERIFY_SPEC, "keys:verify", "VerifyRequest",
        "VerifyResult", "Verify a signature (or a batch): valid true or false.",
    ),
    _message_op(
        "mac", "/mac", _mac, MAC_SPEC, "keys:mac", "MacRequest", "MacResult",
        "The MAC tag of data (or a batch) under a MAC key's active version.",
    ),
    _message_op(
        "verifyMac", "/verify-mac", _verify_mac, VERIFY_MAC_SPEC, "keys:verify-mac",
        "VerifyMacRequest", "VerifyResult", "Verify a MAC tag (or a batch): valid true or false.",
    ),
    Operation(
        "publicKey",
        "GET",
        "/keys/{key_id}/public",
        _public,
        Doc(
            "The public key of a signing key (PEM, JWK, or a JWK Set of its versions).",
            "PublicKey",
            "The public key in the format asked for.",
            tag="keys",
            errors=(400, 403, 404, 409, 503),
            parameters=PUBLIC_PARAMETERS,
            schemas=_pick("PublicJwk", "PublicKey", "PublicJwks"),
            content={
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/" + name}
                            for name in ("PublicKey", "PublicJwk", "PublicJwks")
                        ]
                    }
                },
                PEM_TYPE: {"schema": {"type": "string"}},
            },
        ),
        params=(KEY_PARAM,),
        query=PUBLIC_QUERY,
        text_type=PEM_TYPE,
        permission="keys:read",
        key_names=key_names.param_key,
    ),
    Operation(
        "random",
        "POST",
        "/random",
        _random,
        Doc(
            "Random bytes from the server's CSPRNG (1 to 1 MiB).",
            "RandomResult",
            "The random bytes, base64.",
            request="RandomRequest",
            errors=(400, 403, 413, 415, 503),
            schemas=_pick("RandomRequest", "RandomResult"),
        ),
        spec=RANDOM_SPEC,
        audit="crypto.random",
    ),
    Operation(
        "hash",
        "POST",
        "/hash",
        _hash,
        Doc(
            "The digest of data (SHA-2 or SHA-3).",
            "HashResult",
            "The digest, base64.",
            request="HashRequest",
            errors=(400, 403, 413, 415, 503),
            schemas=_pick("HashRequest", "HashResult"),
        ),
        spec=HASH_SPEC,
    ),
)  # fmt: skip
