"""A short mixed-traffic load run against a real ``qimem serve`` (authentication on) on
PostgreSQL: the same driver as ``python -m bench load`` (bench/load/), a few seconds long.

Encrypt, decrypt, rotate, password and client_credentials logins and revocations from two
client processes at once: no 5xx, no connection error, no unexpected status, every
ciphertext decrypts to its plaintext afterwards, the rotated keys have exactly as many
versions as rotations succeeded, and each 200 on an audited route left exactly one success
audit record. No timing thresholds. The checks themselves are shown to catch a tampered
ciphertext, a wrong plaintext, a 500, a change not seen in time, a missing or duplicated
audit record and an undocumented 503. The durable floor (bench/load/floor.py) runs beside
qimem and passes the same checks. Several servers, workers and a PostgreSQL restart:
tests/test_faults_scale.py.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

import pytest
from bench_helpers import bench_load

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_mixed_load_on_two_servers_has_no_errors_and_loses_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    load = bench_load()
    report = load.run_load(
        postgres_url,
        tmp_path,
        duration=4.0,
        processes=2,
        connections=2,
        rounds=1,
        users=2,
        peer=False,
        servers=2,  # on the one database; changes through one checked on the other
        floor_admin_url=postgres_url,  # and the durable floor (bench/load/floor.py) too,
        floor_hash_slots=1,  # with qimem's login-flood bound on 2 CPUs
        # Rotations: the pushed 50 ms. Revocations: a notice makes the other server re-read
        # a row, which took 52-68 ms now and then on a 2-core machine at load 10; 0.5 s still
        # fails the 2 s polling fallback, so the push is what this shows.
        bounds=load.Bounds(rotation=0.05, revocation=0.5),
    )
    q = report["qimem"]
    samples = q["samples"]
    assert report["failures"] == [], (report["failures"], samples)
    # 503 login_busy is the login gate's backpressure (a waiting login holds a server thread,
    # so qimem serve keeps one thread free of logins); the clients retry it and count it apart.
    assert q["5xx"] == 0 and q["server_5xx"] == q["login_busy"], samples
    assert q["conn_errors"] == 0, samples
    assert q["unexpected"] == {}, samples
    for op in load.OPS:  # every operation ran, and only with the answers it may get
        statuses = q["ops"][op]["statuses"]
        assert statuses.get("200", 0) > 0, (op, statuses)
        assert set(statuses) <= {"200", "409"} if op == "rotate" else set(statuses) == {"200"}

    # Every ciphertext obtained during the run decrypted again, to its own plaintext.
    checked = q["verification"]
    # (the checks after rotations and revocations encrypt too)
    assert q["encrypted"] == q["audited"]["crypto.encrypt"]
    assert q["encrypted"] >= q["ops"]["encrypt"]["statuses"]["200"] > 0
    assert checked["checked"] == checked["verified"] == q["encrypted"]
    assert checked["lost"] == checked["corrupted"] == q["decrypt_mismatches"] == 0
    assert checked["statuses"] and set(checked["statuses"]) == {"200"}

    # Each successful rotation made exactly one version; none vanished, none doubled.
    assert sum(q["rotations"].values()) == q["ops"]["rotate"]["statuses"]["200"]
    for key, (expected, found) in q["versions"].items():
        assert found == expected, key
    # The server's own count covers at least every request the clients made.
    assert q["server_requests"] >= q["requests"]
    assert q["exit_codes"] == [0, 0] and q["traceback"] is False
    # Rotations and revocations through one server reached the other within the bounds (a
    # probe sent later that saw the old state would be a violation).
    assert report["bounds"] == {"rotation": 0.05, "revocation": 0.5}
    assert q["violations"] == {}, samples
    assert q["propagation"]["rotation"]["count"] > 0, samples
    assert q["propagation"]["revocation"]["count"] > 0, samples
    for action, (expected, found) in q["audit"]["success"].items():
        assert found == expected > 0, action

    # The durable floor ran the same mix, passed the same checks (in report["failures"]) and
    # answered as qimem does; a revoked token was refused afterwards.
    f = report["floor"]
    assert report["floor_hash_slots"] == 1
    assert f["5xx"] == f["conn_errors"] == 0 and f["unexpected"] == {}, f["samples"]
    for op in load.OPS:
        assert f["ops"][op]["statuses"].get("200", 0) > 0, (op, f["ops"][op])
    assert f["verification"]["verified"] == f["encrypted"] > 0
    assert f["ops"]["revoke-check"]["statuses"].get("401", 0) > 0
    assert f["propagation"]["rotation"]["count"] > 0 and f["violations"] == {}
    assert f["cpu"]["servers_ms_per_request"] > 0


def test_each_client_connection_has_its_own_address() -> None:
    """One loopback address per connection (so the per-address login share applies to a
    host, not to the users the run simulates), or 127.0.0.1 for all with ``same_source``."""
    load = bench_load()
    addresses = [load.source_address(i) for i in range(250)]
    assert len(set(addresses)) == 250 and "127.0.0.1" not in addresses
    assert all(a.startswith("127.0.0.") for a in addresses)
    assert {load.source_address(i, same_source=True) for i in range(8)} == {"127.0.0.1"}
    with pytest.raises(load.LoadFailure):
        load.source_address(250)


def test_the_final_check_catches_tampered_and_wrong_results(
    postgres_url: str, tmp_path: Path
) -> None:
    load = bench_load()
    with load.qimem_server(postgres_url, tmp_path, users=1, keys=1, rotated=1) as server:
        result = load.drive(server.target, duration=2.0, processes=1, connections=1)
        good = result.records[:3]
        assert len(good) == 3, result.samples
        raw = bytearray(base64.b64decode(good[0].envelope))
        raw[-1] ^= 1  # the last byte of the AEAD tag
        tampered = load.Record(base64.b64encode(raw).decode(), good[0].aad, good[0].digest, 0)
        wrong = load.Record(good[1].envelope, good[1].aad, bytes(32), 0)
        checked = load.verify(server.target, [tampered, wrong, good[2]])
    assert (checked.verified, checked.lost, checked.corrupted) == (1, 1, 1)


def test_a_5xx_or_a_lost_result_fails_the_run() -> None:
    load = bench_load()
    seen = load.DriveResult()
    seen.latencies = {"encrypt": [1.0, 2.0], "rotate": [1.0]}
    seen.statuses = {"encrypt": Counter({200: 1, 500: 1}), "rotate": Counter({409: 1})}
    seen.records = [load.Record("x", None, bytes(32), 1)]
    summary = load.summarize(seen, 1.0)
    assert summary["5xx"] == 1 and summary["unexpected"] == {"encrypt": {"500": 1}}
    summary["verification"] = {"verified": 0, "lost": 1, "corrupted": 0}
    reasons = load.failures({"qimem": summary})
    assert any("5xx 1" in r for r in reasons)
    assert any("unexpected statuses" in r for r in reasons)
    assert any("1 lost" in r for r in reasons)
    summary.update({"5xx": 0, "unexpected": {}, "verification": {"verified": 1, "lost": 0}})
    summary["verification"]["corrupted"] = 0
    assert load.failures({"qimem": summary}) == []  # a 409 on rotate is a right answer


def test_late_changes_audit_gaps_and_undocumented_503s_fail_the_run() -> None:
    load = bench_load()
    seen = load.DriveResult()
    seen.latencies = {"encrypt": [1.0], "revoke-check": [1.0, 1.0]}
    seen.statuses = {"encrypt": Counter({200: 1}), "revoke-check": Counter({200: 1, 401: 1})}
    seen.records = [load.Record("x", None, bytes(32), 1)]
    summary = load.summarize(seen, 1.0)
    summary["verification"] = {"verified": 1, "lost": 0, "corrupted": 0}
    good = {"versions": {"r0": (3, 3)}, "server_5xx": 0, "exit_code": 0, "traceback": False}
    good["audit"] = {"success": {"crypto.encrypt": (2, 2)}, "duplicated_record_ids": 0}
    assert load.failures({"qimem": summary | good}) == []  # 200 then 401: in time

    late = load.DriveResult()
    late.violations["revocation"] = 1
    reasons = load.failures({"qimem": summary | load.summarize(late, 1.0) | good})
    assert any("not seen by every server in time" in r for r in reasons)

    for audit, words in (
        ({"success": {"crypto.encrypt": (2, 1)}}, "1 success audit records"),
        ({"success": {"crypto.encrypt": (2, 3)}}, "3 success audit records"),
        ({"success": {}, "duplicated_record_ids": 1}, "share a record id"),
        ({"success": {}, "records_without_id": 2}, "2 audit records have no record id"),
    ):
        reasons = load.failures({"qimem": summary | good | {"audit": audit}})
        assert any(words in r for r in reasons), (audit, reasons)

    # 503 store_unavailable is allowed (counted apart) only in a run with a restart; the
    # servers' own 5xx count must not exceed what the clients saw as documented.
    reasons = load.failures({"qimem": summary | good | {"server_5xx": 2, "unavailable": 1}})
    assert any("/metrics counts 2 5xx" in r for r in reasons)
    assert load.failures({"qimem": summary | good | {"server_5xx": 1, "unavailable": 1}}) == []
    # A rotation answered 503 may have committed: one more version is fine, two are not.
    unknown = {"rotations_unknown": {"r0": 1}}
    assert load.failures({"qimem": summary | good | unknown | {"versions": {"r0": (3, 4)}}}) == []
    reasons = load.failures({"qimem": summary | good | unknown | {"versions": {"r0": (3, 5)}}})
    assert any("r0 has 5 versions" in r for r in reasons)
