"""Vault key types and qimem algorithms, both ways (docs/transit.md, "Key types").

RSA keys sign with PSS, Vault's default ``signature_algorithm``; a Vault ``rsa-*`` key is
a qimem ``rsa-pss-*`` key, and qimem's ``rsa-pkcs1-*`` keys read back as ``rsa-*`` too
(their signatures are PKCS#1 v1.5, which Vault asks for with ``signature_algorithm =
pkcs1v15``). Types qimem lacks (``aes128-gcm96``, ``xchacha20-poly1305``, ``ecdsa-p521``,
``rsa-2048``, ``managed_key``, ...) are refused by name.
"""

from __future__ import annotations

from qimem.server.transit.framework import VaultError

DEFAULT_TYPE = "aes256-gcm96"
TO_ALGORITHM = {
    "aes256-gcm96": "aes-256-gcm",
    "chacha20-poly1305": "chacha20-poly1305",
    "ed25519": "ed25519",
    "ecdsa-p256": "ecdsa-p256",
    "ecdsa-p384": "ecdsa-p384",
    "rsa-3072": "rsa-pss-3072",
    "rsa-4096": "rsa-pss-4096",
    "hmac": "hmac-sha256",
}
FROM_ALGORITHM = {algorithm: vault for vault, algorithm in TO_ALGORITHM.items()}
FROM_ALGORITHM.update({"rsa-pkcs1-3072": "rsa-3072", "rsa-pkcs1-4096": "rsa-4096"})


def algorithm_of(vault_type: object) -> str:
    """The qimem algorithm of a Vault key type (default ``aes256-gcm96``).

    :raises VaultError: a type qimem does not have.
    """
    if vault_type is None or vault_type == "":
        vault_type = DEFAULT_TYPE
    if not isinstance(vault_type, str) or vault_type not in TO_ALGORITHM:
        raise VaultError(
            f"unsupported key type {vault_type!r}; qimem's Transit facade has "
            + ", ".join(TO_ALGORITHM)
        )
    return TO_ALGORITHM[vault_type]


def type_of(algorithm: str) -> str:
    """The Vault key type a qimem algorithm reads back as (its own name when Vault has
    no such type, e.g. ``aes-256-siv``)."""
    return FROM_ALGORITHM.get(algorithm, algorithm)
