"""Constants of the load suite and what the driver, the servers and the report share:
the mix, the expected answers, ``Target``, ``Record``, ``DriveResult``, ``Verification``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUITE = "load"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_ENV = "QIMEM_TEST_POSTGRES_URL"
REALM = "load"
# Server threads, both servers: one per client connection of the default run (2 processes
# x 4). With fewer threads than connections, qimem serve's login gate (hashing + waiting
# logins held to threads - 1, so one thread stays free for other requests) answers the
# surplus of simultaneous password logins with 503 login_busy: backpressure, which the
# clients retry and count apart (`login_busy` in the report).
THREADS = 8
OPS = ("encrypt", "decrypt", "rotate", "login", "client-login", "revoke")
# Relative weights of the mix; the first round of each connection does one of each.
MIX = {
    "encrypt": 50.0,
    "decrypt": 45.0,
    "rotate": 1.0,
    "login": 2.0,
    "client-login": 0.5,
    "revoke": 0.5,
}
# Requests the checks after a rotation or a revocation send (on every server): reported
# apart from the mix's own operations.
CHECKS = ("rotate-check", "revoke-check")
SIZES = ((32, 6), (1024, 3), (16384, 1))  # plaintext bytes, weight
# The only right answers; "verify" is the final batch-decrypt pass. A revoke-check is a
# request with a token just revoked: 200 until the revocation has reached that server
# (within the bound, or it is counted as a violation), 401 after.
EXPECTED = {op: {200} for op in (*OPS, *CHECKS, "verify")} | {
    "rotate": {200, 409},
    "revoke-check": {200, 401},
}
# The 503 answers docs/http.md documents for a store that cannot be reached (or an audit
# log that cannot be written in required mode): the only non-2xx a run with a PostgreSQL
# restart may see besides the mix's own (counted apart, as ``unavailable``).
DOCUMENTED_503 = frozenset({"store_unavailable", "audit_unavailable"})
# The audited routes (one audit record per request: server/auth_middleware.py).
AUDITED = {
    "/v1/security/encrypt": "crypto.encrypt",
    "/v1/security/decrypt": "crypto.decrypt",
    "/v1/security/rotate": "keys.rotate",
}
# How long a change made through one server may take to reach every other one (seconds,
# from the answer to the change), as docs/operations.md documents them: pushed by
# PostgreSQL (LISTEN/NOTIFY, issue 14) the target is 50 ms for rotations and revocations
# alike; while a server's listener is down (a PostgreSQL restart) it falls back to polling:
# ``cache.revalidate_seconds`` (0.1 s) plus one marker query for a rotation,
# ``revocation_refresh_seconds`` (2 s) for a revocation. ``--rotation-bound`` /
# ``--revocation-bound`` set them.
PUSH_BOUND = 0.05
ROTATION_BOUND = PUSH_BOUND
REVOCATION_BOUND = PUSH_BOUND
FALLBACK_ROTATION_BOUND = 0.15
FALLBACK_REVOCATION_BOUND = 2.05
STAGGER_SECONDS = 0.05  # between the first logins of successive connections
LOGIN_ATTEMPTS = 50  # a login answered 503 login_busy is retried up to this many times


def _code(data: Any) -> str:
    """The error code of a JSON error answer, or ""."""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error.get("code", "")) if isinstance(error, dict) else ""


TOKEN_MAX_AGE = 240.0  # re-login before the 300 s access-token lifetime runs out
REQUEST_TIMEOUT = 30.0
PEER = "bare Falcon+waitress, AESGCM + argon2 in memory"
RESULTS = Path(__file__).resolve().parent.parent / "results"


class LoadFailure(RuntimeError):
    """The run saw a 5xx, a connection error, an unexpected status or a lost result."""


# -- what the driver needs to know about a server --------------------------------------------


@dataclass
class Target:
    """The servers under load (one URL each, all on one store; each ``workers``
    processes) and the identities and keys the mix uses on them."""

    name: str
    urls: list[str]
    realm: str
    users: list[tuple[str, str]]
    client: tuple[str, str]
    keys: list[str]
    rotated: list[str]
    workers: int = 1
    #: The servers' process ids (their descendants count too): for the CPU accounting.
    pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The first server's URL."""
        return self.urls[0]

    @property
    def port(self) -> int:
        return port_of(self.url)


