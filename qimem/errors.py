"""The one error hierarchy of qimem.

Every error carries its HTTP status, CLI exit code and a stable machine ``code`` as class
attributes, so the CLI and the HTTP server map errors in exactly one place each. Messages
never contain key bytes, plaintext, passwords or tokens.
"""

from __future__ import annotations


class QimemError(Exception):
    """Base class of every error qimem raises on purpose."""

    http_status = 500
    exit_code = 1
    code = "internal_error"
    title = "Internal error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.title

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The error body of the HTTP contract: ``{"error": {"code", "message"}}``."""
        return {"error": {"code": self.code, "message": self.message}}


class ValidationError(QimemError):
    """Bad input: a malformed value, a wrong type, an unknown option."""

    http_status = 400
    exit_code = 3
    code = "invalid_request"
    title = "Bad request"


class UnsupportedAlgorithmError(ValidationError):
    """An algorithm name or id no loaded plugin provides."""

    code = "unsupported_algorithm"


class AuthError(QimemError):
    """Missing or invalid credentials."""

    http_status = 401
    exit_code = 4
    code = "unauthorized"
    title = "Unauthorized"


class ForbiddenError(AuthError):
    """Valid credentials without the needed permission."""

    http_status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFoundError(QimemError):
    """A key, realm or other object that does not exist (or is not visible to the caller)."""

    http_status = 404
    exit_code = 5
    code = "not_found"
    title = "Not found"


class ConflictError(QimemError):
    """The operation conflicts with the current state, e.g. rotating an inactive key_id."""

    http_status = 409
    exit_code = 6
    code = "conflict"
    title = "Conflict"


class KeyNotActiveError(ConflictError):
    """The key version is no longer the active one of its lineage."""

    code = "key_not_active"


class DecryptionError(QimemError):
    """Integrity failure: the ciphertext, its key or its associated data does not verify.

    Deliberately vague, like Fernet's ``InvalidToken``: a changed ciphertext, a wrong key and
    wrong associated data all look the same.
    """

    http_status = 422
    exit_code = 7
    code = "decryption_failed"
    title = "Decryption failed"


class EnvelopeFormatError(DecryptionError):
    """Bytes that are not a well-formed envelope or stream (bad magic, truncation ...)."""

    code = "invalid_envelope"


class PluginError(QimemError):
    """A plugin raised, returned something malformed, or clashes with another plugin."""

    http_status = 500
    exit_code = 8
    code = "plugin_error"
    title = "Plugin error"


class ConfigError(QimemError):
    """Missing or unusable configuration: no config file, a bad root key file ..."""

    http_status = 500
    exit_code = 9
    code = "config_error"
    title = "Configuration error"


class AuditUnavailableError(QimemError):
    """The audit log cannot be written and auditing is required: the request is refused (or
    its result withheld) rather than served unaudited."""

    http_status = 503
    exit_code = 10
    code = "audit_unavailable"
    title = "Service unavailable"


class StoreUnavailableError(QimemError):
    """The key store cannot be reached right now; retrying later may succeed."""

    http_status = 503
    exit_code = 10
    code = "store_unavailable"
    title = "Service unavailable"


class PayloadTooLargeError(ValidationError):
    """An input over a configured size limit."""

    http_status = 413
    code = "payload_too_large"
    title = "Payload too large"
