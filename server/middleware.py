"""Cross-cutting request handling: request ids, access log, metrics, body size limit.

Falcon calls ``process_request`` in list order and ``process_response`` in reverse order,
and ``process_response`` runs for every request, including ones an error handler answered.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from typing import Any

import falcon

from qimem.errors import PayloadTooLargeError
from qimem.random_ids import hex_id
from qimem.server.media import LimitedStream
from qimem.server.metrics import Metrics

access_log = logging.getLogger("qimem.server.access")

REQUEST_ID_HEADER = "X-Request-Id"
UNMATCHED_ROUTE = "unmatched"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


def route_of(req: falcon.Request) -> str:
    """The route template that matched (``/v1/security/keys/{key_id}``), never the raw path,
    so logs and metric labels cannot carry identifiers or grow without bound."""
    return req.uri_template or UNMATCHED_ROUTE


def method_of(req: falcon.Request) -> str:
    """The request method if it is a standard one, else ``OTHER``: any token is a valid
    method, so a raw method in a label or log line would let clients mint new series."""
    method = req.method
    return method if method in _METHODS else "OTHER"


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
            req.context.request_id = hex_id()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        resp.set_header(REQUEST_ID_HEADER, req.context.request_id)


class AccessLogHandler(logging.Handler):
    """A handler for the access log that writes whole lines in batches.

    Lines are appended to a buffer and written by a background thread every
    ``flush_interval`` seconds (and on :meth:`flush`/:meth:`close`), so a request never
    waits for a ``write`` system call. :class:`AccessLogMiddleware` hands it ready-made lines
    directly (no ``LogRecord``) when it is the logger's only handler.
    """

    def __init__(self, stream: Any, flush_interval: float = 0.2) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._flush_interval = flush_interval
        self._thread = threading.Thread(target=self._run, name="qimem-access-log", daemon=True)
        self._thread.start()

    def write_line(self, line: str) -> None:
        """Queue one line (thread-safe: ``deque.append`` is atomic)."""
        self._lines.append(line)

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record))

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_interval)
            self.flush()

    def flush(self) -> None:
        lines: list[str] = []
        pop = self._lines.popleft
        try:
            while True:
                lines.append(pop())
        except IndexError:
            pass
        if lines:
            with self.lock or threading.Lock():
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # closed or broken stream: drop the lines
                    pass

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()


class AccessLogMiddleware:
    """One JSON line per request on the ``qimem.server.access`` logger: method, route
    template, status, duration and request id. Never a path, query, header or body value.

    The line is built directly (every field is already safe: a known method or ``OTHER``, a
    route template of this app, an int, a float and a validated request id). With an
    :class:`AccessLogHandler` as the logger's only handler (as ``qimem serve`` sets it up)
    the line goes straight to it; otherwise a record goes to the logger's handlers, skipping
    the caller lookup ``Logger.info`` would do.
    """

    def __init__(self, logger: logging.Logger = access_log) -> None:
        self._log = logger
        self._routes: dict[str | None, str] = {}

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        log = self._log
        if not log.isEnabledFor(logging.INFO):
            return
        route = self._routes.get(req.uri_template)
        if route is None:
            route = self._routes[req.uri_template] = json.dumps(route_of(req))
        method = method_of(req)
        line = (
            f'{{"event":"http_request","method":"{method}","route":{route},'
            f'"status":{resp.status_code},"duration_ms":{elapsed(req) * 1000.0:.3f},'
            f'"request_id":"{req.context.request_id}"}}'
        )
        handlers = log.handlers
        if len(handlers) == 1 and not log.propagate and isinstance(handlers[0], AccessLogHandler):
            handlers[0].write_line(line)
        else:
            log.handle(logging.LogRecord(log.name, logging.INFO, __file__, 0, line, None, None))


class MetricsMiddleware:
    """Count every request by method, route template and status, and time it.

    Labels are bounded: a standard method or ``OTHER`` (:func:`method_of`), a route template
    of this app or ``unmatched`` (:func:`route_of`), never a raw method or path."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        self._metrics.observe_request(method_of(req), route_of(req), resp.status_code, elapsed(req))


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
