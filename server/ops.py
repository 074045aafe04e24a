"""Operations endpoints: ``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/openapi.json``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import StoreUnavailableError
from qimem.server.metrics import CONTENT_TYPE, Metrics
from qimem.server.operations import add_to_openapi, security_operations

log = logging.getLogger("qimem.server")

#: Paths only ``qimem-api`` serves (short aliases of the /v1/security ones).
SHORT_PATHS = tuple(op.short for op in security_operations() if op.short)


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document: ``qimem/server/openapi.json`` (shared components, the
    lifecycle, operations and plugin paths) with the declared operations' paths
    (:mod:`qimem.server.operations`) and /v1/auth added."""
    text = resources.files("qimem.server").joinpath("openapi.json").read_text("utf-8")
    from qimem.server.auth_openapi import add_auth  # /v1/auth and bearer authentication
    from qimem.server.root_api import add_to_openapi as add_root  # issue 18
    from qimem.server.transit.openapi import add_to_openapi as add_transit  # issue 17

    doc = json.loads(text)
    add_to_openapi(doc)
    add_transit(doc)
    add_root(doc)
    return add_auth(doc)


class HealthResource:
    """``GET /healthz``: the process is up and serving."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    """``GET /readyz``: the key store answers; 503 ``store_unavailable`` when it does not."""

    def __init__(self, app: AppContext) -> None:
        self._app = app

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            self._app.store.ping()
        except StoreUnavailableError:
            raise
        except Exception as exc:  # a store plugin's own failure must not become a 500
            log.warning("readiness check failed: %s", type(exc).__name__)
            raise StoreUnavailableError("the key store is not ready") from None
        resp.media = {"status": "ready"}


class MetricsResource:
    """``GET /metrics``: Prometheus text format of this app's registry."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._metrics.render()
        resp.content_type = CONTENT_TYPE


class OpenApiResource:
    """``GET /v1/openapi.json``: the document, with only the paths this app serves."""

    def __init__(self, paths: Iterable[str], *, transit_mount: str = "transit") -> None:
        from qimem.server.transit.openapi import mounted

        served = set(paths)
        doc = dict(openapi_document())
        renamed = {mounted(p, transit_mount): v for p, v in doc["paths"].items()}
        doc["paths"] = {p: v for p, v in renamed.items() if p in served}
        self._data = json.dumps(doc, separators=(",", ":")).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._data
        resp.content_type = falcon.MEDIA_JSON
