"""Plugin resources: ``GET|POST /v1/plugins`` and ``GET|DELETE /v1/plugins/{name}``.

Thin over :mod:`qimem.services.plugins`, like the CLI's ``qimem plugins``. ``POST`` takes a
manifest as JSON (the same schema as the TOML file, see :mod:`qimem.manifest`) and records
it in the store; enabling a plugin is a host decision made in the config file, not over
HTTP. Permissions (server/auth_middleware.py): ``plugins:read`` for GET, ``plugins:admin``
(master realm) for POST and DELETE.
"""

from __future__ import annotations

import re

import falcon

from qimem import manifest
from qimem.app import AppContext
from qimem.errors import NotFoundError
from qimem.server.media import read_json
from qimem.services import plugins as service

PLUGINS_PATH = "/v1/plugins"
_NAME_RE = re.compile(manifest.NAME_PATTERN.replace("$", r"\Z"))


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise NotFoundError(f"no plugin {value[:80]!r}", code="plugin_not_found")
    return value


class PluginsResource:
    """The collection (list, register) and its items (show, remove)."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        found = service.list_plugins(self._app)
        resp.media = {
            "plugin_api": manifest.PLUGIN_API,
            "plugins": [info.to_dict() for info in found],
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self._limit)
        info = service.register_manifest(self._app, body, source="request body")
        resp.status = falcon.HTTP_201
        resp.location = f"{PLUGINS_PATH}/{info.name}"
        resp.media = info.to_dict()

    def on_get_item(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        resp.media = service.show_plugin(self._app, _name(name)).to_dict()

    def on_delete_item(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        service.remove_manifest(self._app, _name(name))
        resp.status = falcon.HTTP_204
