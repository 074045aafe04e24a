"""AES-256-GCM over cryptography's ``AESGCM``: 32-byte keys, random 96-bit nonces."""

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qimem.builtin_plugins._aead import CryptographyAead
from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm


class AesGcm(CryptographyAead):
    name = "aes-256-gcm"
    algorithm_id = 1
    aead_class = AESGCM


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    register(AesGcm())


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "aes-256-gcm",
        "version": "1.0.0",
        "description": "AES-256-GCM with random 96-bit nonces (cryptography's AESGCM)",
        "provides": {"algorithms": ["aes-256-gcm"]},
        "qimem_api": ">=1,<2",
    }
