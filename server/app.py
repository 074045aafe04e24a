"""The Falcon app factory: one app, built from an AppContext and a few server options.

``create_app(app_ctx)`` is the unified server (``qimem serve``, ``qauth-api``): security,
identity and plugin APIs and operations endpoints. ``qimem-api`` is
``create_app(app_ctx, short_paths=True, security_only=True)``: the security API alone, also
answering ``POST /keys``, ``/encrypt``, ``/decrypt`` and ``/rotate``.

The security API's routes come from its operations' declarations
(:mod:`qimem.server.operations`). Resources are thin: parse and validate the body, call the
same :mod:`qimem.services` function as the CLI, render the result.
"""

from __future__ import annotations

from collections.abc import Iterable

import falcon

from qimem.app import AppContext
from qimem.server import errors
from qimem.server.auth_api import add_auth_routes
from qimem.server.auth_middleware import IdentityAuthMiddleware, rules_with_transit
from qimem.server.exposure import ClientMiddleware, Network
from qimem.server.metrics import Metrics
from qimem.server.middleware import (
    AccessLogMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from qimem.server.operations import add_routes
from qimem.server.ops import (
    HealthResource,
    MetricsResource,
    OpenApiResource,
    ReadyResource,
)
from qimem.server.plugins import PLUGINS_PATH, PluginsResource
from qimem.server.root_api import add_root_routes

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
OPENAPI_PATH = "/v1/openapi.json"


def create_app(
    app_ctx: AppContext,
    *,
    insecure_no_auth: bool = False,
    short_paths: bool = False,
    security_only: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    allowed_hosts: Iterable[str] = (),
    trusted_proxies: Iterable[Network] = (),
    require_tls_proxy: bool | None = None,
) -> falcon.App:
    """Build the WSGI app serving ``app_ctx``.

    :param insecure_no_auth: serve without tokens, to loopback clients only (local
        development); otherwise every route except the public ones needs a bearer token.
    :param short_paths: also answer ``qimem-api``'s short paths.
    :param security_only: serve the security API and operations endpoints only, without the
        identity and plugin APIs (``qimem-api``; tokens are still verified).
    :param max_body_bytes: request bodies over this many bytes get 413.
    :param metrics: the metrics to record into (default: a fresh per-app registry).
    :param allowed_hosts: ``Host`` values answered, others get 421 (empty: any;
        ``qimem serve --insecure-no-auth`` passes the loopback names).
    :param trusted_proxies: reverse proxies whose ``X-Forwarded-For``/``-Proto`` give the
        client's address (``req.context.client_addr``) and scheme.
    :param require_tls_proxy: refuse with 403 ``direct_access_refused`` a request whose peer
        is neither a trusted proxy nor loopback, or that a proxy forwards with an
        ``X-Forwarded-Proto`` other than ``https``; default: when ``trusted_proxies`` are
        given (``qimem serve --insecure-plain-http`` passes False).
    """
    trusted_proxies = tuple(trusted_proxies)
    if require_tls_proxy is None:
        require_tls_proxy = bool(trusted_proxies)
    transit = app_ctx.config.transit  # the Vault-Transit-compatible facade (docs/transit.md)
    auth = IdentityAuthMiddleware(
        app_ctx, insecure_no_auth=insecure_no_auth, rules=rules_with_transit(transit)
    )
    metrics = metrics or Metrics()
    app = falcon.App(
        middleware=[
            RequestIdMiddleware(),
            ClientMiddleware(
                allowed_hosts=allowed_hosts,
                trusted_proxies=trusted_proxies,
                require_tls_proxy=require_tls_proxy,
            ),
            MetricsMiddleware(metrics),
            AccessLogMiddleware(),
            BodyLimitMiddleware(max_body_bytes),
            auth,
        ],
        cors_enable=False,
    )
    app.req_options.strip_url_path_trailing_slash = False
    errors.install(app)

    add_routes(app, app_ctx, max_body_bytes, metrics, short_paths=short_paths)
    if transit.enabled:
        from qimem.server import transit as facade

        facade.install(
            app, app_ctx, max_body_bytes, metrics, transit.mount, token_lookup=not security_only
        )

    if not security_only:
        plugins = PluginsResource(app_ctx, max_body_bytes)
        app.add_route(PLUGINS_PATH, plugins)
        app.add_route(PLUGINS_PATH + "/{name}", plugins, suffix="item")
        add_auth_routes(app, app_ctx, max_body_bytes)
        add_root_routes(app, app_ctx, max_body_bytes)
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(app_ctx))
    app.add_route("/metrics", MetricsResource(metrics))
    served = served_paths(app)
    app.add_route(
        OPENAPI_PATH, OpenApiResource([*served, OPENAPI_PATH], transit_mount=transit.mount)
    )
    return app


def served_paths(app: falcon.App) -> list[str]:
    """Every route template ``app`` answers, in the router's order: what
    ``falcon.inspect.inspect_routes`` lists, without the source-file lookups that made it
    cost 0.4 s per app (every server start and every in-process test app)."""
    paths: list[str] = []

    def walk(nodes: list, parent: str) -> None:  # type: ignore[type-arg]
        for node in nodes:
            path = parent + "/" + node.raw_segment
            if node.resource is not None:
                paths.append(path)
            if node.children:
                walk(node.children, path)

    try:
        roots = app._router._roots  # noqa: SLF001 (as falcon.inspect walks it)
    except AttributeError:  # another router, or a falcon that renamed it: the slow way
        import falcon.inspect

        return [route.path for route in falcon.inspect.inspect_routes(app)]
    walk(roots, "")
    return paths
