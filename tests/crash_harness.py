"""Helpers for the SIGKILL crash-safety tests (tests/test_crash_safety.py).

A scenario runs a real child process (the ``qimem`` CLI or a ``python -c`` child using the
service layer) in its own process group, kills the whole group with SIGKILL at a kill point
drawn from a seeded :class:`random.Random`, waits until no process of the group can write
any more, and then checks invariants in the test process.

Kill points are counted in operations, not in wall time, so that they spread over the work
whatever the machine's load: either the n-th progress line the child prints (children
print one line per SQL statement, per COMMIT and per completed operation) or the n-th file
the child is seen touching in a directory, in both cases followed by a random sub-ms to
few-ms delay. The seed fixes n and the delay; the scheduler decides the rest, so a failing
run is reproduced by rerunning with the printed seed (and ``QIMEM_CRASH_RUNS`` at least the
failing run's index + 1), usually on the first try, otherwise by running more runs.

Environment:

* ``QIMEM_CRASH_SEED``: the base seed (default :data:`DEFAULT_SEED`).
* ``QIMEM_CRASH_RUNS``: kill runs per scenario and store (default: each test's small CI
  number).
* ``QIMEM_CRASH_STATS``: a file to which one JSON line per run is appended (kill point,
  outcome), for campaign figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import IO, Any

SEED_ENV = "QIMEM_CRASH_SEED"
RUNS_ENV = "QIMEM_CRASH_RUNS"
STATS_ENV = "QIMEM_CRASH_STATS"
DEFAULT_SEED = 20261130
#: No child may run longer than this (a hung child fails the run instead of the suite).
CHILD_TIMEOUT = 120.0


def base_seed() -> int:
    """The campaign's seed: ``QIMEM_CRASH_SEED`` or :data:`DEFAULT_SEED`."""
    return int(os.environ.get(SEED_ENV) or DEFAULT_SEED)


def runs(default: int) -> int:
    """Kill runs per scenario and store: ``QIMEM_CRASH_RUNS`` or ``default``."""
    return int(os.environ.get(RUNS_ENV) or default)


def run_rng(scenario: str, store: str, index: int) -> random.Random:
    """The random source of one run: a pure function of the seed, scenario, store, index."""
    return random.Random(f"{base_seed()}/{scenario}/{store}/{index}")


def describe(scenario: str, store: str, index: int, **kill: object) -> str:
    """The line that reproduces a run, put in front of every failure message."""
    point = " ".join(f"{k}={v}" for k, v in kill.items())
    return (
        f"[crash {scenario}/{store} run {index}: {SEED_ENV}={base_seed()} "
        f"{RUNS_ENV}>={index + 1}; kill point: {point}]"
    )


@contextlib.contextmanager
def reproducible(context: str) -> Iterator[None]:
    """Prefix any assertion failure inside the block with ``context`` (seed, run, kill point)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{context} {exc}") from exc


# ------------------------------------------------------------------------ children


def python_child(script: str, *args: str, env: Mapping[str, str] | None = None) -> Child:
    """Start ``python -c script args...`` in a new process group (cwd outside the repo)."""
    return Child([sys.executable, "-c", script, *args], env=env)


class Child:
    """A child process in its own session/process group, stdout piped (text lines).

    A watchdog kills the group after :data:`CHILD_TIMEOUT` seconds so that a hung child
    cannot hang the test.
    """

    def __init__(self, argv: list[str], *, env: Mapping[str, str] | None = None) -> None:
        self.started = time.monotonic()
        # stderr to a file: only stdout is read while the child runs, so no pipe can fill.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        self.proc = subprocess.Popen(
            argv,
            # Not the repo root: its qimem/ folder would shadow the installed package.
            cwd=tempfile.gettempdir(),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        self.killed = False
        self.killed_at: float | None = None
        self.gone_after: float | None = None
        self.timed_out = False
        self._watchdog = threading.Timer(CHILD_TIMEOUT, self._time_out)
        self._watchdog.daemon = True
        self._watchdog.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self) -> str | None:
        """The next stdout line (without newline), or None at end of output."""
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        if not raw:
            return None
        line = raw.decode().rstrip("\n")
        self.lines.append(line)
        return line

    def wait_ready(self) -> None:
        """Read up to the child's ``ready`` line, then forget what came before it."""
        while (line := self.readline()) != "ready":
            if line is None:
                self.kill()
                rc, err = self.finish()
                raise AssertionError(f"child exited ({rc}) before ready: {err[-2000:]}")
        self.lines.clear()

    def read_lines(self, count: int) -> int:
        """Read up to ``count`` lines; returns how many were read before the output ended."""
        for done in range(count):
            if self.readline() is None:
                return done
        return count

    def kill(self, *, group: bool = True) -> None:
        """SIGKILL the whole process group (the child and any workers it forked), or with
        ``group=False`` the child alone (as the OOM killer or ``kill -9 PID`` would)."""
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pgid, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
            self.killed = True
            if self.killed_at is None:
                self.killed_at = time.monotonic()

    def finish(self) -> tuple[int, str]:
        """Wait for the child, drain what it wrote before dying; ``(returncode, stderr)``.

        Returns only when no process of the group is left running (zombies cannot write);
        :attr:`gone_after` is then the seconds from the kill to that moment.
        """
        assert self.proc.stdout is not None
        rest = self.proc.stdout.read()  # EOF once every process of the group is gone
        if rest:
            self.lines.extend(rest.decode().splitlines())
        self.proc.wait(timeout=CHILD_TIMEOUT)
        self._watchdog.cancel()
        wait_group_gone(self.pgid)
        if self.killed_at is not None:
            self.gone_after = time.monotonic() - self.killed_at
        self.proc.stdout.close()
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        return self.proc.returncode, err

    def _time_out(self) -> None:
        self.timed_out = True
        self.kill()

    def close(self) -> None:
        """Teardown: kill the group if anything is left, reap, close the pipes."""
        if self.proc.poll() is None or group_alive(self.pgid):
            self.kill()
        with contextlib.suppress(Exception):
            self.finish()
        self._watchdog.cancel()


