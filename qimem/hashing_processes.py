"""Argon2 in helper processes: a server's password hashing off its interpreter.

``qimem serve`` (``[identity] argon2_runs_in = "auto"``) hashes and verifies passwords in
``max_concurrent_hashes`` helper processes instead of its own request threads. The bound is
the same (a helper hashes one password at a time; the other logins wait in the server for a
place), but a helper goes from one hash to the next at once: the next login's job is
already in its pipe, so no helper waits for the server's GIL between two hashes. In the
server's own threads every hash cost two GIL hand-offs under load (after the hash, and for
the next login's thread to start one), about a third of the slot's time
(docs/performance.md).

A helper is ``python -I -c ...`` with an empty environment (none of the server's
variables, such as a root key), started with ``close_fds``; it takes the server's
``sys.path`` as its argument, imports this module and argon2-cffi only, turns off its core
dumps before it reads its pipe, and exits when its pipe closes or its server process is
gone (within half a second, even after SIGKILL). Jobs and answers are JSON lines on its
stdin and stdout; its stderr is discarded. A helper that dies is replaced; one that hangs
is killed. If helpers cannot be started, :class:`HelpersUnavailable` tells the caller to
hash in its own thread.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as Late
from typing import IO, Any

#: Argon2 parameters: (time_cost, memory_cost in KiB, parallelism).
Params = tuple[int, int, int]

#: Seconds one job may take in a helper (a hash takes tens of milliseconds; two jobs can be
#: ahead of it) before the helper is killed and the caller told the login is busy.
HELPER_TIMEOUT = 30.0
#: How often a helper checks that its server process is still there.
_WATCH_INTERVAL = 0.5
# The server's sys.path comes as an argument (not secret); passwords only on stdin, which
# helper_main reads after it has hardened the process.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from qimem.hashing_processes import helper_main; helper_main()"
)


class HelpersUnavailable(Exception):
    """The helpers cannot be used here (they cannot be started, or keep dying)."""


class HelperTimeout(Exception):
    """A helper took longer than :data:`HELPER_TIMEOUT` for one job (it was killed)."""


class JobRefused(Exception):
    """The helper could not do this job (e.g. a password that is not valid Unicode)."""


# ---- in the helper -----------------------------------------------------------------------


def helper_main() -> None:
    """A helper's loop: one JSON job per line on stdin, one JSON answer per line on stdout.

    Before it reads anything: no core dumps (:func:`qimem.hardening.disable_core_dumps`;
    the server's ``QIMEM_ALLOW_CORE_DUMPS`` is the one variable it gets), and no SIGINT or
    SIGTERM (a Ctrl-C or a stop sent to the server's process group: a helper ends with its
    input or its server)."""
    import signal

    from qimem.hardening import disable_core_dumps

    disable_core_dumps()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server = os.getppid()

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(_WATCH_INTERVAL)
        os._exit(0)

    threading.Thread(target=watch, name="qimem-hashing-watch", daemon=True).start()
    from argon2 import PasswordHasher, Type
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    hashers: dict[tuple[int, ...], PasswordHasher] = {}
    for line in sys.stdin:
        answer: dict[str, Any]
        job: dict[str, Any] = {}
        try:
            job = json.loads(line)
            t, m, p = (int(x) for x in job["params"])
            hasher = hashers.get((t, m, p))
            if hasher is None:
                hasher = PasswordHasher(time_cost=t, memory_cost=m, parallelism=p, type=Type.ID)
                hashers[(t, m, p)] = hasher
            if job["op"] == "hash":
                answer = {"hash": hasher.hash(job["password"])}
            else:
                try:
                    answer = {"ok": bool(hasher.verify(job["stored"], job["password"]))}
                except (VerifyMismatchError, VerificationError, InvalidHashError):
                    answer = {"ok": False}
        except Exception as exc:  # never the job's text: it holds a password
            answer = {"error": type(exc).__name__}
        answer["id"] = job.get("id") if isinstance(job, dict) else None
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# ---- in the server -----------------------------------------------------------------------


class _Helper:
    """One helper process and the futures of its jobs, answered in order."""

    def __init__(self) -> None:
        if not sys.executable:  # an embedded interpreter: no program to start
            raise HelpersUnavailable("no Python executable")
        env = {k: v for k, v in os.environ.items() if k == "QIMEM_ALLOW_CORE_DUMPS"}
        path = json.dumps([entry for entry in sys.path if isinstance(entry, str)])
        self.proc = subprocess.Popen(  # noqa: S603 (this interpreter, fixed code)
            [sys.executable, "-I", "-c", _BOOT, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            text=True,
            encoding="utf-8",
            errors="surrogatepass",
        )
        self._stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self._lock = threading.Lock()
        self.pending: collections.deque[Future[dict[str, Any]]] = collections.deque()
        self.dead = False
        self._next_id = 0
        threading.Thread(target=self._read, name="qimem-hashing-answers", daemon=True).start()

    def submit(self, job: dict[str, Any]) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self.dead:
                raise BrokenPipeError
            self._next_id += 1
            future.job_id = self._next_id  # type: ignore[attr-defined]
            line = json.dumps({**job, "id": self._next_id}) + "\n"
            self.pending.append(future)
            try:
                self._stdin.write(line)
                self._stdin.flush()
            except (OSError, ValueError):
                self._died_locked()
                raise BrokenPipeError from None
        return future

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            answer = _answer(line)
            with self._lock:
                future = self.pending[0] if self.pending else None
                if future is None or answer is None or answer["id"] != future.job_id:  # type: ignore[attr-defined]
                    break  # not our helper's answer: trust nothing more from it
                self.pending.popleft()
            future.set_result(answer)
        with self._lock:
            self._died_locked()
            try:
                self._stdin.close()
            except OSError:
                pass
        self.proc.kill()  # if it is still there (it broke the protocol)
        stdout.close()
        self.proc.wait()

    def _died_locked(self) -> None:
        self.dead = True
        while self.pending:
            self.pending.popleft().set_exception(BrokenPipeError())

    def kill(self) -> None:
        """Stop the process now and wait for it (it holds no state worth keeping); its
        answer reader then sees the end of its output and fails what it still had."""
        with self._lock:
            self.dead = True
            try:
                self._stdin.close()
            except OSError:
                pass
        self.proc.kill()
        self.proc.wait()


def _answer(line: str) -> dict[str, Any] | None:
    """A helper's answer line, or None if it is not one (cut short, not JSON, no id)."""
    if not line.endswith("\n"):
        return None
    try:
        answer = json.loads(line)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), int):
        return None
    return answer


