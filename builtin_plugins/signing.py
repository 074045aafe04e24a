"""Signing algorithms (purpose ``sign``): Ed25519, ECDSA P-256/P-384, RSA-PSS and RSA
PKCS#1 v1.5 at 3072/4096 bits, ML-DSA-65.

Registered by reference (plugin API 1.2, ``purpose="sign"``): their code
(:mod:`qimem.builtin_plugins._signing`) and cryptography's asymmetric primitives are
imported only when a signing algorithm is used. See docs/algorithms.md.
"""

from __future__ import annotations

from qimem.hooks import hookimpl
from qimem.registry import RegisterAlgorithm

#: name → (class in qimem.builtin_plugins._signing, algorithm id).
ALGORITHMS = {
    "ed25519": ("Ed25519", 16),
    "ecdsa-p256": ("EcdsaP256", 17),
    "ecdsa-p384": ("EcdsaP384", 18),
    "rsa-pss-3072": ("RsaPss3072", 19),
    "rsa-pss-4096": ("RsaPss4096", 20),
    "rsa-pkcs1-3072": ("RsaPkcs1v15_3072", 21),
    "rsa-pkcs1-4096": ("RsaPkcs1v15_4096", 22),
    "ml-dsa-65": ("MlDsa65", 23),
}


@hookimpl
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    for name, (attr, algorithm_id) in ALGORITHMS.items():
        register(
            f"qimem.builtin_plugins._signing:{attr}",
            name=name,
            algorithm_id=algorithm_id,
            purpose="sign",
        )


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "signing",
        "version": "1.0.0",
        "description": "Signing keys: Ed25519, ECDSA, RSA-PSS, RSA PKCS#1 v1.5, ML-DSA-65",
        "provides": {"algorithms": list(ALGORITHMS)},
        "qimem_api": ">=1,<2",
    }
