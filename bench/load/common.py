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
OPS = ("encrypt", "decrypt", "rotate", "login", "client-login")
# Relative weights of the mix; the first round of each connection does one of each.
MIX = {"encrypt": 50.0, "decrypt": 45.0, "rotate": 1.0, "login": 2.0, "client-login": 0.5}
SIZES = ((32, 6), (1024, 3), (16384, 1))  # plaintext bytes, weight
# The only right answers; "verify" is the final batch-decrypt pass.
EXPECTED = {op: {200} for op in (*OPS, "verify")} | {"rotate": {200, 409}}
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
    """A server under load and the identities and keys the mix uses on it."""

    name: str
    url: str
    realm: str
    users: list[tuple[str, str]]
    client: tuple[str, str]
    keys: list[str]
    rotated: list[str]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


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

    def merge(self, other: DriveResult) -> None:
        self.elapsed += other.elapsed
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
