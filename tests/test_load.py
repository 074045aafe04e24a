"""A short mixed-traffic load run against a real ``qimem serve`` (authentication on) on
PostgreSQL: the same driver as ``python -m bench load`` (bench/load.py), a few seconds long.

Encrypt, decrypt, rotate, password and client_credentials logins from two client processes
at once: no 5xx, no connection error, no unexpected status, every ciphertext decrypts to its
plaintext afterwards, and the rotated keys have exactly as many versions as rotations
succeeded. No timing thresholds. The checks themselves are shown to catch a tampered
ciphertext, a wrong plaintext and a 500.
"""

from __future__ import annotations

import base64
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _bench_load() -> ModuleType:
    """``bench.load`` from the repo root (bench/ is not part of the installed package).

    ``bench/__init__`` takes the repo root off ``sys.path`` again as it is imported, so
    ``./qimem`` never shadows the installed package (which is already imported here).
    """
    sys.path.insert(0, str(REPO))
    try:
        import bench.load
    finally:
        while str(REPO) in sys.path:
            sys.path.remove(str(REPO))
    return bench.load


def test_mixed_load_has_no_errors_and_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    load = _bench_load()
    report = load.run_load(
        postgres_url,
        tmp_path,
        duration=4.0,
        processes=2,
        connections=2,
        rounds=1,
        users=2,
        peer=False,
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
    assert q["encrypted"] == q["ops"]["encrypt"]["statuses"]["200"] > 0
    assert checked["checked"] == checked["verified"] == q["encrypted"]
    assert checked["lost"] == checked["corrupted"] == q["decrypt_mismatches"] == 0
    assert checked["statuses"] and set(checked["statuses"]) == {"200"}

    # Each successful rotation made exactly one version; none vanished, none doubled.
    assert sum(q["rotations"].values()) == q["ops"]["rotate"]["statuses"]["200"]
    for key, (expected, found) in q["versions"].items():
        assert found == expected, key
    # The server's own count covers at least every request the clients made.
    assert q["server_requests"] >= q["requests"]
    assert q["exit_code"] == 0 and q["traceback"] is False


def test_the_final_check_catches_tampered_and_wrong_results(
    postgres_url: str, tmp_path: Path
) -> None:
    load = _bench_load()
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
    load = _bench_load()
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
