"""What root rotation moves: the columns of wrapped blobs (:class:`WrappedColumn`). A store
backend that keeps wrapped rows in SQL tables says where (``Backend(root_rows=...)``,
:class:`RootRows`); the identity layer lists its tables' columns
(:func:`qimem.identity.root_columns.wrapped_columns`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WrappedColumn:
    """A column of wrapped blobs: its table, primary key, and the context each row's blob
    is bound to (the associated data its owner wraps it with)."""

    table: str
    key: tuple[str, ...]
    blob: str
    context: Callable[[Any], bytes]
    what: str


@dataclass(frozen=True)
class RootRows:
    """Where a store's wrapped rows are: the SQLAlchemy engine of their database and their
    columns (the store's and, with identity kept alongside, the identity layer's)."""

    engine: Any
    columns: list[WrappedColumn]