class HashingProcesses:
    """``processes`` helper processes that hash with ``params``; thread-safe; started on
    first use (and again in a forked child, which never touches its parent's: see
    :func:`_after_fork_in_child`)."""

    def __init__(self, processes: int, params: Params) -> None:
        self.processes = processes
        self.params = params
        self._helpers: list[_Helper] = []
        self._closed = False
        self._lock = threading.Lock()
        _instances.add(self)

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by another thread at the fork; the helpers are the
        # parent's (their pipes stay open here, unused).
        self._lock = threading.Lock()
        self._helpers = []

    def verify(self, stored: str, password: str) -> bool:
        """Whether ``password`` matches ``stored`` (argon2 errors: False)."""
        ok = self._run({"op": "verify", "stored": stored, "password": password}).get("ok")
        if not isinstance(ok, bool):
            raise JobRefused("no verdict")
        return ok

    def hash(self, password: str) -> str:
        """A PHC-encoded Argon2id hash of ``password``."""
        made = self._run({"op": "hash", "password": password}).get("hash")
        if not isinstance(made, str):
            raise JobRefused("no hash")
        return made

    def _run(self, job: dict[str, Any]) -> dict[str, Any]:
        job["params"] = list(self.params)
        for _attempt in (1, 2):  # one helper may die (killed, out of memory): its replacement
            helper = self._pick()
            try:
                answer = helper.submit(job).result(timeout=HELPER_TIMEOUT)
            except BrokenPipeError:
                continue
            except Late:
                helper.kill()
                raise HelperTimeout from None
            if "error" in answer:
                raise JobRefused(str(answer["error"]))
            return answer
        raise HelpersUnavailable("helpers died twice in a row")

    def _pick(self) -> _Helper:
        """The live helper with the fewest jobs (one is started if there are fewer than
        ``processes``)."""
        with self._lock:
            if self._closed:
                raise HelpersUnavailable("closed")
            self._helpers = [h for h in self._helpers if not h.dead]
            idle = min(self._helpers, key=lambda h: len(h.pending), default=None)
            if idle is None or (idle.pending and len(self._helpers) < self.processes):
                try:
                    idle = _Helper()
                except HelpersUnavailable:
                    raise
                except Exception as exc:  # cannot start a process here (OSError, ...)
                    raise HelpersUnavailable(type(exc).__name__) from None
                self._helpers.append(idle)
            return idle

    def helper_pids(self) -> list[int]:
        """The live helpers' process ids (for tests and diagnostics)."""
        with self._lock:
            return sorted(h.proc.pid for h in self._helpers if not h.dead)

    def close(self) -> None:
        """Kill the helpers and wait for them; later jobs raise :class:`HelpersUnavailable`.
        When this returns, no helper of this process is hashing."""
        with self._lock:
            self._closed = True
            helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.kill()

    def __repr__(self) -> str:
        t, m, p = self.params
        return f"<HashingProcesses {self.processes} argon2id m={m} t={t} p={p}>"


_instances: weakref.WeakSet[HashingProcesses] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for instance in list(_instances):
        instance._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
