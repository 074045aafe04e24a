"""MAC algorithms (purpose ``mac``): HMAC-SHA-256 and HMAC-SHA-512.

Registered by reference (plugin API 1.2, ``purpose="mac"``): their code
(:mod:`qimem.builtin_plugins._mac`) is imported only when a MAC algorithm is used.
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    module = "qimem.builtin_plugins._mac"
    register(f"{module}:HmacSha256", name="hmac-sha256", algorithm_id=32, purpose="mac")
    register(f"{module}:HmacSha512", name="hmac-sha512", algorithm_id=33, purpose="mac")


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "hmac",
        "version": "1.0.0",
        "description": "HMAC-SHA-256 and HMAC-SHA-512 keys (cryptography's HMAC)",
        "provides": {"algorithms": ["hmac-sha256", "hmac-sha512"]},
        "qimem_api": ">=1,<2",
    }
