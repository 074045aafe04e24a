"""``python -m bench [SUITE ...] [--quick]``: run benchmark suites, print ratios, save results.

Each suite is a module ``bench.<suite>`` with ``run(quick: bool) -> list[dict]``; a suite
whose module does not exist yet is skipped. ``load`` (a mixed-traffic reliability run on
PostgreSQL, ``--duration S``) runs only when named. Results go to ``bench/results/latest.json``
(merged with earlier runs of the other suites) plus a timestamped copy of this run, and the
figures table in ``docs/performance.md`` between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` is rewritten from ``latest.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SUITES = ["core", "files", "http", "auth", "cli", "workers", "signing", "transit"]
# Run only when named: ``load`` needs a PostgreSQL server and is a reliability run.
OPTIONAL = ["load"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import cryptography

    import qimem

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cryptography": cryptography.__version__,
        "qimem": qimem.__version__,
    }


def fmt(value: Any) -> str:
    """A number for people: thousands separators, 3 significant digits for small ones."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int | float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def check_row(suite: str, row: Any) -> dict[str, Any]:
    """Fill defaults and refuse rows a suite got wrong, naming the suite."""
    if not isinstance(row, dict) or not all(k in row for k in ("case", "metric", "qimem")):
        raise ValueError(f"suite {suite!r} returned a malformed row: {row!r}")
    out = {
        "suite": suite,
        "peer_name": "",
        "peer": None,
        "ratio": None,
        "target": "",
        "ok": None,
        "notes": "",
    }
    out.update(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table for the terminal."""
    head = ["suite", "case", "metric", "qimem", "peer", "peer value", "ratio", "target", "ok"]
    head += ["notes"]
    body = [
        [
            r["suite"],
            r["case"],
            r["metric"],
            fmt(r["qimem"]),
            r["peer_name"],
            fmt(r["peer"]),
            fmt(r["ratio"]),
            r["target"],
            fmt(r["ok"]) if r["ok"] is not None else "",
            r["notes"],
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    numeric = {3, 5, 6}
    lines = []
    for cells in [head, *body]:
        lines.append(
            "  ".join(
                str(c).rjust(w) if i in numeric else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()
        )
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(latest: dict[str, Any]) -> str:
    """The figures block for docs/performance.md."""
    lines = [
        "| suite | case | metric | qimem | peer | peer value | ratio | target | ok | notes |",
        "|---|---|---|--:|---|--:|--:|---|---|---|",
    ]
    for r in latest["rows"]:
        ok = "" if r["ok"] is None else fmt(r["ok"])
        cells = [r["suite"], r["case"], r["metric"], fmt(r["qimem"]), r["peer_name"]]
        cells += [fmt(r["peer"]), fmt(r["ratio"]), r["target"], ok, r["notes"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    for name, run in latest["suites"].items():
        m = run["machine"]
        lines.append(
            f"- `{name}`: {run['when']}, `{run['command']}`"
            f"{' (quick)' if run['quick'] else ''}; {m['cpus']} CPUs {m['cpu']}, "
            f"load {m['loadavg']}, Python {m['python']}, cryptography {m['cryptography']}"
        )
    return "\n".join(lines)


def save(rows: list[dict[str, Any]], ran: dict[str, dict[str, Any]]) -> Path:
    """Write this run's JSON, merge it into latest.json and refresh the docs table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    this_run = {"suites": ran, "rows": rows}
    (RESULTS / f"run-{stamp}.json").write_text(json.dumps(this_run, indent=2) + "\n")

    # Several people run suites at once on this machine: merge under a lock (named *.json
    # like everything in results/ that git ignores).
    with open(RESULTS / "lock.json", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge(rows, ran)


def _merge(rows: list[dict[str, Any]], ran: dict[str, dict[str, Any]]) -> Path:
    latest_path = RESULTS / "latest.json"
    try:
        latest = json.loads(latest_path.read_text())
        if not isinstance(latest.get("suites"), dict) or not isinstance(latest.get("rows"), list):
            raise ValueError
    except (OSError, ValueError):
        latest = {"suites": {}, "rows": []}
    order = {name: i for i, name in enumerate(SUITES + OPTIONAL)}
    latest["suites"].update(ran)
    latest["suites"] = dict(sorted(latest["suites"].items(), key=lambda kv: order.get(kv[0], 99)))
    kept = [r for r in latest["rows"] if r.get("suite") not in ran]
    latest["rows"] = sorted(kept + rows, key=lambda r: order.get(r["suite"], 99))
    tmp = RESULTS / "latest.tmp.json"
    tmp.write_text(json.dumps(latest, indent=2) + "\n")
    os.replace(tmp, latest_path)

    if DOC.exists():
        text = DOC.read_text()
        start, end = text.find(BEGIN), text.find(END)
        if 0 <= start < end:
            block = f"{BEGIN}\n{markdown(latest)}\n{END}"
            DOC.write_text(text[:start] + block + text[end + len(END) :])
        else:
            print(f"warning: no {BEGIN} ... {END} markers in {DOC}", file=sys.stderr)
    return latest_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run qimem's benchmark suites against their peers; print and save ratios.",
    )
    parser.add_argument(
        "suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES + OPTIONAL)}"
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument(
        "--no-save", action="store_true", help="print only; leave results/ and docs alone"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--duration", type=float, help="seconds of load (suites that take it: load)"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES + OPTIONAL]
    if unknown:
        known = ", ".join(SUITES + OPTIONAL)
        parser.error(f"unknown suite {', '.join(unknown)} (known: {known})")
    wanted = args.suites or SUITES

    extra = ["--quick"] if args.quick else []
    extra += [f"--duration {args.duration:g}"] if args.duration else []
    command = "python -m bench " + " ".join([*args.suites, *extra])
    rows: list[dict[str, Any]] = []
    ran: dict[str, dict[str, Any]] = {}
    failed = []
    for name in wanted:
        if importlib.util.find_spec(f"bench.{name}") is None:
            print(f"[{name}] not written yet, skipped", file=sys.stderr)
            if args.suites:
                failed.append(name)
            continue
        print(f"[{name}] running{' (quick)' if args.quick else ''} ...", file=sys.stderr)
        started = time.monotonic()
        info = machine()
        try:
            module = importlib.import_module(f"bench.{name}")
            kwargs = {}
            if args.duration and "duration" in inspect.signature(module.run).parameters:
                kwargs["duration"] = args.duration
            suite_rows = [check_row(name, r) for r in module.run(args.quick, **kwargs)]
        except Exception:
            traceback.print_exc()
            print(f"[{name}] FAILED", file=sys.stderr)
            failed.append(name)
            continue
        rows += suite_rows
        ran[name] = {
            "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(),
            "quick": args.quick,
            "seconds": round(time.monotonic() - started, 1),
            "machine": info,
        }
        print(f"[{name}] done in {ran[name]['seconds']} s", file=sys.stderr)

    if rows:
        print(table(rows))
    missed = [r for r in rows if r["ok"] is False]
    for r in missed:
        print(f"target missed: {r['suite']} {r['case']}: {fmt(r['ratio'])} (want {r['target']})")
    if ran and not args.no_save:
        path = save(rows, ran)
        print(f"results: {path.relative_to(ROOT)}; table: {DOC.relative_to(ROOT)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
