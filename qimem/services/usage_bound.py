"""Usage limits against the nonce bound: one key version may encrypt at most its algorithm's
``max_messages_per_key`` messages (2^32 for random 96-bit nonces, and for an algorithm that
declares nothing; see :func:`qimem.keys.max_messages_per_key`)."""

from __future__ import annotations

from typing import Any

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.keys import KeyVersion, max_messages_per_key, message_bound_reason


def algorithm_of(app: AppContext, version: KeyVersion) -> Any:
    """``version``'s algorithm object, or None when no enabled plugin provides it."""
    from qimem.crypto import DEFAULT_PURPOSE
    from qimem.errors import UnsupportedAlgorithmError

    try:  # of its own purpose (a deterministic key's AES-SIV is no AEAD of purpose encrypt)
        purpose = app.registry.algorithm_purposes.get(version.algorithm, DEFAULT_PURPOSE)
        return app.registry.algorithm(version.algorithm, purpose)
    except UnsupportedAlgorithmError:
        return None


def message_bound(app: AppContext, version: KeyVersion) -> int:
    """The most messages one version of ``version``'s algorithm may encrypt (see
    :func:`qimem.keys.max_messages_per_key`; 2^32 when its plugin is not loaded)."""
    return max_messages_per_key(algorithm_of(app, version))


def check_message_bound(app: AppContext, active: KeyVersion, limit: int | None) -> None:
    """:raises ValidationError: ``invalid_policy``: ``limit`` above the algorithm's bound."""
    if limit is None:
        return
    algorithm = algorithm_of(app, active)
    bound = max_messages_per_key(algorithm)
    if limit > bound:
        power = f" (2^{bound.bit_length() - 1})" if bound & (bound - 1) == 0 else ""
        raise ValidationError(
            f"usage_limit {limit} is above {bound}{power}, the most messages one "
            f"{active.algorithm} key version may encrypt: {message_bound_reason(algorithm)}",
            code="invalid_policy",
        )
