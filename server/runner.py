"""Serve a WSGI app with waitress, and stop gracefully.

On SIGTERM or SIGINT (or :meth:`Server.stop` from another thread) the server stops
accepting connections, lets every request in flight (being received, queued or running)
finish and its response be sent, closes idle keep-alive connections (a connection accepted
but silent so far gets :data:`FRESH_GRACE` seconds to send its request), and returns; the
process then exits 0. A deadline (``drain_timeout``) bounds the wait.

Waitress logs "Task queue depth is N" at WARNING for every request that waits for a worker
thread once all are busy; under load that logging alone cost ~10% of throughput, so the
``waitress.queue`` logger is raised to ERROR here (a full queue shows in latency metrics).

Slow clients: waitress stops accepting connections once ``connection_limit`` are open, and
closes idle ones after ``channel_timeout``, but a client that sends one byte now and then is
never idle. So the server also closes a connection whose request (headers and body) has
not fully arrived ``request_timeout`` seconds after its first byte. Both checks run every
``cleanup_interval`` seconds. Defaults (:data:`DEFAULT_CONNECTION_LIMIT` ...) keep
``/healthz`` answering with 500 clients trickling a byte every 5 s; floods larger than
that need a reverse proxy (docs/operations.md).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser

log = logging.getLogger("qimem.server")

DEFAULT_THREADS = 4
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_CONNECTION_LIMIT = 1000
DEFAULT_CHANNEL_TIMEOUT = 60
DEFAULT_REQUEST_TIMEOUT = 30
DEFAULT_CLEANUP_INTERVAL = 5
_LOOP_TIMEOUT = 1.0
#: Seconds a connection accepted just before a stop may take to send its first request.
FRESH_GRACE = 2.0


def quiet_waitress_queue_logger() -> None:
    """Silence waitress's per-request "Task queue depth" warning (see module docstring)."""
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def backstop_body_size(max_body_bytes: int) -> int:
    """Waitress's own body limit: above the app's, so the app answers 413 in JSON for any body
    up to it, while waitress still refuses to buffer arbitrarily large bodies."""
    return max(2 * max_body_bytes, max_body_bytes + 1024 * 1024)


class _TimedParser(HTTPRequestParser):
    """waitress's request parser, stamped with when the request's first byte arrived."""

    def __init__(self, adj: Any) -> None:
        super().__init__(adj)
        self.started = time.monotonic()


class _Channel(HTTPChannel):
    parser_class = _TimedParser
    #: whether the client has sent anything yet (see :meth:`Server._drain`)
    spoke = False

    def received(self, data: bytes) -> bool:
        if data:
            self.spoke = True
        return bool(super().received(data))


class Server:
    """A waitress server on one address with a graceful stop.

    :param app: the WSGI app.
    :param host: a numeric address or host name to bind (port 0 picks a free port; read
        :attr:`port` afterwards).
    :param threads: waitress worker threads.
    :param max_body_bytes: the app's body limit; waitress gets :func:`backstop_body_size`.
    :param drain_timeout: seconds to wait for in-flight requests on stop.
    :param connection_limit: open connections at most; beyond it new ones wait in the
        listen backlog.
    :param channel_timeout: seconds after which an idle connection is closed.
    :param request_timeout: seconds a request may take to arrive, from its first byte to
        the end of its body; the connection is closed after that.
    :param cleanup_interval: seconds between the two checks above.
    :param trusted_proxies: when given, waitress leaves ``X-Forwarded-*`` headers in place
        for :class:`qimem.server.exposure.ClientMiddleware`, which honours them only from
        these peers (otherwise waitress removes them).
    :param sock: a listening socket bound elsewhere (a ``--workers`` master's, shared by its
        workers) instead of binding ``host``/``port``; its copy in this process is closed on
        stop, the other processes' copies stay open.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        threads: int = DEFAULT_THREADS,
        max_body_bytes: int = 1024 * 1024,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        connection_limit: int = DEFAULT_CONNECTION_LIMIT,
        channel_timeout: int = DEFAULT_CHANNEL_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        cleanup_interval: int = DEFAULT_CLEANUP_INTERVAL,
        trusted_proxies: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        quiet_waitress_queue_logger()
        where: dict[str, Any] = (
            {"host": host, "port": port} if sock is None else {"sockets": [sock]}
        )
        self._server = waitress.create_server(
            app,
            **where,
            threads=threads,
            ident="qimem",
            max_request_body_size=backstop_body_size(max_body_bytes),
            clear_untrusted_proxy_headers=not trusted_proxies,
            asyncore_use_poll=True,
            connection_limit=connection_limit,
            channel_timeout=channel_timeout,
            cleanup_interval=cleanup_interval,
        )
        self.request_timeout = request_timeout
        self._server.channel_class = _Channel
        self._waitress_maintenance = self._server.maintenance
        self._server.maintenance = self._maintenance
        self.host = str(self._server.effective_host)
        self.port = int(self._server.effective_port)
        self.drain_timeout = drain_timeout
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _maintenance(self, now: float) -> None:
        """waitress's idle check, then close connections whose request is overdue."""
        self._waitress_maintenance(now)
        cutoff = time.monotonic() - self.request_timeout
        for channel in list(self._server.active_channels.values()):
            request = channel.request
            overdue = request is not None and getattr(request, "started", cutoff) < cutoff
            if overdue and not channel.requests:  # never while a response is on its way
                channel.will_close = True

    def stop(self) -> None:
        """Ask the server to stop (thread-safe and signal-safe); :meth:`serve_forever`
        returns once in-flight requests are done."""
        self._stopping.set()
        try:
            self._server.pull_trigger()
        except OSError:  # already closed
            pass

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until :meth:`serve_forever` has returned."""
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`, then drain and close everything."""
        server = self._server
        use_poll = server.adj.asyncore_use_poll
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=_LOOP_TIMEOUT, map=server._map, use_poll=use_poll, count=1)
            self._drain(use_poll)
        finally:
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
            wasyncore.close_all(server._map)
            self._stopped.set()

    def _drain(self, use_poll: bool) -> None:
        server = self._server
        wasyncore.dispatcher.close(server)  # stop listening; keep the trigger for wake-ups
        deadline = time.monotonic() + self.drain_timeout
        while server.active_channels and time.monotonic() < deadline:
            now = time.time()
            for channel in list(server.active_channels.values()):
                receiving = channel.request is not None  # a request partly received
                # Accepted just before the stop, its request not here yet (a --workers
                # reload retires a worker under traffic): not idle, for FRESH_GRACE.
                fresh = not channel.spoke and now - channel.creation_time < FRESH_GRACE
                if not (receiving or fresh or channel.requests or channel.total_outbufs_len):
                    channel.will_close = True  # idle (keep-alive): close it
            wasyncore.loop(timeout=0.05, map=server._map, use_poll=use_poll, count=1)
        if server.active_channels:
            log.warning(
                "shutdown deadline reached with %d connection(s) still busy",
                len(server.active_channels),
            )


@contextmanager
def stop_on_signals(server: Server) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT stop ``server`` gracefully (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        server.stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve(server: Server, on_ready: Callable[[], None] | None = None) -> None:
    """Serve in the foreground until SIGTERM/SIGINT, then drain and return.

    ``on_ready`` runs once the signal handlers are in place, just before the first
    connection is accepted (a ``--workers`` worker tells its master it is ready).
    """
    with stop_on_signals(server):
        if on_ready is not None:
            on_ready()
        server.serve_forever()
