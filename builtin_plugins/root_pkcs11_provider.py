"""The ``pkcs11`` root-key provider: the root key is a non-extractable AES-256 key inside a
PKCS#11 token (an HSM, SoftHSM2), and key-wrapping keys are sealed by the token with
AES-GCM (12-byte random IV, the context as associated data, 128-bit tag). Imported only
when a store's root uses it (``python-pkcs11`` is imported inside the functions).

``[root_key]`` settings (none of them secret; :meth:`Pkcs11RootKeyProvider.describe`
returns them)::

    provider = "pkcs11"
    library = "/usr/lib/softhsm/libsofthsm2.so"   # the PKCS#11 module (required)
    token_label = "qimem"          # or: slot = 1234 (exactly one of the two)
    key_label = "qimem-root"       # the AES-256 key's label (CKA_LABEL)
    pin_file = "token.pin"         # mode 0600; or: pin = "stdin" (read once, at open)
    # create_key = true            # 'qimem init' creates the key (create_root_key)
    # allow_imported_key = true    # accept a key that was once extractable or imported

The PIN never comes from the config or argv. One logged-in session per token is shared by
every provider of the process (PKCS#11 login state is per process and token: a second
``C_Login`` fails, and closing a logged-in session logs every session out); calls on it are
serialised by a lock. A forked child initialises the library again and logs in with its
own session.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import stat
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from qimem.errors import ConfigError, ConflictError, DecryptionError

_FORMAT = 1
_IV = 12
_TAG = 16
_MAX_PIN = 256
_T = TypeVar("_T")
#: PKCS#11 errors meaning the token, its session or its login went away (not the blob).
_GONE = frozenset(
    [
        "DeviceRemoved",
        "TokenNotPresent",
        "TokenNotRecognised",
        "SessionClosed",
        "SessionHandleInvalid",
        "UserNotLoggedIn",
        "KeyHandleInvalid",
        "ObjectHandleInvalid",
        "OperationNotInitialized",
    ]
)
#: PKCS#11 errors meaning the token refuses the operation (not a damaged blob either).
_REFUSED = frozenset(
    [
        "MechanismInvalid",
        "MechanismParamInvalid",
        "FunctionNotSupported",
        "FunctionRejected",
        "KeyTypeInconsistent",
        "KeySizeRange",
        "DeviceMemory",
        "HostMemory",
        "SessionCount",
    ]
)


def _err_name(exc: BaseException) -> str:
    return type(exc).__name__


def login_error(exc: BaseException, token: str) -> ConfigError:
    """The :class:`ConfigError` for a failed ``C_Login`` on ``token`` (never quotes the PIN)."""
    name = _err_name(exc)
    what = {
        "PinIncorrect": "wrong PIN",
        "PinLocked": "the user PIN is locked (too many wrong PINs; the SO must unlock it)",
        "PinExpired": "the user PIN has expired (change it with the token's tools)",
        "PinLenRange": "the PIN has a length the token refuses (wrong PIN)",
        "PinInvalid": "the PIN has characters the token refuses (wrong PIN)",
        "UserPinNotInitialized": "the token's user PIN was never set (initialise the token)",
    }.get(name, f"login refused ({name})")
    return ConfigError(f"pkcs11 root provider: {what} for token {token}")


class _Login:
    """The process's one logged-in session on a token (shared by its providers)."""

    def __init__(self, token: Any, session: Any, pin_digest: bytes | None) -> None:
        self.token = token
        self.session = session
        self.pin_digest = pin_digest  # HMAC of the PIN that logged in (None: read from stdin)
        self.lock = threading.Lock()
        self.users = 0
        self.valid = True


_state_lock = threading.Lock()
_logins: dict[tuple[str, int], _Login] = {}
_forked_libraries: set[str] = set()  # initialised by the parent of this forked process
#: PINs read from stdin, by (library, token name): read once per process and kept for its
#: forked children; None after the token refused it (never read again, never retried).
_stdin_pins: dict[tuple[str, str], str | None] = {}
#: Digests of PINs a token refused in this process: not tried again (a real token locks
#: its PIN after a few wrong tries).
_refused_pins: dict[tuple[str, int], set[bytes]] = {}
_providers: weakref.WeakSet[Pkcs11RootKeyProvider] = weakref.WeakSet()
_salt = os.urandom(32)
_pid = os.getpid()


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_salt, pin.encode(), hashlib.sha256).digest()


