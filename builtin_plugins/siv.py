"""Deterministic AEAD (purpose ``deterministic``): AES-256-SIV (RFC 5297).

Registered by reference (plugin API 1.2, ``purpose="deterministic"``): its code
(:mod:`qimem.builtin_plugins._siv`) is imported only when it is used.
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    register(
        "qimem.builtin_plugins._siv:AesSiv",
        name="aes-256-siv",
        algorithm_id=48,
        purpose="deterministic",
    )


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "aes-256-siv",
        "version": "1.0.0",
        "description": "AES-256-SIV deterministic AEAD (cryptography's AESSIV); leaks equality",
        "provides": {"algorithms": ["aes-256-siv"]},
        "qimem_api": ">=1,<2",
    }