def group_alive(pgid: int) -> bool:
    """True while some non-zombie process of process group ``pgid`` exists (Linux /proc)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    """Wait until every process of group ``pgid`` is dead (forked workers too)."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process group {pgid} still alive {timeout}s after SIGKILL")
        time.sleep(0.005)


def sleep_precise(seconds: float) -> None:
    """Sleep ``seconds`` (sub-ms values included; the last 0.2 ms are a short spin)."""
    end = time.perf_counter() + seconds
    if seconds > 0.0005:
        time.sleep(seconds - 0.0002)
    while time.perf_counter() < end:
        pass


def poll_until(child: Child, condition: Any, *, interval: float = 0.0005) -> bool:
    """Poll ``condition()`` until it holds (True) or the child exits (False)."""
    while True:
        if condition():
            return True
        if child.proc.poll() is not None:
            return bool(condition())
        time.sleep(interval)


# ------------------------------------------------------------------------ statistics


class Stats:
    """Kill points and outcomes of one test's runs: a summary for the test output and,
    with ``QIMEM_CRASH_STATS``, one JSON line per run for campaign figures."""

    def __init__(self, scenario: str, store: str) -> None:
        self.scenario = scenario
        self.store = store
        self.counts: Counter[str] = Counter()
        path = os.environ.get(STATS_ENV)
        self._file: IO[str] | None = open(path, "a") if path else None  # noqa: SIM115

    def record(self, index: int, **fields: object) -> None:
        for key in ("kill_point", "outcome"):
            if key in fields:
                self.counts[f"{key}={fields[key]}"] += 1
        if self._file is not None:
            line = {"scenario": self.scenario, "store": self.store, "run": index}
            line.update(fields)
            line["seed"] = base_seed()
            self._file.write(json.dumps(line, sort_keys=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        print(f"crash {self.scenario}/{self.store} seed={base_seed()}: {summary}")
        if self._file is not None:
            self._file.close()


def summarize(path: str) -> str:
    """A markdown table of a ``QIMEM_CRASH_STATS`` file: runs, kill points and outcomes per
    scenario and store (``python tests/crash_harness.py STATS.jsonl``)."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with open(path) as fh:
        for line in fh:
            record = json.loads(line)
            rows.setdefault((record["scenario"], record["store"]), []).append(record)
    out = ["| scenario | store | runs | kill points | outcomes |", "|---|---|---|---|---|"]
    for (scenario, store), records in sorted(rows.items()):
        points = Counter(r.get("kill_point") for r in records)
        outcomes = Counter(r.get("outcome") for r in records)
        out.append(
            f"| {scenario} | {store} | {len(records)} | "
            + ", ".join(f"{k} {v}" for k, v in points.most_common())
            + " | "
            + ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
            + " |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
