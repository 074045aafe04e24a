"""The root-key provider contract (``qimem_register_root_key_providers``).

A provider holds a root secret and wraps and unwraps 32-byte key-wrapping keys (KWKs)
under it, bound to a context (associated data). qimem calls it once per root version when
a process opens a store, and when ``qimem root rotate`` creates a version; never per
request. A provider is built by a factory from its settings::

    factory(settings: dict[str, Any], base_dir: pathlib.Path) -> RootKeyProvider

``settings`` come from the config's ``[root_key]`` table (every key but ``provider``) or,
for an existing root version, from the keyring record (what :meth:`RootKeyProvider.
describe` returned when the version was made), with the config filling in keys the record
lacks. ``base_dir`` is the config file's directory: relative paths are relative to it.

Errors (each message names the provider and never quotes a secret):

* the factory or :meth:`wrap` raise :class:`qimem.errors.ConfigError` when the provider is
  misconfigured or its secret cannot be reached (wrong token, slot, label or PIN; an
  unreachable or refusing upstream server): a clear startup error, never a fallback;
* :meth:`unwrap` raises :class:`qimem.errors.DecryptionError` when the blob is damaged,
  was tampered with, or was wrapped under another root secret or context.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: Size of every key a provider wraps (a root version's key-wrapping key).
KWK_SIZE = 32
#: Names a provider may be registered under.
PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@runtime_checkable
class RootKeyProvider(Protocol):
    """Wraps and unwraps key-wrapping keys under a root secret it holds."""

    #: The name it was registered under (``file``, ``env``, ``pkcs11``, ``qimem`` ...).
    name: str

    def wrap(self, key: bytes, context: bytes) -> bytes:
        """``key`` (:data:`KWK_SIZE` bytes) sealed under the root secret, bound to
        ``context``; the result is opaque to qimem and stored in the keyring.

        :raises ConfigError: the root secret cannot be used (device, upstream, PIN).
        """
        ...

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """The key :meth:`wrap` sealed with the same ``context``.

        :raises DecryptionError: damaged or tampered ``blob``, another root secret, or
            another ``context`` (never a device's or server's own error type).
        :raises ConfigError: the root secret cannot be used (device, upstream, PIN).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """The settings that reopen this same root secret later (no secret in them: a
        path to a PIN file, never the PIN). Recorded in the keyring with each root version
        the provider wraps, shown by ``qimem root status``; JSON types only."""
        ...

    def close(self) -> None:
        """Release sessions and connections (the provider is not used afterwards)."""
        ...


@runtime_checkable
class DirectRootKey(Protocol):
    """A provider whose root secret is a 32-byte key qimem may read (``file``, ``env``):
    such a provider can also serve a store's unkeyringed version 1, whose key-wrapping key
    is the root key itself."""

    def read_direct(self) -> bytearray:
        """The root key's 32 bytes (the caller zeroes them after use).

        :raises ConfigError: missing, unreadable, badly encoded or too widely readable.
        """
        ...


#: ``factory(settings, base_dir)`` returns a :class:`RootKeyProvider`.
RootKeyProviderFactory = Callable[[Mapping[str, Any], Path], RootKeyProvider]
#: ``register(name, factory)``; ``factory`` may be a ``"module:attr"`` reference.
RegisterRootKeyProvider = Callable[[str, "RootKeyProviderFactory | str"], None]


def kwk_context(keyring_id: str, version: int) -> bytes:
    """The associated data a root version's KWK is wrapped with: the store's keyring id
    and the version, so a wrapped KWK copied into another store or onto another version
    does not unwrap."""
    return f"qimem root kwk v1|{keyring_id}|{version}".encode()
