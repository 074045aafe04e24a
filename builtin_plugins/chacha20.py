"""ChaCha20-Poly1305 over cryptography's ``ChaCha20Poly1305``: 32-byte keys, 96-bit nonces."""

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from qimem.builtin_plugins._aead import CryptographyAead
from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm


class ChaCha20(CryptographyAead):
    name = "chacha20-poly1305"
    algorithm_id = 2
    aead_class = ChaCha20Poly1305


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    register(ChaCha20())


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "chacha20-poly1305",
        "version": "1.0.0",
        "description": "ChaCha20-Poly1305 with random 96-bit nonces (cryptography)",
        "provides": {"algorithms": ["chacha20-poly1305"]},
        "qimem_api": ">=1,<2",
    }