def _after_fork() -> None:
    """In a forked child: new locks and no sessions (the parent's are not ours to close);
    each library is initialised again on its next use (PKCS#11 wants C_Initialize per
    process). Does no PKCS#11 call itself."""
    global _state_lock, _pid
    _state_lock = threading.Lock()
    for login in _logins.values():
        login.valid = False
    _logins.clear()
    for provider in list(_providers):
        provider._reset_after_fork()
    loaded = getattr(sys.modules.get("pkcs11"), "_loaded", None) or {}
    _forked_libraries.update(loaded)
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _check_pid() -> None:
    if os.getpid() != _pid:  # forked by something that skipped the at-fork hooks
        _after_fork()


def _load_library(path: str) -> Any:
    import pkcs11

    try:
        loaded = pkcs11._loaded.get(path)
        if path in _forked_libraries:
            # Initialised by the parent before the fork: initialise it for this process.
            _forked_libraries.discard(path)
            if loaded is not None and loaded.initialized:
                try:
                    loaded.finalize()
                except Exception:  # noqa: BLE001, S110 - the child's C_Finalize may refuse
                    pass
        lib = pkcs11.lib(path)
    except Exception as exc:  # noqa: BLE001 - dlopen and C_Initialize errors alike
        raise ConfigError(
            f"pkcs11 root provider: cannot load or initialise the PKCS#11 library {path} "
            f"({_err_name(exc)}; for SoftHSM2 check SOFTHSM2_CONF and its token directory)"
        ) from None
    return lib


def _read_pin_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"pkcs11 root provider: PIN file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(
            f"pkcs11 root provider: cannot open PIN file {path}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"pkcs11 root provider: PIN file {path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"pkcs11 root provider: PIN file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        data = os.read(fd, _MAX_PIN + 3)
    finally:
        os.close(fd)
    return _clean_pin(data, f"PIN file {path}")


def _clean_pin(data: bytes, source: str) -> str:
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        data = data[:-1]
    if not data:
        raise ConfigError(f"pkcs11 root provider: {source} is empty")
    if len(data) > _MAX_PIN or b"\n" in data:
        raise ConfigError(f"pkcs11 root provider: {source} does not hold one PIN line")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"pkcs11 root provider: {source} is not UTF-8") from None


def _read_pin_stdin(token: str) -> str:
    if sys.stdin is None:
        raise ConfigError('pkcs11 root provider: pin = "stdin" but the process has no stdin')
    if sys.stdin.isatty():
        line = getpass.getpass(f"PKCS#11 user PIN for token {token}: ")
    else:
        line = sys.stdin.readline()
    return _clean_pin(line.encode("utf-8"), "the PIN read from stdin")


