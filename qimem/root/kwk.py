"""Key-wrapping-key primitives: what a root version's 32-byte key is turned into (HKDF-SHA256
with fixed labels). Shared by :mod:`qimem.rootkey` and :mod:`qimem.root.keyring`."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def derive(root_key: bytes | bytearray, info: bytes) -> bytes:
    """HKDF-SHA256 of ``root_key`` with ``info``, 32 bytes, no salt."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(root_key))


def wrapping_key(kwk: bytes | bytearray) -> bytes:
    """The AES-256-GCM key rows are sealed with under a root version's key-wrapping key."""
    return derive(kwk, b"qimem key wrapping v1")


def derive_base(kwk: bytes | bytearray) -> bytes:
    """The base of a store's derived keys: HKDF of its version 1 key-wrapping key."""
    return derive(kwk, b"qimem derived keys v1")


def check_value(kwk: bytes | bytearray) -> str:
    """A public fingerprint of a key-wrapping key (it does not reveal the key)."""
    return derive(kwk, b"qimem root key check v1")[:16].hex()


def keyring_mac_key(kwk: bytes | bytearray) -> bytes:
    """The key a root version authenticates the keyring document with (HMAC-SHA256)."""
    return derive(kwk, b"qimem root keyring mac v1")
