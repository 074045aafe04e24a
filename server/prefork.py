"""``qimem serve --workers N``: a pre-fork master over one listening socket.

The master parses the configuration, checks the options, binds the socket once and forks
N workers; it never serves a request and opens no store. Each worker opens its own store
connections and serves the inherited socket with the single-process server's own steps
(:func:`qimem.server.setup.open_server`, :class:`qimem.server.runner.Server`: graceful drain,
slow-client timeouts, connection limits). docs/operations.md ("Workers") is the user's
account; in short:

* A worker that dies is restarted; deaths before ready or within :data:`STABLE_SECONDS`
  are failures, delayed by :func:`backoff`; :data:`MAX_FAILURES` in a row with no worker
  serving stop the master (exit 1). A failure while the server starts stops it at once
  with the worker's status (slot 0 starts first, so such an error is printed once).
* SIGTERM/SIGINT: the master closes its socket copy and SIGTERMs the workers, which
  drain; exit 0 when all are gone (SIGKILL after the drain deadline + :data:`STOP_GRACE`).
* SIGHUP: the configuration is read again (invalid: refused, nothing changes); then one
  slot at a time a new worker starts, the master waits until it is ready, then SIGTERMs
  the old one. The socket stays open, so no connection is refused.
* Background jobs: the deletion purge runs in slot 0's worker only (once per master; a
  reload of slot 0 may overlap two purgers briefly, which DeletionPurger tolerates). The
  buffered audit flush runs in every worker on purpose (each flushes its own buffer), and
  revocation lists are refreshed lazily per process (reads only): safe N times.
* Metrics: ``PROMETHEUS_MULTIPROC_DIR`` is a private 0700 directory the master removes
  on exit; ``/metrics`` sums every worker's files (dead ones included).
* Secrets: workers are forked, not re-executed: same argv and environment, core dumps
  still disabled; each reads the root key as it starts, as a single process does.
* A worker whose master died (SIGKILL) sees a pipe only the master held close, and drains.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from qimem.errors import QimemError

if TYPE_CHECKING:
    from qimem.config import Settings

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
MAX_FAILURES = 5
STABLE_SECONDS = 5.0
READY_TIMEOUT = 60.0
STOP_GRACE = 10.0
BACKLOG = 1024
_READY = b"R"
_TICK = 1.0


def backoff(failures: int) -> float:
    """Seconds before the next start after ``failures`` failures in a row (0: none)."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), before any fork."""
    info = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class WorkerContext:
    """What a worker gets from the master: its slot, the shared socket, the settings to
    build its app from, whether it runs the background jobs, and :attr:`ready` to call
    once it is about to accept connections."""

    slot: int
    sock: socket.socket
    config: Settings
    runs_jobs: bool
    ready: Callable[[], None]


@dataclass(eq=False)
class _Worker:
    slot: int
    pid: int
    ready_fd: int | None
    started: float
    ready_at: float | None = None
    retiring: bool = False
    killed: bool = False


@dataclass
class _Reload:
    previous: Settings
    queue: list[int]
    new: _Worker | None = None
    replaced: list[int] = field(default_factory=list)


