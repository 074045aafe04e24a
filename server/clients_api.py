"""``/v1/auth/realms/{realm}/clients``: service accounts' lifecycle over HTTP.

``GET`` lists, ``POST {client_id, roles?}`` creates (the resource of
:mod:`qimem.server.auth_api`); ``GET /{client_id}`` shows; ``POST /{client_id}/disable``,
``/enable``, ``/rotate-secret {overlap_seconds?}`` and ``DELETE /{client_id}``. Thin: parse,
call :mod:`qimem.services.clients`, render. Every route needs ``users:admin`` in the realm
(the users' rule, in :mod:`qimem.server.auth_middleware`'s table); the services add the
no-escalation check. The OpenAPI entries are merged by :mod:`qimem.server.auth_openapi`.
"""

from __future__ import annotations

from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.identity.clients import MAX_OVERLAP
from qimem.server.acting import actor as _actor
from qimem.server.acting import caller
from qimem.server.acting import no_store as _no_store
from qimem.server.media import Field, Spec, read_body, read_json
from qimem.services import clients as cs


def _overlap(name: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_OVERLAP:
        raise ValidationError(
            f"'{name}' must be an integer from 0 to {MAX_OVERLAP}", code="invalid_value"
        )
    return value


ROTATE_SPEC = Spec(Field("overlap_seconds", _overlap))


class ClientsCollection:
    """``GET`` the realm's service accounts; ``POST`` creates one (``create``'s answer)."""

    def __init__(self, app: AppContext, create: Any) -> None:
        self._app = app
        self._create = create

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        found = cs.list_clients(self._app, realm, principal=caller(req))
        resp.media = {"clients": [{**u.to_dict(), "client_id": u.username} for u in found]}

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        self._create.on_post(req, resp, realm)


class ClientResource:
    """One service account: show, disable, enable, rotate its secret, delete."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_get(
        self, req: falcon.Request, resp: falcon.Response, realm: str, client_id: str
    ) -> None:
        resp.media = cs.show_client(self._app, realm, client_id, principal=caller(req))

    def on_delete(
        self, req: falcon.Request, resp: falcon.Response, realm: str, client_id: str
    ) -> None:
        cs.delete_client(self._app, realm, client_id, actor=_actor(req), principal=caller(req))
        resp.status = falcon.HTTP_204

    def _enabled(
        self, req: falcon.Request, resp: falcon.Response, realm: str, cid: str, on: bool
    ) -> None:
        resp.media = cs.set_client_enabled(
            self._app, realm, cid, on, actor=_actor(req), principal=caller(req)
        )

    def on_post_disable(
        self, req: falcon.Request, resp: falcon.Response, realm: str, client_id: str
    ) -> None:
        self._enabled(req, resp, realm, client_id, False)

    def on_post_enable(
        self, req: falcon.Request, resp: falcon.Response, realm: str, client_id: str
    ) -> None:
        self._enabled(req, resp, realm, client_id, True)

    def on_post_rotate(
        self, req: falcon.Request, resp: falcon.Response, realm: str, client_id: str
    ) -> None:
        body: dict[str, Any] = {}
        if req.content_length or req.content_type:
            body = ROTATE_SPEC.parse(read_json(req, self._limit))
        else:
            read_body(req, self._limit)
        made = cs.rotate_client_secret(
            self._app,
            realm,
            client_id,
            body.get("overlap_seconds"),
            actor=_actor(req),
            principal=caller(req),
        )
        _no_store(resp)
        resp.media = {**made.user.to_dict(), "client_id": client_id, "client_secret": made.secret}


def add_client_routes(
    app: falcon.App, app_ctx: AppContext, prefix: str, limit: int, create: Any
) -> None:
    """Register the service-account routes under ``prefix`` (``/v1/auth/realms``);
    ``create`` serves ``POST .../clients``. Their rules (the users' ``users:admin``) are in
    :mod:`qimem.server.auth_middleware`'s table."""
    item = ClientResource(app_ctx, limit)
    app.add_route(prefix + "/{realm}/clients", ClientsCollection(app_ctx, create))
    app.add_route(prefix + "/{realm}/clients/{client_id}", item)
    app.add_route(prefix + "/{realm}/clients/{client_id}/disable", item, suffix="disable")
    app.add_route(prefix + "/{realm}/clients/{client_id}/enable", item, suffix="enable")
    app.add_route(prefix + "/{realm}/clients/{client_id}/rotate-secret", item, suffix="rotate")


# -- OpenAPI (merged by qimem.server.auth_openapi) ---------------------------------------

_ERR = [401, 403, 404, 503]
_CLIENT_ID = {
    "name": "client_id",
    "in": "path",
    "required": True,
    "description": "Service account (client) id.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$",
    },
}
OPENAPI_SCHEMAS: dict[str, Any] = {
    "ClientList": {
        "type": "object",
        "properties": {
            "clients": {"type": "array", "items": {"$ref": "#/components/schemas/User"}}
        },
        "required": ["clients"],
        "additionalProperties": False,
    },
    "Client": {
        "type": "object",
        "properties": {
            "client_id": {"type": "string"},
            "enabled": {"type": "boolean"},
            "roles": {"type": "array", "items": {"type": "string"}},
            "previous_secrets_expire": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["client_id", "enabled", "roles"],
    },
    "RotateSecretRequest": {
        "type": "object",
        "properties": {
            "overlap_seconds": {"type": "integer", "minimum": 0, "maximum": MAX_OVERLAP}
        },
        "required": [],
        "additionalProperties": False,
    },
}


def openapi_paths(op: Any, realm: dict[str, Any], json_body: Any) -> dict[str, Any]:
    """The service-account paths, built with :mod:`qimem.server.auth_openapi`'s helpers."""
    params = [realm, _CLIENT_ID]
    base = "/v1/auth/realms/{realm}/clients/{client_id}"
    return {
        base: {
            "get": op(
                "showClient",
                "A service account (users:admin).",
                "200",
                "Client",
                _ERR,
                params=params,
            ),
            "delete": op(
                "deleteClient",
                "Delete a service account; its tokens stop working at once.",
                "204",
                None,
                _ERR,
                params=params,
            ),
        },
        base + "/disable": {
            "post": op(
                "disableClient",
                "Disable a service account; its tokens stop working at once.",
                "200",
                "Client",
                _ERR,
                params=params,
            )
        },
        base + "/enable": {
            "post": op(
                "enableClient",
                "Enable a service account (new tokens only).",
                "200",
                "Client",
                _ERR,
                params=params,
            )
        },
        base + "/rotate-secret": {
            "post": op(
                "rotateClientSecret",
                "A new secret (in this response only); the old one stays valid for "
                "overlap_seconds (default 3600; 0: at once, and its tokens are cut off).",
                "200",
                "NewClient",
                [400, *_ERR, 413, 415],
                params=params,
                body={
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/RotateSecretRequest"}
                        }
                    },
                },
            )
        },
    }


def list_operation(op: Any, realm: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/auth/realms/{realm}/clients``."""
    return op(
        "listClients",
        "The realm's service accounts (users:admin).",
        "200",
        "ClientList",
        _ERR,
        params=[realm],
    )
