"""AES-256-GCM over cryptography's ``AESGCM``: 32-byte keys, random 96-bit nonces.

Registered by reference, like a third-party plugin may: the algorithm's code
(:class:`qimem.builtin_plugins._aead.AesGcm`) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    register("qimem.builtin_plugins._aead:AesGcm", name="aes-256-gcm", algorithm_id=1)


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "aes-256-gcm",
        "version": "1.0.0",
        "description": "AES-256-GCM with random 96-bit nonces (cryptography's AESGCM)",
        "provides": {"algorithms": ["aes-256-gcm"]},
        "qimem_api": ">=1,<2",
    }


def __getattr__(name: str) -> Any:
    if name == "AesGcm":  # the class, for code that imported it from here
        from qimem.builtin_plugins._aead import AesGcm

        return AesGcm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
