"""Key operations: create, list, show (``/v1/security/keys``) and rotate, declared once
(:mod:`qimem.server.operations`)."""

from __future__ import annotations

from typing import Any

from qimem import services
from qimem.app import AppContext
from qimem.server import key_names
from qimem.server.media import Field, Spec, boolean, key_id_string, plain_string, ref_string
from qimem.server.operations import Doc, Operation

KEYS_PATH = "/v1/security/keys"
#: The ``{key_id}`` URL parameter of the OpenAPI document.
KEY_PARAMETER = {
    "name": "key_id",
    "in": "path",
    "required": True,
    "description": "A key_id, lineage_id or key name.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    },
}
KEY_PARAM = Field("key_id", ref_string)


CREATE_SPEC = Spec(
    Field("algorithm", plain_string, nullable=True),
    Field("name", plain_string, nullable=True),
    Field("derived", boolean, nullable=True),
    Field("purpose", plain_string, nullable=True),
)
ROTATE_SPEC = Spec(
    Field("key_id", key_id_string), Field("key", ref_string), one_of=("key_id", "key")
)


def ref_of(args: dict[str, Any]) -> str:
    """The key a body names with ``key_id`` or ``key`` (its spec made one of them present)."""
    return args.get("key_id") or args["key"]


def _create(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.create_key(
        app,
        algorithm=args.get("algorithm") or services.keys.DEFAULT_ALGORITHM,
        name=args.get("name"),
        realm=realm,
        derived=args.get("derived", False),
        purpose=args.get("purpose"),
    ).to_dict()


def _list(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [k.to_dict() for k in services.list_keys(app, realm=realm)]}


def _show(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.show_key(app, args["key_id"], realm=realm).to_dict()


def _rotate(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return services.rotate_key(app, ref_of(args), realm=realm).to_dict()


OPERATIONS = (
    Operation(
        "createKey",
        "POST",
        "/keys",
        _create,
        Doc(
            "Create a key (version 1, active).",
            "KeyVersion",
            "The new key version; Location names it.",
            request="CreateKeyRequest",
            tag="keys",
            errors=(400, 403, 413, 415, 503, 409),
        ),
        spec=CREATE_SPEC,
        permission="keys:create",
        key_names=key_names.new_key_name,
        audit="keys.create",
        short="/keys",
        status=201,
        location=KEYS_PATH + "/{key_id}",
    ),
    Operation(
        "listKeys",
        "GET",
        "/keys",
        _list,
        Doc(
            "List keys (newest version of each).",
            "KeyList",
            "The keys of the realm.",
            tag="keys",
            errors=(403, 503),
        ),
        permission="keys:read",
    ),
    Operation(
        "showKey",
        "GET",
        "/keys/{key_id}",
        _show,
        Doc(
            "Show a key lineage and all its versions.",
            "KeyDetails",
            "The lineage.",
            tag="keys",
            errors=(400, 403, 404, 503),
            parameters=(KEY_PARAMETER,),
        ),
        params=(KEY_PARAM,),
        permission="keys:read",
        key_names=key_names.param_key,
    ),
    Operation(
        "rotate",
        "POST",
        "/rotate",
        _rotate,
        Doc(
            "Rotate: the key_id becomes decrypt-only, a new version becomes active.",
            "KeyVersion",
            "The new active version.",
            request="KeyRefRequest",
            tag="keys",
        ),
        spec=ROTATE_SPEC,
        permission="keys:rotate",
        key_names=key_names.ref_names,
        audit="keys.rotate",
        short="/rotate",
    ),
)
