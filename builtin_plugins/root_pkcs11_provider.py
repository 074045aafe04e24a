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

The PIN never comes from the config or argv. Every provider of a process shares one
logged-in session per token, and a forked child logs in with its own
(:mod:`qimem.builtin_plugins.root_pkcs11_session`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qimem.builtin_plugins import root_pkcs11_session as tokens
from qimem.builtin_plugins.root_pkcs11_session import err_name
from qimem.errors import ConfigError, ConflictError, DecryptionError

_FORMAT = 1
_IV = 12
_TAG = 16
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
        self._login: tokens.Login | None = None
        self._key: Any = None
        self._ref = tokens.TokenRef(str(library), token_label, slot, pin_file)
        tokens.track(self)

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
                "pkcs11 root provider needs python-pkcs11: pip install python-pkcs11"
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
        return self._ref.name

    def read_stdin_pin(self) -> None:
        """With ``pin = "stdin"``: read the PIN now, without opening the token. A pre-fork
        master (``qimem serve --workers N``) calls this before forking, so the workers
        reuse the PIN instead of each reading stdin. Nothing to do with ``pin_file``."""
        tokens.read_stdin_pin(self._ref)

    def _find_key(self, login: tokens.Login) -> Any:
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
                f"pkcs11 root provider: cannot search for {where} ({err_name(exc)})"
            ) from None
        if not keys:
            raise ConfigError(
                f"pkcs11 root provider: no secret {where} (create it: 'qimem init "
                "--root-key-provider pkcs11 --root-key-setting create_key=true' for a new "
                "store, 'qimem root rotate --create-key' for an existing one, or the token's "
                "tools)"
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

    def _call(self, operation: Callable[[Any], _T]) -> _T:
        """Run ``operation(key)`` on the shared session; reopen once if the session is gone."""
        for attempt in (1, 2):
            with self._lock:
                if self._login is None or not self._login.valid:
                    if self._login is not None:
                        tokens.release(self._login)
                        self._login, self._key = None, None
                    login = tokens.acquire(self._ref)
                    try:
                        with login.lock:
                            self._key = self._find_key(login)
                    except BaseException:
                        tokens.release(login)
                        raise
                    self._login = login
                login, key = self._login, self._key
            try:
                with login.lock:
                    return operation(key)
            except Exception as exc:  # noqa: BLE001
                if err_name(exc) not in _GONE:
                    raise
                tokens.invalidate(login)
                if attempt == 2:
                    raise ConfigError(
                        f"pkcs11 root provider: token {self._token_name} is unreachable "
                        f"({err_name(exc)})"
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
                f"pkcs11 root provider: token {self._token_name} refused to wrap ({err_name(exc)})"
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
            if err_name(exc) in _REFUSED:
                raise ConfigError(
                    f"pkcs11 root provider: token {self._token_name} refused to unwrap "
                    f"({err_name(exc)})"
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

    def create_key(self) -> None:
        """Generate this provider's root key in the token (:func:`create_root_key`).

        :raises ConflictError: a secret key with ``key_label`` already exists on the token.
        :raises ConfigError: the token cannot be opened or refuses to make the key.
        """
        create_key(self)

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
            tokens.release(login)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._login, self._key = None, None

    def __repr__(self) -> str:
        token, key = self._token_name, self.key_label
        return f"<Pkcs11RootKeyProvider {self.library} token {token} key '{key}'>"


def _key_template() -> dict[Any, Any]:
    from pkcs11 import Attribute

    template: dict[Any, Any] = {
        a: False
        for a in (Attribute.EXTRACTABLE, Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN,
                  Attribute.VERIFY, Attribute.DERIVE)
    }  # fmt: skip
    for a in (Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.ENCRYPT,
              Attribute.DECRYPT):  # fmt: skip
        template[a] = True
    return template


def create_key(provider: Pkcs11RootKeyProvider) -> None:
    """Generate ``provider``'s root key in its token (see :func:`create_root_key`)."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    name, label = provider._token_name, provider.key_label
    with provider._lock:
        login = tokens.acquire(provider._ref)
    try:
        with login.lock:
            step = "open a read-write session"
            try:
                session = login.token.open(rw=True)  # shares the login; its close keeps it
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(
                    f"pkcs11 root provider: token {name}: cannot {step} ({err_name(exc)})"
                ) from None
            try:
                step = "search for the key"
                where = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                if list(session.get_objects(where)):
                    raise ConflictError(
                        f"pkcs11 root provider: token {name} already has a key labelled "
                        f"'{label}' (refusing to make another)"
                    )
                step = "generate the key"
                session.generate_key(
                    KeyType.AES, 256, label=label, id=os.urandom(8), store=True,
                    template=_key_template(),
                )  # fmt: skip
            except (ConfigError, ConflictError):
                raise
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(
                    f"pkcs11 root provider: token {name}: cannot {step} ({err_name(exc)})"
                ) from None
            finally:
                try:
                    session.close()
                except Exception:  # noqa: BLE001, S110 - the token may be gone already
                    pass
    finally:
        tokens.release(login)
    provider.check()


def create_root_key(settings: Mapping[str, Any], base_dir: Path) -> None:
    """Generate the root key in the token: AES-256, a token object, private, sensitive,
    never extractable, labelled ``key_label``, allowed to encrypt and decrypt only. For
    ``qimem init --root-key-provider pkcs11`` when ``create_key = true`` (also reachable as
    ``provider.create_key()`` on a provider the registry's factory built).

    :raises ConflictError: a secret key with that label already exists on the token.
    :raises ConfigError: the token cannot be opened or refuses to make the key.
    """
    provider = Pkcs11RootKeyProvider.from_settings(settings, base_dir)
    try:
        provider.create_key()
    finally:
        provider.close()
