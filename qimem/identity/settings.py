"""Identity settings: the ``[identity]`` table of the config file.

Defaults are production values: Argon2id at OWASP's minimum (m=19 MiB, t=2, p=1), short
access tokens (5 minutes), refresh tokens rotating on every use. Tests lower the Argon2
cost through the same settings; nothing else changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem.errors import ConfigError
from qimem.identity.password_policy import PasswordPolicies, policies_from_mapping

if TYPE_CHECKING:
    from qimem.identity.audit_spill import SpillSettings

#: Paths that never need a token (configurable with ``identity.public_paths``).
DEFAULT_PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics")


AUDIT_MODES = ("buffered", "required")
AUDIT_SPILL_FULL = ("drop", "refuse")
ARGON2_RUNS_IN = ("auto", "processes", "threads")
#: The smallest non-zero ``audit_spill_max_bytes`` (a header and a few records).
MIN_SPILL_BYTES = 4096


@dataclass
class IdentitySettings:
    """Tunable identity parameters; see docs/identity.md for each."""

    argon2_memory_kib: int = 19 * 1024
    argon2_time_cost: int = 2
    argon2_parallelism: int = 1
    #: Concurrent Argon2 computations; more logins wait (bounded) or get 503.
    max_concurrent_hashes: int = max(1, (os.cpu_count() or 2) // 2)
    #: Logins allowed to wait for a hashing slot before new ones are refused at once.
    max_waiting_hashes: int = 16
    hash_wait_seconds: float = 10.0
    #: Where Argon2 runs: "processes" (one helper process per hashing slot), "threads" (the
    #: login's own thread), or "auto": processes in ``qimem serve``, threads elsewhere.
    argon2_runs_in: str = "auto"
    #: Hashing + waiting places one client address (or one account) may hold at once, so a
    #: flood from one source cannot take every slot; 0 = half of all places (at least 1).
    max_logins_per_source: int = 0
    lockout_threshold: int = 5
    lockout_seconds: float = 300.0
    access_token_ttl: int = 300
    refresh_token_ttl: int = 1800
    session_max_seconds: int = 36000
    audience: str = "qimem"
    issuer_base: str = "qimem"
    #: How often a server re-reads the revoked-token list other servers may have added to.
    revocation_refresh_seconds: float = 2.0
    #: How often signing keys and roles are re-read from the database.
    cache_seconds: float = 30.0
    public_paths: tuple[str, ...] = field(default=DEFAULT_PUBLIC_PATHS)
    #: Record every key operation served over HTTP (buffered, batched) in the audit log.
    audit_key_operations: bool = True
    #: "buffered": key operations are audited in batches (at least once, within 0.5 s).
    #: "required": no audit, no answer (as Vault's audit devices): each audited HTTP key
    #: operation writes a "requested" record before it runs and its outcome record before
    #: the answer, both synchronously; if either write fails the request gets 503
    #: ``audit_unavailable`` (the operation does not run, or its result is withheld).
    audit_mode: str = "buffered"
    #: Where buffered audit records wait while the store is down (one fsynced file per
    #: process, mode 0600, replayed in order when the store returns); "" = the data
    #: directory's ``audit-spill``.
    audit_spill_dir: str = ""
    #: The most bytes of one process's spill file; 0 turns spilling off (records then wait
    #: in memory, at most 10,000).
    audit_spill_max_bytes: int = 64 * 1024 * 1024
    #: When the spill is full: "drop" (counted in ``qimem_audit_dropped_total``, logged)
    #: or "refuse" (audited requests get 503 ``audit_unavailable`` until there is room).
    audit_spill_full: str = "drop"
    #: Password rules (``[identity.password_policy]``, per-realm ``.realms.NAME`` tables).
    password_policy: PasswordPolicies = field(default_factory=PasswordPolicies)

    def spill_settings(self) -> SpillSettings | None:
        """The audit spill these settings configure (None when turned off)."""
        if self.audit_spill_max_bytes <= 0:
            return None
        from qimem.identity.audit_spill import SpillSettings

        if self.audit_spill_dir:
            directory = Path(self.audit_spill_dir).expanduser()
        else:
            from qimem.config import data_dir

            directory = data_dir() / "audit-spill"
        return SpillSettings(directory, self.audit_spill_max_bytes, self.audit_spill_full)

    def issuer(self, realm: str) -> str:
        """The ``iss`` claim of tokens from ``realm``."""
        return f"{self.issuer_base}/realms/{realm}"


def settings_from_mapping(values: dict[str, Any], source: str = "[identity]") -> IdentitySettings:
    """Settings from a mapping (the ``[identity]`` table); unknown keys are an error."""
    known = {f.name: f for f in fields(IdentitySettings)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown identity setting {name!r}")
        if name == "password_policy":
            kwargs[name] = policies_from_mapping(value, source)
            continue
        default = getattr(IdentitySettings(), name)
        try:
            if isinstance(default, tuple):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError
                kwargs[name] = tuple(value)
            elif isinstance(default, bool | str):
                if not isinstance(value, type(default)):
                    raise TypeError
                kwargs[name] = value
            else:
                kwargs[name] = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: identity.{name} has the wrong type") from None
    settings = IdentitySettings(**kwargs)
    for name, choices in (
        ("audit_mode", AUDIT_MODES),
        ("argon2_runs_in", ARGON2_RUNS_IN),
        ("audit_spill_full", AUDIT_SPILL_FULL),
    ):
        if getattr(settings, name) not in choices:
            raise ConfigError(f"{source}: identity.{name} must be one of {', '.join(choices)}")
    if settings.audit_spill_max_bytes < 0 or 0 < settings.audit_spill_max_bytes < MIN_SPILL_BYTES:
        raise ConfigError(
            f"{source}: identity.audit_spill_max_bytes must be 0 (no spill) or at least "
            f"{MIN_SPILL_BYTES}"
        )
    if settings.argon2_time_cost < 1 or settings.argon2_memory_kib < 8:
        raise ConfigError(f"{source}: Argon2 parameters are too small")
    if settings.max_concurrent_hashes < 1 or settings.lockout_threshold < 1:
        raise ConfigError(f"{source}: identity limits must be at least 1")
    return settings


def bounded_by_threads(settings: IdentitySettings, threads: int) -> IdentitySettings:
    """``settings`` with the login bounds cut so that logins hashing plus logins waiting
    for a hashing slot hold at most ``threads - 1`` of a server's worker threads: one thread
    always serves other requests during a login flood. A waiting login holds its worker
    thread, so with 4 threads the defaults (16 waiting) would let logins take them all."""
    budget = threads - 1
    if budget < 1:  # a single worker thread: there is nothing to keep free
        return settings
    concurrent = min(settings.max_concurrent_hashes, budget)
    waiting = min(settings.max_waiting_hashes, budget - concurrent)
    return replace(settings, max_concurrent_hashes=concurrent, max_waiting_hashes=waiting)


def server_settings(settings: IdentitySettings, threads: int) -> IdentitySettings:
    """``settings`` as ``qimem serve`` uses them: :func:`bounded_by_threads`, and Argon2 in
    helper processes unless ``argon2_runs_in = "threads"``."""
    bounded = bounded_by_threads(settings, threads)
    if bounded.argon2_runs_in == "auto":
        bounded = replace(bounded, argon2_runs_in="processes")
    return bounded


def load_settings(config_path: Path | None) -> IdentitySettings:
    """The ``[identity]`` table of the config file at ``config_path`` (defaults if none).

    The file is read by :func:`qimem.config.read_document` (a broken file is reported by
    :func:`qimem.config.load_config`, the one parser of the config file).
    """
    from qimem.config import read_document, section

    path = Path(config_path) if config_path is not None else None
    table = section(read_document(path, lenient=True), "identity", config_path)
    return settings_from_mapping(table, f"{config_path}")
