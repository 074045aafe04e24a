"""Token logins for the ``pkcs11`` root-key provider (:mod:`qimem.builtin_plugins.
root_pkcs11_provider`): loading the PKCS#11 library, finding the token, reading the PIN and
keeping one logged-in session per token per process.

PKCS#11 keeps login state per process and token: a second ``C_Login`` fails with
``CKR_USER_ALREADY_LOGGED_IN``, and closing a logged-in session (python-pkcs11's
``Session.close`` calls ``C_Logout``) logs every session of the process out. So every
provider of a process shares one :class:`Login` per token, counted by its users, and its
calls are serialised by the login's lock. A PIN read from a PIN file is checked against the
one that logged in (an HMAC, never the PIN). A forked child (``os.register_at_fork``) drops
its parent's sessions without closing them and initialises each library again on next use.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qimem.errors import ConfigError

_MAX_PIN = 256


def err_name(exc: BaseException) -> str:
    """A python-pkcs11 error's class name (``PinIncorrect``): safe to show, unlike its text."""
    return type(exc).__name__


def login_error(exc: BaseException, token: str) -> ConfigError:
    """The :class:`ConfigError` for a failed ``C_Login`` on ``token`` (never quotes the PIN)."""
    name = err_name(exc)
    what = {
        "PinIncorrect": "wrong PIN",
        "PinLocked": "the user PIN is locked (too many wrong PINs; the SO must unlock it)",
        "PinExpired": "the user PIN has expired (change it with the token's tools)",
        "PinLenRange": "the PIN has a length the token refuses (wrong PIN)",
        "PinInvalid": "the PIN has characters the token refuses (wrong PIN)",
        "UserPinNotInitialized": "the token's user PIN was never set (initialise the token)",
    }.get(name, f"login refused ({name})")
    return ConfigError(f"pkcs11 root provider: {what} for token {token}")


@dataclass(frozen=True)
class TokenRef:
    """How a provider reaches its token: library, token label or slot, PIN source."""

    library: str
    token_label: str | None
    slot: int | None
    pin_file: Path | None  # None: the PIN comes from stdin

    @property
    def name(self) -> str:
        """The token as messages name it: ``'label'`` or ``in slot N``."""
        return f"'{self.token_label}'" if self.token_label is not None else f"in slot {self.slot}"


class Login:
    """The process's one logged-in session on a token (shared by its providers)."""

    def __init__(self, key: tuple[str, int], token: Any, session: Any, pin_digest: bytes | None):
        self.key = key  # (library, slot id)
        self.token = token
        self.session = session
        self.pin_digest = pin_digest  # HMAC of the PIN that logged in (None: read from stdin)
        self.lock = threading.Lock()
        self.users = 0
        self.valid = True


class _Resettable(Protocol):
    def _reset_after_fork(self) -> None: ...


_state_lock = threading.Lock()
_logins: dict[tuple[str, int], Login] = {}
_forked_libraries: set[str] = set()  # initialised by the parent of this forked process
#: PINs read from stdin, by (library, token name): read once per process and kept for its
#: forked children; None after the token refused it (never read again, never retried).
stdin_pins: dict[tuple[str, str], str | None] = {}
#: Digests of PINs a token refused in this process: not tried again (a real token locks
#: its PIN after a few wrong tries).
_refused_pins: dict[tuple[str, int], set[bytes]] = {}
_users: weakref.WeakSet[_Resettable] = weakref.WeakSet()
_salt = os.urandom(32)
_pid = os.getpid()


def track(user: _Resettable) -> None:
    """Call ``user._reset_after_fork()`` in a forked child (new locks, no session)."""
    _users.add(user)


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_salt, pin.encode(), hashlib.sha256).digest()


def _after_fork() -> None:
    """In a forked child: new locks, and no sessions (the parent's are not ours to close).
    Each library is initialised again on its next use (PKCS#11 wants C_Initialize per
    process); no PKCS#11 call is made here."""
    global _state_lock, _pid
    _state_lock = threading.Lock()
    for login in _logins.values():
        login.valid = False
    _logins.clear()
    for user in list(_users):
        user._reset_after_fork()
    loaded = getattr(sys.modules.get("pkcs11"), "_loaded", None) or {}
    _forked_libraries.update(loaded)
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


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
        return pkcs11.lib(path)
    except Exception as exc:  # noqa: BLE001 - dlopen and C_Initialize errors alike
        raise ConfigError(
            f"pkcs11 root provider: cannot load or initialise the PKCS#11 library {path} "
            f"({err_name(exc)}; for SoftHSM2 check SOFTHSM2_CONF and its token directory)"
        ) from None