def port_of(url: str) -> int:
    """The port of ``http://127.0.0.1:PORT``."""
    return int(url.rsplit(":", 1)[1])


@dataclass
class Bounds:
    """How long a change may take to reach the other servers (seconds)."""

    rotation: float = ROTATION_BOUND
    revocation: float = REVOCATION_BOUND

    @classmethod
    def fallback(cls) -> Bounds:
        """The polling bounds, for a run in which the notification connections drop."""
        return cls(FALLBACK_ROTATION_BOUND, FALLBACK_REVOCATION_BOUND)


@dataclass
class Record:
    """One successful encryption: the envelope, its aad and the plaintext's digest."""

    envelope: str
    aad: str | None
    digest: bytes
    size: int


@dataclass
class DriveResult:
    """What the client processes saw, merged."""

    elapsed: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    conn_errors: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0  # decrypts during the run that returned other bytes
    rotations: Counter[str] = field(default_factory=Counter)  # successful, per key name
    rotate_forms: Counter[str] = field(default_factory=Counter)  # "key:200", "key_id:409" ...
    samples: list[str] = field(default_factory=list)  # a few unexpected answers
    records: list[Record] = field(default_factory=list)
    # 503 login_busy: the server's documented backpressure on password logins (hashing
    # slots full). A client retries shortly, as the answer's Retry-After asks; counted
    # here, not as a status, and reported.
    login_busy: int = 0
    # Documented 503s (store_unavailable ...) per operation, allowed only in a run with a
    # PostgreSQL restart, and the wall-clock window in which they came (time.time()).
    unavailable: Counter[str] = field(default_factory=Counter)
    unavailable_window: list[float] = field(default_factory=list)
    # Changes that had not reached a server within the bound, per kind ("revocation",
    # "rotation", "rotation-decrypt", "rotation-local"); how long they did take (seconds).
    violations: Counter[str] = field(default_factory=Counter)
    propagation: dict[str, list[float]] = field(default_factory=dict)
    audited: Counter[str] = field(default_factory=Counter)  # 200 answers per audit action
    # Rotations whose outcome is unknown (503 or no answer): they may have committed.
    rotations_unknown: Counter[str] = field(default_factory=Counter)
    unchecked: int = 0  # follow-up checks still scheduled when the run ended
    # CPU seconds during the rounds (bench.load.cpu): the servers, PostgreSQL, the clients.
    cpu: dict[str, float] = field(default_factory=dict)

    def merge(self, other: DriveResult) -> None:
        self.elapsed += other.elapsed
        for part, seconds in other.cpu.items():
            self.cpu[part] = self.cpu.get(part, 0.0) + seconds
        for op, values in other.latencies.items():
            self.latencies.setdefault(op, []).extend(values)
        for op, counts in other.statuses.items():
            self.statuses.setdefault(op, Counter()).update(counts)
        self.conn_errors.update(other.conn_errors)
        self.mismatches += other.mismatches
        self.rotations.update(other.rotations)
        self.rotate_forms.update(other.rotate_forms)
        self.samples.extend(other.samples[: max(0, 20 - len(self.samples))])
        self.records.extend(other.records)
        self.login_busy += other.login_busy
        self.unavailable.update(other.unavailable)
        if other.unavailable_window:
            both = self.unavailable_window + other.unavailable_window
            self.unavailable_window = [min(both), max(both)]
        self.violations.update(other.violations)
        for kind, values in other.propagation.items():
            self.propagation.setdefault(kind, []).extend(values)
        self.audited.update(other.audited)
        self.rotations_unknown.update(other.rotations_unknown)
        self.unchecked += other.unchecked

    def unexpected(self) -> dict[str, dict[int, int]]:
        return {
            op: {s: n for s, n in counts.items() if s not in EXPECTED[op]}
            for op, counts in self.statuses.items()
            if any(s not in EXPECTED[op] for s in counts)
        }

    def count_5xx(self) -> int:
        return sum(n for c in self.statuses.values() for s, n in c.items() if s >= 500)


@dataclass
class Verification:
    """The final pass: every ciphertext decrypted once more through the API."""

    checked: int = 0
    verified: int = 0
    lost: int = 0
    corrupted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    conn_errors: int = 0
    seconds: float = 0.0
