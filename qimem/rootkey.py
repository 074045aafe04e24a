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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qimem import fileio
from qimem.errors import ConfigError, ConflictError, DecryptionError
from qimem.root.kwk import check_value, derive, derive_base, keyring_mac_key, wrapping_key

ROOT_KEY_SIZE = 32
_WRAP_FORMAT = 1  # version 1: format | nonce | ciphertext
_WRAP_FORMAT_VERSIONED = 2  # format | root version (u32) | nonce | ciphertext
_NONCE = 12
#: A root key file is 45 bytes (base64 and a newline); anything above this is refused unread.
_MAX_ROOT_KEY_FILE = 4096
#: How often a process re-reads the store's root keyring before it wraps (so a rotation
#: elsewhere moves its new rows to the new root version within about this long).
REFRESH_SECONDS = 1.0


_derive = derive


def _log() -> Any:
    import logging

    return logging.getLogger("qimem.rootkey")


def blob_root_version(blob: bytes) -> int:
    """The root version a wrapped blob is sealed under (0 if it is no wrapped blob)."""
    if len(blob) >= 1 + _NONCE + 16 and blob[0] == _WRAP_FORMAT:
        return 1
    if len(blob) >= 5 + _NONCE + 16 and blob[0] == _WRAP_FORMAT_VERSIONED:
        return int.from_bytes(blob[1:5], "big")
    return 0


