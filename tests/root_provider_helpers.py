"""Root-key providers written the way an outside plugin writes them, for
tests/test_root_provider_contract.py: ``sealbox`` (a sound one: its root secret is 32 bytes,
hex, in a file; ChaCha20-Poly1305) and deliberately broken variants, each registered
through ``qimem_register_root_key_providers`` under its own name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from qimem.errors import ConfigError, DecryptionError
from qimem.hooks import hookimpl
from qimem.root.provider import RegisterRootKeyProvider

_FORMAT = b"\x01"
_NONCE = 12


def write_secret(path: Path) -> str:
    """A fresh root secret in ``path`` (0600); returns its hex text (the secret)."""
    text = os.urandom(32).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return text


class SealboxProvider:
    """Root secret: 32 bytes, hex, in the file ``key_file`` (relative to the config)."""

    name = "sealbox"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], base_dir: Path) -> SealboxProvider:
        value = settings.get("key_file")
        if not isinstance(value, str) or not value:
            raise ConfigError('the sealbox root provider needs key_file = "PATH"')
        return cls((base_dir / value).resolve())

    def _aead(self) -> ChaCha20Poly1305:
        try:
            return ChaCha20Poly1305(bytes.fromhex(self.path.read_text().strip()))
        except (OSError, ValueError):
            raise ConfigError(f"sealbox: cannot read a root secret from {self.path}") from None

    def _nonce(self, key: bytes) -> bytes:
        return os.urandom(_NONCE)

    def _aad(self, context: bytes) -> bytes:
        return context

    def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = self._nonce(key)
        return _FORMAT + nonce + self._aead().encrypt(nonce, bytes(key), self._aad(context))

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        if len(blob) < 1 + _NONCE + 16 or blob[:1] != _FORMAT:
            raise DecryptionError("sealbox: the wrapped key is damaged")
        try:
            nonce, sealed = blob[1 : 1 + _NONCE], blob[1 + _NONCE :]
            return bytearray(self._aead().decrypt(nonce, sealed, self._aad(context)))
        except InvalidTag:
            raise DecryptionError("sealbox: the wrapped key does not open") from None

    def describe(self) -> dict[str, Any]:
        return {"key_file": str(self.path)}

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<SealboxProvider {self.path}>"


@hookimpl
def qimem_register_root_key_providers(register: RegisterRootKeyProvider) -> None:
    register("sealbox", SealboxProvider.from_settings)


# -- deliberately broken providers (each caught by the contract test aimed at it) ----------


class IgnoresContext(SealboxProvider):
    """Bug: the context is not bound (a KWK copied to another keyring or version opens)."""

    name = "broken-context"

    def _aad(self, context: bytes) -> bytes:
        return b""


class Deterministic(SealboxProvider):
    """Bug: the nonce is derived from the key (one key wrapped twice gives one blob)."""

    name = "broken-deterministic"

    def _nonce(self, key: bytes) -> bytes:
        return bytes(key[:_NONCE])


class ValueErrorOnTamper(SealboxProvider):
    """Bug: a damaged blob raises the library's error (a ValueError), not DecryptionError."""

    name = "broken-valueerror"

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        try:
            return bytearray(self._aead().decrypt(blob[1:13], blob[13:], context))
        except InvalidTag:
            raise ValueError(f"tag mismatch for blob {blob.hex()}") from None


class LeaksSecret(SealboxProvider):
    """Bug: describe() records the root secret itself (it ends up in the keyring)."""

    name = "broken-leak"

    def describe(self) -> dict[str, Any]:
        return {"key_file": str(self.path), "key": self.path.read_text().strip()}


BROKEN = {cls.name: cls for cls in (IgnoresContext, Deterministic, ValueErrorOnTamper, LeaksSecret)}


class BrokenPlugin:
    """Registers every broken provider (a plugin object, as pluggy allows)."""

    @hookimpl
    def qimem_register_root_key_providers(self, register: RegisterRootKeyProvider) -> None:
        for name, cls in BROKEN.items():
            register(name, cls.from_settings)
