"""Prometheus metrics of one app, in a registry of its own (never the global one).

A per-app registry keeps two apps in one process (tests, an embedding program) from
clashing on metric names and from seeing each other's counts.

Under ``qimem serve --workers N`` each worker is a process of its own: the master points
``PROMETHEUS_MULTIPROC_DIR`` at a private directory before forking, each worker calls
:func:`enable_multiprocess` (its counters and histograms then live in memory-mapped files
there), and :meth:`Metrics.render` sums every worker's files, the dead ones' included, so
a scrape answered by any worker shows the totals of the whole server.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from qimem.identity import audit_spill, authz_mac

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_multiprocess_dir: str | None = None
_jobs_counter: Any = None
_jobs_lock = threading.Lock()


def enable_multiprocess() -> None:
    """Record this process's metrics in ``$PROMETHEUS_MULTIPROC_DIR`` (set by the
    ``--workers`` master) and render the sum over every process that wrote there.

    Called in a worker before any metric is created. prometheus_client picks its value
    class when it is first imported; if that happened before the variable was set, the
    class is picked again here.
    """
    global _multiprocess_dir
    from prometheus_client import values

    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        raise RuntimeError(f"{MULTIPROC_ENV} is not set")
    values.ValueClass = values.get_value_class()
    _multiprocess_dir = path


def job_runs_counter() -> Any:
    """``qimem_background_job_runs_total{job}``: runs of the server's background jobs
    (``purge``), process-wide like the authorization integrity counter. Under
    ``--workers N`` it shows that a job runs once per server, not once per worker."""
    global _jobs_counter
    with _jobs_lock:
        if _jobs_counter is None:
            _jobs_counter = Counter(
                "qimem_background_job_runs",
                "Runs of the server's background jobs (one server runs each job once, "
                "however many workers it has).",
                ["job"],
                registry=None,
            )
            _jobs_counter.labels("purge")
        return _jobs_counter


class Metrics:
    """Request counts by route and status, latency histograms, crypto operation counts.

    Labelled children are cached in plain dicts: a lookup there is cheaper than
    ``labels()`` on every request, and a lost race only creates the same child twice.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "qimem_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qimem_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.crypto = Counter(
            "qimem_crypto_operations",
            "Key operations: encrypt, decrypt, rewrap, datakey, sign, verify, mac, verify-mac "
            "(batch items count one each).",
            ["operation", "outcome"],
            registry=self.registry,
        )
        # The identity layer counts authorization rows failing their MAC in one
        # process-wide counter; every app's registry exposes it.
        self.registry.register(authz_mac.failures_counter())
        self.registry.register(job_runs_counter())
        for counter in audit_spill.metrics().values():  # spilled, replayed, dropped audit
            self.registry.register(counter)
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._crypto_children: dict[tuple[str, str], Any] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and record its latency."""
        key = (method, route, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(method, route, str(status))
        counter.inc()
        lkey = (method, route)
        histogram = self._latency_children.get(lkey)
        if histogram is None:
            histogram = self._latency_children[lkey] = self.latency.labels(method, route)
        histogram.observe(seconds)

    def count_crypto(self, operation: str, ok: int = 0, failed: int = 0) -> None:
        """Count ``ok`` successful and ``failed`` failed operations of one kind."""
        for outcome, n in (("ok", ok), ("error", failed)):
            if n:
                key = (operation, outcome)
                child = self._crypto_children.get(key)
                if child is None:
                    child = self._crypto_children[key] = self.crypto.labels(operation, outcome)
                child.inc(n)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry; under ``--workers`` (see
        :func:`enable_multiprocess`), of every worker's metrics summed."""
        if _multiprocess_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=_multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)
