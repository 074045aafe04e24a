"""Message operations: encrypt, decrypt (single or batch), rewrap and data keys, declared
once (:mod:`qimem.server.operations`).

Batch bodies are ``{"items": [...]}``; the response holds one entry per item, in order,
either the result or ``{"error": {"code", "message"}}``, so one bad item never fails the
others. The response to a batch is 200 even when some items failed.
"""

from __future__ import annotations

from typing import Any

from qimem import services
from qimem.app import AppContext
from qimem.server import key_names
from qimem.server.keys import ref_of
from qimem.server.media import Field, Spec, base64_bytes, boolean, key_id_string, ref_string
from qimem.server.operations import Doc, Operation

KEY_FIELDS = (Field("key_id", key_id_string), Field("key", ref_string))
#: The OpenAPI properties of KEY_FIELDS.
KEY_REF_SCHEMA = {
    "key_id": {
        "type": "string",
        "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        "description": "Exactly this key version (409 if it is no longer active).",
    },
    "key": {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        "description": "A key_id, lineage_id or key name (its active version).",
    },
}
_CONTEXT = Field("context", base64_bytes, nullable=True)  # derived keys (docs/keys.md)
ENCRYPT_SPEC = Spec(
    *KEY_FIELDS,
    Field("plaintext", base64_bytes, required=True),
    Field("aad", base64_bytes, nullable=True),
    _CONTEXT,
    one_of=("key_id", "key"),
)
DECRYPT_SPEC = Spec(
    Field("envelope", base64_bytes, required=True),
    Field("aad", base64_bytes, nullable=True),
    _CONTEXT,
)
REWRAP_SPEC = Spec(*DECRYPT_SPEC.fields.values(), Field("target", ref_string, nullable=True))
DATAKEY_SPEC = Spec(
    *KEY_FIELDS,
    _CONTEXT,
    Field("aad", base64_bytes, nullable=True),
    Field("wrapped_only", boolean, nullable=True),
    one_of=("key_id", "key"),
)


def _given(args: dict[str, Any], *names: str) -> dict[str, Any]:
    """The optional arguments the body gave (the services' defaults stand for the rest)."""
    return {name: args[name] for name in names if name in args}


def _encrypt(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.encrypt(
        app,
        ref_of(args),
        args["plaintext"],
        aad=args.get("aad"),
        realm=realm,
        context=args.get("context"),
    ).to_dict()


def _decrypt(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.decrypt(
        app, args["envelope"], aad=args.get("aad"), realm=realm, context=args.get("context")
    ).to_dict()


def _rewrap(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.rewrap(
        app,
        args["envelope"],
        aad=args.get("aad"),
        realm=realm,
        context=args.get("context"),
        **_given(args, "target"),
    ).to_dict()


def _datakey(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.datakey(
        app,
        ref_of(args),
        realm=realm,
        context=args.get("context"),
        **_given(args, "aad", "wrapped_only"),
    ).to_dict()


OPERATIONS = (
    Operation(
        "encrypt",
        "POST",
        "/encrypt",
        _encrypt,
        Doc(
            "Encrypt one plaintext, or a batch.",
            "EncryptResult",
            "The envelope (or one result or error per batch item).",
            request="EncryptRequest",
            batch_response="EncryptBatchResult",
        ),
        spec=ENCRYPT_SPEC,
        permission="crypto:encrypt",
        key_names=key_names.ref_names,
        audit="crypto.encrypt",
        batch=True,
        short="/encrypt",
        metric="encrypt",
    ),
    Operation(
        "decrypt",
        "POST",
        "/decrypt",
        _decrypt,
        Doc(
            "Decrypt one envelope, or a batch.",
            "DecryptResult",
            "The plaintext (or one result or error per batch item).",
            request="DecryptRequest",
            batch_response="DecryptBatchResult",
            errors=(400, 403, 413, 415, 503, 404, 422),
        ),
        spec=DECRYPT_SPEC,
        permission="crypto:decrypt",
        key_names=key_names.envelope_names,
        audit="crypto.decrypt",
        batch=True,
        short="/decrypt",
        metric="decrypt",
    ),
    Operation(
        "rewrap",
        "POST",
        "/rewrap",
        _rewrap,
        Doc(
            "Re-seal an envelope (or a batch) under its lineage's active version, or under "
            "a target key.",
            "EncryptResult",
            "The new envelope (or one result or error per batch item).",
            request="RewrapRequest",
            batch_response="EncryptBatchResult",
            errors=(400, 403, 413, 415, 503, 404, 409, 422),
        ),
        spec=REWRAP_SPEC,
        permission="crypto:rewrap",
        key_names=key_names.envelope_names,
        # another key: what a decrypt and an encrypt would need (no new way to read data)
        also=(
            ("crypto:decrypt", key_names.retargeted_sources),
            ("crypto:encrypt", key_names.target_names),
        ),
        audit="crypto.rewrap",
        batch=True,
        metric="rewrap",
    ),
    Operation(
        "datakey",
        "POST",
        "/datakey",
        _datakey,
        Doc(
            "A fresh data key, in the clear and wrapped (or wrapped only).",
            "DataKey",
            "The data key.",
            request="DataKeyRequest",
        ),
        spec=DATAKEY_SPEC,
        permission="crypto:datakey",
        key_names=key_names.ref_names,
        audit="crypto.datakey",
        metric="datakey",
    ),
)
