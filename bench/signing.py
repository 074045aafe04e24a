"""Signing suite: sign/verify and MAC/verify-MAC through the service layer vs raw ``cryptography``.

qimem side: ``qimem.services.signing.sign`` / ``verify`` (Ed25519) and
``qimem.services.macs.mac`` / ``verify_mac`` (HMAC-SHA-256) on an :class:`~qimem.app.AppContext`
over a real SQLite store, addressing the key by name as an application would, with qimem's
signature/tag format (the 26-byte header naming the key version; docs/formats.md). Peer:
the same ``cryptography`` call on a key loaded once (``Ed25519PrivateKey.sign`` /
``Ed25519PublicKey.verify``; ``HMAC(key, SHA256())`` + ``update`` + ``finalize``, and for
verification ``HMAC.verify``). Messages are 64 bytes (a JWT-sized input is as cheap).

Issue 16's target: each service-layer row >= 0.5x the bare call. Timing as in
:mod:`bench.core` (alternating rounds, best round, thread CPU time, GC off).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.hmac import HMAC

import qimem
from bench.core import CLOCK, Loop, best_of_alternating, make_row
from qimem.services import macs, signing
from qimem.services.keys import create_key

MESSAGE_SIZE = 64
TARGET = 0.5


def _loop(operation: Callable[[], object]) -> Loop:
    def loop(n: int) -> float:
        start = CLOCK()
        for _ in itertools.repeat(None, n):
            operation()
        return CLOCK() - start

    return loop


def _pair(
    case: str,
    qimem_op: Callable[[], object],
    peer_op: Callable[[], object],
    peer_name: str,
    rounds: int,
    seconds: float,
) -> dict[str, Any]:
    q, p = best_of_alternating([_loop(qimem_op), _loop(peer_op)], rounds=rounds, seconds=seconds)
    return make_row(
        "signing",
        case,
        "ops/s",
        q,
        peer_name,
        p,
        target=TARGET,
        notes=f"{1e6 / q:.1f} vs {1e6 / p:.1f} us per call; 64-byte message",
    )


def run(quick: bool) -> list[dict[str, Any]]:
    """Ed25519 sign/verify and HMAC-SHA-256 mac/verify through the service layer."""
    rounds, seconds = (3, 0.05) if quick else (5, 0.2)
    message = os.urandom(MESSAGE_SIZE)
    rows: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="qimem-bench-")
    try:
        app = qimem.connect(f"sqlite:///{tmp}/keys.db", root_key=os.urandom(32))
        try:
            create_key(app, algorithm="ed25519", name="bench-ed25519")
            create_key(app, algorithm="hmac-sha256", name="bench-hmac")
            private = ed25519.Ed25519PrivateKey.generate()
            public = private.public_key()
            peer_signature = private.sign(message)
            signature = signing.sign(app, "bench-ed25519", message).signature
            # Both sides must really work before their speed means anything.
            assert signing.verify(app, "bench-ed25519", message, signature).valid
            public.verify(peer_signature, message)
            rows.append(
                _pair(
                    "ed25519 sign",
                    lambda: signing.sign(app, "bench-ed25519", message),
                    lambda: private.sign(message),
                    "cryptography Ed25519PrivateKey.sign",
                    rounds,
                    seconds,
                )
            )
            rows.append(
                _pair(
                    "ed25519 verify",
                    lambda: signing.verify(app, "bench-ed25519", message, signature),
                    lambda: public.verify(peer_signature, message),
                    "cryptography Ed25519PublicKey.verify",
                    rounds,
                    seconds,
                )
            )
            key = os.urandom(32)

            def peer_mac() -> bytes:
                h = HMAC(key, hashes.SHA256())
                h.update(message)
                return h.finalize()

            peer_tag = peer_mac()

            def peer_verify() -> None:
                h = HMAC(key, hashes.SHA256())
                h.update(message)
                h.verify(peer_tag)

            tag = macs.mac(app, "bench-hmac", message).tag
            assert macs.verify_mac(app, "bench-hmac", message, tag).valid
            peer_verify()
            rows.append(
                _pair(
                    "hmac-sha256 mac",
                    lambda: macs.mac(app, "bench-hmac", message),
                    peer_mac,
                    "cryptography HMAC(SHA256)",
                    rounds,
                    seconds,
                )
            )
            rows.append(
                _pair(
                    "hmac-sha256 verify",
                    lambda: macs.verify_mac(app, "bench-hmac", message, tag),
                    peer_verify,
                    "cryptography HMAC(SHA256).verify",
                    rounds,
                    seconds,
                )
            )
        finally:
            app.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