def _find_token(lib: Any, ref: TokenRef) -> Any:
    try:
        slots = lib.get_slots(token_present=True)
        if ref.slot is not None:
            for slot in slots:
                if slot.slot_id == ref.slot:
                    return slot.get_token()
            ids = ", ".join(str(s.slot_id) for s in slots) or "none"
            raise ConfigError(
                f"pkcs11 root provider: no token in slot {ref.slot} of {ref.library} "
                f"(slots with a token: {ids})"
            )
        tokens = [t for t in (s.get_token() for s in slots) if t.label == ref.token_label]
        labels = ", ".join(sorted({repr(s.get_token().label) for s in slots})) or "none"
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            f"pkcs11 root provider: cannot list the tokens ({err_name(exc)})"
        ) from None
    if not tokens:
        raise ConfigError(
            f"pkcs11 root provider: no token labelled '{ref.token_label}' in {ref.library} "
            f"(token labels: {labels})"
        )
    if len(tokens) > 1:
        raise ConfigError(
            f"pkcs11 root provider: {len(tokens)} tokens are labelled '{ref.token_label}'; "
            "name the token by slot instead"
        )
    return tokens[0]


def read_pin_file(path: Path) -> str:
    """The PIN in ``path``: one line, the file 0600 (group/other access refused)."""
    from qimem.fileio import read_private_file

    data = read_private_file(path, "pkcs11 root provider: PIN file", _MAX_PIN + 2)
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


def _pin(ref: TokenRef) -> str:
    if ref.pin_file is not None:
        return read_pin_file(ref.pin_file)
    key = (ref.library, ref.name)
    if key not in stdin_pins:
        stdin_pins[key] = _read_pin_stdin(ref.name)
    pin = stdin_pins[key]
    if pin is None:
        raise ConfigError(
            f"pkcs11 root provider: the PIN read from stdin for token {ref.name} was "
            "refused; restart qimem to enter it again"
        )
    return pin


def read_stdin_pin(ref: TokenRef) -> None:
    """With ``pin = "stdin"``: read the PIN now (once per process) without opening the token."""
    if ref.pin_file is None:
        with _state_lock:
            _pin(ref)


def acquire(ref: TokenRef) -> Login:
    """The process's logged-in session on ``ref``'s token, logging in if there is none;
    :func:`release` it when done.

    :raises ConfigError: library, token, slot or PIN wrong (the PIN is never quoted).
    """
    if os.getpid() != _pid:  # forked by something that skipped the at-fork hooks
        _after_fork()
    with _state_lock:
        token = _find_token(_load_library(ref.library), ref)
        slot_key = (ref.library, int(token.slot.slot_id))
        login = _logins.get(slot_key)
        if login is not None and login.valid:
            if ref.pin_file is not None and login.pin_digest is not None:
                pin = read_pin_file(ref.pin_file)
                if not hmac.compare_digest(_pin_digest(pin), login.pin_digest):
                    raise ConfigError(f"pkcs11 root provider: wrong PIN for token {ref.name}")
        else:
            pin = _pin(ref)
            refused = _refused_pins.setdefault(slot_key, set())
            if _pin_digest(pin) in refused:
                raise ConfigError(
                    f"pkcs11 root provider: wrong PIN for token {ref.name} "
                    "(refused before; not tried again)"
                )
            try:
                session = token.open(user_pin=pin)
            except Exception as exc:  # noqa: BLE001
                if ref.pin_file is None:
                    stdin_pins[(ref.library, ref.name)] = None
                if err_name(exc) == "UserAlreadyLoggedIn":
                    raise ConfigError(
                        f"pkcs11 root provider: token {ref.name} is already logged in by "
                        "other code in this process; qimem cannot check its PIN"
                    ) from None
                if err_name(exc) in ("PinIncorrect", "PinLenRange", "PinInvalid"):
                    refused.add(_pin_digest(pin))
                raise login_error(exc, ref.name) from None
            digest = _pin_digest(pin) if ref.pin_file is not None else None
            login = _logins[slot_key] = Login(slot_key, token, session, digest)
        login.users += 1
        return login


def release(login: Login) -> None:
    """One user fewer; the last one closes the session (which logs the token out)."""
    with _state_lock:
        login.users -= 1
        if login.users <= 0 and login.valid:
            _forget(login)


def invalidate(login: Login) -> None:
    """Forget a session the token no longer honours (removed, restarted, logged out, or
    its key gone); the next :func:`acquire` logs in again."""
    with _state_lock:
        if login.valid:
            _forget(login)


def _forget(login: Login) -> None:
    login.valid = False
    if _logins.get(login.key) is login:
        del _logins[login.key]
    try:
        login.session.close()  # logs out, or the next login would be "already logged in"
    except Exception:  # noqa: BLE001, S110 - the token may be gone already
        pass
