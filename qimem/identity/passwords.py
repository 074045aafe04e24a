"""Password hashing: Argon2id (argon2-cffi, which releases the GIL) behind a bounded gate.

At most ``max_concurrent_hashes`` hashes run at once and at most ``max_waiting_hashes``
callers wait for a slot; beyond that a login is refused at once (503), so a login flood
cannot occupy every server thread and starve encrypt traffic. One client address and one
account may each hold at most a fair share of those places (``max_logins_per_source``, by
default half), so a flood from one source cannot take them all and starve other users'
logins (finding 13 of issue 12). Unknown usernames are hashed against a dummy hash made
with the same parameters, so they cost the same time as real ones.

In ``qimem serve`` the hashes run in helper processes (:mod:`qimem.hashing_processes`,
``argon2_runs_in``), one per hashing slot; elsewhere in the calling thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from qimem.errors import QimemError, ValidationError
from qimem.hashing_processes import (
    HashingProcesses,
    HelpersUnavailable,
    HelperTimeout,
    JobRefused,
)
from qimem.identity.settings import IdentitySettings

log = logging.getLogger("qimem.identity")
_T = TypeVar("_T")

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
_CLIENT_SECRET_PREFIX = "sha256$"  # noqa: S105 (a hash prefix, not a secret)


class LoginBusyError(QimemError):
    """Too many logins are hashing at once; retry shortly."""

    http_status = 503
    exit_code = 10
    code = "login_busy"
    title = "Service unavailable"
    retry_after = 1  # seconds (HTTP Retry-After): a hashing slot frees within a login's time


def validate_password(password: str) -> str:
    """Check a new password's length (never echoing it)."""
    if not isinstance(password, str):
        raise ValidationError("password must be a string", code="invalid_password")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValidationError(
            f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
            code="invalid_password",
        )
    if not _encodable(password):
        raise ValidationError("password must be valid Unicode text", code="invalid_password")
    return password


