"""One whole run (``run_load``): the qimem servers and the peer, the alternating rounds of
load, an optional PostgreSQL restart during qimem's first round, then the final checks
(every ciphertext again, key versions, ``/metrics``, the audit records, exit statuses,
tracebacks in the logs)."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from bench.load import cpu
from bench.load.common import AUDITED, MIX, SIZES, Bounds, DriveResult, LoadFailure
from bench.load.driver import drive
from bench.load.floor import floor_server
from bench.load.peer import peer_server
from bench.load.report import failures, summarize
from bench.load.servers import qimem_servers
from bench.load.verify import verify

OUTAGE = (2.0, 5.0)  # seconds PostgreSQL stays down in a run with a restart (uniform)
RESTART_SLACK = 3.0  # seconds of load the round needs after PostgreSQL is back


class Restartable(Protocol):
    """A PostgreSQL server the run may stop and start (``tests/pg_instance.PgInstance``)."""

    def stop(self, mode: str = "fast") -> None: ...

    def start(self) -> None: ...


class _Restart(threading.Thread):
    """Stops ``pg`` ``after`` seconds from now, starts it again ``down`` seconds later."""

    def __init__(self, pg: Restartable, after: float, down: float) -> None:
        super().__init__(name="pg-restart", daemon=True)
        self.pg, self.after, self.down = pg, after, down
        self.info: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            begun = time.time()
            time.sleep(self.after)
            stopping = time.time()
            self.pg.stop()
            stopped = time.time()
            time.sleep(self.down)
            self.pg.start()
            ready = time.time()
            self.info = {
                "stop_after_s": round(stopping - begun, 2),
                "down_s": round(ready - stopped, 2),
                "stopped_at": stopping,
                "ready_at": ready,
            }
        except BaseException as exc:  # reported by the run
            self.error = exc


def run_load(
    store_url: str,
    workdir: Path,
    duration: float = 30.0,
    processes: int = 2,
    connections: int = 4,
    rounds: int = 3,
    users: int = 4,
    peer: bool = True,
    mix: dict[str, float] | None = None,
    *,
    servers: int = 1,
    workers: int = 1,
    bounds: Bounds | None = None,
    pg: Restartable | None = None,
    outage: float | None = None,
    config_extra: str = "",
    floor_admin_url: str | None = None,
    floor_hash_slots: int = 0,
    same_source: bool = False,
) -> dict[str, Any]:
    """The whole run against a fresh database at ``store_url``; the report (see
    ``failures``). ``duration`` is the total time of load on qimem (and as much on the
    peer), split into ``rounds`` alternating rounds.

    ``servers`` qimem servers on that one database, each ``--workers workers`` (passed
    only when > 1); the peer gets ``servers`` × ``workers`` processes. ``pg``: the
    PostgreSQL server of ``store_url`` (a private one), stopped once during qimem's first
    round and started again ``outage`` seconds later (default: 2-5 s at random); qimem may
    then answer documented 503s (counted as ``unavailable``), nothing else. ``bounds``:
    by default the pushed 50 ms, or the polling fallback in a run with a restart.
    ``floor_admin_url``: also run the durable floor (``bench.load.floor``) on a fresh
    database of that server, as a third side (``floor_hash_slots``: its login-flood bound,
    ``bench.load.floor.floor_server``). ``same_source``: every client connection
    sends from 127.0.0.1 (by default each has its own loopback address).
    """
    # A restart drops every server's notification connection: the polling bounds apply.
    bounds = bounds or (Bounds.fallback() if pg is not None else Bounds())
    round_seconds = duration / rounds
    down = outage if outage is not None else random.uniform(*OUTAGE)
    after = max(1.0, 0.25 * round_seconds)
    if pg is not None and after + down + RESTART_SLACK > round_seconds:
        raise LoadFailure(
            f"a round of {round_seconds:g} s is too short for a PostgreSQL restart "
            f"({after:g} s in, {down:.1f} s down, {RESTART_SLACK:g} s after): raise --duration"
        )
    report: dict[str, Any] = {
        "duration": duration,
        "processes": processes,
        "connections": connections,
        "rounds": rounds,
        "servers": servers,
        "workers": workers,
        "mix": mix or MIX,
        "sizes": [s for s, _ in SIZES],
        "bounds": dataclasses.asdict(bounds),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "client_addresses": "127.0.0.1" if same_source else "one per connection",
    }
    if config_extra:
        report["config_extra"] = config_extra
    if floor_admin_url:
        report["floor_hash_slots"] = floor_hash_slots
    with qimem_servers(
        store_url, workdir, servers, workers, users=users, config_extra=config_extra
    ) as cluster:
        sides = {"qimem": cluster.target}
        with (
            peer_server(cluster.target, workdir) if peer else _nothing() as peer_target,
            floor_server(cluster.target, workdir, floor_admin_url, hash_slots=floor_hash_slots)
            if floor_admin_url
            else _nothing() as floor_target,
        ):
            if peer_target is not None:
                sides["peer"] = peer_target
            if floor_target is not None:
                sides["floor"] = floor_target
            results = {name: DriveResult() for name in sides}
            order = list(sides)
            for r in range(rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    sample = random.Random(r).sample(
                        results[name].records, min(500, len(results[name].records))
                    )
                    restart = None
                    if pg is not None and name == "qimem" and r == 0:
                        restart = _Restart(pg, after, down)
                        restart.start()
                    before = cpu.sample(sides[name].pids)
                    part = drive(
                        sides[name],
                        round_seconds,
                        processes,
                        connections,
                        sample,
                        100 * r,
                        mix,
                        bounds,
                        allow_503=pg is not None and name == "qimem",
                        same_source=same_source,
                    )
                    part.cpu = dataclasses.asdict(cpu.spent(before, cpu.sample(sides[name].pids)))
                    if restart is not None:
                        restart.join(60)
                        if restart.error is not None or restart.is_alive():
                            raise LoadFailure(f"the PostgreSQL restart failed: {restart.error}")
                        report["pg_restart"] = _outage(restart.info, part)
                    results[name].merge(part)
            report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            verified = {}
            for name, target in sides.items():
                s = summarize(results[name], results[name].elapsed)
                done = verify(target, results[name].records)
                verified[name] = done
                checked = {f.name: getattr(done, f.name) for f in dataclasses.fields(done)}
                checked["statuses"] = {str(k): v for k, v in sorted(done.statuses.items())}
                s["verification"] = checked
                report[name] = s
        q = report["qimem"]
        q["versions"] = {
            key: (1 + results["qimem"].rotations.get(key, 0), cluster.versions(key))
            for key in cluster.target.rotated
        }
        q["server_requests"], q["server_5xx"] = cluster.metrics_5xx()
        codes = cluster.stop()
        q["exit_codes"] = codes
        q["exit_code"] = next((c for c in codes if c != 0), 0)
        log = cluster.log()
        q["traceback"] = "Traceback" in log
        # Every request answered 200 on an audited route made exactly one success record
        # (the servers have stopped: their buffers are written).
        expected = results["qimem"].audited.copy()
        expected["crypto.decrypt"] += verified["qimem"].statuses.get(200, 0)
        actions = sorted(AUDITED.values())
        found = cluster.audit_counts(actions)
        q["audit"] = {
            "success": {
                a: (expected.get(a, 0), found["records"][a].get("success", 0)) for a in actions
            },
            "records": found["records"],
            "duplicated_record_ids": found["duplicated_record_ids"],
            "records_without_id": found["records_without_id"],
        }
    report["failures"] = failures(report)
    if report["failures"]:  # the servers' side of the story (the access log has no secrets)
        report["qimem"]["log_tail"] = log[-20000:]
    return report


def _outage(info: dict[str, Any], part: DriveResult) -> dict[str, Any]:
    """The restart's timing, and when the documented 503s came relative to the stop."""
    out = {k: v for k, v in info.items() if k.endswith("_s")}
    window = part.unavailable_window
    if window:
        out["first_503_s"] = round(window[0] - info["stopped_at"], 2)
        out["last_503_s"] = round(window[1] - info["stopped_at"], 2)
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
