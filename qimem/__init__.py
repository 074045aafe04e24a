"""qimem: versioned, rotatable AEAD keys, a deterministic envelope, pluggable stores.

Python API::

    import qimem
    app = qimem.connect("sqlite:///keys.db", root_key_file="root.key")
    key = qimem.services.create_key(app, name="payroll")
    sealed = qimem.services.encrypt(app, "payroll", b"secret")
    assert qimem.services.decrypt(app, sealed.envelope).plaintext == b"secret"
"""

from qimem import services
from qimem.app import AppContext, connect
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

__version__ = "0.1.0"

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