def _encodable(text: str) -> bool:
    """False for text with lone surrogates (JSON can carry them; UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class PasswordHashing:
    """Argon2id hashing and verification with a concurrency bound."""

    def __init__(self, settings: IdentitySettings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        slots = settings.max_concurrent_hashes
        #: Helper processes (``argon2_runs_in = "processes"``), or None: the calling thread.
        self.helpers: HashingProcesses | None = None
        if settings.argon2_runs_in == "processes":
            params = (settings.argon2_time_cost, settings.argon2_memory_kib,
                      settings.argon2_parallelism)  # fmt: skip
            self.helpers = HashingProcesses(slots, params)
        # With helpers, a slot's next login hands its job over while one hashes (so the
        # helper never waits for it), hence two per helper; the helpers are the bound.
        self._slots = threading.BoundedSemaphore(2 * slots if self.helpers else slots)
        self._in_thread = threading.BoundedSemaphore(slots)  # the bound without helpers
        self._fallback_lock = threading.Lock()
        places = settings.max_concurrent_hashes + settings.max_waiting_hashes
        self._waiting = threading.BoundedSemaphore(places)
        self._wait = settings.hash_wait_seconds
        #: Places (hashing or waiting) one source address or one account may hold.
        self.fair_share = settings.max_logins_per_source or max(1, places // 2)
        self._held: dict[str, int] = {}
        self._held_lock = threading.Lock()
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()

    def _claim(self, keys: tuple[str, ...]) -> None:
        """Take a place for each of ``keys``, or refuse if one of them holds its share."""
        with self._held_lock:
            if any(self._held.get(k, 0) >= self.fair_share for k in keys):
                raise LoginBusyError("too many logins in progress; retry shortly")
            for k in keys:
                self._held[k] = self._held.get(k, 0) + 1

    def _release(self, keys: tuple[str, ...]) -> None:
        with self._held_lock:
            for k in keys:
                left = self._held.get(k, 0) - 1
                if left > 0:
                    self._held[k] = left
                else:
                    self._held.pop(k, None)

    @contextlib.contextmanager
    def _gate(self, source: str | None = None, account: str | None = None) -> Iterator[None]:
        """A hashing slot: at most ``fair_share`` places per source and per account, then
        a bounded wait for a global slot; :class:`LoginBusyError` otherwise."""
        keys = tuple(
            k for k in (f"s:{source}" if source else "", f"a:{account}" if account else "") if k
        )
        self._claim(keys)
        try:
            if not self._waiting.acquire(blocking=False):
                raise LoginBusyError("too many logins in progress; retry shortly")
            try:
                if not self._slots.acquire(timeout=self._wait):
                    raise LoginBusyError("too many logins in progress; retry shortly")
                try:
                    yield
                finally:
                    self._slots.release()
            finally:
                self._waiting.release()
        finally:
            self._release(keys)

    def hash(self, password: str) -> str:
        """A PHC-encoded Argon2id hash (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``)."""
        validate_password(password)
        with self._gate():
            return self._hashed(lambda h: h.hash(password), lambda: self._hasher.hash(password))

    def _hashed(
        self, in_helpers: Callable[[HashingProcesses], _T], in_thread: Callable[[], _T]
    ) -> _T:
        """``in_helpers`` if helpers are in use, else ``in_thread`` under the in-thread
        bound (called holding a gate slot)."""
        helpers = self.helpers
        if helpers is not None:
            try:
                return in_helpers(helpers)
            except HelpersUnavailable as exc:
                if self._stop_helpers():
                    log.warning(
                        "password hashing helpers unavailable (%s); hashing in-process", exc
                    )
            except (HelperTimeout, JobRefused):  # never a verdict: the input was screened
                raise LoginBusyError("password hashing is overloaded; retry shortly") from None
        with self._in_thread:
            return in_thread()

    def _stop_helpers(self) -> bool:
        """Hash in the calling threads from now on; True if this call stopped the helpers.
        Returns once no helper is hashing, so the bound holds across the switch."""
        with self._fallback_lock:
            helpers = self.helpers
            if helpers is None:
                return False
            helpers.close()  # first: kills and reaps them, so no helper still hashes
            self.helpers = None
            return True

    @property
    def dummy_hash(self) -> str:
        """A hash of a random password with the current parameters (for unknown users)."""
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self._hasher.hash(secrets.token_urlsafe(24))
            return self._dummy

    def verify(
        self,
        stored: str | None,
        password: str,
        *,
        source: str | None = None,
        account: str | None = None,
    ) -> bool:
        """True if ``password`` matches ``stored``; with ``stored=None`` a dummy hash is
        verified instead, so unknown users take as long as known ones and always fail.

        ``source`` (the client address) and ``account`` (realm and username) each get at
        most :attr:`fair_share` of the hashing and waiting places.
        """
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            password = ""
        elif not _encodable(password):
            password = ""  # fails, as any wrong password, after the same work
        target = stored if stored is not None else self.dummy_hash
        with self._gate(source, account):
            ok = self._hashed(
                lambda h: h.verify(target, password), lambda: self._verify_here(target, password)
            )
        return ok and stored is not None

    def _verify_here(self, target: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(target, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def close(self) -> None:
        """Stop the helper processes, if any (later hashes run in the calling thread)."""
        self._stop_helpers()

    def needs_rehash(self, stored: str) -> bool:
        """True when ``stored`` was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(stored)
        except (InvalidHashError, ValueError):
            return True

    def __repr__(self) -> str:
        h = self._hasher
        return f"<PasswordHashing argon2id m={h.memory_cost} t={h.time_cost} p={h.parallelism}>"


def hash_client_secret(secret: str) -> str:
    """A service-account secret's stored form. Secrets are 256-bit random strings, so one
    SHA-256 is enough (no stretching needed); the clear secret is never stored."""
    return _CLIENT_SECRET_PREFIX + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def verify_client_secret(stored: str | None, secret: str) -> bool:
    """Constant-time check of a client secret; ``stored=None`` always fails (same work)."""
    if not isinstance(secret, str):
        secret = ""
    candidate = hash_client_secret(secret[:MAX_PASSWORD_LENGTH])
    reference = stored if stored is not None else _CLIENT_SECRET_PREFIX + "0" * 64
    return hmac.compare_digest(candidate, reference) and stored is not None


def new_client_secret() -> str:
    return "qcs_" + secrets.token_urlsafe(32)


def generate_password() -> str:
    """A random password for ``qimem init`` when none is given (shown once)."""
    return secrets.token_urlsafe(18)
