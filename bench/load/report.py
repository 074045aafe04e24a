"""The report of a run: per-operation summaries, the failed checks, the table and the bench
rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load.common import CHECKS, OPS, PEER, RESULTS, DriveResult

# -- one whole run ---------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(result: DriveResult, seconds: float) -> dict[str, Any]:
    """Per operation (and per kind of check): count, req/s, p50/p99/max latency (ms),
    statuses; the totals; the documented 503s, bound violations and propagation times."""
    ops: dict[str, Any] = {}
    for op in (*OPS, *CHECKS):
        lat = result.latencies.get(op, [])
        ops[op] = {
            "count": len(lat),
            "rps": len(lat) / seconds if seconds else 0.0,
            "p50_ms": _pct(lat, 0.50),
            "p99_ms": _pct(lat, 0.99),
            "max_ms": max(lat) if lat else None,
            "time_s": round(sum(lat) / 1000, 2),  # connection time spent waiting for these
            "statuses": {str(s): n for s, n in sorted(result.statuses.get(op, {}).items())},
            "conn_errors": result.conn_errors.get(op, 0),
            "unavailable": result.unavailable.get(op, 0),
        }
    total = sum(len(v) for v in result.latencies.values())
    every = [x for v in result.latencies.values() for x in v]
    return {
        "cpu": {
            f"{part}_ms_per_request": round(1000 * used / total, 3) if total else None
            for part, used in result.cpu.items()
        }
        | {"server_cores": round(result.cpu.get("servers", 0.0) / seconds, 2) if seconds else None},
        "seconds": seconds,
        "requests": total,
        "rps": total / seconds if seconds else 0.0,
        "p99_ms": _pct(every, 0.99),
        "ops": ops,
        "encrypted": len(result.records),
        "decrypt_mismatches": result.mismatches,
        "rotations": dict(result.rotations),
        "rotate_forms": dict(sorted(result.rotate_forms.items())),
        "5xx": result.count_5xx(),
        "login_busy": result.login_busy,
        "conn_errors": sum(result.conn_errors.values()),
        "unexpected": {
            op: {str(s): n for s, n in c.items()} for op, c in result.unexpected().items()
        },
        "unavailable": sum(result.unavailable.values()),
        "unavailable_window": result.unavailable_window,
        "violations": dict(result.violations),
        "propagation": {
            kind: {
                "count": len(values),
                "p50_ms": _ms_of(_pct(values, 0.5)),
                "p99_ms": _ms_of(_pct(values, 0.99)),
                "max_ms": _ms_of(max(values)),
            }
            for kind, values in sorted(result.propagation.items())
        },
        "audited": dict(result.audited),
        "rotations_unknown": dict(result.rotations_unknown),
        "unchecked": result.unchecked,
        "samples": result.samples,
    }


def _ms_of(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


SIDES = ("qimem", "peer", "floor")


def failures(report: dict[str, Any]) -> list[str]:
    """Every reason the run failed (empty: it passed)."""
    bad = []
    for side in SIDES:
        if side not in report:
            continue
        s = report[side]
        for what in ("5xx", "conn_errors", "decrypt_mismatches"):
            if s[what]:
                bad.append(f"{side}: {what} {s[what]}")
        if s.get("violations"):
            bad.append(f"{side}: changes not seen by every server in time {s['violations']}")
        if s["unexpected"]:
            bad.append(f"{side}: unexpected statuses {s['unexpected']}")
        v = s["verification"]
        if v["lost"] or v["corrupted"] or v["verified"] != s["encrypted"]:
            bad.append(
                f"{side}: verification {v['verified']}/{s['encrypted']} verified, "
                f"{v['lost']} lost, {v['corrupted']} corrupted"
            )
    q = report.get("qimem", {})
    for key, (want, have) in q.get("versions", {}).items():
        # A rotation answered 503 (or not at all) may have committed all the same.
        unknown = q.get("rotations_unknown", {}).get(key, 0)
        if not want <= have <= want + unknown:
            extra = f" (+ up to {unknown} answered 503)" if unknown else ""
            bad.append(
                f"qimem: key {key} has {have} versions, {want}{extra} expected from the rotations"
            )
    # The server counts its login_busy and documented 503 answers among its 5xx; the
    # clients counted them too.
    allowed = q.get("login_busy", 0) + q.get("unavailable", 0)
    if q.get("server_5xx", 0) - allowed > 0:
        bad.append(
            f"qimem: /metrics counts {q['server_5xx']} 5xx answers, "
            f"{q.get('login_busy', 0)} of them login_busy, {q.get('unavailable', 0)} "
            "documented 503s"
        )
    audit = q.get("audit", {})
    for action, (want, have) in audit.get("success", {}).items():
        if want != have:
            bad.append(f"qimem: {have} success audit records of {action}, {want} expected")
    if audit.get("duplicated_record_ids"):
        bad.append(f"qimem: {audit['duplicated_record_ids']} audit records share a record id")
    if audit.get("records_without_id"):
        bad.append(f"qimem: {audit['records_without_id']} audit records have no record id")
    if q.get("traceback"):
        bad.append("qimem: the server logged a traceback")
    if q.get("exit_code") not in (None, 0):
        bad.append(f"qimem: serve exited {q['exit_code']} on SIGTERM")
    return bad


# -- reporting and the bench entry point ------------------------------------------------------


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def render(report: dict[str, Any]) -> str:
    """The run as a plain-text table plus the checks."""
    lines = []
    head = f"{'side':6} {'op':13} {'count':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
    head += f"{'max ms':>8} {'time s':>7}  statuses"
    lines.append(head)
    for side in SIDES:
        if side not in report:
            continue
        s = report[side]
        for op, o in s["ops"].items():
            statuses = " ".join(f"{k}:{v}" for k, v in o["statuses"].items())
            if o["conn_errors"]:
                statuses += f" conn-errors:{o['conn_errors']}"
            if o.get("unavailable"):
                statuses += f" 503-store-unavailable:{o['unavailable']}"
            lines.append(
                f"{side:6} {op:13} {o['count']:>8} {o['rps']:>8.1f} {_ms(o['p50_ms']):>8} "
                f"{_ms(o['p99_ms']):>8} {_ms(o['max_ms']):>8} {o.get('time_s', 0):>7.1f}  "
                f"{statuses}"
            )
        lines.append(
            f"{side:6} {'all':13} {s['requests']:>8} {s['rps']:>8.1f} {'':>8} {_ms(s['p99_ms']):>8}"
        )
        v = s["verification"]
        lines.append(
            f"  {side}: {s['encrypted']} ciphertexts, {v['verified']} verified, {v['lost']} lost,"
            f" {v['corrupted']} corrupted (final pass {v['seconds']:.1f} s); 5xx {s['5xx']}, "
            f"connection errors {s['conn_errors']}, in-run decrypt mismatches "
            f"{s['decrypt_mismatches']}, login_busy answers (retried) {s['login_busy']}"
        )
        spread = ", ".join(
            f"{kind} n={f['count']} p50 {_ms(f['p50_ms'])} p99 {_ms(f['p99_ms'])} max "
            f"{_ms(f['max_ms'])} ms"
            for kind, f in s.get("propagation", {}).items()
        )
        lines.append(
            f"  {side}: changes reaching the other servers/workers: {spread or 'none checked'};"
            f" bound violations {s.get('violations') or 0}; follow-up checks left at the end "
            f"{s.get('unchecked', 0)}"
        )
        c = s.get("cpu") or {}
        if c.get("servers_ms_per_request") is not None:
            lines.append(
                f"  {side}: CPU ms per request: server {c['servers_ms_per_request']:.3f} "
                f"({c['server_cores']} cores), PostgreSQL {c['store_ms_per_request']:.3f}, "
                f"clients {c['clients_ms_per_request']:.3f}"
            )
    lines.extend(_ratios(report))
    q = report.get("qimem", {})
    if "versions" in q:
        lines.append(
            "  qimem: versions (expected, found) "
            + ", ".join(f"{k} {w}/{h}" for k, (w, h) in q["versions"].items())
            + f"; /metrics {q['server_requests']} requests, {q['server_5xx']} 5xx; "
            f"exit {q['exit_code']} on SIGTERM; traceback in log: {q['traceback']}"
        )
        forms = " ".join(f"{k}:{v}" for k, v in q["rotate_forms"].items())
        lines.append(f"  qimem: rotate by form:status {forms}")
    if "audit" in q:
        found = ", ".join(f"{a} {want}/{have}" for a, (want, have) in q["audit"]["success"].items())
        lines.append(
            f"  qimem: success audit records (expected, found) {found}; records sharing a "
            f"record id: {q['audit']['duplicated_record_ids']}, without one: "
            f"{q['audit'].get('records_without_id')}; all records "
            f"{q['audit']['records']}"
        )
    if report.get("pg_restart"):
        r = report["pg_restart"]
        lines.append(
            f"  qimem: PostgreSQL stopped {r.get('stop_after_s')} s into the run, down "
            f"{r.get('down_s')} s; documented 503s {q.get('unavailable')} from "
            f"{r.get('first_503_s')} s to {r.get('last_503_s')} s after the stop"
        )
    lines.append(
        f"  load average before {report['loadavg_before']}, after "
        f"{report.get('loadavg_after')}; {report['processes']} processes × "
        f"{report['connections']} connections, {report['rounds']} round(s); "
        f"{shape(report)}; bounds {report.get('bounds')}; client addresses "
        f"{report.get('client_addresses', '127.0.0.1')}"
    )
    if report.get("config_extra"):
        lines.append(f"  qimem config added: {report['config_extra']!r}")
    for sample in q.get("samples", [])[:10]:
        lines.append(f"  sample: {sample}")
    lines.append("  FAILED: " + "; ".join(report["failures"]) if report["failures"] else "  OK")
    return "\n".join(lines)


def _ratios(report: dict[str, Any]) -> list[str]:
    """req/s and server CPU per request of each pair of sides that ran."""
    pairs = [("qimem", "peer"), ("qimem", "floor"), ("floor", "peer")]
    out = []
    for a, b in pairs:
        if a not in report or b not in report:
            continue
        mine, theirs = report[a], report[b]
        text = f"  {a}/{b}: req/s {mine['rps'] / theirs['rps']:.3f}" if theirs["rps"] else ""
        cm, ct = mine.get("cpu") or {}, theirs.get("cpu") or {}
        if cm.get("servers_ms_per_request") and ct.get("servers_ms_per_request"):
            ratio = ct["servers_ms_per_request"] / cm["servers_ms_per_request"]
            text += f"; server CPU per request {b}/{a}: {ratio:.3f}"
        if text:
            out.append(text)
    return out


def shape(report: dict[str, Any]) -> str:
    """ "1 server × 2 workers (peer: 2 processes)"."""
    s, w = report.get("servers", 1), report.get("workers", 1)
    text = f"{s} server{'s' if s > 1 else ''} × {w} worker{'s' if w > 1 else ''}"
    return text + f" (peer: {s * w} process{'es' if s * w > 1 else ''})"


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Bench rows: per operation and overall req/s against the peer; the correctness row.
    A run of another shape than 1 server × 1 worker names it in its cases."""
    q, p = report["qimem"], report.get("peer")
    s, w = report.get("servers", 1), report.get("workers", 1)
    where = "" if (s, w) == (1, 1) else f", {s} server{'s' if s > 1 else ''} × {w} workers"
    peer_name = PEER + (f", {s * w} processes" if s * w > 1 else "")
    out = []
    for op in [*OPS, "all"]:
        mine = q if op == "all" else q["ops"][op]
        theirs = None if p is None else (p if op == "all" else p["ops"][op])
        ratio = theirs and theirs["rps"] and mine["rps"] / theirs["rps"]
        note = f"p99 {_ms(mine['p99_ms'])} ms"
        if op != "all":
            note = f"p50 {_ms(mine['p50_ms'])} ms, " + note + f", max {_ms(mine['max_ms'])} ms"
        if theirs is not None:
            note += f" (peer p99 {_ms(theirs['p99_ms'])} ms)"
        out.append(
            {
                "case": f"mixed load{where} on PostgreSQL: {op}",
                "metric": "req/s",
                "qimem": round(mine["rps"], 1),
                "peer_name": peer_name if p else "",
                "peer": None if theirs is None else round(theirs["rps"], 1),
                "ratio": ratio or None,
                "notes": note,
            }
        )
    v = q["verification"]
    out.append(
        {
            "case": f"mixed load{where} on PostgreSQL: failed checks",
            "metric": "count",
            "qimem": len(report["failures"]),
            "target": "0",
            "ok": not report["failures"],
            "notes": (
                f"{q['encrypted']} ciphertexts all decrypted again: {v['verified']} verified, "
                f"{v['lost']} lost, {v['corrupted']} corrupted; 5xx {q['5xx']}, connection "
                f"errors {q['conn_errors']}; {report['duration']:g} s, {report['processes']} "
                f"procs × {report['connections']} conns, load avg {report['loadavg_before']}"
            ),
            "details": report,
        }
    )
    return out


def _save_report(report: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"load-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
