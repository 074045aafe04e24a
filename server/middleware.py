"""Cross-cutting request handling: request ids, access log, metrics, body size limit.

Falcon calls ``process_request`` in list order and ``process_response`` in reverse order,
and ``process_response`` runs for every request, including ones an error handler answered.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import falcon

from qimem.errors import PayloadTooLargeError
from qimem.server.media import LimitedStream
from qimem.server.metrics import Metrics

access_log = logging.getLogger("qimem.server.access")

REQUEST_ID_HEADER = "X-Request-Id"
UNMATCHED_ROUTE = "unmatched"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def route_of(req: falcon.Request) -> str:
    """The route template that matched (``/v1/security/keys/{key_id}``), never the raw path,
    so logs and metric labels cannot carry identifiers or grow without bound."""
    return req.uri_template or UNMATCHED_ROUTE


def elapsed(req: falcon.Request) -> float:
    """Seconds since :class:`RequestIdMiddleware` saw the request."""
    return time.perf_counter() - req.context.start


class RequestIdMiddleware:
    """Give each request an id: the client's ``X-Request-Id`` if it is a short token of safe
    characters, else a fresh random one; echo it in the response."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.start = time.perf_counter()
        given = req.get_header(REQUEST_ID_HEADER)
        if given is not None and _REQUEST_ID_RE.match(given):
            req.context.request_id = given
        else:
            req.context.request_id = uuid.uuid4().hex

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        resp.set_header(REQUEST_ID_HEADER, req.context.request_id)


class AccessLogMiddleware:
    """One JSON line per request on the ``qimem.server.access`` logger: method, route
    template, status, duration and request id. Never a path, query, header or body value."""

    def __init__(self, logger: logging.Logger = access_log) -> None:
        self._log = logger

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        self._log.info(
            json.dumps(
                {
                    "event": "http_request",
                    "method": req.method,
                    "route": route_of(req),
                    "status": resp.status_code,
                    "duration_ms": round(elapsed(req) * 1000.0, 3),
                    "request_id": req.context.request_id,
                },
                separators=(",", ":"),
            )
        )


class MetricsMiddleware:
    """Count every request by method, route template and status, and time it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        self._metrics.observe_request(req.method, route_of(req), resp.status_code, elapsed(req))


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes with 413.

    Two layers: a declared Content-Length over the limit is refused before anything is read,
    and the input stream is wrapped so that reading more than ``limit`` bytes fails too (a
    body without, or with a wrong, Content-Length cannot get past).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the body limit must be at least 1 byte")
        self.limit = limit

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        length = req.content_length
        if length is not None and length > self.limit:
            raise PayloadTooLargeError(f"request body is over the limit of {self.limit} bytes")
        req.stream = LimitedStream(req.stream, self.limit)
