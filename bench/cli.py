"""CLI suite: what one ``qimem`` process costs, against the import floor and ``age``.

Every figure is the median wall time of whole processes (fork + exec + interpreter start +
imports + work), the sides alternating run by run so a drifting machine hits both alike:

* ``--version`` / ``--help`` against ``python -c "import click"``;
* ``encrypt`` / ``decrypt`` of a 3-byte file and of 3 bytes on stdin against the **import
  floor**: a ``python -c`` importing exactly click, sqlite3 and cryptography's AEAD class,
  which is the least any Python CLI doing this job must load; ``age`` as information;
* ``keys list`` over 20 keys against the same floor.

Throughput (1 GiB stdin → /dev/null, disk → disk) is the ``files`` suite's job.
Targets (issue "The CLI, fast and exact"): ≤ 1.3× ``import click`` for --version/--help,
≤ 1.5× the floor for encrypt/decrypt, ≤ 2× the floor for keys list.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLOOR = "import click, sqlite3; from cryptography.hazmat.primitives.ciphers.aead import AESGCM"


def _timer(argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        subprocess.run(
            argv,
            input=stdin if stdin is not None else None,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            check=True,
        )
        return time.perf_counter() - start

    return run


def _medians(sides: list[Callable[[], float]], runs: int) -> list[float]:
    """Median wall time of each side; sides alternate, order reversed every other round."""
    times: list[list[float]] = [[] for _ in sides]
    for side in sides:  # one warm-up each (page cache, .pyc files)
        side()
    for r in range(runs):
        order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            times[i].append(sides[i]())
    return [statistics.median(t) for t in times]


def _row(case: str, q: float, peer_name: str, peer: float, target: float | None) -> dict[str, Any]:
    ratio = q / peer
    return {
        "case": case,
        "metric": "ms per process",
        "qimem": q * 1000,
        "peer_name": peer_name,
        "peer": peer * 1000,
        "ratio": ratio,
        "target": f"≤ {target}× (lower is better)" if target else "information",
        "ok": (ratio <= target) if target else None,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    runs = 5 if quick else 21
    qimem = shutil.which("qimem")
    if qimem is None:
        raise RuntimeError("qimem is not on PATH (pip install .)")
    py = sys.executable
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qimem-bench-cli-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "QIMEM_HOME": str(work / "home")}
        subprocess.run([qimem, "init"], env=env, check=True, capture_output=True)
        for i in range(20):
            subprocess.run(
                [qimem, "keys", "create", "--name", f"k{i:02d}"],
                env=env,
                check=True,
                capture_output=True,
            )
        small = work / "small.txt"
        small.write_bytes(b"hi\n")
        sealed = work / "small.txt.qimem"
        subprocess.run([qimem, "encrypt", "--key", "k00", str(small)], env=env, check=True)

        click_floor = _timer([py, "-c", "import click"], env)
        floor = _timer([py, "-c", FLOOR], env)
        for case, argv in (("--version", ["--version"]), ("--help", ["--help"])):
            q, p = _medians([_timer([qimem, *argv], env), click_floor], runs)
            rows.append(_row(f"qimem {case}", q, "python -c 'import click'", p, 1.3))

        out, force = str(work / "out.bin"), ["--force"]
        enc = ["encrypt", "--key", "k00"]
        cases: list[tuple[str, list[str], bytes | None]] = [
            ("encrypt 3-byte file", [*enc, str(small), "-o", out, *force], None),
            ("encrypt 3 bytes stdin", enc, b"hi\n"),
            ("decrypt 3-byte file", ["decrypt", str(sealed), "-o", out, *force], None),
            ("decrypt stdin", ["decrypt"], sealed.read_bytes()),
        ]
        for case, argv, stdin in cases:
            q, p = _medians([_timer([qimem, *argv], env, stdin), floor], runs)
            rows.append(_row(f"qimem {case}", q, "import floor", p, 1.5))
        q, p = _medians([_timer([qimem, "keys", "list"], env), floor], runs)
        rows.append(_row("qimem keys list (20 keys)", q, "import floor", p, 2.0))

        if shutil.which("age") and shutil.which("age-keygen"):
            keyfile = work / "age.key"
            subprocess.run(["age-keygen", "-o", str(keyfile)], check=True, capture_output=True)
            recipient = subprocess.run(
                ["age-keygen", "-y", str(keyfile)], check=True, capture_output=True, text=True
            ).stdout.strip()
            age = _timer(["age", "-r", recipient, str(small)], env)
            q, p = _medians([_timer([qimem, *cases[0][1]], env), age], runs)
            rows.append(_row("qimem encrypt 3-byte file", q, "age -r", p, None))
        else:
            print("bench cli: age is not installed (apt-get install age); age row skipped")
    return rows
