"""ChaCha20-Poly1305 over cryptography's ``ChaCha20Poly1305``: 32-byte keys, 96-bit nonces.

Registered by reference: :class:`qimem.builtin_plugins._aead.ChaCha20` is imported on
first use.
"""

from __future__ import annotations

from typing import Any

from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    register("qimem.builtin_plugins._aead:ChaCha20", name="chacha20-poly1305", algorithm_id=2)


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "chacha20-poly1305",
        "version": "1.0.0",
        "description": "ChaCha20-Poly1305 with random 96-bit nonces (cryptography)",
        "provides": {"algorithms": ["chacha20-poly1305"]},
        "qimem_api": ">=1,<2",
    }


def __getattr__(name: str) -> Any:
    if name == "ChaCha20":  # the class, for code that imported it from here
        from qimem.builtin_plugins._aead import ChaCha20

        return ChaCha20
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
