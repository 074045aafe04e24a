"""The service layer: every qimem operation, called by the CLI, the HTTP server and users.

Functions take an :class:`qimem.app.AppContext` first and return plain dataclasses; nothing
here knows about click or HTTP.
"""

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
