"""The benchmark package for tests that reuse its driver (bench/ is not part of the
installed package)."""

from __future__ import annotations

import sys
from types import ModuleType

from conftest import REPO


def bench_load() -> ModuleType:
    """``bench.load`` from the repo root.

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


def bench_workers() -> ModuleType:
    """``bench.workers`` from the repo root (as :func:`bench_load`)."""
    sys.path.insert(0, str(REPO))
    try:
        import bench.workers
    finally:
        while str(REPO) in sys.path:
            sys.path.remove(str(REPO))
    return bench.workers


def bench_app_cpu() -> ModuleType:
    """``bench.app_cpu`` from the repo root (as :func:`bench_load`)."""
    sys.path.insert(0, str(REPO))
    try:
        import bench.app_cpu
    finally:
        while str(REPO) in sys.path:
            sys.path.remove(str(REPO))
    return bench.app_cpu
