"""``qimem serve --workers N`` (N > 1): the command's side of :mod:`qimem.server.prefork`.

:func:`run_master` checks the options against the configuration, binds, points
``PROMETHEUS_MULTIPROC_DIR`` at a private directory and runs the :class:`Master`;
:func:`_worker` is what each forked worker runs: the single-process server's own steps
(:func:`qimem.server.setup.open_server`) on the master's socket, the purge in slot 0 only.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import click

from qimem.errors import ConfigError, QimemError
from qimem.server.prefork import Master, WorkerContext, bind_socket

if TYPE_CHECKING:
    from qimem.cli.context import CliState
    from qimem.config import Settings


def run_master(
    state: CliState, *, prog: str, short_paths: bool, workers: int, **options: Any
) -> None:
    """``qimem serve --workers N`` (N > 1): bind, fork, supervise; exit with the master's
    status (0 after a graceful stop).

    :raises ConfigError: bad settings or an address that cannot be bound (before any fork).
    """
    from qimem.server.runner import DEFAULT_DRAIN_TIMEOUT
    from qimem.server.setup import check_bind

    config = state.config()
    _, bind, warning, mode = check_bind(config, **options)
    from qimem.root.opening import prepare_before_fork

    prepare_before_fork(config, lambda: state.app.registry)  # a PIN from stdin, read once
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
    from qimem.server.metrics import enable_multiprocess
    from qimem.server.runner import serve
    from qimem.server.setup import close_logging, configure_logging, open_server, start_purger

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
