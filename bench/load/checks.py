"""The checks after a change: a rotation or a revocation made through one server must reach
every server within the bound (``Bounds``), and a ciphertext under a new version must open
on every server at once.

A mixin of the driver's client (``bench.load.driver._Client``): the requests are the
client's own (``seal``, ``open``), counted under the ``rotate-check`` / ``revoke-check``
operations. A server with several workers is also checked through new connections, which
may reach any of its workers. A check answered with a documented 503 (a run with a
PostgreSQL restart) tells nothing and is dropped; a violation is counted with a sample.

The checks never make a connection wait for the bound: one probe of each server at once,
and the follow-ups (another probe of a server that has not seen the change yet, with a
doubling pause; the sweep once a revocation's bound has passed) are *scheduled*: the client
runs them between its operations when they fall due (``run_due``). Follow-ups still due when
the run ends are not run (counted as ``unchecked``).

The rule: a probe *sent* after the bound had passed that still sees the old state (the
revoked token accepted, the old version used) is a violation. The propagation figures are
upper bounds: from the change's answer to the answer of the first probe that saw it (they
include the probe's own latency and the wait for the client's current operation).
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.load.common import Bounds, DriveResult, Record, Target

if TYPE_CHECKING:
    import random

FIRST_PAUSE = 0.005  # before probing again a server that has not seen the change yet, doubling
MAX_PAUSE = 0.1


class Checks:
    """What ``_Client`` runs after its own rotations and revocations."""

    target: Target
    bounds: Bounds
    home: str
    out: DriveResult
    rng: random.Random

    def seal(
        self,
        op: str,
        key: str,
        plaintext: bytes,
        aad: str | None = None,
        token: str | None = None,
        url: str | None = None,
    ) -> tuple[int, Any]:
        raise NotImplementedError

    def open(self, op: str, record: Record, url: str | None = None) -> tuple[int, bool]:
        raise NotImplementedError

    # scheduling

    def later(self, when: float, check: Callable[[], None]) -> None:
        """Run ``check`` at ``when`` (monotonic), between two operations."""
        if not hasattr(self, "_pending"):
            self._pending: list[tuple[float, int, Callable[[], None]]] = []
            self._order = itertools.count()
        heapq.heappush(self._pending, (when, next(self._order), check))

    def run_due(self) -> None:
        """Run the follow-ups that are due."""
        pending = getattr(self, "_pending", [])
        while pending and pending[0][0] <= time.monotonic():
            heapq.heappop(pending)[2]()

    def drop_pending(self) -> None:
        """The run is over: what is still scheduled is not checked."""
        pending = getattr(self, "_pending", [])
        self.out.unchecked += len(pending)
        pending.clear()

    def elsewhere(self) -> list[str]:
        """The servers a change made here must reach: every other one, and this one too
        when it has several workers (another worker of it has a cache of its own)."""
        return [u for u in self.target.urls if u != self.home or self.target.workers > 1]

    def violation(self, kind: str, text: str) -> None:
        self.out.violations[kind] += 1
        if len(self.out.samples) < 20:
            self.out.samples.append(f"{kind} bound violated: {text}")

    def _seen(self, kind: str, at: float) -> None:
        self.out.propagation.setdefault(kind, []).append(time.monotonic() - at)

    # revocations

    def _use(self, token: str, url: str) -> int:
        """A request with ``token`` on a new connection to ``url``: 200 or 401."""
        return self.seal("revoke-check", self.target.keys[0], os.urandom(1), None, token, url)[0]

    def after_revocation(self, token: str, at: float) -> None:
        """``token`` was revoked through this server at ``at`` (monotonic): every server
        refuses it within ``bounds.revocation``, and each on several new connections once
        the bound has passed."""
        deadline = at + self.bounds.revocation
        for url in self.elsewhere():
            self._probe_revoked(url, token, at, deadline, FIRST_PAUSE)
        self.later(deadline, lambda: self._sweep_revoked(token, at))

    def _probe_revoked(
        self, url: str, token: str, at: float, deadline: float, pause: float
    ) -> None:
        sent = time.monotonic()
        status = self._use(token, url)
        if status == 401:
            self._seen("revocation", at)
        elif status != 200:
            return  # unavailable: no figure
        elif sent > deadline:
            self.violation("revocation", f"{url} accepted it {sent - at:.3f} s after")
        else:
            nxt = min(pause * 2, MAX_PAUSE)
            self.later(
                time.monotonic() + pause,
                lambda: self._probe_revoked(url, token, at, deadline, nxt),
            )

    def _sweep_revoked(self, token: str, at: float) -> None:
        for url in self.target.urls:
            for _ in range(self.target.workers + 1):
                sent = time.monotonic()
                if self._use(token, url) == 200:
                    self.violation("revocation", f"{url} accepted it {sent - at:.3f} s after")

    # rotations

    def after_rotation(self, key: str, version: int, at: float) -> None:
        """``key`` was rotated to ``version`` through this server at ``at``: every other
        server (worker) encrypts with it (or a newer one) within ``bounds.rotation`` and
        decrypts a ciphertext under it; this process used it at once."""
        deadline = at + self.bounds.rotation
        for url in self.elsewhere():
            self._probe_rotated(url, key, version, at, deadline, FIRST_PAUSE)
        status, data = self.seal("rotate-check", key, os.urandom(32))
        if status != 200:
            return
        if int(data["version"]) < version:
            found = f"{key} v{data['version']} after rotating to v{version}"
            self.violation("rotation-local", found)
            return
        # A ciphertext under the new version opens everywhere, whatever the caches held.
        record = self.out.records[-1]
        for url in self.elsewhere():
            status, right = self.open("rotate-check", record, url)
            if status != 503 and not right:
                self.violation("rotation-decrypt", f"{url}: {key} v{version} answered {status}")

    def _probe_rotated(
        self, url: str, key: str, version: int, at: float, deadline: float, pause: float
    ) -> None:
        sent = time.monotonic()
        status, data = self.seal("rotate-check", key, os.urandom(32), url=url)
        if status != 200:
            return
        if int(data["version"]) >= version:
            self._seen("rotation", at)
        elif sent > deadline:
            found = f"{url}: {key} v{data['version']} {sent - at:.3f} s after v{version}"
            self.violation("rotation", found)
        else:
            nxt = min(pause * 2, MAX_PAUSE)
            self.later(
                time.monotonic() + pause,
                lambda: self._probe_rotated(url, key, version, at, deadline, nxt),
            )
