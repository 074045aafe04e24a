"""Scheduled key deletions, carried out in the background by a long-running process.

``qimem serve`` runs a :class:`DeletionPurger`: every ``interval`` seconds it deletes the key
lineages whose scheduled deletion date has passed (:func:`qimem.services.lifecycle.
purge_due_deletions`), so a deletion happens on its date even when nobody uses the key or
runs ``qimem keys purge``. Several servers on one database may purge at once: a lineage
another server deleted first is skipped. A store that is down is retried at the next tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from qimem.app import AppContext
from qimem.errors import QimemError
from qimem.services.lifecycle import purge_due_deletions

log = logging.getLogger("qimem.purge")

DEFAULT_INTERVAL = 60.0


class DeletionPurger:
    """A daemon thread that purges due deletions every ``interval`` seconds until stopped.

    :param clock: the current time (tests pass a clock that runs ahead).
    """

    def __init__(
        self,
        app: AppContext,
        interval: float = DEFAULT_INTERVAL,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if interval <= 0:
            raise ValueError("the purge interval must be positive")
        self._app = app
        self._interval = interval
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<DeletionPurger every {self._interval:g} s>"

    def run_once(self) -> list[str]:
        """Purge what is due now; return the deleted lineage ids. Never raises a qimem
        error: a failure is logged and the next tick tries again."""
        try:
            purged = purge_due_deletions(self._app, now=self._clock())
        except QimemError as exc:
            log.warning("scheduled deletions not purged this time: %s", exc.message)
            return []
        except Exception as exc:  # keep purging at later ticks; the type alone, no details
            log.error("scheduled deletions not purged this time: %s", type(exc).__name__)
            return []
        for lineage_id in purged:
            log.info("deleted key %s: its scheduled deletion date has passed", lineage_id)
        return purged

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.run_once()

    def start(self) -> DeletionPurger:
        """Start the background thread (the first purge runs one interval from now)."""
        self._thread = threading.Thread(target=self._loop, name="qimem-purge", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, waiting for a purge in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
