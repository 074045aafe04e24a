"""Load suite: a bounded, mixed-traffic run against a real ``qimem serve`` on PostgreSQL.

``python -m bench load [--duration S] [--quick]`` (or ``python -m bench.load --help`` for
every knob). Loopback only. Steps:

1. A fresh PostgreSQL database (admin URL ``$QIMEM_TEST_POSTGRES_URL``, default
   ``postgresql+psycopg://postgres@127.0.0.1:5432/test``; dropped at the end), ``qimem
   init`` on it, and ``qimem serve`` **with authentication** on a free 127.0.0.1 port.
2. Through the API, as ``admin`` of ``master``: realm ``load``, users ``u0..`` (role
   ``encryptor``, Argon2id at the default cost), a service account ``rotator`` (role
   ``key-manager``, client_credentials) and the keys (``k*`` encrypted with, ``r*`` also
   rotated).
3. Client *processes* (so the load generator is not one GIL against the server), each with
   several keep-alive connections (one thread each), send a weighted mix for the duration:
   encrypt (32 B, 1 KiB, 16 KiB; some with aad; by key name), decrypt of ciphertexts
   obtained earlier (checked against the plaintext's SHA-256), rotate (rare; mostly by name,
   some by a possibly stale key_id, where 409 is the expected answer), password logins (the
   connection then uses the new token) and client_credentials logins. Every request carries
   its bearer token. Each connection does one of every operation first, so each runs.
   Each connection sends from its own loopback address (127.0.0.2, 127.0.0.3, ...: one user
   per host; qimem's per-address share of login places is for a flood from one host, and
   ``--same-source`` shows what it does to 8 users behind one address).
4. Afterwards every ciphertext obtained is decrypted again through the API (batch decrypt)
   and compared: *lost* = no longer decrypts, *corrupted* = decrypts to other bytes. The
   rotated keys must have exactly 1 + (successful rotations) versions; the server's own
   ``/metrics`` must show no 5xx; its log no traceback.

Peer, in the same run, with the same driver and mix: a bare Falcon + waitress server (same
thread count) implementing the same routes with raw ``AESGCM`` keys in memory, argon2-cffi
``verify`` at the same cost for logins and a random bearer token in a set: the framework and
crypto floor, without a database, JWTs, envelopes or auditing. The two run in alternating
rounds so load from other processes on the machine hits both alike.

Floor (``--floor``, a third side in the same rounds): the peer's routes with qimem's
durability on qimem's stack (``bench/load/floor.py``: key versions, revocations, refresh
tokens, lockout counts and login audit records in PostgreSQL, Ed25519 JWTs, rotations and
revocations pushed by ``NOTIFY``, a buffered audit record per key operation written by
``COPY``). ``qimem/floor`` is then qimem's own overhead, ``floor/peer`` the price of the
durability alone.

Any 5xx, connection error, unexpected status, lost or corrupted result, or rotation count
mismatch fails the run (``LoadFailure``; ``python -m bench`` then exits non-zero and does not
save it). The full report of every run, failed or not, is written to
``bench/results/load-<UTC stamp>.json``.
"""

from bench.load.common import (
    CHECKS,
    DEFAULT_ADMIN_URL,
    EXPECTED,
    MIX,
    OPS,
    PEER,
    POSTGRES_ENV,
    REALM,
    RESULTS,
    REVOCATION_BOUND,
    ROTATION_BOUND,
    SIZES,
    SUITE,
    THREADS,
    Bounds,
    DriveResult,
    LoadFailure,
    Record,
    Target,
    Verification,
)
from bench.load.driver import drive, source_address
from bench.load.floor import floor_server
from bench.load.peer import peer_server
from bench.load.report import failures, render, rows, summarize
from bench.load.servers import (
    QimemServer,
    QimemServers,
    fresh_database,
    qimem_server,
    qimem_servers,
    workers_supported,
)
from bench.load.session import run_load
from bench.load.suite import main, measure, private_postgres, run
from bench.load.verify import verify

__all__ = [
    "CHECKS",
    "REVOCATION_BOUND",
    "ROTATION_BOUND",
    "Bounds",
    "QimemServers",
    "private_postgres",
    "qimem_servers",
    "workers_supported",
    "DEFAULT_ADMIN_URL",
    "EXPECTED",
    "MIX",
    "OPS",
    "PEER",
    "POSTGRES_ENV",
    "REALM",
    "RESULTS",
    "SIZES",
    "SUITE",
    "THREADS",
    "DriveResult",
    "LoadFailure",
    "QimemServer",
    "Record",
    "Target",
    "Verification",
    "drive",
    "floor_server",
    "source_address",
    "failures",
    "fresh_database",
    "main",
    "measure",
    "peer_server",
    "qimem_server",
    "render",
    "rows",
    "run",
    "run_load",
    "summarize",
    "verify",
]
