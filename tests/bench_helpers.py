"""The benchmark package for tests that reuse its driver (bench/ is not part of the
installed package)."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from conftest import REPO


def bench_module(name: str) -> ModuleType:
    """``bench.<name>`` from the repo root.

    ``bench/__init__`` takes the repo root off ``sys.path`` again as it is imported, so
    ``./qimem`` never shadows the installed package (which is already imported here).
    """
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        while str(REPO) in sys.path:
            sys.path.remove(str(REPO))


def bench_load() -> ModuleType:
    """``bench.load`` (the load suite's package)."""
    return bench_module("load")
