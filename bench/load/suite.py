"""A run's fresh database (on the shared PostgreSQL, or on a private cluster for a restart)
and temporary directory (``measure``), and the entry points ``run`` (``python -m bench
load``) and ``main`` (``python -m bench.load``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load.common import (
    DEFAULT_ADMIN_URL,
    FALLBACK_REVOCATION_BOUND,
    FALLBACK_ROTATION_BOUND,
    MIX,
    POSTGRES_ENV,
    REVOCATION_BOUND,
    ROTATION_BOUND,
    SUITE,
    Bounds,
    LoadFailure,
)
from bench.load.report import _save_report, render, rows
from bench.load.servers import fresh_database, workers_supported
from bench.load.session import run_load


def measure(
    duration: float,
    processes: int = 2,
    connections: int = 4,
    rounds: int = 3,
    admin_url: str | None = None,
    peer: bool = True,
    mix: dict[str, float] | None = None,
    *,
    servers: int = 1,
    workers: int = 1,
    bounds: Bounds | None = None,
    pg_restart: bool = False,
    outage: float | None = None,
    config_extra: str = "",
    floor: bool = False,
    floor_hash_slots: int = 0,
    same_source: bool = False,
) -> dict[str, Any]:
    """A fresh database and a temporary directory around ``run_load``; prints the table,
    saves the report, raises ``LoadFailure`` when the run failed. ``pg_restart``: the
    database is on a private PostgreSQL cluster (never the shared server), restarted once
    during the run."""
    admin_url = admin_url or os.environ.get(POSTGRES_ENV) or DEFAULT_ADMIN_URL
    workdir = Path(tempfile.mkdtemp(prefix="qimem-bench-load-"))
    kwargs: dict[str, Any] = {"servers": servers, "workers": workers, "bounds": bounds}
    kwargs["config_extra"] = config_extra
    kwargs["floor_admin_url"] = admin_url if floor else None
    kwargs["floor_hash_slots"] = floor_hash_slots
    kwargs["same_source"] = same_source
    args = (duration, processes, connections, rounds)
    try:
        if pg_restart:
            with private_postgres() as pg:
                store_url = pg.create_database("qimem_load")
                report = run_load(
                    store_url, workdir, *args, peer=peer, mix=mix, pg=pg, outage=outage, **kwargs
                )
        else:
            with fresh_database(admin_url) as store_url:
                report = run_load(store_url, workdir, *args, peer=peer, mix=mix, **kwargs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path = _save_report(report)
    print(render(report))
    print(f"report: {path}")
    if report["failures"]:
        raise LoadFailure("; ".join(report["failures"]))
    return report


@contextmanager
def private_postgres() -> Iterator[Any]:
    """A private PostgreSQL cluster on a free loopback port (``tests/pg_instance.py``),
    removed on exit: one the run may stop and start."""
    tests = str(Path(__file__).resolve().parents[2] / "tests")
    sys.path.insert(0, tests)
    try:
        import pg_instance  # tests/pg_instance.py (and the conftest it imports)
    finally:
        sys.path.remove(tests)
    pg_bin = pg_instance.find_pg_bin()
    if pg_bin is None or not (pg_bin / "initdb").exists():
        raise LoadFailure("--pg-restart needs the PostgreSQL server binaries (initdb, pg_ctl)")
    instance = pg_instance.PgInstance(pg_bin)
    try:
        instance.start()
        yield instance
    finally:
        instance.destroy()


def run(quick: bool, duration: float | None = None) -> list[dict[str, Any]]:
    """The load suite's rows (``python -m bench load [--quick] [--duration S]``): one
    server × one worker against the one-process peer, then, when ``qimem serve`` has
    ``--workers``, one server × two workers against the peer with two processes."""
    if duration is None:
        duration = 6.0 if quick else 30.0
    out = rows(measure(duration, rounds=1 if quick else 3))
    if workers_supported():
        out += rows(measure(duration, rounds=1 if quick else 3, workers=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.load``: every knob; ``--save`` merges the rows into latest.json."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=_package_doc().split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds on each server")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="connections per process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--postgres-url",
        help=f"admin URL of the server (default ${POSTGRES_ENV} or {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="OP=WEIGHT",
        help=f"change one weight of the mix (default {MIX}); repeatable",
    )
    parser.add_argument(
        "--servers", type=int, default=1, help="qimem servers on the one database (default 1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="qimem serve --workers of each server (default 1: the option is not passed); "
        "the peer gets servers × workers processes",
    )
    parser.add_argument(
        "--rotation-bound",
        type=float,
        metavar="S",
        help="seconds a rotation may take to reach the other servers/workers (default "
        f"{ROTATION_BOUND:g}, pushed; {FALLBACK_ROTATION_BOUND:g} with --pg-restart, polling)",
    )
    parser.add_argument(
        "--revocation-bound",
        type=float,
        metavar="S",
        help="seconds a revoked token may still be accepted elsewhere (default "
        f"{REVOCATION_BOUND:g}, pushed; {FALLBACK_REVOCATION_BOUND:g} with --pg-restart)",
    )
    parser.add_argument(
        "--pg-restart",
        action="store_true",
        help="run on a private PostgreSQL cluster and restart it once (stopped 2-5 s) during "
        "qimem's first round; documented 503s are allowed then",
    )
    parser.add_argument(
        "--outage", type=float, metavar="S", help="with --pg-restart: seconds down (default 2-5)"
    )
    parser.add_argument(
        "--config",
        default="",
        metavar="TOML",
        help="TOML merged into the qimem servers' config.toml, for an experiment (e.g. "
        "$'[identity]\\nmax_concurrent_hashes = 2'); the report records it",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the peer")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run the durable floor (bench/load/floor.py: the peer's routes with "
        "qimem's durability, on qimem's stack) as a third side",
    )
    parser.add_argument(
        "--floor-hash-slots",
        type=int,
        default=0,
        metavar="N",
        help="with --floor: at most N password hashes at once per floor process, as qimem's "
        "max_concurrent_hashes bounds its own (default 0: unbounded, like the peer)",
    )
    parser.add_argument(
        "--same-source",
        action="store_true",
        help="every client connection from 127.0.0.1 (default: each from its own loopback "
        "address, one user per host)",
    )
    parser.add_argument("--save", action="store_true", help="merge into results/latest.json")
    args = parser.parse_args(argv)
    if args.servers < 1 or args.workers < 1:
        parser.error("--servers and --workers must be at least 1")
    if args.floor_hash_slots < 0:
        parser.error("--floor-hash-slots must be 0 (unbounded) or more")
    if args.floor_hash_slots and not args.floor:
        parser.error("--floor-hash-slots needs --floor")
    mix = dict(MIX)
    for item in args.mix:
        op, _, weight = item.partition("=")
        if op not in MIX:
            parser.error(f"--mix: unknown operation {op!r} (known: {', '.join(MIX)})")
        try:
            mix[op] = float(weight)
        except ValueError:
            parser.error(f"--mix: {item!r} is not OP=NUMBER")
    from bench.__main__ import check_row, machine, save

    info = machine()
    started = time.monotonic()
    try:
        report = measure(
            args.duration,
            args.processes,
            args.connections,
            args.rounds,
            args.postgres_url,
            peer=not args.no_peer,
            mix=mix,
            servers=args.servers,
            workers=args.workers,
            bounds=_bounds(args.rotation_bound, args.revocation_bound, args.pg_restart),
            pg_restart=args.pg_restart,
            outage=args.outage,
            config_extra=args.config,
            floor=args.floor,
            floor_hash_slots=args.floor_hash_slots,
            same_source=args.same_source,
        )
    except LoadFailure as exc:
        print(f"load: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.save:
        command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
        ran = {
            SUITE: {
                "when": report["when"],
                "command": command.strip(),
                "quick": False,
                "seconds": round(time.monotonic() - started, 1),
                "machine": info,
            }
        }
        path = save([check_row(SUITE, r) for r in rows(report)], ran)
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _bounds(rotation: float | None, revocation: float | None, pg_restart: bool) -> Bounds:
    """The bounds given, the others by default (polling ones in a run with a restart)."""
    default = Bounds.fallback() if pg_restart else Bounds()
    return Bounds(
        default.rotation if rotation is None else rotation,
        default.revocation if revocation is None else revocation,
    )


def _package_doc() -> str:
    import bench.load

    return bench.load.__doc__ or ""
