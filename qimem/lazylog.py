"""A logger that imports :mod:`logging` on first use (issue 13: a CLI call that logs
nothing does not pay for importing it).

``log = lazylog.get_logger(__name__)`` behaves like ``logging.getLogger(__name__)``: every
attribute (``warning``, ``debug``, ``isEnabledFor``...) is the real logger's, looked up when
first used, so handlers, levels and pytest's ``caplog`` see the same records.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """Stands for ``logging.getLogger(name)``; the logging module loads on first use."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        import logging

        return getattr(logging.getLogger(self.name), attr)

    def __repr__(self) -> str:
        return f"<LazyLogger {self.name}>"


def get_logger(name: str) -> Any:
    """A :class:`LazyLogger` for ``name`` (typed ``Any``: it has a Logger's methods)."""
    return LazyLogger(name)
