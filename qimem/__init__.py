"""qimem: versioned, rotatable AEAD keys, a deterministic envelope, pluggable stores.

Python API::

    import qimem
    app = qimem.connect("sqlite:///keys.db", root_key_file="root.key")
    key = qimem.services.create_key(app, name="payroll")
    sealed = qimem.services.encrypt(app, "payroll", b"secret")
    assert qimem.services.decrypt(app, sealed.envelope).plaintext == b"secret"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qimem.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    DecryptionError,
    EnvelopeFormatError,
    ForbiddenError,
    KeyNotActiveError,
    NotFoundError,
    PayloadTooLargeError,
    PluginError,
    QimemError,
    StoreUnavailableError,
    UnsupportedAlgorithmError,
    ValidationError,
)

if TYPE_CHECKING:
    from qimem import services
    from qimem.app import AppContext, connect

__version__ = "0.1.0"

#: Attributes imported on first use: ``import qimem`` (and so every ``qimem`` command,
#: ``--version`` included) must not pay for the service layer, pluggy or a database driver.
_LAZY = {
    "AppContext": ("qimem.app", "AppContext"),
    "connect": ("qimem.app", "connect"),
    "services": ("qimem.services", None),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'qimem' has no attribute {name!r}") from None
    import importlib

    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    "AppContext",
    "AuthError",
    "ConfigError",
    "ConflictError",
    "DecryptionError",
    "EnvelopeFormatError",
    "ForbiddenError",
    "KeyNotActiveError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PluginError",
    "QimemError",
    "StoreUnavailableError",
    "UnsupportedAlgorithmError",
    "ValidationError",
    "connect",
    "services",
]