class Pkcs11RootKeyProvider:
    """The root key is an AES-256 key that never leaves a PKCS#11 token."""

    name = "pkcs11"

    def __init__(
        self,
        library: Path,
        *,
        key_label: str,
        token_label: str | None = None,
        slot: int | None = None,
        pin_file: Path | None = None,
        allow_imported_key: bool = False,
    ) -> None:
        self.library = library
        self.key_label = key_label
        self.token_label = token_label
        self.slot = slot
        self.pin_file = pin_file
        self.allow_imported_key = allow_imported_key
        self._lock = threading.Lock()
        self._login: _Login | None = None
        self._key: Any = None
        _providers.add(self)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], base_dir: Path) -> Pkcs11RootKeyProvider:
        """Build a provider from ``[root_key]`` settings; nothing is opened until first use.

        :raises ConfigError: a missing, mistyped or conflicting setting, or a PIN in the config.
        """

        def path(key: str) -> Path | None:
            value = settings.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                raise ConfigError(f"pkcs11 root provider: '{key}' must be a path")
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base_dir / p).resolve()

        try:
            import pkcs11  # noqa: F401
        except ImportError:
            raise ConfigError(
                "pkcs11 root provider needs python-pkcs11: pip install 'qimem[pkcs11]'"
            ) from None
        library = path("library")
        if library is None:
            raise ConfigError(
                'pkcs11 root provider needs [root_key] library = "PATH" '
                "(the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so for SoftHSM2)"
            )
        if not library.is_file():
            raise ConfigError(f"pkcs11 root provider: PKCS#11 library {library} does not exist")
        token_label, slot = settings.get("token_label"), settings.get("slot")
        if (token_label is None) == (slot is None):
            raise ConfigError("pkcs11 root provider needs exactly one of token_label or slot")
        if token_label is not None and (not isinstance(token_label, str) or not token_label):
            raise ConfigError("pkcs11 root provider: 'token_label' must be a non-empty string")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or slot < 0):
            raise ConfigError("pkcs11 root provider: 'slot' must be a slot id (an integer)")
        key_label = settings.get("key_label")
        if not isinstance(key_label, str) or not key_label:
            raise ConfigError('pkcs11 root provider needs [root_key] key_label = "LABEL"')
        pin = settings.get("pin")
        if pin is not None and pin != "stdin":
            raise ConfigError(
                "pkcs11 root provider: the PIN never goes in the config; "
                'use pin_file = "PATH" (mode 0600) or pin = "stdin"'
            )
        pin_file = path("pin_file")
        if (pin_file is None) == (pin is None):
            raise ConfigError('pkcs11 root provider needs exactly one of pin_file or pin = "stdin"')
        for flag in ("allow_imported_key", "create_key"):
            if not isinstance(settings.get(flag, False), bool):
                raise ConfigError(f"pkcs11 root provider: '{flag}' must be true or false")
        return cls(
            library,
            key_label=key_label,
            token_label=token_label,
            slot=slot,
            pin_file=pin_file,
            allow_imported_key=settings.get("allow_imported_key", False),
        )

    # --- the token -------------------------------------------------------------------

    @property
    def _token_name(self) -> str:
        return f"'{self.token_label}'" if self.token_label is not None else f"in slot {self.slot}"

    def _find_token(self, lib: Any) -> Any:
        try:
            slots = lib.get_slots(token_present=True)
            if self.slot is not None:
                for slot in slots:
                    if slot.slot_id == self.slot:
                        return slot.get_token()
                ids = ", ".join(str(s.slot_id) for s in slots) or "none"
                raise ConfigError(
                    f"pkcs11 root provider: no token in slot {self.slot} of {self.library} "
                    f"(slots with a token: {ids})"
                )
            tokens = [t for t in (s.get_token() for s in slots) if t.label == self.token_label]
            labels = ", ".join(sorted({repr(s.get_token().label) for s in slots})) or "none"
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"pkcs11 root provider: cannot list the tokens ({_err_name(exc)})"
            ) from None
        if not tokens:
            raise ConfigError(
                f"pkcs11 root provider: no token labelled '{self.token_label}' in {self.library} "
                f"(token labels: {labels})"
            )
        if len(tokens) > 1:
            raise ConfigError(
                f"pkcs11 root provider: {len(tokens)} tokens are labelled '{self.token_label}'; "
                "name the token by slot instead"
            )
        return tokens[0]

    @property
    def _stdin_key(self) -> tuple[str, str]:
        return (str(self.library), self._token_name)

    def _pin(self) -> str:
        if self.pin_file is not None:
            return _read_pin_file(self.pin_file)
        if self._stdin_key not in _stdin_pins:
            _stdin_pins[self._stdin_key] = _read_pin_stdin(self._token_name)
        pin = _stdin_pins[self._stdin_key]
        if pin is None:
            raise ConfigError(
                f"pkcs11 root provider: the PIN read from stdin for token {self._token_name} "
                "was refused; restart qimem to enter it again"
            )
        return pin

    def read_stdin_pin(self) -> None:
        """With ``pin = "stdin"``: read the PIN now, without opening the token. A pre-fork
        master (``qimem serve --workers N``) calls this before forking, so the workers
        reuse the PIN instead of each reading stdin. Nothing to do with ``pin_file``."""
        if self.pin_file is None:
            with _state_lock:
                self._pin()

    def _acquire_login(self) -> _Login:
        """The shared logged-in session of this provider's token (caller holds ``self._lock``)."""
        _check_pid()
        with _state_lock:
            lib = _load_library(str(self.library))
            token = self._find_token(lib)
            slot_key = (str(self.library), int(token.slot.slot_id))
            login = _logins.get(slot_key)
            if login is not None and login.valid:
                if self.pin_file is not None and login.pin_digest is not None:
                    pin = _read_pin_file(self.pin_file)
                    if not hmac.compare_digest(_pin_digest(pin), login.pin_digest):
                        raise ConfigError(
                            f"pkcs11 root provider: wrong PIN for token {self._token_name}"
                        )
            else:
                pin = self._pin()
                refused = _refused_pins.setdefault(slot_key, set())
                if _pin_digest(pin) in refused:
                    raise ConfigError(
                        f"pkcs11 root provider: wrong PIN for token {self._token_name} "
                        "(refused before; not tried again)"
                    )
                try:
                    session = token.open(user_pin=pin)
                except Exception as exc:  # noqa: BLE001
                    if self.pin_file is None:
                        _stdin_pins[self._stdin_key] = None
                    if _err_name(exc) == "UserAlreadyLoggedIn":
                        raise ConfigError(
                            f"pkcs11 root provider: token {self._token_name} is already logged in "
                            "by other code in this process; qimem cannot check its PIN"
                        ) from None
                    if _err_name(exc) in ("PinIncorrect", "PinLenRange", "PinInvalid"):
                        refused.add(_pin_digest(pin))
                    raise login_error(exc, self._token_name) from None
                digest = _pin_digest(pin) if self.pin_file is not None else None
                login = _logins[slot_key] = _Login(token, session, digest)
            login.users += 1
            return login

    def _find_key(self, login: _Login) -> Any:
        from pkcs11 import Attribute, KeyType, ObjectClass

        where = f"key '{self.key_label}' on token {self._token_name}"
        try:
            keys = list(
                login.session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}
                )
            )
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"pkcs11 root provider: cannot search for {where} ({_err_name(exc)})"
            ) from None
        if not keys:
            raise ConfigError(
                f"pkcs11 root provider: no secret {where} (create it with "
                "'qimem init --root-key-provider pkcs11' or the token's tools)"
            )
        if len(keys) > 1:
            raise ConfigError(
                f"pkcs11 root provider: {len(keys)} secret keys are labelled "
                f"'{self.key_label}' on token {self._token_name}; labels must be unique"
            )
        key = keys[0]

        def attr(a: Any) -> Any:
            try:
                return key[a]
            except Exception:  # noqa: BLE001 - an attribute the token will not show
                return None

        if attr(Attribute.KEY_TYPE) != KeyType.AES or attr(Attribute.VALUE_LEN) != 32:
            raise ConfigError(f"pkcs11 root provider: {where} is not an AES-256 key")
        if attr(Attribute.EXTRACTABLE) is not False or attr(Attribute.SENSITIVE) is not True:
            raise ConfigError(
                f"pkcs11 root provider: {where} can leave the token (it must be sensitive "
                "and not extractable)"
            )
        if not self.allow_imported_key and (
            attr(Attribute.NEVER_EXTRACTABLE) is not True
            or attr(Attribute.ALWAYS_SENSITIVE) is not True
        ):
            raise ConfigError(
                f"pkcs11 root provider: {where} was extractable or imported once (set "
                "allow_imported_key = true if it was copied from another HSM on purpose)"
            )
        if attr(Attribute.ENCRYPT) is not True or attr(Attribute.DECRYPT) is not True:
            raise ConfigError(f"pkcs11 root provider: {where} may not encrypt and decrypt")
        return key

    def _drop_login(self, login: _Login, *, close: bool) -> None:
        with _state_lock:
            login.users -= 1
            if close and login.users <= 0 and login.valid:
                login.valid = False
                _logins.pop((str(self.library), int(login.token.slot.slot_id)), None)
                try:
                    login.session.close()
                except Exception:  # noqa: BLE001, S110 - the token may be gone already
                    pass

    def _invalidate(self, login: _Login) -> None:
        """Forget a session the token no longer honours (removed, restarted, logged out)."""
        with _state_lock:
            if login.valid:
                login.valid = False
                _logins.pop((str(self.library), int(login.token.slot.slot_id)), None)

    def _call(self, operation: Callable[[Any], _T]) -> _T:
        """Run ``operation(key)`` on the shared session; reopen once if the session is gone."""
        for attempt in (1, 2):
            with self._lock:
                if self._login is None or not self._login.valid:
                    if self._login is not None:
                        self._drop_login(self._login, close=False)
                        self._login, self._key = None, None
                    login = self._acquire_login()
                    try:
                        with login.lock:
                            self._key = self._find_key(login)
                    except BaseException:
                        self._drop_login(login, close=True)
                        raise
                    self._login = login
                login, key = self._login, self._key
            try:
                with login.lock:
                    return operation(key)
            except Exception as exc:  # noqa: BLE001
                if _err_name(exc) not in _GONE:
                    raise
                self._invalidate(login)
                if attempt == 2:
                    raise ConfigError(
                        f"pkcs11 root provider: token {self._token_name} is unreachable "
                        f"({_err_name(exc)})"
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # --- the provider ----------------------------------------------------------------

    def wrap(self, key: bytes, context: bytes) -> bytes:
        """``key`` sealed by the token (AES-GCM, ``context`` as associated data)."""
        from pkcs11 import GCMParams, Mechanism

        iv = os.urandom(_IV)
        data, aad = bytes(key), bytes(context)
        try:
            params = GCMParams(iv, aad, _TAG * 8)
            sealed = self._call(
                lambda k: k.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"pkcs11 root provider: token {self._token_name} refused to wrap ({_err_name(exc)})"
            ) from None
        return bytes([_FORMAT]) + iv + bytes(sealed)

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """The key :meth:`wrap` sealed under this token's key with the same ``context``."""
        from pkcs11 import GCMParams, Mechanism

        blob = bytes(blob)
        if len(blob) < 1 + _IV + _TAG or blob[0] != _FORMAT:
            raise DecryptionError("the pkcs11 root provider's wrapped key is damaged")
        iv, sealed, aad = blob[1 : 1 + _IV], blob[1 + _IV :], bytes(context)
        try:
            params = GCMParams(iv, aad, _TAG * 8)
            plain = self._call(
                lambda k: k.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - SoftHSM reports a bad tag as CKR_GENERAL_ERROR
            if _err_name(exc) in _REFUSED:
                raise ConfigError(
                    f"pkcs11 root provider: token {self._token_name} refused to unwrap "
                    f"({_err_name(exc)})"
                ) from None
            raise DecryptionError(
                "the wrapped key does not unwrap under this pkcs11 root key "
                "(damaged, another key, or another context)"
            ) from None
        return bytearray(plain)

    def check(self) -> None:
        """Open the token, log in and check the key now (startup refuses clearly).

        :raises ConfigError: wrong library, token, slot, PIN or key label, or an unfit key.
        """
        self._call(lambda k: None)

    def describe(self) -> dict[str, Any]:
        """The settings that reopen this root key (paths and labels; never the PIN)."""
        out: dict[str, Any] = {"library": str(self.library), "key_label": self.key_label}
        if self.token_label is not None:
            out["token_label"] = self.token_label
        else:
            out["slot"] = self.slot
        if self.pin_file is not None:
            out["pin_file"] = str(self.pin_file)
        else:
            out["pin"] = "stdin"
        if self.allow_imported_key:
            out["allow_imported_key"] = True
        return out

    def close(self) -> None:
        """Release this provider's use of the shared session (the last one logs out)."""
        with self._lock:
            login, self._login, self._key = self._login, None, None
        if login is not None:
            self._drop_login(login, close=True)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._login, self._key = None, None

    def __repr__(self) -> str:
        token, key = self._token_name, self.key_label
        return f"<Pkcs11RootKeyProvider {self.library} token {token} key '{key}'>"


@contextmanager
def _rw_session(provider: Pkcs11RootKeyProvider) -> Iterator[Any]:
    """A read-write session on the provider's (logged-in) token, closed afterwards."""
    with provider._lock:
        login = provider._acquire_login()
    try:
        with login.lock:
            session = login.token.open(rw=True)  # shares the login; closing it does not log out
        try:
            yield session
        finally:
            session.close()
    finally:
        provider._drop_login(login, close=True)


def create_root_key(settings: Mapping[str, Any], base_dir: Path) -> None:
    """Generate the root key in the token: AES-256, a token object, private, sensitive,
    never extractable, labelled ``key_label``, allowed to encrypt and decrypt only. Used by
    ``qimem init --root-key-provider pkcs11`` when ``create_key = true``.

    :raises ConflictError: a secret key with that label already exists on the token.
    :raises ConfigError: the token cannot be opened or refuses to make the key.
    """
    from pkcs11 import Attribute, KeyType, ObjectClass

    provider = Pkcs11RootKeyProvider.from_settings(settings, base_dir)
    try:
        with _rw_session(provider) as session:
            found = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: provider.key_label}
                )
            )
            if found:
                raise ConflictError(
                    f"pkcs11 root provider: token {provider._token_name} already has a key "
                    f"labelled '{provider.key_label}' (refusing to make another)"
                )
            false_attrs = (
                Attribute.EXTRACTABLE,
                Attribute.WRAP,
                Attribute.UNWRAP,
                Attribute.SIGN,
                Attribute.VERIFY,
                Attribute.DERIVE,
            )
            template: dict[Any, Any] = {a: False for a in false_attrs}
            template.update(
                {
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                }
            )
            try:
                session.generate_key(
                    KeyType.AES,
                    256,
                    label=provider.key_label,
                    id=os.urandom(8),
                    store=True,
                    template=template,
                )
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(
                    f"pkcs11 root provider: token {provider._token_name} refused to generate "
                    f"the key ({_err_name(exc)})"
                ) from None
        provider.check()
    finally:
        provider.close()
