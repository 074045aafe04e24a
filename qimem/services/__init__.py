"""The service layer: every qimem operation, called by the CLI, the HTTP server and users.

Functions take an :class:`qimem.app.AppContext` first and return plain dataclasses; nothing
here knows about click or HTTP.

The names below load on first use (issue 13): ``qimem encrypt`` imports
:mod:`qimem.services.crypto` without :mod:`qimem.services.keys`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qimem.services.crypto import (
        DataKey,
        DecryptResult,
        EncryptResult,
        datakey,
        decrypt,
        encrypt,
        rewrap,
    )
    from qimem.services.keys import KeyDetails, create_key, list_keys, rotate_key, show_key

#: name → the submodule that defines it
_LAZY = {
    "DataKey": "crypto",
    "DecryptResult": "crypto",
    "EncryptResult": "crypto",
    "datakey": "crypto",
    "decrypt": "crypto",
    "encrypt": "crypto",
    "rewrap": "crypto",
    "KeyDetails": "keys",
    "create_key": "keys",
    "list_keys": "keys",
    "rotate_key": "keys",
    "show_key": "keys",
}

__all__ = [
    "DataKey",
    "DecryptResult",
    "EncryptResult",
    "KeyDetails",
    "create_key",
    "datakey",
    "decrypt",
    "encrypt",
    "list_keys",
    "rewrap",
    "rotate_key",
    "show_key",
]


def __getattr__(name: str) -> Any:
    """``services.create_key`` and the others, and a submodule not imported yet
    (``services.keys``), imported on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
