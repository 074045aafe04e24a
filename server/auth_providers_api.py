"""``/v1/auth/realms/{realm}/providers``: a realm's login providers and role mapping
(``GET`` shows it, secrets as ``"(set)"``; ``PUT`` replaces it; ``DELETE`` resets it to the
password provider alone) and ``POST .../providers/users {username, provider}`` provisions a
user for an external provider. Thin: parse, call :mod:`qimem.services.auth_providers`,
render. These routes are realm administration of the deployment: they are not in the
middleware's route table, so they take its closed default (``realms:admin`` in ``master``).
"""

from __future__ import annotations

import falcon

from qimem.app import AppContext
from qimem.server.acting import actor as _actor
from qimem.server.acting import caller
from qimem.server.media import Field, Spec, plain_string, read_json
from qimem.services import auth_providers as aps

EXTERNAL_USER_SPEC = Spec(
    Field("username", plain_string, required=True), Field("provider", plain_string, required=True)
)


class ProvidersResource:
    """``GET`` / ``PUT`` / ``DELETE`` a realm's login configuration."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        resp.media = aps.realm_providers(self._app, realm, principal=caller(req)).to_dict()

    def on_put(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        document = read_json(req, self._limit)
        resp.media = aps.set_realm_providers(
            self._app, realm, document, actor=_actor(req), principal=caller(req)
        ).to_dict()

    def on_delete(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        resp.media = aps.set_realm_providers(
            self._app, realm, None, actor=_actor(req), principal=caller(req)
        ).to_dict()

    def on_post_users(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        body = EXTERNAL_USER_SPEC.parse(read_json(req, self._limit))
        made = aps.add_external_user(
            self._app,
            realm,
            body["username"],
            body["provider"],
            actor=_actor(req),
            principal=caller(req),
        )
        resp.status = falcon.HTTP_201
        resp.media = {**made.to_dict(), "provider": body["provider"]}


def add_provider_routes(app: falcon.App, app_ctx: AppContext, prefix: str, limit: int) -> None:
    """Register the provider configuration routes under ``prefix`` (``/v1/auth/realms``)."""
    resource = ProvidersResource(app_ctx, limit)
    app.add_route(prefix + "/{realm}/providers", resource)
    app.add_route(prefix + "/{realm}/providers/users", resource, suffix="users")
