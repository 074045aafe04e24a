"""PostgreSQL's change feed: one ``LISTEN qimem_invalidate`` connection per process.

The SQL store's writers send their :class:`qimem.invalidation.Change` notices with
``pg_notify`` inside the transaction making the change (:func:`qimem.invalidation.notify`),
so PostgreSQL delivers them exactly when it commits, in commit order, to every listening
session, and never for a rollback.

:class:`PgChangeFeed` runs one daemon thread on a dedicated psycopg connection (autocommit,
not from the engine's pool): ``LISTEN``, then read the rotation marker (every change
committed after it is delivered), report ``connected``, and hand each notice to the sink
as it arrives. Every ``heartbeat`` seconds it sends a probe (below), and the
connection has TCP keepalives and a send timeout, so a connection that died quietly is
noticed within seconds. That heartbeat is a probe of delivery itself: a ``pg_notify`` on a
channel only this session listens on, which must come back within ``probe_timeout``
(through a transaction-pooling proxy it would not, see below). On any error or a lost probe
the sink hears ``disconnected`` (its caches poll) and the feed reconnects with exponential
backoff (50 ms doubling to ``max_backoff``).

The connection must be a session of its own: a transaction-pooling proxy (PgBouncer's
``pool_mode = transaction``) does not carry ``LISTEN`` (the probe notices, and the caches
keep polling); point the store at PostgreSQL or a session-pooling proxy.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa

from qimem.invalidation import CHANNEL, ChangeSink
from qimem.lazylog import get_logger

log = get_logger(__name__)

#: The listener's application_name in ``pg_stat_activity``.
APPLICATION_NAME = "qimem-invalidation"
#: TCP settings of the listener's connection (the URL's own values win): a dead peer is
#: noticed within ~10 s even when no packet comes back.
_TCP = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 5_000,  # ms
}


def conninfo(url: sa.URL) -> str:
    """The libpq connection string of a SQLAlchemy PostgreSQL URL (the driver dropped)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ProbeLost(Exception):
    """The listener's own probe notice did not come back: notices are not delivered."""


class PgChangeFeed:
    """Notices from ``LISTEN qimem_invalidate`` on a connection of its own (see module).

    :param url: the store's SQLAlchemy URL.
    :param marker: the SQL reading the rotation marker (one row, one column).
    """

    def __init__(
        self,
        url: sa.URL,
        marker: str,
        *,
        heartbeat: float = 2.0,
        probe_timeout: float = 2.0,
        max_backoff: float = 2.0,
        poll: float = 0.25,
    ) -> None:
        self._conninfo = conninfo(url)
        self._options: dict[str, Any] = {k: v for k, v in _TCP.items() if k not in url.query}
        self._marker_sql = marker
        self._heartbeat = heartbeat
        self._probe_timeout = probe_timeout
        self._probe_channel = f"{CHANNEL}_probe_{uuid.uuid4().hex}"
        self._max_backoff = max_backoff
        self._poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The listening session's backend pid while connected (tests terminate it).
        self.backend_pid: int | None = None
        #: Connections made (the first, then one per reconnect).
        self.connects = 0

    def start(self, sink: ChangeSink) -> None:
        if self._thread is not None:
            raise RuntimeError("this change feed is already started")
        self._thread = threading.Thread(
            target=self._run, args=(sink,), name=APPLICATION_NAME, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._poll + 5.0)

    def _run(self, sink: ChangeSink) -> None:
        delay = 0.05
        while not self._stop.is_set():
            connected = False
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    conn.execute(f"LISTEN {self._probe_channel}")
                    row = conn.execute(self._marker_sql).fetchone()
                    self.backend_pid = conn.info.backend_pid
                    self.connects += 1
                    sink.connected(row[0] if row is not None else None)
                    connected = True
                    delay = 0.05
                    self._listen(conn, sink)
            except Exception as exc:  # lost, refused, or the server went away
                if not self._stop.is_set():
                    log.warning(
                        "cache invalidation listener: %s; polling, reconnecting in %.2f s",
                        type(exc).__name__,
                        delay,
                    )
            finally:
                self.backend_pid = None
                if connected:
                    sink.disconnected()
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self._max_backoff)

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            application_name=APPLICATION_NAME,
            **self._options,
        )

    def _listen(self, conn: Any, sink: ChangeSink) -> None:
        probed = time.monotonic()  # when the last probe was sent
        waiting = False  # for it to come back
        while not self._stop.is_set():
            for notice in conn.notifies(timeout=self._poll):
                if notice.channel == CHANNEL:
                    sink.received(notice.payload)
                elif notice.channel == self._probe_channel:
                    waiting = False
            now = time.monotonic()
            if waiting and now - probed > self._probe_timeout:
                raise ProbeLost
            if not waiting and now - probed >= self._heartbeat:
                conn.execute("SELECT pg_notify(%s, '')", (self._probe_channel,))
                probed, waiting = now, True

    def __repr__(self) -> str:
        state = "listening" if self.backend_pid is not None else "not connected"
        return f"<PgChangeFeed {state}>"
