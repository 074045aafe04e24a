"""``qimem serve --workers N``: a pre-fork master over one listening socket.

The master parses the configuration, checks the options, binds the socket once and forks
N workers. Each worker opens its own store connections and identity layer (nothing the
master opened is shared), builds the app and serves the inherited socket with the same
:class:`qimem.server.runner.Server` as a single-process server (graceful drain, slow
client timeouts, connection limits per worker). The master never serves a request and
opens no store: it only starts, watches and stops workers.

* **A worker that dies** is started again. A worker that dies before it is ready, or
  within :data:`STABLE_SECONDS` of being ready, counts as a failure; failures in a row
  delay the restart (:data:`BACKOFF_FIRST` doubling up to :data:`BACKOFF_MAX` seconds).
  When :data:`MAX_FAILURES` failures in a row leave no worker serving, the master stops
  and exits 1 ("giving up"); while some worker still serves, it keeps trying at the
  backoff's pace. A worker that fails while the server starts stops it at once with the
  worker's exit status (its error is on stderr, as without ``--workers``).
* **Start**: the worker of slot 0 starts first and the others once it is ready, so an
  error every worker would hit (no root key, no realm 'master') is reported once; the
  "serving on" line comes when all are ready.
* **SIGTERM / SIGINT**: the master closes its copy of the socket and sends each worker
  SIGTERM; each drains (requests in flight finish, then it closes its copy, so new
  connections are refused once all have); the master exits 0 once all have exited
  (SIGKILL after the drain deadline + 10 s).
* **SIGHUP**: the configuration is read again (an invalid one is refused, nothing
  changes); then, one slot at a time, a new worker is started with it, the master waits
  until it is ready, and only then sends the old one SIGTERM (it drains). The socket stays
  open throughout, so no connection is refused. A new worker that fails to start stops the
  reload; the master goes back to the previous configuration for later restarts.
* **Background jobs**: the purge of due deletions runs in the worker of slot 0 only (once
  per master; during a reload of slot 0 the old and new worker overlap for a moment,
  which :class:`qimem.purger.DeletionPurger` tolerates: a lineage deleted first by one is
  skipped by the other). The buffered audit flush runs in every worker because each
  flushes the records buffered in its own memory (distinct records; running it N times
  is the point). Token revocation lists are refreshed lazily per process on the request
  path (reads only; N workers read N times per ``revocation_refresh_seconds``).
* **Metrics**: the master points ``PROMETHEUS_MULTIPROC_DIR`` at a private 0700 directory
  (removed on exit); workers write their counters there and ``/metrics`` sums them all
  (:func:`qimem.server.metrics.enable_multiprocess`); a dead worker's counts stay in the
  totals (:func:`prometheus_client.multiprocess.mark_process_dead` clears its live gauges).
* **Secrets**: workers are forked, never re-executed: they inherit the parsed settings,
  the environment and the disabled core dumps unchanged; no key goes through argv or a
  new environment variable. A worker reads the root key (file or ``QIMEM_ROOT_KEY``) when
  it starts, like a single-process server.
* A worker whose master dies (SIGKILL) stops by itself: it watches a pipe only the master
  holds open, and drains when it closes.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from qimem.errors import ConfigError, QimemError

if TYPE_CHECKING:
    from qimem.cli.context import CliState
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
        previous = {sig: signal.signal(sig, note) for sig in sigs}
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


# ---- qimem serve --workers N --------------------------------------------------------


def run_master(
    state: CliState, *, prog: str, short_paths: bool, workers: int, **options: Any
) -> None:
    """``qimem serve --workers N`` (N > 1): bind, fork, supervise; exit with the master's
    status (0 after a graceful stop).

    :raises ConfigError: bad settings or an address that cannot be bound (before any fork).
    """
    from qimem.cli.serve import check_bind
    from qimem.server.runner import DEFAULT_DRAIN_TIMEOUT

    config = state.config()
    _, bind, warning, mode = check_bind(config, **options)
    try:
        sock = bind_socket(bind, options["port"])
    except OSError as exc:
        where = f"{options['host']}:{options['port']}"
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if warning:
        click.echo(f"{prog}: {warning}", err=True)

    def load_config() -> Settings:
        fresh = state.config()
        check_bind(fresh, **options)
        return fresh

    def worker_main(context: WorkerContext) -> int:
        return _worker(context, prog=prog, short_paths=short_paths, options=options)

    metrics_dir = tempfile.mkdtemp(prefix="qimem-metrics-")  # 0700
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        master = Master(
            sock=sock,
            workers=workers,
            prog=prog,
            config=config,
            load_config=load_config,
            worker_main=worker_main,
            banner=f"serving on {url} ({mode})",
            metrics_dir=metrics_dir,
            drain_timeout=DEFAULT_DRAIN_TIMEOUT,
        )
        code = master.run()
    finally:
        sock.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if code:
        sys.exit(code)


def _worker(context: WorkerContext, *, prog: str, short_paths: bool, options: dict) -> int:
    """One worker: the single-process server's own steps, on the master's socket."""
    from qimem.app import build
    from qimem.cli.serve import close_logging, configure_logging, open_server, start_purger
    from qimem.server.metrics import enable_multiprocess
    from qimem.server.runner import serve

    enable_multiprocess()
    app_ctx = build(context.config, one_shot=False)
    try:
        server, _ = open_server(app_ctx, short_paths=short_paths, sock=context.sock, **options)
        configure_logging(options["access_log"])
        interval = options["purge_interval"]
        purger = start_purger(app_ctx, interval) if context.runs_jobs else None
        try:
            serve(server, on_ready=context.ready)
        finally:
            if purger is not None:
                purger.stop()
            close_logging()
    except QimemError as exc:
        click.echo(f"{prog}: error: {exc.message}", err=True)
        return exc.exit_code
    finally:
        app_ctx.close()
    return 0
