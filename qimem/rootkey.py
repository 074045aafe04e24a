"""The root key, and the wrapping of key material under it (DESIGN.md §3).

Persistent stores never hold key material in the clear: each version's key is sealed with
AES-256-GCM under a wrapping key derived from the root key (HKDF-SHA256), with the version's
identity (realm, lineage, key id, version, algorithm) as associated data, so a row copied
onto another row in the database does not unwrap.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qimem import fileio
from qimem.errors import ConfigError, ConflictError, DecryptionError

ROOT_KEY_SIZE = 32
_WRAP_FORMAT = 1
_NONCE = 12


def _derive(root_key: bytes | bytearray, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(root_key))


class KeyWrapper:
    """Seals and opens key material under the root key. Its repr shows no key bytes."""

    __slots__ = ("_aead", "_derive_base", "check_value")

    def __init__(self, root_key: bytes | bytearray) -> None:
        if len(root_key) != ROOT_KEY_SIZE:
            raise ConfigError(f"the root key must be {ROOT_KEY_SIZE} bytes")
        self._aead = AESGCM(_derive(root_key, b"qimem key wrapping v1"))
        self._derive_base = _derive(root_key, b"qimem derived keys v1")
        # A public fingerprint stores keep, so a wrong root key is refused with a clear
        # message instead of failing on every key.
        self.check_value = _derive(root_key, b"qimem root key check v1")[:16].hex()

    def derive_key(self, label: str) -> bytes:
        """A 32-byte key for another purpose (HKDF-SHA256 from the root key, ``label`` in
        the info): distinct labels give independent keys, none of them the wrapping key."""
        return _derive(self._derive_base, b"qimem derived key v1|" + label.encode("utf-8"))

    def wrap(self, material: bytes | bytearray, context: bytes) -> bytes:
        """``material`` sealed under the root key, bound to ``context``."""
        nonce = os.urandom(_NONCE)
        return bytes([_WRAP_FORMAT]) + nonce + self._aead.encrypt(nonce, bytes(material), context)

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """The material sealed by :meth:`wrap` with the same ``context``.

        :raises DecryptionError: wrong root key, wrong context, or damaged bytes.
        """
        if len(blob) < 1 + _NONCE + 16 or blob[0] != _WRAP_FORMAT:
            raise DecryptionError("stored key material is damaged")
        try:
            return bytearray(self._aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], context))
        except InvalidTag:
            raise DecryptionError(
                "stored key material does not unwrap under this root key"
            ) from None

    def __repr__(self) -> str:
        return f"<KeyWrapper check={self.check_value}>"


def generate_root_key() -> bytearray:
    return bytearray(os.urandom(ROOT_KEY_SIZE))


def encode_root_key(key: bytes | bytearray) -> str:
    return base64.b64encode(bytes(key)).decode("ascii")


def decode_root_key(text: str, source: str) -> bytearray:
    """Decode a base64 root key; ``source`` names where it came from for the error message."""
    try:
        key = bytearray(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source} does not hold a base64 root key") from None
    if len(key) != ROOT_KEY_SIZE:
        raise ConfigError(f"{source} must hold a {ROOT_KEY_SIZE}-byte root key")
    return key


def write_root_key_file(path: Path) -> bytearray:
    """Create ``path`` (mode 0600, never overwriting; a missing directory 0700) holding a
    fresh root key.

    The key is written to a hidden temp file, fsynced and linked into place without
    replacing anything (:func:`qimem.fileio.commit`), so a crash never leaves an empty or
    partial root key file for the next ``qimem init`` to trip over; a dead run's temp file
    is removed by the next call.

    :raises ConfigError: ``path`` already exists (an existing root key is never replaced).
    """
    fileio.make_private_dirs(path.parent)
    exists = ConfigError(f"root key file {path} already exists; refusing to overwrite it")
    if path.exists():
        raise exists
    fileio.cleanup_stale_temps(path.parent)
    key = generate_root_key()
    fd, tmp = fileio.create_temp(path)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(encode_root_key(key) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fileio.commit(tmp, path, force=False)
    except ConflictError:
        raise exists from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fileio.fsync_dir(path.parent)
    return key


def generate(path: str | os.PathLike[str]) -> Path:
    """Write a fresh root key to ``path`` (mode 0600) and return the path: the Python
    equivalent of the root key ``qimem init`` writes.

    >>> from qimem import rootkey
    >>> rootkey.generate("root.key")  # doctest: +SKIP
    PosixPath('root.key')

    The file is created with :func:`write_root_key_file` (temp file, fsync, no-replace
    link; a missing directory is created 0700). Keep it, and back it up apart from the
    database: key material in persistent stores opens only under it.

    :raises ConfigError: ``path`` already exists (an existing root key is never replaced).
    """
    target = Path(path)
    write_root_key_file(target)
    return target


def read_root_key_file(path: Path) -> bytearray:
    """Read the root key file, refusing one that others can read or write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"root key file {path} does not exist (run 'qimem init')") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"root key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read root key file {path}: {type(exc).__name__}") from None
    return decode_root_key(text, f"root key file {path}")
