"""The built-in algorithms of the other key purposes (plugin API 1.2): signing (Ed25519,
ECDSA P-256/P-384, RSA-PSS and RSA PKCS#1 v1.5 at 3072/4096 bits, ML-DSA-65), MAC
(HMAC-SHA-256/512) and deterministic encryption (AES-256-SIV). See docs/algorithms.md.

One plugin module for all of them, registered by reference with their purpose: every
command imports this small module, and the algorithms' code (``_signing``, ``_mac``,
``_siv``) with cryptography's primitives only when one is used.
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm

#: name → (reference, algorithm id, purpose). Ids are written into signatures, tags and
#: envelopes: they never change.
ALGORITHMS = {
    "ed25519": ("_signing:Ed25519", 16, "sign"),
    "ecdsa-p256": ("_signing:EcdsaP256", 17, "sign"),
    "ecdsa-p384": ("_signing:EcdsaP384", 18, "sign"),
    "rsa-pss-3072": ("_signing:RsaPss3072", 19, "sign"),
    "rsa-pss-4096": ("_signing:RsaPss4096", 20, "sign"),
    "rsa-pkcs1-3072": ("_signing:RsaPkcs1v15_3072", 21, "sign"),
    "rsa-pkcs1-4096": ("_signing:RsaPkcs1v15_4096", 22, "sign"),
    "ml-dsa-65": ("_signing:MlDsa65", 23, "sign"),
    "hmac-sha256": ("_mac:HmacSha256", 32, "mac"),
    "hmac-sha512": ("_mac:HmacSha512", 33, "mac"),
    "aes-256-siv": ("_siv:AesSiv", 48, "deterministic"),
}


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    for name, (reference, algorithm_id, purpose) in ALGORITHMS.items():
        register(
            f"qimem.builtin_plugins.{reference}",
            name=name,
            algorithm_id=algorithm_id,
            purpose=purpose,
        )


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "key-purposes",
        "version": "1.0.0",
        "description": "Signing (Ed25519, ECDSA, RSA, ML-DSA-65), HMAC and AES-256-SIV keys",
        "provides": {"algorithms": list(ALGORITHMS)},
        "qimem_api": ">=1,<2",
    }