class KeyWrapper:
    """Seals and opens key material under the store's root versions. Its repr shows no key
    bytes.

    ``KeyWrapper(root_key)`` is a store's version 1 whose key-wrapping key is the root key
    itself (a store with no root keyring). :meth:`pending` makes one that has no key until
    a store attaches its keyring (a root held by a provider: PKCS#11, another server).
    A store calls :meth:`attach` when it opens; from then on the wrapper follows the
    store's keyring: it loads versions another process added (:data:`REFRESH_SECONDS`)
    and wraps new rows under the active one.
    """

    __slots__ = (
        "_aeads",
        "_checks",
        "_mac_keys",
        "_refused",
        "_active",
        "_derive_base",
        "check_value",
        "_slot",
        "_opener",
        "_new_provider",
        "_previous",
        "_keyring",
        "_text",
        "_read_at",
        "_lock",
    )

    def __init__(self, root_key: bytes | bytearray | None = None) -> None:
        import threading

        self._aeads: dict[int, AESGCM] = {}
        self._checks: dict[int, str] = {}
        self._mac_keys: dict[int, bytes] = {}
        self._refused: str | None = None
        self._active = 0
        self._derive_base: bytes | None = None
        self.check_value = ""
        self._slot: Any = None
        self._opener: Any = None
        self._new_provider: Any = None
        self._previous: Any = None
        self._keyring: Any = None
        self._text: str | None = None
        self._read_at = 0.0
        self._lock = threading.RLock()
        if root_key is not None:
            if len(root_key) != ROOT_KEY_SIZE:
                raise ConfigError(f"the root key must be {ROOT_KEY_SIZE} bytes")
            self._aeads = {1: AESGCM(wrapping_key(root_key))}
            self.check_value = check_value(root_key)
            self._checks = {1: self.check_value}
            self._mac_keys = {1: keyring_mac_key(root_key)}
            self._active = 1
            # A public fingerprint stores keep, so a wrong root key is refused with a clear
            # message instead of failing on every key.
            self._derive_base = derive_base(root_key)

    @classmethod
    def pending(
        cls,
        opener: Callable[..., Any],
        new_provider: Callable[[], Any],
        previous: Callable[[], list[Callable[[], Any]]] | None = None,
    ) -> KeyWrapper:
        """A wrapper for a root held by a provider: no key until a store attaches its
        keyring, or creates one with ``new_provider()`` for a new store."""
        wrapper = cls()
        wrapper.use_providers(opener, new_provider, previous)
        return wrapper

    def use_providers(
        self,
        opener: Callable[..., Any],
        new_provider: Callable[[], Any] | None = None,
        previous: Callable[[], list[Callable[[], Any]]] | None = None,
    ) -> None:
        """How to open a keyring's versions: ``opener(name, settings)`` returns a root-key
        provider (:mod:`qimem.root.provider`) for a version's recorded settings (used only
        once the document is authenticated); ``new_provider()`` the configured one;
        ``previous()`` makers of the providers ``[[root_key.previous]]`` names (a root being
        migrated away from), trusted like the configured one."""
        self._opener = opener
        self._new_provider = new_provider
        self._previous = previous

    # -- the store's keyring -----------------------------------------------------------

    def attach(self, slot: Any, text: str | None | bool = False, *, fresh: bool = True) -> None:
        """Follow the keyring ``slot`` of the store that is opening (``text``: its
        document if the store already read it, ``None`` if it has none). A pending wrapper
        on a store with no keyring creates it (version 1, wrapped by the configured
        provider).

        :raises ConfigError: a version cannot be opened, or a provider-held root on a
            store that already has a root key of its own (no keyring).
        """
        with self._lock:
            self._slot = slot
            document = slot.read() if text is False else text
            if document is not None:
                self._load(str(document))
            elif not self._aeads:
                if not fresh:
                    # Also what a lost root key file looks like (the configured file
                    # does not exist): say how to restore it, not only how to migrate.
                    raise ConfigError(
                        "this store's root is a root key file or QIMEM_ROOT_KEY (it has no "
                        "root keyring), and none is available: if the root key file is "
                        "lost, restore it where [root_key] file says (from its backup, or "
                        "'qimem root recover' from escrow shares); to move the store to "
                        "another provider, keep [root_key] file (or QIMEM_ROOT_KEY) "
                        "configured next to the new provider's settings and run "
                        "'qimem root rotate'"
                    )
                self._create(slot)
            self._read_at = time.monotonic()

    @property
    def attached(self) -> bool:
        """Whether a store's keyring slot is attached."""
        return self._slot is not None

    @property
    def slot(self) -> Any:
        """The attached store's keyring slot (``None`` before a store attached it)."""
        return self._slot

    @property
    def keyring(self) -> Any:
        """The loaded :class:`qimem.root.keyring.Keyring`, or ``None`` (no keyring)."""
        return self._keyring

    @property
    def document(self) -> str | None:
        """The keyring document loaded (and verified), or ``None``."""
        return self._text

    @property
    def active_version(self) -> int:
        """The root version new rows are wrapped under (0: no key yet)."""
        return self._active

    def refresh(self, *, force: bool = True) -> None:
        """Re-read the attached store's keyring (always, or if older than
        :data:`REFRESH_SECONDS` when ``force`` is false)."""
        slot = self._slot
        if slot is None:
            return
        if not force:
            if time.monotonic() - self._read_at < REFRESH_SECONDS:
                return
            # One thread reads for the process; the others wrap under what is loaded (a
            # wrap inside a transaction never waits for a second pooled connection behind
            # other writers).
            if not self._lock.acquire(blocking=False):
                return
        else:
            self._lock.acquire()
        try:
            document = slot.read()
            self._read_at = time.monotonic()
            if document is not None and document != self._text:
                try:
                    self._load(document)
                except ConfigError as exc:
                    if force:
                        raise
                    # A running process keeps the keyring it verified (and goes on
                    # wrapping under its active version) rather than fail every write.
                    if document != self._refused:
                        self._refused = document
                        _log().warning("root keyring not reloaded: %s", exc.message)
        finally:
            self._lock.release()

    def _create(self, slot: Any) -> None:
        from qimem.root import keyring as kr

        if self._new_provider is None:
            raise ConfigError("no root key configured (run 'qimem init' or set QIMEM_ROOT_KEY)")
        provider = self._new_provider()
        try:
            keyring, kwk = kr.new_keyring(provider)
        finally:
            provider.close()
        try:
            document = keyring.dump()
            if slot.replace(None, document):
                self._install(keyring, document, {1: kwk})
                return
        finally:
            kwk[:] = bytes(len(kwk))
        found = slot.read()  # another process created it first
        if found is None:
            raise ConfigError("the store's root keyring could not be created")
        self._load(found)

    def _load(self, document: str) -> None:
        from qimem.root import keyring as kr

        keyring = kr.parse(document)
        opened: dict[int, bytearray] = {}
        try:
            self._authenticate(keyring, opened)
            for record in keyring.versions:
                if record.version in opened:
                    continue
                known = self._aeads.get(record.version)
                if known is not None and self._checks.get(record.version) == record.check:
                    continue
                if record.state == kr.RETIRED and record.version != keyring.derive_version:
                    continue  # opened on demand (a straggling row), not at startup
                opened[record.version] = kr.open_version(keyring, record, self._need_opener())
            self._install(keyring, document, opened)
        finally:
            for kwk in opened.values():
                kwk[:] = bytes(len(kwk))

    def _authenticate(self, keyring: Any, opened: dict[int, bytearray]) -> None:
        """Check the document's tag under a root version this process holds or that the
        *configured* provider opens (never under recorded settings, which a database
        writer could have chosen), before anything recorded in it is used.

        :raises ConfigError: no version this process trusts vouches for the document.
        """
        import hmac

        from qimem.root import keyring as kr

        order = sorted(keyring.versions, key=lambda r: (r.version != keyring.active, -r.version))
        for record in order:
            key = self._mac_keys.get(record.version)
            held = key is not None and self._checks.get(record.version) == record.check
            tag = keyring.tags.get(record.version, "")
            if held and hmac.compare_digest(keyring.tag(key), tag):
                return
        first: str | None = None
        for make in self._trusted():
            name = make().name
            for record in order:
                if record.provider != name or record.version not in keyring.tags:
                    continue
                try:
                    kwk = kr.open_version(keyring, record, _always(make))
                except ConfigError as exc:
                    first = first or exc.message
                    continue
                tag = keyring.tag(keyring_mac_key(kwk))
                if hmac.compare_digest(tag, keyring.tags[record.version]):
                    opened[record.version] = kwk
                    return
                kwk[:] = bytes(len(kwk))
        raise ConfigError(
            "the store's root keyring is not vouched for by any root version this "
            "configuration opens: it was changed outside qimem, or [root_key] (and "
            "[[root_key.previous]]) name another root than the store's"
            + (f" ({first})" if first else "")
        )

    def _trusted(self) -> list[Callable[[], Any]]:
        """Makers of the providers the configuration names: ``[root_key]`` first, then each
        ``[[root_key.previous]]`` (settings from the operator, never from the keyring)."""
        if self._new_provider is None:
            return []
        return [self._new_provider, *(self._previous() if self._previous else [])]

    def sign(self, keyring: Any, extra: dict[int, bytearray] | None = None) -> str:
        """``keyring`` as a document tagged by every version this process holds (and the
        new ones in ``extra``: version -> KWK), for the store's slot."""
        checks = {r.version: r.check for r in keyring.versions}
        keys = {v: k for v, k in self._mac_keys.items() if self._checks.get(v) == checks.get(v)}
        for version, kwk in (extra or {}).items():
            keys[version] = keyring_mac_key(kwk)
        return str(keyring.signed(keys).dump())

    def _need_opener(self) -> Callable[..., Any]:
        if self._opener is None:
            raise ConfigError(
                "this store's root is a root keyring; open it with its configuration "
                "(qimem.connect or the qimem CLI), not a bare root key"
            )
        return self._opener  # type: ignore[no-any-return]

    def _install(self, keyring: Any, document: str, opened: dict[int, bytearray]) -> None:
        from qimem.root import keyring as kr

        aeads: dict[int, AESGCM] = {}
        checks: dict[int, str] = {}
        mac_keys: dict[int, bytes] = {}
        for record in keyring.versions:
            if record.version in opened:
                aeads[record.version] = AESGCM(wrapping_key(opened[record.version]))
                checks[record.version] = record.check
                mac_keys[record.version] = keyring_mac_key(opened[record.version])
            elif self._checks.get(record.version) == record.check:
                aeads[record.version] = self._aeads[record.version]
                checks[record.version] = record.check
                if record.version in self._mac_keys:
                    mac_keys[record.version] = self._mac_keys[record.version]
        if keyring.active not in aeads:
            raise ConfigError(f"root version {keyring.active} (active) could not be opened")
        if keyring.derive_version in opened:
            base = kr.open_derive_base(keyring, opened[keyring.derive_version])
        elif self._derive_base is not None and self.check_value == keyring.check:
            base = self._derive_base
        else:
            base = self._open_derive(keyring)
        self._aeads = aeads
        self._checks = checks
        self._mac_keys = mac_keys
        self._derive_base = base
        self.check_value = keyring.check
        self._active = keyring.active
        self._keyring = keyring
        self._text = document

    def _open_derive(self, keyring: Any) -> bytes:
        from qimem.root import keyring as kr

        record = keyring.version(keyring.derive_version)
        kwk = kr.open_version(keyring, record, self._need_opener())
        try:
            return kr.open_derive_base(keyring, kwk)
        finally:
            kwk[:] = bytes(len(kwk))

    def _aead_for(self, version: int) -> AESGCM:
        aead = self._aeads.get(version)
        if aead is not None:
            return aead
        try:
            self.refresh(force=True)
        except ConfigError:
            pass  # a keyring that does not verify holds no version for this blob
        aead = self._aeads.get(version)
        if aead is not None:
            return aead
        keyring = self._keyring
        if keyring is not None and any(r.version == version for r in keyring.versions):
            with self._lock:
                from qimem.root import keyring as kr

                kwk = kr.open_version(keyring, keyring.version(version), self._need_opener())
                try:
                    aead = AESGCM(wrapping_key(kwk))
                    self._mac_keys = {**self._mac_keys, version: keyring_mac_key(kwk)}
                finally:
                    kwk[:] = bytes(len(kwk))
                self._aeads = {**self._aeads, version: aead}
                self._checks = {**self._checks, version: keyring.version(version).check}
                return aead
        raise DecryptionError(
            f"stored key material is wrapped under root version {version}, which this "
            "store's root keyring does not hold"
        )

    def seal_derive_base(self, keyring_id: str, check: str, kwk: bytes | bytearray) -> bytes:
        """The store's derive base sealed under a new version's ``kwk`` (rotation)."""
        from qimem.root import keyring as kr

        if self._derive_base is None:
            raise ConfigError("no root key yet: the store has not attached its root keyring")
        return kr.seal_derive_base(keyring_id, check, kwk, self._derive_base)

    # -- wrapping ----------------------------------------------------------------------

    def derive_key(self, label: str) -> bytes:
        """A 32-byte key for another purpose (HKDF-SHA256 from the store's derive base,
        ``label`` in the info): distinct labels give independent keys, none of them the
        wrapping key. The same for the store's whole life, whatever its root version."""
        if self._derive_base is None:
            raise ConfigError("no root key yet: the store has not attached its root keyring")
        return _derive(self._derive_base, b"qimem derived key v1|" + label.encode("utf-8"))

    def wrap(self, material: bytes | bytearray, context: bytes) -> bytes:
        """``material`` sealed under the active root version, bound to ``context``."""
        if self._slot is not None:
            self.refresh(force=False)
        version = self._active
        if version == 0:
            raise ConfigError("no root key yet: the store has not attached its root keyring")
        aead = self._aeads[version]
        nonce = os.urandom(_NONCE)
        sealed = aead.encrypt(nonce, bytes(material), context)
        if version == 1:
            return bytes([_WRAP_FORMAT]) + nonce + sealed
        return bytes([_WRAP_FORMAT_VERSIONED]) + version.to_bytes(4, "big") + nonce + sealed

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """The material sealed by :meth:`wrap` with the same ``context``, whichever root
        version sealed it.

        :raises DecryptionError: wrong root key, wrong context, or damaged bytes.
        """
        version = blob_root_version(blob)
        if version == 0:
            raise DecryptionError("stored key material is damaged")
        start = 1 if blob[0] == _WRAP_FORMAT else 5
        aead = self._aead_for(version)
        try:
            return bytearray(
                aead.decrypt(blob[start : start + _NONCE], blob[start + _NONCE :], context)
            )
        except InvalidTag:
            raise DecryptionError(
                "stored key material does not unwrap under this root key"
            ) from None

    def rewrap(self, blob: bytes, context: bytes) -> bytes | None:
        """``blob`` sealed under the active root version instead, or ``None`` if it already
        is (root rotation)."""
        if blob_root_version(blob) == self._active:
            return None
        material = self.unwrap(blob, context)
        try:
            return self.wrap(material, context)
        finally:
            material[:] = bytes(len(material))

    def __repr__(self) -> str:
        return f"<KeyWrapper check={self.check_value} active={self._active}>"


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
    """Read the root key file, refusing one that others can read or write, one that is
    not a regular file (a FIFO would block the open forever) and one too large to be a
    root key (it is never read whole)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"root key file {path} does not exist (run 'qimem init')") from None
    except OSError as exc:
        raise ConfigError(f"cannot read root key file {path}: {type(exc).__name__}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"root key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"root key file {path} is not a regular file")
        try:
            data = os.read(fd, _MAX_ROOT_KEY_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read root key file {path}: {type(exc).__name__}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_ROOT_KEY_FILE:
        raise ConfigError(f"root key file {path} is too large to hold a root key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read root key file {path}: {type(exc).__name__}") from None
    return decode_root_key(text, f"root key file {path}")


def _always(make: Callable[[], Any]) -> Callable[[str, Any], Any]:
    """A provider opener that ignores a version's recorded settings: ``make()``."""

    def opener(_name: str, _settings: Any) -> Any:
        return make()

    return opener
