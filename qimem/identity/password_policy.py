"""Password policy: per realm, checked when a password is set (user creation, password
change, ``qimem init``'s admin password), never at login.

Rules, each named in the error it raises (``weak_password``; the password is never echoed):

* ``min_length`` — at least this many characters (default 12; never below 8, the floor of
  the hashing layer);
* ``username`` — neither equal to nor containing the username, ignoring case (usernames of
  fewer than 3 characters are only compared for equality);
* ``common`` — not one of the 30,000 most common passwords of zxcvbn's frequency list
  (the maintained ``zxcvbn`` package), ignoring case and a trailing run of digits and
  symbols (``Dragon2024!`` is ``dragon``);
* ``min_score`` — zxcvbn's strength estimate (0–4, with the username and realm as known
  words) at least this (default 2; 0 turns the estimate off).

Configured in the ``[identity.password_policy]`` table, with per-realm overrides in
``[identity.password_policy.realms.NAME]`` (see docs/identity.md).
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qimem.errors import ConfigError, ValidationError

ABSOLUTE_MIN_LENGTH = 8
MAX_LENGTH = 1024
_ZXCVBN_MAX = 72  # zxcvbn refuses longer input; a longer password is scored on its start
_USERNAME_MIN_FOR_CONTAINS = 3
_TRAILING = re.compile(r"[\W\d_]+$")
_zxcvbn_lock = threading.Lock()  # zxcvbn keeps the user inputs in a module-global table
_common: frozenset[str] | None = None


@dataclass(frozen=True)
class PasswordPolicy:
    """One realm's password rules."""

    min_length: int = 12
    reject_username: bool = True
    reject_common: bool = True
    min_score: int = 2

    def check(self, password: str, username: str | None = None, realm: str | None = None) -> str:
        """Return ``password`` if it passes every rule.

        :raises ValidationError: ``weak_password`` naming the first rule it breaks.
        """
        if not isinstance(password, str):
            raise ValidationError("password must be a string", code="invalid_password")
        where = f" (password policy of realm {realm!r})" if realm else ""
        if len(password) < self.min_length:
            raise _weak(
                f"password must be at least {self.min_length} characters{where}", "min_length"
            )
        if len(password) > MAX_LENGTH:
            raise _weak(f"password must be at most {MAX_LENGTH} characters", "max_length")
        lowered = password.casefold()
        if self.reject_username and username:
            name = username.casefold()
            if lowered == name or (len(name) >= _USERNAME_MIN_FOR_CONTAINS and name in lowered):
                raise _weak("password must not contain the username" + where, "username")
        if self.reject_common and is_common(password):
            raise _weak("password is one of the most common passwords" + where, "common")
        if self.min_score > 0:
            score = strength(password, [u for u in (username, realm) if u])
            if score < self.min_score:
                raise _weak(
                    f"password is too easy to guess: strength {score} of 4, "
                    f"at least {self.min_score} needed{where}",
                    "min_score",
                )
        return password


def _weak(message: str, rule: str) -> ValidationError:
    return ValidationError(f"{message} [rule {rule}]", code="weak_password")


def _common_passwords() -> frozenset[str]:
    global _common
    if _common is None:
        from zxcvbn.frequency_lists import FREQUENCY_LISTS

        _common = frozenset(p.casefold() for p in FREQUENCY_LISTS["passwords"])
    return _common


def is_common(password: str) -> bool:
    """True if ``password`` (ignoring case and trailing digits/symbols) is a common one."""
    lowered = password.casefold()
    common = _common_passwords()
    stem = _TRAILING.sub("", lowered)
    return lowered in common or (len(stem) >= 4 and stem in common)


def strength(password: str, known_words: list[str]) -> int:
    """zxcvbn's score (0 weakest … 4) of the password's first 72 characters."""
    from zxcvbn import zxcvbn

    with _zxcvbn_lock:
        return int(zxcvbn(password[:_ZXCVBN_MAX], user_inputs=known_words)["score"])


@dataclass(frozen=True)
class PasswordPolicies:
    """The default policy and per-realm overrides."""

    default: PasswordPolicy = field(default_factory=PasswordPolicy)
    realms: Mapping[str, PasswordPolicy] = field(default_factory=dict)

    def for_realm(self, realm: str) -> PasswordPolicy:
        return self.realms.get(realm, self.default)


def _policy_from(values: Mapping[str, Any], base: PasswordPolicy, source: str) -> PasswordPolicy:
    known = {f.name: f for f in fields(PasswordPolicy)}
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown password policy setting {name!r}")
        expected = type(getattr(base, name))
        if type(value) is not expected:  # bool is not int here, and int is not bool
            raise ConfigError(f"{source}: password_policy.{name} has the wrong type")
        changes[name] = value
    policy = replace(base, **changes)
    if not ABSOLUTE_MIN_LENGTH <= policy.min_length <= MAX_LENGTH:
        raise ConfigError(
            f"{source}: password_policy.min_length must be {ABSOLUTE_MIN_LENGTH} to {MAX_LENGTH}"
        )
    if not 0 <= policy.min_score <= 4:
        raise ConfigError(f"{source}: password_policy.min_score must be 0 to 4")
    return policy


def policies_from_mapping(values: Any, source: str = "[identity]") -> PasswordPolicies:
    """Policies from the ``password_policy`` table: defaults plus a ``realms`` table of
    per-realm overrides (each starting from the defaults)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: identity.password_policy must be a table")
    values = dict(values)
    overrides = values.pop("realms", {})
    if not isinstance(overrides, Mapping) or not all(
        isinstance(v, Mapping) for v in overrides.values()
    ):
        raise ConfigError(f"{source}: identity.password_policy.realms must hold tables")
    default = _policy_from(values, PasswordPolicy(), source)
    realms = {
        str(name): _policy_from(table, default, f"{source} realm {name}")
        for name, table in overrides.items()
    }
    return PasswordPolicies(default, realms)


def generate_password(policy: PasswordPolicy | None = None, username: str | None = None) -> str:
    """A random password that passes ``policy`` (shown once by ``qimem init``/``qauth``)."""
    policy = policy or PasswordPolicy()
    length = max(24, policy.min_length)
    while True:
        candidate = secrets.token_urlsafe(length)[:length]
        try:
            return policy.check(candidate, username)
        except ValidationError:  # practically never: a random 24 characters
            continue


__all__ = [
    "PasswordPolicies",
    "PasswordPolicy",
    "generate_password",
    "is_common",
    "policies_from_mapping",
    "strength",
]
