"""Key resources: create, list, show (``/v1/security/keys``) and rotate."""

from __future__ import annotations

import falcon

from qimem import services
from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.server.media import Field, Spec, key_id_string, plain_string, read_json, ref_string


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"'{name}' must be true or false", code="invalid_type")
    return value


CREATE_SPEC = Spec(
    Field("algorithm", plain_string, nullable=True),
    Field("name", plain_string, nullable=True),
    Field("derived", _bool, nullable=True),
)
ROTATE_SPEC = Spec(
    Field("key_id", key_id_string), Field("key", ref_string), one_of=("key_id", "key")
)

KEYS_PATH = "/v1/security/keys"


class CreateKeyResource:
    """``POST`` a new key (version 1, active) → 201 with its metadata."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = CREATE_SPEC.parse(read_json(req, self._limit))
        key = services.create_key(
            self._app,
            algorithm=body.get("algorithm") or services.keys.DEFAULT_ALGORITHM,
            name=body.get("name"),
            realm=req.context.realm,
            derived=body.get("derived", False),
        )
        resp.status = falcon.HTTP_201
        resp.location = f"{KEYS_PATH}/{key.key_id}"
        resp.media = key.to_dict()


class KeysResource(CreateKeyResource):
    """``/v1/security/keys``: create and list; ``/v1/security/keys/{key_id}``: show.

    ``{key_id}`` also accepts a lineage_id or a key name.
    """

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        found = services.list_keys(self._app, realm=req.context.realm)
        resp.media = {"keys": [k.to_dict() for k in found]}

    def on_get_item(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        details = services.show_key(
            self._app, ref_string("key_id", key_id), realm=req.context.realm
        )
        resp.media = details.to_dict()


class RotateResource:
    """``POST {key_id | key}`` → the new active version (409 ``key_not_active`` when the
    given key_id was already rotated away)."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = ROTATE_SPEC.parse(read_json(req, self._limit))
        ref = body.get("key_id") or body["key"]
        resp.media = services.rotate_key(self._app, ref, realm=req.context.realm).to_dict()
