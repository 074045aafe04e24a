"""The identity tables' wrapped columns, for root rotation (:mod:`qimem.root.rotation`):
token signing keys, OTP secrets and realms' sealed login settings."""

from __future__ import annotations

from qimem.identity.login_providers import _auth_context
from qimem.identity.otp import _context as otp_context
from qimem.identity.tokens import _wrap_context as signing_context
from qimem.root.columns import WrappedColumn


def wrapped_columns() -> list[WrappedColumn]:
    """Every identity column that holds blobs wrapped under the root."""
    return [
        WrappedColumn(
            "qimem_signing_keys",
            ("kid",),
            "private_wrapped",
            lambda r: signing_context(r.realm, r.kid),
            "token signing keys",
        ),
        WrappedColumn(
            "qimem_otp",
            ("user_id",),
            "secret_wrapped",
            lambda r: otp_context(r.realm, r.user_id),
            "OTP secrets",
        ),
        WrappedColumn(
            "qimem_realm_auth",
            ("realm",),
            "config",
            lambda r: _auth_context(r.realm),
            "realm login settings",
        ),
    ]
