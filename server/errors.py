"""The one place HTTP error bodies are made: ``{"error": {"code": ..., "message": ...}}``.

Three handlers, most specific first (Falcon picks by the exception's MRO):

* :func:`handle_qimem_error` maps every :class:`qimem.errors.QimemError` by its
  ``http_status`` and ``code``;
* :func:`handle_http_error` gives Falcon's own errors (unknown route, method not allowed)
  the same shape;
* :func:`handle_unexpected` is the catch-all: it logs the exception *type* only (never its
  message or a traceback, which could hold request data) and answers a generic 500.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon

from qimem.errors import QimemError

log = logging.getLogger("qimem.server")

_FALCON_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The error body of the HTTP contract."""
    return {"error": {"code": code, "message": message}}


def qimem_error_body(exc: QimemError) -> dict[str, dict[str, str]]:
    """The body for a qimem error; server-side failures (5xx) get a generic message unless
    they are "store unavailable", which a client can act on (retry later)."""
    if exc.http_status >= 500 and exc.http_status != 503:
        return error_body(exc.code, "the server failed to handle this request")
    return error_body(exc.code, exc.message)


def handle_qimem_error(
    req: falcon.Request, resp: falcon.Response, exc: QimemError, params: Any
) -> None:
    """Map a :class:`QimemError` to its status and the error body."""
    if exc.http_status >= 500:
        log.warning(
            "request failed: %s (%s) request_id=%s",
            type(exc).__name__,
            exc.code,
            getattr(req.context, "request_id", "-"),
        )
    resp.status = exc.http_status
    resp.media = qimem_error_body(exc)
    if exc.http_status == 503:  # how long a client should wait: the error's own hint, or 5 s
        resp.set_header("Retry-After", str(getattr(exc, "retry_after", 5)))


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: Any
) -> None:
    """Falcon's own errors (404 no route, 405 wrong method ...) in the qimem error shape."""
    status = exc.status_code
    code = _FALCON_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
    if status == 404:
        message = "no such endpoint"
    elif status == 405:
        message = f"method {req.method} is not allowed here"
    else:
        message = exc.title or "request failed"
        if exc.description:
            message = f"{message}: {exc.description}"
    if exc.headers:
        for name, value in exc.headers.items():
            resp.set_header(name, value)
    resp.status = status
    resp.media = error_body(code, message)


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any
) -> None:
    """The catch-all: log the exception type only and answer a generic 500."""
    log.error(
        "unexpected %s while handling %s %s request_id=%s",
        type(exc).__name__,
        req.method,
        req.uri_template or "-",
        getattr(req.context, "request_id", "-"),
    )
    resp.status = 500
    resp.media = error_body("internal_error", "the server failed to handle this request")


def install(app: falcon.App) -> None:
    """Register the three handlers on ``app`` (order does not matter: MRO decides)."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(QimemError, handle_qimem_error)