class Master:
    """Runs ``workers`` copies of ``worker_main`` on ``sock`` until SIGTERM/SIGINT.

    :param worker_main: runs in each forked worker; returns its exit status.
    :param load_config: reads the configuration again (SIGHUP); raises a qimem error
        for an invalid one.
    :param metrics_dir: the ``PROMETHEUS_MULTIPROC_DIR`` the workers write to.
    :param drain_timeout: how long a stopping worker may drain before SIGKILL (plus
        :data:`STOP_GRACE`).
    """

    def __init__(
        self,
        *,
        sock: socket.socket,
        workers: int,
        prog: str,
        config: Settings,
        load_config: Callable[[], Settings],
        worker_main: Callable[[WorkerContext], int],
        banner: str,
        metrics_dir: str,
        drain_timeout: float,
    ) -> None:
        self._sock = sock
        self._n = workers
        self._prog = prog
        self._config = config
        self._load_config = load_config
        self._worker_main = worker_main
        self._banner = banner
        self._metrics_dir = metrics_dir
        self._drain_timeout = drain_timeout
        self._slots: dict[int, _Worker | None] = dict.fromkeys(range(workers))
        self._live: dict[int, _Worker] = {}
        self._restart_at: dict[int, float] = {}
        self._failures = 0
        self._last_failure = 0.0
        self._booting = True
        self._stopping = False
        self._stop_deadline = 0.0
        self._exit_code = 0
        self._signals: list[int] = []
        self._reload: _Reload | None = None
        self._reload_again = False
        self._wake_r, self._wake_w = os.pipe()
        self._life_r, self._life_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    def _say(self, message: str) -> None:
        click.echo(f"{self._prog}: {message}", err=True)

    # ---- main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them; return the master's exit status."""
        previous = self._install_signals()
        try:
            # Slot 0 first, the others once it is ready: an error every worker would hit
            # (no root key, no realm 'master') is reported once, by one worker.
            self._slots[0] = self._spawn(0)
            while not (self._stopping and not self._live):
                self._wait(self._timeout())
                self._handle_signals()
                self._reap()
                self._tick()
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w, self._life_r, self._life_w):
                os.close(fd)
        self._say("stopped")
        return self._exit_code

    def _install_signals(self) -> dict[int, Any]:
        def note(signum: int, frame: FrameType | None) -> None:
            self._signals.append(signum)

        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous: dict[int, Any] = {sig: signal.signal(sig, note) for sig in sigs}
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return previous

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [*self._restart_at.values()]
        if self._stopping:
            due.append(self._stop_deadline)
        return max(0.0, min([now + _TICK, *due]) - now)

    def _wait(self, timeout: float) -> None:
        fds = [self._wake_r, *(w.ready_fd for w in self._live.values() if w.ready_fd is not None)]
        readable, _, _ = select.select(fds, [], [], timeout)
        for fd in readable:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            worker = next(w for w in self._live.values() if w.ready_fd == fd)
            data = os.read(fd, 1)
            os.close(fd)
            worker.ready_fd = None
            if data == _READY:
                self._on_ready(worker)

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._begin_stop(0)
            elif signum == signal.SIGHUP:
                self._on_sighup()

    # ---- workers --------------------------------------------------------------------

    def _spawn(self, slot: int) -> _Worker:
        self._restart_at.pop(slot, None)
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the master's code
            code = 1
            try:
                os.close(ready_r)
                self._child_setup()
                context = WorkerContext(
                    slot=slot,
                    sock=self._sock,
                    config=self._config,
                    runs_jobs=slot == 0,
                    ready=lambda: _write_ready(ready_w),
                )
                code = self._worker_main(context)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(ready_w)
        worker = _Worker(slot=slot, pid=pid, ready_fd=ready_r, started=time.monotonic())
        self._live[pid] = worker
        return worker

    def _child_setup(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's signal, not ours
        mine = {self._wake_r, self._wake_w, self._life_w}
        mine |= {w.ready_fd for w in self._live.values() if w.ready_fd is not None}
        for fd in mine:
            os.close(fd)
        life = self._life_r

        def watch_master() -> None:
            # Only the master holds the write end: EOF means it is gone; drain and stop.
            while True:
                try:
                    if not os.read(life, 1):
                        break
                except InterruptedError:
                    continue
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch_master, name="qimem-master-watch", daemon=True).start()

    def _on_ready(self, worker: _Worker) -> None:
        worker.ready_at = time.monotonic()
        if self._stopping:  # it has its SIGTERM; start nothing more
            return
        reload = self._reload
        if reload is not None and reload.new is worker:
            old = self._slots[worker.slot]
            self._slots[worker.slot] = worker
            reload.replaced.append(worker.slot)
            reload.new = None
            if old is not None:
                self._retire(old)
            self._say(f"worker {worker.slot} reloaded (pid {worker.pid})")
        elif self._booting:
            if worker.slot == 0:
                for slot in range(1, self._n):
                    self._slots[slot] = self._spawn(slot)
            if all(w is not None and w.ready_at is not None for w in self._slots.values()):
                self._booting = False
                pids = " ".join(str(w.pid) for w in self._slots.values() if w is not None)
                self._say(f"{self._banner}; {self._n} workers (pids {pids})")
                if self._reload_again:
                    self._reload_again = False
                    self._on_sighup()
        else:
            self._say(f"worker {worker.slot} started (pid {worker.pid})")

    def _retire(self, worker: _Worker) -> None:
        worker.retiring = True
        _signal(worker.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._live.pop(pid, None)
            if worker is None:
                continue
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None
            _mark_dead(pid, self._metrics_dir)
            self._on_exit(worker, os.waitstatus_to_exitcode(status))

    def _on_exit(self, worker: _Worker, code: int) -> None:
        how = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
        if self._stopping or worker.retiring:
            return
        reload = self._reload
        if reload is not None and reload.new is worker:
            self._reload = None
            self._config = reload.previous
            self._say(
                f"reload stopped: the new worker {worker.slot} {how} before it was ready; "
                f"{len(reload.replaced)} worker(s) run the new configuration, the others "
                "the previous one (send SIGHUP again once it is fixed)"
            )
            return
        if self._booting and worker.ready_at is None:
            self._say(f"worker {worker.slot} {how} while starting; stopping")
            self._begin_stop(code if code > 0 else 1)
            return
        if self._slots.get(worker.slot) is worker:
            self._slots[worker.slot] = None
        now = time.monotonic()
        unstable = worker.ready_at is None or now - worker.ready_at < STABLE_SECONDS
        self._failures = self._failures + 1 if unstable else 0
        if unstable:
            self._last_failure = now
        serving = any(w is not None and w.ready_at is not None for w in self._slots.values())
        if self._failures >= MAX_FAILURES and not serving:
            self._say(
                f"error: worker {worker.slot} {how}; {self._failures} worker failures in a "
                "row and no worker is serving: giving up"
            )
            self._begin_stop(1)
            return
        if reload is not None and reload.new is not None and reload.new.slot == worker.slot:
            self._say(f"worker {worker.slot} (pid {worker.pid}) {how}; its reload replaces it")
            return
        delay = backoff(self._failures)
        if reload is not None and worker.slot in reload.queue:
            reload.queue.remove(worker.slot)  # its restart gets the new configuration
        self._restart_at[worker.slot] = now + delay
        self._say(f"worker {worker.slot} (pid {worker.pid}) {how}; restarting in {delay:g} s")

    def _tick(self) -> None:
        now = time.monotonic()
        if self._stopping:
            if now >= self._stop_deadline:
                for worker in self._live.values():
                    if not worker.killed:
                        worker.killed = True
                        _signal(worker.pid, signal.SIGKILL)
            return
        for slot, when in list(self._restart_at.items()):
            if now >= when and self._slots[slot] is None:
                self._slots[slot] = self._spawn(slot)
        for worker in self._live.values():
            late = worker.ready_at is None and now - worker.started > READY_TIMEOUT
            if late and not worker.killed:
                worker.killed = True
                self._say(f"worker {worker.slot} not ready after {READY_TIMEOUT:g} s; killed")
                _signal(worker.pid, signal.SIGKILL)
        if self._failures and any(
            w.ready_at is not None
            and w.ready_at > self._last_failure
            and now - w.ready_at >= STABLE_SECONDS
            for w in self._live.values()
        ):
            self._failures = 0
        reload = self._reload
        if reload is not None and reload.new is None:
            if reload.queue:
                reload.new = self._spawn(reload.queue.pop(0))
            else:
                self._reload = None
                self._say("reload complete")
                if self._reload_again:
                    self._reload_again = False
                    self._on_sighup()

    def _on_sighup(self) -> None:
        if self._stopping:
            return
        if self._booting or self._reload is not None:
            self._reload_again = True  # once the current start or reload is done
            return
        try:
            config = self._load_config()
        except QimemError as exc:
            self._say(f"reload refused, nothing changed: {exc.message}")
            return
        self._reload = _Reload(previous=self._config, queue=list(range(self._n)))
        self._config = config
        self._say(f"reloading {self._n} workers one at a time")

    def _begin_stop(self, code: int) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._exit_code = code
        self._reload = None
        self._restart_at.clear()
        self._stop_deadline = time.monotonic() + self._drain_timeout + STOP_GRACE
        # No worker will be started any more: once the draining workers have closed their
        # copies too, new connections are refused (as by a single-process server).
        self._sock.close()
        for worker in self._live.values():
            _signal(worker.pid, signal.SIGTERM)


def _write_ready(fd: int) -> None:
    os.write(fd, _READY)
    os.close(fd)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # already gone; reaped at the next turn
        pass


def _mark_dead(pid: int, path: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)
