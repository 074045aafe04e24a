"""bench/app_cpu.py, the in-process diagnostic docs/performance.md quotes: every operation
it times answers 200 through the real app on a real SQLite file, and gets a figure."""

from __future__ import annotations

from pathlib import Path

from bench_helpers import bench_module


def test_every_operation_runs_through_the_app_and_is_timed(tmp_path: Path) -> None:
    figures = bench_module("app_cpu").measure(f"sqlite:///{tmp_path / 'qimem.db'}", scale=0.02)
    assert set(figures) >= {
        "encrypt 32 B",
        "decrypt 16 KiB",
        "rotation",
        "client_credentials login",
    }
    assert all(micros > 0 for micros in figures.values())
