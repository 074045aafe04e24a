"""CPU seconds used during a round, by side: the servers (their process trees), PostgreSQL
(every ``postgres`` process: the peer uses none, so its figure is the machine's idle
database) and the client processes (reaped children of this process).

Closed-loop throughput on a 2-core machine swings ±10 % from run to run, because the
servers, the clients and PostgreSQL share the cores; CPU time per request moves far less,
so the report gives both (``cpu`` in each side's summary)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: str) -> tuple[int, str, float] | None:
    """(parent pid, command, CPU seconds) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), name, (int(fields[11]) + int(fields[12])) / _TICK


def _processes() -> dict[int, tuple[int, str, float]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)) is not None:
            found[int(entry)] = stat
    return found


@dataclass
class CpuSample:
    """Cumulative CPU seconds at one moment."""

    servers: float
    store: float
    clients: float


def sample(pids: list[int]) -> CpuSample:
    """CPU seconds so far of ``pids`` and their descendants, of PostgreSQL, and of this
    process's reaped children (the client processes of finished rounds)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo, servers = list(pids), 0.0
    while todo:
        pid = todo.pop()
        if pid in table:
            servers += table[pid][2]
            todo.extend(children.get(pid, []))
    store = sum(cpu for _, name, cpu in table.values() if name == "postgres")
    times = os.times()
    return CpuSample(servers, store, times.children_user + times.children_system)


def spent(before: CpuSample, after: CpuSample) -> CpuSample:
    """CPU seconds used between two samples."""
    return CpuSample(
        after.servers - before.servers,
        after.store - before.store,
        after.clients - before.clients,
    )
