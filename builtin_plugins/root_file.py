"""The built-in ``file`` and ``env`` root-key providers: the root key is 32 bytes in a
0600 file (``[root_key] file``) or in an environment variable (``QIMEM_ROOT_KEY`` unless
``variable`` names another). Key-wrapping keys are sealed with AES-256-GCM under a key
derived from it (HKDF-SHA256). Either can also serve a store's unkeyringed version 1, whose
key-wrapping key is the root key itself (:class:`qimem.root.provider.DirectRootKey`).

These are the weakest roots (the secret is in a file or the process environment, readable
by whoever can read them); docs/operations.md, "Threat model", says what each protects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem.hooks import hookimpl

if TYPE_CHECKING:
    from qimem.root.provider import RegisterRootKeyProvider


@hookimpl
def qimem_register_root_key_providers(register: RegisterRootKeyProvider) -> None:
    register("file", FileRootKeyProvider.from_settings)
    register("env", EnvRootKeyProvider.from_settings)


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "root-file",
        "version": "1.0.0",
        "description": "Root key in a 0600 file or an environment variable",
        "provides": {"root_key_providers": ["file", "env"]},
        "qimem_api": ">=1,<2",
    }


_WRAP_FORMAT = 1
_NONCE = 12


class _LocalRootKey:
    """AES-256-GCM wrapping under HKDF(root key); subclasses say where the key lives."""

    name = "local"

    def _aead(self) -> Any:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        root = self.read_direct()
        try:
            derived = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None, info=b"qimem root provider v1"
            ).derive(bytes(root))
        finally:
            root[:] = bytes(len(root))
        return AESGCM(derived)

    def read_direct(self) -> bytearray:  # pragma: no cover - abstract
        raise NotImplementedError

    def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return bytes([_WRAP_FORMAT]) + nonce + self._aead().encrypt(nonce, bytes(key), context)

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        from cryptography.exceptions import InvalidTag

        from qimem.errors import DecryptionError

        if len(blob) < 1 + _NONCE + 16 or blob[0] != _WRAP_FORMAT:
            raise DecryptionError(f"the {self.name} root provider's wrapped key is damaged")
        try:
            return bytearray(
                self._aead().decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], context)
            )
        except InvalidTag:
            raise DecryptionError(
                f"the wrapped key does not unwrap under this {self.name} root key"
            ) from None

    def close(self) -> None:
        pass


class FileRootKeyProvider(_LocalRootKey):
    """The root key in a file (mode 0600, base64; ``qimem init`` writes it)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], base_dir: Path) -> FileRootKeyProvider:
        from qimem.errors import ConfigError

        value = settings.get("file")
        if not isinstance(value, str) or not value:
            raise ConfigError('the file root provider needs [root_key] file = "PATH"')
        path = Path(value).expanduser()
        return cls(path if path.is_absolute() else (base_dir / path).resolve())

    def read_direct(self) -> bytearray:
        from qimem.rootkey import read_root_key_file

        return read_root_key_file(self.path)

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path)}

    def __repr__(self) -> str:
        return f"<FileRootKeyProvider {self.path}>"


class EnvRootKeyProvider(_LocalRootKey):
    """The root key, base64, in an environment variable (``QIMEM_ROOT_KEY`` by default)."""

    name = "env"

    def __init__(self, variable: str) -> None:
        self.variable = variable

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], base_dir: Path) -> EnvRootKeyProvider:
        from qimem.errors import ConfigError

        variable = settings.get("variable", "QIMEM_ROOT_KEY")
        if not isinstance(variable, str) or not variable.isidentifier():
            raise ConfigError("the env root provider's 'variable' must name a variable")
        return cls(variable)

    def read_direct(self) -> bytearray:
        from qimem.errors import ConfigError
        from qimem.rootkey import decode_root_key

        text = os.environ.get(self.variable)
        if not text:
            raise ConfigError(f"the env root provider's variable {self.variable} is not set")
        return decode_root_key(text, self.variable)

    def describe(self) -> dict[str, Any]:
        return {"variable": self.variable}

    def __repr__(self) -> str:
        return f"<EnvRootKeyProvider {self.variable}>"
