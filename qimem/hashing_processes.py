"""Argon2 in helper processes: a server's password hashing off its interpreter.

``qimem serve`` (``[identity] argon2_runs_in = "auto"``) hashes and verifies passwords in
``max_concurrent_hashes`` helper processes instead of its own request threads. The bound is
the same (one login hashes per helper, the others wait in the server for a place), but a
helper goes from one hash to the next at once: a login waiting in the server has already
handed its job over, so no helper waits for the server's GIL between two hashes. In the
server's own threads, every hash cost two GIL hand-offs under load (after the hash, and for
the next login's thread to start one), about a third of each slot's time (31 ms of wall
time for 19 ms of CPU, docs/performance.md); the mixed load went from 0.56-0.67 of the
bare peer to 0.74-0.76.

The helpers are started with ``spawn``: a fresh interpreter that imports this module and
argon2-cffi only, with no copy of the server's memory (keys, tokens, connections). Each
disables its core dumps (:func:`qimem.hardening.disable_core_dumps`) and exits within half
a second when the server process is gone (even after SIGKILL). A helper that dies is
replaced on the next login; if helpers cannot be started at all, hashing falls back to the
calling thread, with the same bound. Passwords reach a helper through a pipe, never argv
or the environment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("qimem.identity")

#: Argon2 parameters: (time_cost, memory_cost in KiB, parallelism).
Params = tuple[int, int, int]

#: Seconds a helper may take for one hash before the login gets 503 login_busy.
HELPER_TIMEOUT = 60.0
#: How often a helper checks that the server process is still there.
_WATCH_INTERVAL = 0.5

_hashers: dict[Params, PasswordHasher] = {}  # in a helper: one hasher per parameter set


def _hasher(params: Params) -> PasswordHasher:
    hasher = _hashers.get(params)
    if hasher is None:
        hasher = _hashers[params] = PasswordHasher(*params, type=Type.ID)
    return hasher


def _helper_started(server_pid: int) -> None:
    """A helper's initializer: no core dumps; exit when the server process is gone."""
    from qimem.hardening import disable_core_dumps

    disable_core_dumps()

    def watch() -> None:
        while os.getppid() == server_pid:
            time.sleep(_WATCH_INTERVAL)
        os._exit(0)

    threading.Thread(target=watch, name="qimem-hashing-watch", daemon=True).start()


def _verify(params: Params, stored: str, password: str) -> bool:
    """In a helper: whether ``password`` matches the PHC hash ``stored``."""
    try:
        return bool(_hasher(params).verify(stored, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _hash(params: Params, password: str) -> str:
    """In a helper: a PHC-encoded Argon2id hash of ``password``."""
    return _hasher(params).hash(password)


class HelpersUnavailable(Exception):
    """The helpers could not do a job (they could not be started, or died twice)."""


class HashingProcesses:
    """``processes`` helper processes that hash with ``params``; thread-safe; started on
    first use (again in a forked child, which never uses its parent's)."""

    def __init__(self, processes: int, params: Params) -> None:
        self.processes = processes
        self.params = params
        self._pool: ProcessPoolExecutor | None = None
        self._pid = 0
        self._closed = False
        self._lock = threading.Lock()

    def verify(self, stored: str, password: str) -> bool:
        """Whether ``password`` matches ``stored`` (argon2 errors: False)."""
        return bool(self._run(_verify, stored, password))

    def hash(self, password: str) -> str:
        """A PHC-encoded Argon2id hash of ``password``."""
        return str(self._run(_hash, password))

    def _run(self, job: Callable[..., object], *args: str) -> object:
        from concurrent.futures import TimeoutError as Late
        from concurrent.futures.process import BrokenProcessPool

        for _attempt in (1, 2):
            pool = self._current()
            try:
                return pool.submit(job, self.params, *args).result(timeout=HELPER_TIMEOUT)
            except (BrokenProcessPool, RuntimeError):  # a helper died, or another thread
                # replaced this pool after one did: new helpers, once
                log.warning("a password hashing helper died; starting new ones")
                self._discard(pool)
            except Late:
                raise HelpersUnavailable("a hash took too long") from None
            except Exception as exc:  # processes cannot be started here (OSError, ...)
                self._discard(pool)
                raise HelpersUnavailable(type(exc).__name__) from None
        raise HelpersUnavailable("helpers died twice in a row")

    def _current(self) -> ProcessPoolExecutor:
        import multiprocessing  # here: the CLI never starts helpers, nor pays the import
        from concurrent.futures import ProcessPoolExecutor

        with self._lock:
            if self._closed:
                raise HelpersUnavailable("closed")
            if self._pool is None or self._pid != os.getpid():
                # In a forked child the parent's pool is not ours: never shut it down here.
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_helper_started,
                    initargs=(os.getpid(),),
                )
                self._pid = os.getpid()
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def helper_pids(self) -> list[int]:
        """The live helpers' process ids (for tests and diagnostics)."""
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            return []
        processes = getattr(pool, "_processes", None) or {}
        return sorted(pid for pid, proc in processes.items() if proc.is_alive())

    def close(self) -> None:
        """Stop the helpers (they finish the job in hand); later jobs raise
        :class:`HelpersUnavailable`."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            mine = self._pid == os.getpid()
        if pool is not None and mine:
            pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        t, m, p = self.params
        return f"<HashingProcesses {self.processes} argon2id m={m} t={t} p={p}>"
