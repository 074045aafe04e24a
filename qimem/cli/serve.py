"""``qimem serve`` and the console scripts ``qimem-api`` and ``qauth-api``.

``qimem serve`` and ``qauth-api`` run the unified server; ``qimem-api`` runs the security
API alone, with the short paths ``POST /keys``, ``/encrypt``, ``/decrypt``, ``/rotate``.
Every endpoint except health, metrics and JWKS needs a bearer token (see docs/identity.md);
``--insecure-no-auth`` serves without tokens for local development, loopback binds only.
A non-loopback bind needs ``--trusted-proxy`` (TLS at a reverse proxy) or
``--insecure-plain-http``; behind a proxy, peers that bypass it get 403 unless
``--insecure-plain-http`` is also given. Connection limits, timeouts, allowed hosts and
trusted proxies also come from the config file's ``[serve]`` table; options override it.
``--workers N`` (N > 1) hands over to the pre-fork master of :mod:`qimem.server.prefork`
(run by :mod:`qimem.server.serve_workers`); the server itself is built by
:mod:`qimem.server.setup`, for one process and for each worker alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from qimem.cli.context import CliError, CliState, config_option, pass_state, store_option
from qimem.errors import QimemError
from qimem.hardening import disable_core_dumps
from qimem.server.setup import (  # noqa: F401 - ServeSettings, serve_settings: re-exported
    ServeSettings,
    close_logging,
    configure_logging,
    open_server,
    serve_settings,
    start_purger,
)

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_WORKERS = 256


def auto_workers() -> int:
    """``--workers auto``: the CPUs this process may run on (its affinity mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class WorkersType(click.ParamType):
    """``--workers``: a whole number from 1 to :data:`MAX_WORKERS`, or ``auto``."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif str(value).strip().lower() == "auto":
            return auto_workers()
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not a whole number or 'auto'", param, ctx)
        if not 1 <= number <= MAX_WORKERS:
            self.fail(f"{number} is not from 1 to {MAX_WORKERS} (or 'auto')", param, ctx)
        return number


def serve_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by ``qimem serve``, ``qimem-api`` and ``qauth-api``."""
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind."),
        click.option(
            "--port",
            type=click.IntRange(0, 65535),
            default=8080,
            show_default=True,
            help="Port to bind (0 picks a free one).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(1, 256),
            default=4,
            show_default=True,
            help="Worker threads.",
        ),
        click.option(
            "--workers",
            type=WorkersType(),
            default=1,
            show_default=True,
            help="Worker processes sharing the socket ('auto': one per CPU); above 1, a "
            "master process restarts workers that die and reloads them one at a time on "
            "SIGHUP (docs/operations.md, Workers).",
        ),
        click.option(
            "--insecure-no-auth",
            is_flag=True,
            help="Serve without authentication (local development; loopback binds only).",
        ),
        click.option(
            "--max-body-bytes",
            type=click.IntRange(1, 1 << 30),
            default=DEFAULT_MAX_BODY_BYTES,
            show_default=True,
            help="Larger request bodies get 413.",
        ),
        click.option(
            "--purge-interval",
            type=click.FloatRange(0, 86400),
            default=60,
            show_default=True,
            help="Seconds between background purges of keys whose scheduled deletion date "
            "has passed (0: never; then run 'qimem keys purge' yourself).",
        ),
        click.option(
            "--connection-limit",
            type=click.IntRange(1, 100_000),
            default=None,
            help="Open connections at most; more wait in the listen backlog "
            "[default: 1000, or [serve] connection_limit].",
        ),
        click.option(
            "--channel-timeout",
            type=click.IntRange(1, 86_400),
            default=None,
            help="Seconds after which an idle connection is closed [default: 60].",
        ),
        click.option(
            "--request-timeout",
            type=click.IntRange(1, 86_400),
            default=None,
            help="Seconds a request may take to arrive, headers and body, before its "
            "connection is closed (slow clients) [default: 30].",
        ),
        click.option(
            "--cleanup-interval",
            type=click.IntRange(1, 3_600),
            default=None,
            help="Seconds between the idle and request timeout checks [default: 5].",
        ),
        click.option(
            "--allowed-host",
            "allowed_hosts",
            multiple=True,
            help="Answer only requests whose Host header is this name (optionally with "
            ":port); repeatable. Default: any (with --insecure-no-auth: loopback names only).",
        ),
        click.option(
            "--trusted-proxy",
            "trusted_proxies",
            multiple=True,
            help="Address or network of a TLS-terminating reverse proxy whose X-Forwarded-For "
            "and X-Forwarded-Proto are honoured; allows a non-loopback bind, and peers that "
            "bypass it (neither a proxy nor loopback) are then refused. Repeatable.",
        ),
        click.option(
            "--insecure-plain-http",
            is_flag=True,
            help="Allow a non-loopback bind without a TLS proxy, or (with --trusted-proxy) "
            "direct peers that bypass it (tokens travel in clear).",
        ),
        click.option(
            "--access-log/--no-access-log",
            default=True,
            show_default=True,
            help="One JSON line per request on stderr.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_server(
    state: CliState,
    *,
    prog: str,
    short_paths: bool,
    workers: int = 1,
    **options: Any,
) -> None:
    """Check the options, open the store, bind, serve until SIGTERM/SIGINT.

    ``options``: those of :func:`serve_options` (the limits of :class:`ServeSettings` None:
    from ``[serve]`` or default). ``workers`` > 1: a pre-fork master
    (:mod:`qimem.server.prefork`) binds once and runs that many worker processes.
    """
    disable_core_dumps()  # before the root key is read (inherited by --workers workers)
    state.one_shot = False  # a server reserves usage in blocks (docs/keys.md)
    if workers > 1:
        from qimem.server.serve_workers import run_master

        run_master(state, prog=prog, short_paths=short_paths, workers=workers, **options)
        return
    from qimem.root.opening import prepare_before_fork
    from qimem.server.runner import serve

    prepare_before_fork(state.config(), lambda: state.app.registry)  # checks the root's provider
    app_ctx = state.app
    server, banner = open_server(app_ctx, short_paths=short_paths, **options)
    configure_logging(options["access_log"])
    purger = start_purger(app_ctx, options["purge_interval"])
    try:
        # The banner says "ready": printed once SIGTERM stops the server gracefully (a
        # supervisor or test that signals right after it must get the drain, exit 0).
        serve(server, on_ready=lambda: click.echo(f"{prog}: {banner}", err=True))
    finally:
        if purger is not None:
            purger.stop()
        close_logging()  # writes out the access log lines still buffered
    click.echo(f"{prog}: stopped", err=True)


@click.command()
@serve_options
@pass_state
def serve(state: CliState, **options: Any) -> None:
    """Run the HTTP server (security API and operations endpoints) with waitress.

    Stops gracefully on SIGTERM/SIGINT: requests in flight finish first.
    """
    run_server(state, prog="qimem", short_paths=False, **options)


def _standalone(prog: str, short_paths: bool, doc: str) -> click.Command:
    @click.command(name=prog, help=doc, context_settings={"help_option_names": ["-h", "--help"]})
    @config_option
    @store_option
    @click.option(
        "--plugin", "plugins", multiple=True, help="Enable an installed plugin (repeatable)."
    )
    @serve_options
    def command(
        config_path: str | None, store_url: str | None, plugins: tuple[str, ...], **options: Any
    ) -> None:
        state = CliState(config_path, store_url, list(plugins), "master")
        try:
            run_server(state, prog=prog, short_paths=short_paths, **options)
        except QimemError as exc:
            raise CliError(prog, exc.message, exc.exit_code) from None
        finally:
            state.close()

    return command


api_command = _standalone(
    "qimem-api",
    True,
    "Run the security API alone (also POST /keys, /encrypt, /decrypt, /rotate).",
)
unified_command = _standalone(
    "qauth-api", False, "Run the unified qimem server (same as 'qimem serve')."
)


def api_main() -> None:
    """Console entry point of ``qimem-api``."""
    api_command(prog_name="qimem-api")


def unified_main() -> None:
    """Console entry point of ``qauth-api``."""
    unified_command(prog_name="qauth-api")
