"""Core suite: library encrypt/decrypt through the service layer vs raw ``cryptography``.

qimem side: ``qimem.services.encrypt`` / ``decrypt`` on an :class:`~qimem.app.AppContext`
over a real SQLite store (temp dir, random root key), addressing the key by name, as an
application would. Each call builds or parses a full envelope v1 (43 bytes of header,
bound as associated data). Peer: the same ``cryptography`` AEAD class, built once, sealing
with a fresh ``os.urandom(12)`` nonce per message (and opening a ciphertext made that way)
in a bare call. The notes add the ratio against raw AEAD building and opening a minimal
self-contained ``nonce || ciphertext`` message, and the ratio that the *envelope floor*
reaches against the bare call: the least pure-Python code that can build or open an envelope
v1 at all (see :func:`_floor_loops`). The floor shows how much of the gap is the format's
unavoidable work and how much is qimem's own.

Timing: the two sides alternate (qimem, peer, peer, qimem, ...) for a few rounds of a fixed
duration each and the best round of each side counts, so a burst of load from other
processes on this shared machine hits both sides alike. Loops are timed in thread CPU time
(:data:`CLOCK`), and the garbage collector is off while a loop runs, as in :mod:`timeit`.

The timing helpers (:func:`calibrate`, :func:`best_of_alternating`, :func:`make_row`) are
shared with the other suites.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

import qimem
from qimem import envelope as env
from qimem.services import decrypt, encrypt
from qimem.services.keys import create_key

Loop = Callable[[int], float]
"""Runs an operation ``n`` times and returns the elapsed seconds (of :data:`CLOCK`)."""

CLOCK = time.thread_time
"""The CPU time of this thread: these loops are single-threaded and CPU-bound, so time
the process spends preempted by other work on the shared machine is not counted. On a
quiet machine it equals wall time."""

SIZES = [("64 B", 64), ("1 KiB", 1024), ("64 KiB", 64 * 1024)]
ALGORITHMS = [
    ("aes-256-gcm", AESGCM, "cryptography AESGCM"),
    ("chacha20-poly1305", ChaCha20Poly1305, "cryptography ChaCha20Poly1305"),
]
# Issue 2, item 9: service-layer ratio >= 0.5 at 1 KiB for encrypt and for decrypt (AES).
TARGETS = {("aes-256-gcm", "1 KiB"): 0.5}


def timed(operation: Callable[[], object]) -> Loop:
    """A :data:`Loop` over a zero-argument callable."""

    def loop(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            operation()
        return CLOCK() - start

    return loop


def _run(loop: Loop, n: int) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return loop(n)
    finally:
        if enabled:
            gc.enable()


def calibrate(loop: Loop, seconds: float) -> int:
    """How many iterations of ``loop`` take about ``seconds``."""
    n = 1
    while True:
        elapsed = _run(loop, n)
        if elapsed >= seconds / 10 or n >= 1 << 30:
            return max(1, int(n * seconds / max(elapsed, 1e-9)))
        n *= 10 if elapsed < seconds / 100 else 2


def best_of_alternating(sides: list[Loop], *, rounds: int, seconds: float) -> list[float]:
    """Best operations per second of each loop, alternating their order every round."""
    counts = [calibrate(loop, seconds) for loop in sides]
    best = [0.0] * len(sides)
    for r in range(rounds):
        order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            elapsed = _run(sides[i], counts[i])
            best[i] = max(best[i], counts[i] / max(elapsed, 1e-9))
    return best


def make_row(
    suite: str,
    case: str,
    metric: str,
    qimem_value: float,
    peer_name: str,
    peer_value: float | None,
    *,
    target: float | None = None,
    higher_is_better: bool = True,
    notes: str = "",
) -> dict[str, Any]:
    """One result row in the shape the runner expects (see docs/performance.md)."""
    ratio = qimem_value / peer_value if peer_value else None
    ok = None
    if target is not None and ratio is not None:
        ok = ratio >= target if higher_is_better else ratio <= target
    return {
        "suite": suite,
        "case": case,
        "metric": metric,
        "qimem": round(qimem_value, 1),
        "peer_name": peer_name,
        "peer": round(peer_value, 1) if peer_value is not None else None,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "target": "" if target is None else f"{'>=' if higher_is_better else '<='} {target}",
        "ok": ok,
        "notes": notes,
    }


def _notes(size: int, q: float, p: float, m: float, f: float) -> str:
    notes = [f"vs nonce‖ct message: {q / m:.2f}", f"envelope floor vs peer: {f / p:.2f}"]
    if size >= 4096:
        notes.append(f"{q * size / 1e6:,.0f} vs {p * size / 1e6:,.0f} MB/s")
    return "; ".join(notes)


def run(quick: bool) -> list[dict[str, Any]]:
    """Encrypt and decrypt at 64 B, 1 KiB, 64 KiB for each built-in algorithm."""
    rounds, seconds = (3, 0.05) if quick else (7, 0.25)
    rows: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="qimem-bench-")
    try:
        app = qimem.connect(f"sqlite:///{tmp}/keys.db", root_key=os.urandom(32))
        try:
            for algorithm, aead_class, peer_name in ALGORITHMS:
                name = f"bench-{algorithm}"
                create_key(app, algorithm=algorithm, name=name)
                aead = aead_class(os.urandom(32))
                for label, size in SIZES:
                    rows += _case(
                        app, name, algorithm, aead, peer_name, label, size, rounds, seconds
                    )
        finally:
            app.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _case(
    app: qimem.AppContext,
    name: str,
    algorithm: str,
    aead: Any,
    peer_name: str,
    label: str,
    size: int,
    rounds: int,
    seconds: float,
) -> list[dict[str, Any]]:
    plaintext = os.urandom(size)
    envelope = encrypt(app, name, plaintext).envelope
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, plaintext, None)
    # Both sides must really work before their speed means anything.
    assert decrypt(app, envelope).plaintext == plaintext
    assert aead.decrypt(nonce, sealed, None) == plaintext

    urandom, aead_encrypt, aead_decrypt = os.urandom, aead.encrypt, aead.decrypt

    def peer_encrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            aead_encrypt(urandom(12), plaintext, None)
        return CLOCK() - start

    def qimem_encrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            encrypt(app, name, plaintext)
        return CLOCK() - start

    def peer_decrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            aead_decrypt(nonce, sealed, None)
        return CLOCK() - start

    def qimem_decrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            decrypt(app, envelope)
        return CLOCK() - start

    # A second, informational peer: raw AEAD producing and opening a self-contained message
    # ``nonce || ciphertext``, which is what an application must store to decrypt later.
    message = nonce + sealed

    def message_encrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            fresh = urandom(12)
            fresh + aead_encrypt(fresh, plaintext, None)
        return CLOCK() - start

    def message_decrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            aead_decrypt(message[:12], message[12:], None)
        return CLOCK() - start

    floor_encrypt, floor_decrypt = _floor_loops(aead, plaintext)
    target = TARGETS.get((algorithm, label))
    rows = []
    for op, loops in (
        ("encrypt", [qimem_encrypt, peer_encrypt, message_encrypt, floor_encrypt]),
        ("decrypt", [qimem_decrypt, peer_decrypt, message_decrypt, floor_decrypt]),
    ):
        q, p, m, f = best_of_alternating(loops, rounds=rounds, seconds=seconds)
        rows.append(
            make_row(
                "core",
                f"{algorithm} {op} {label}",
                "ops/s",
                q,
                peer_name,
                p,
                target=target,
                notes=_notes(size, q, p, m, f),
            )
        )
    return rows


def _floor_loops(aead: Any, plaintext: bytes) -> tuple[Loop, Loop]:
    """The envelope floor: the least Python that builds or opens an envelope v1, with none
    of qimem's checks (no key state or expiry, no length check, no error mapping, no result
    object). Decrypt: one dict lookup of the key by header prefix, one ``struct`` unpack of
    nonce and length, the header and ciphertext slices, and the AEAD call with the header as
    associated data. Encrypt: a fresh nonce, one ``struct`` pack of the header, the AEAD call
    and the concatenation. Each is one plain function call, as any library API is: qimem
    cannot be faster than this in pure Python."""
    nonce_size = 12
    prefix = env.header_prefix(1, os.urandom(16), 1, nonce_size)
    pack, unpack = env.header_packer(nonce_size), env.header_unpacker(nonce_size)
    size = env.header_size(nonce_size)
    urandom, aead_encrypt = os.urandom, aead.encrypt
    tag = len(aead_encrypt(os.urandom(12), b"", None))
    keys = {prefix: aead.decrypt}
    blob = b""  # set below, once seal() exists

    def seal(data: bytes) -> bytes:
        fresh = urandom(12)
        header = pack(prefix, fresh, len(data) + tag)
        return header + aead_encrypt(fresh, data, header)

    def open_(blob: bytes) -> bytes:
        nonce, _length = unpack(blob)
        header = blob[:size]
        return keys[blob[:27]](nonce, blob[size:], header)

    def floor_encrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            seal(plaintext)
        return CLOCK() - start

    def floor_decrypt(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            open_(blob)
        return CLOCK() - start

    blob = seal(plaintext)
    assert open_(blob) == plaintext
    return floor_encrypt, floor_decrypt
