"""One whole run (``run_load``), its fresh database and temporary directory (``measure``),
and the entry points ``run`` (``python -m bench load``) and ``main`` (``python -m bench.load``).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
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
    MIX,
    POSTGRES_ENV,
    SIZES,
    SUITE,
    DriveResult,
    LoadFailure,
)
from bench.load.driver import drive
from bench.load.peer import peer_server
from bench.load.report import _save_report, failures, render, rows, summarize
from bench.load.servers import fresh_database, qimem_server
from bench.load.verify import verify


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
) -> dict[str, Any]:
    """The whole run against a fresh database at ``store_url``; the report (see
    ``failures``). ``duration`` is the total time of load on qimem (and as much on the
    peer), split into ``rounds`` alternating rounds."""
    report: dict[str, Any] = {
        "duration": duration,
        "processes": processes,
        "connections": connections,
        "rounds": rounds,
        "mix": mix or MIX,
        "sizes": [s for s, _ in SIZES],
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with qimem_server(store_url, workdir, users=users) as server:
        sides = {"qimem": server.target}
        with peer_server(server.target, workdir) if peer else _nothing() as peer_target:
            if peer_target is not None:
                sides["peer"] = peer_target
            results = {name: DriveResult() for name in sides}
            order = list(sides)
            for r in range(rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    sample = random.Random(r).sample(
                        results[name].records, min(500, len(results[name].records))
                    )
                    part = drive(
                        sides[name],
                        duration / rounds,
                        processes,
                        connections,
                        sample,
                        100 * r,
                        mix,
                    )
                    results[name].merge(part)
            report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            for name, target in sides.items():
                s = summarize(results[name], results[name].elapsed)
                done = verify(target, results[name].records)
                checked = {f.name: getattr(done, f.name) for f in dataclasses.fields(done)}
                checked["statuses"] = {str(k): v for k, v in sorted(done.statuses.items())}
                s["verification"] = checked
                report[name] = s
        q = report["qimem"]
        q["versions"] = {
            key: (1 + results["qimem"].rotations.get(key, 0), server.versions(key))
            for key in server.target.rotated
        }
        q["server_requests"], q["server_5xx"] = server.metrics_5xx()
        server.proc.send_signal(signal.SIGTERM)
        try:
            q["exit_code"] = server.proc.wait(40)
        except subprocess.TimeoutExpired:
            q["exit_code"] = "timeout"
        q["traceback"] = "Traceback" in server.log()
    report["failures"] = failures(report)
    if report["failures"]:  # the server's side of the story (the access log has no secrets)
        report["qimem"]["log_tail"] = server.log()[-20000:]
    return report


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def measure(
    duration: float,
    processes: int = 2,
    connections: int = 4,
    rounds: int = 3,
    admin_url: str | None = None,
    peer: bool = True,
    mix: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A fresh database and a temporary directory around ``run_load``; prints the table,
    saves the report, raises ``LoadFailure`` when the run failed."""
    admin_url = admin_url or os.environ.get(POSTGRES_ENV) or DEFAULT_ADMIN_URL
    workdir = Path(tempfile.mkdtemp(prefix="qimem-bench-load-"))
    try:
        with fresh_database(admin_url) as store_url:
            report = run_load(
                store_url, workdir, duration, processes, connections, rounds, peer=peer, mix=mix
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path = _save_report(report)
    print(render(report))
    print(f"report: {path}")
    if report["failures"]:
        raise LoadFailure("; ".join(report["failures"]))
    return report


def run(quick: bool, duration: float | None = None) -> list[dict[str, Any]]:
    """The load suite's rows (``python -m bench load [--quick] [--duration S]``)."""
    if duration is None:
        duration = 6.0 if quick else 30.0
    return rows(measure(duration, rounds=1 if quick else 3))


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
    parser.add_argument("--no-peer", action="store_true", help="skip the peer")
    parser.add_argument("--save", action="store_true", help="merge into results/latest.json")
    args = parser.parse_args(argv)
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


def _package_doc() -> str:
    import bench.load

    return bench.load.__doc__ or ""
