"""One declaration per operation of the security API (DESIGN.md §10).

An :class:`Operation` says everything about one operation once: its name, method and path
(under ``/v1/security``, plus ``qimem-api``'s short alias where there is one), the request
:class:`~qimem.server.media.Spec`, the service call, the permission and how grants scoped to
key-name patterns find the key names, the audit action, whether ``{"items": [...]}``
batches are allowed, and its OpenAPI fragment. From the declarations come:

* the Falcon routes (:func:`add_routes`), served by two small generic resources;
* the authorization rules (``qimem.server.auth_middleware.default_rules``);
* the OpenAPI paths (:func:`add_to_openapi`, called by ``qimem.server.ops``).

The call takes ``(app, realm, args)``: ``args`` is the parsed body (one item of a batch)
with the URL's parameters and the query string added; it returns the JSON answer. It knows
nothing of HTTP, so another facade (the Transit-compatible one of issue 17) can map its own
paths and field names onto the same declarations and calls.

Adding an operation is one declaration in a module listed in :data:`MODULES`, its service
function and its tests (docs/http.md, "Adding an operation").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import QimemError
from qimem.server.errors import qimem_error_body
from qimem.server.key_names import KeyNames
from qimem.server.media import Field, Spec, batch_items, read_json
from qimem.server.metrics import Metrics

PREFIX = "/v1/security"
#: The modules holding declarations (an ``OPERATIONS`` tuple each), in document order.
MODULES = (
    "qimem.server.keys",
    "qimem.server.crypto",
    "qimem.server.lifecycle",
    "qimem.server.signing",
)
SHORT_TAG = "qimem-api short paths"
SHORT_NOTE = "Served by qimem-api only: the same operation as its /v1/security path."

Call = Callable[[AppContext, str, dict[str, Any]], Any]


@dataclass(frozen=True)
class Doc:
    """The OpenAPI fragment of an operation (schemas by component name).

    :param request: the body schema of one item (a batch adds ``BatchRequest``).
    :param response: the answer's schema; ``batch_response`` the answer to a batch.
    :param schemas: component schemas this operation contributes to the document.
    :param content: the answer's content by media type, when it is not one JSON schema.
    """

    summary: str
    response: str
    answer: str
    request: str | None = None
    batch_response: str | None = None
    tag: str = "crypto"
    errors: tuple[int, ...] = (400, 403, 413, 415, 503, 404, 409)
    parameters: tuple[Mapping[str, Any], ...] = ()
    schemas: Mapping[str, Any] = field(default_factory=dict)
    content: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Operation:
    """One operation of the security API, declared once.

    :param path: under :data:`PREFIX`; ``short``: the qimem-api alias (served with
        ``short_paths``).
    :param params: parsers of the URL's parameters; ``query``: the query string's spec.
    :param key_names: finds the key names a grant scoped to key-name patterns must cover.
    :param also: further ``(permission, key names)`` the caller must hold (a rewrap to a
        target key: decrypt on the source, encrypt on the target); an empty list of names
        asks nothing.
    :param audit: the action the middleware records for each call; ``pair``: a management
        operation the service audits itself (see ``auth_middleware.Rule``).
    :param metric: the ``qimem_crypto_operations`` label counting it (batch items one each).
    :param location: for 201 answers, the Location header made from the answer's fields.
    :param text_type: the media type of an answer the call gives as text (not JSON).
    :param optional_body: a request without a body counts as ``{}``.
    """

    name: str
    method: str
    path: str
    call: Call
    doc: Doc
    spec: Spec | None = None
    params: tuple[Field, ...] = ()
    query: Spec | None = None
    permission: str | None = None
    key_names: KeyNames | None = None
    also: tuple[tuple[str, KeyNames], ...] = ()
    audit: str | None = None
    pair: str | None = None
    batch: bool = False
    short: str | None = None
    status: int = 200
    location: str | None = None
    metric: str | None = None
    text_type: str | None = None
    optional_body: bool = False


@cache
def security_operations() -> tuple[Operation, ...]:
    """Every declared operation of the security API, in :data:`MODULES` order."""
    found: list[Operation] = []
    for name in MODULES:
        found.extend(importlib.import_module(name).OPERATIONS)
    return tuple(found)


def operation(name: str) -> Operation:
    """The declared operation ``name`` (its operationId), for another facade to bind.

    :raises KeyError: no such operation.
    """
    for op in security_operations():
        if op.name == name:
            return op
    raise KeyError(name)


# ---- resources --------------------------------------------------------------------------


class BodyResource:
    """A POST operation: the JSON body (or each batch item) parsed by the spec and handed
    to the call. As lean as a hand-written resource: no work beyond parse, call, render."""

    def __init__(self, app: AppContext, limit: int, metrics: Metrics, op: Operation) -> None:
        self._app = app
        self._limit = limit
        self._metrics = metrics
        self._op = op
        self._spec = op.spec
        self._call = op.call
        self._params = op.params
        self._batch = op.batch
        self._metric = op.metric
        self._status = falcon.code_to_http_status(op.status)
        self._optional = op.optional_body
        self._actor = op.pair is not None  # the service audits itself: name the caller

    def _parse(self, item: Any, params: dict[str, Any]) -> dict[str, Any]:
        args = self._spec.parse(item)  # type: ignore[union-attr]  # read at call time
        if params:
            for parser in self._params:
                args[parser.name] = parser.parse(parser.name, params[parser.name])
        return args

    def on_post(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        if self._optional and not req.content_length:
            body: Any = {}
        else:
            body = read_json(req, self._limit)
        realm = req.context.realm
        items = batch_items(body) if self._batch else None
        metric = self._metric
        if items is None:
            try:
                args = self._parse(body, params)
                if self._actor:
                    args["actor"] = actor_of(req)
                result = self._call(self._app, realm, args)
            except QimemError:
                if metric is not None:
                    self._metrics.count_crypto(metric, failed=1)
                raise
            if metric is not None:
                self._metrics.count_crypto(metric, ok=1)
                if result.get("key_id") is None:  # an invalid signature: audit the key asked
                    req.context.key_ref = args.get("key_id") or args.get("key")
            if self._op.location is not None:
                resp.location = self._op.location.format(**result)
            resp.status = self._status
            resp.media = result
            return
        results: list[Any] = []
        failed = 0
        for item in items:
            try:
                results.append(self._call(self._app, realm, self._parse(item, params)))
            except QimemError as exc:
                failed += 1
                results.append(qimem_error_body(exc))
        if metric is not None:
            self._metrics.count_crypto(metric, ok=len(items) - failed, failed=failed)
        resp.media = {"items": results}


def actor_of(req: falcon.Request) -> str | None:
    """The audit actor a self-auditing service is given: the token's user (None without
    authentication: nothing is recorded)."""
    principal = getattr(req.context, "principal", None)
    return None if principal is None else f"{principal.username}@{principal.realm}"


class QueryResource:
    """A GET operation: the URL's parameters and the query string (``realm`` aside, which
    the authorization middleware reads) handed to the call."""

    def __init__(self, app: AppContext, op: Operation) -> None:
        self._app = app
        self._op = op

    def on_get(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        op = self._op
        args: dict[str, Any] = {}
        if op.query is not None:
            args = op.query.parse({k: v for k, v in req.params.items() if k != "realm"})
        for parser in op.params:
            args[parser.name] = parser.parse(parser.name, params[parser.name])
        result = op.call(self._app, req.context.realm, args)
        if isinstance(result, str):
            resp.text = result
            resp.content_type = op.text_type or falcon.MEDIA_TEXT
        else:
            resp.media = result


class _Route:
    """The responders of every operation sharing one path."""


def add_routes(
    app: falcon.App,
    app_ctx: AppContext,
    limit: int,
    metrics: Metrics,
    *,
    short_paths: bool = False,
    operations: Iterable[Operation] | None = None,
) -> None:
    """Serve the declared operations (with ``short_paths``, their qimem-api aliases too)."""
    routes: dict[str, _Route] = {}
    for op in security_operations() if operations is None else operations:
        if op.method == "GET":
            responder = QueryResource(app_ctx, op).on_get
        else:
            responder = BodyResource(app_ctx, limit, metrics, op).on_post
        paths = [PREFIX + op.path] + ([op.short] if short_paths and op.short else [])
        for path in paths:
            setattr(routes.setdefault(path, _Route()), "on_" + op.method.lower(), responder)
    for path, route in routes.items():
        app.add_route(path, route)


# ---- OpenAPI ----------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def fragment(op: Operation, *, short: bool = False) -> dict[str, Any]:
    """The OpenAPI operation object of ``op`` (at its short path with ``short``)."""
    doc = op.doc
    entry: dict[str, Any] = {
        "operationId": op.name + ("Short" if short else ""),
        "tags": [SHORT_TAG if short else doc.tag],
        "summary": doc.summary,
    }
    if doc.parameters:
        entry["parameters"] = [dict(p) for p in doc.parameters]
    if doc.request is not None:
        request: dict[str, Any] = _ref(doc.request)
        if op.batch:
            request = {"oneOf": [request, _ref("BatchRequest")]}
        entry["requestBody"] = {"required": not op.optional_body, "content": _json(request)}
    response: dict[str, Any] = _ref(doc.response)
    if op.batch and doc.batch_response is not None:
        response = {"oneOf": [response, _ref(doc.batch_response)]}
    content = dict(doc.content) if doc.content is not None else _json(response)
    ok: dict[str, Any] = {"description": doc.answer, "content": content}
    if op.location is not None:
        ok["headers"] = {"Location": {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(op.status): ok}
    for status in doc.errors:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    entry["responses"] = responses
    if short:
        entry["description"] = SHORT_NOTE
    return entry


def batch_result(item: str) -> dict[str, Any]:
    """The schema of a batch answer whose entries are ``item`` or an error."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "items": {"oneOf": [_ref(item), _ref("Error")]},
                "description": "One entry per request item, in order.",
            }
        },
    }


def add_to_openapi(doc: dict[str, Any], operations: Iterable[Operation] | None = None) -> None:
    """Add the declared operations' paths and component schemas to ``doc`` (in place)."""
    paths = doc.setdefault("paths", {})
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for op in security_operations() if operations is None else operations:
        for name, schema in op.doc.schemas.items():
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different OpenAPI schemas are named {name!r}")
        method = op.method.lower()
        paths.setdefault(PREFIX + op.path, {})[method] = fragment(op)
        if op.short:
            paths.setdefault(op.short, {})[method] = fragment(op, short=True)
