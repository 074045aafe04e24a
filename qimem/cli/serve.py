"""``qimem serve`` and the console scripts ``qimem-api`` and ``qauth-api``.

``qimem serve`` and ``qauth-api`` run the unified server; ``qimem-api`` runs the security
API alone, with the short paths ``POST /keys``, ``/encrypt``, ``/decrypt``, ``/rotate``.
Every endpoint except health, metrics and JWKS needs a bearer token (see docs/identity.md);
``--insecure-no-auth`` serves without tokens for local development, loopback binds only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from qimem.cli.context import CliState, config_option, pass_state, store_option
from qimem.errors import ConfigError, QimemError

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


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
            "--access-log/--no-access-log",
            default=True,
            show_default=True,
            help="One JSON line per request on stderr.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _configure_logging(access_log: bool) -> None:
    from qimem.server.middleware import AccessLogHandler

    access = logging.getLogger("qimem.server.access")
    for handler in access.handlers:
        handler.close()
    access.handlers[:] = [AccessLogHandler(sys.stderr)] if access_log else []
    access.propagate = False
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    general = logging.StreamHandler(sys.stderr)
    general.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("qimem", "waitress"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(general)
        logger.setLevel(logging.INFO)


def _close_logging() -> None:
    for handler in logging.getLogger("qimem.server.access").handlers:
        handler.close()


def run_server(
    state: CliState,
    *,
    prog: str,
    short_paths: bool,
    host: str,
    port: int,
    threads: int,
    insecure_no_auth: bool,
    max_body_bytes: int,
    access_log: bool,
    purge_interval: float,
) -> None:
    """Check the options, open the store, bind, serve until SIGTERM/SIGINT."""
    from qimem.purger import DeletionPurger
    from qimem.server.app import create_app
    from qimem.server.auth import resolve_loopback_bind
    from qimem.server.runner import Server, serve

    bind = resolve_loopback_bind(host, port) if insecure_no_auth else host
    app_ctx = state.app.open()
    if not insecure_no_auth:
        from qimem.identity.settings import bounded_by_threads, load_settings
        from qimem.services.identity import configure, identity

        configure(app_ctx, bounded_by_threads(load_settings(app_ctx.config.path), threads))
        if not identity(app_ctx).realm_exists("master"):
            raise ConfigError(
                "this store has no realm 'master', so no one could log in: run 'qimem init' "
                "(it creates master and its admin), or serve with --insecure-no-auth for local "
                "development (loopback only)"
            )
    wsgi = create_app(
        app_ctx,
        insecure_no_auth=insecure_no_auth,
        short_paths=short_paths,
        security_only=short_paths,  # qimem-api: the security API alone
        max_body_bytes=max_body_bytes,
    )
    try:
        server = Server(wsgi, host=bind, port=port, threads=threads, max_body_bytes=max_body_bytes)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    _configure_logging(access_log)
    mode = "no authentication, loopback only" if insecure_no_auth else "bearer tokens required"
    click.echo(f"{prog}: serving on {server.url} ({mode})", err=True)
    purger = DeletionPurger(app_ctx, purge_interval).start() if purge_interval else None
    try:
        serve(server)
    finally:
        if purger is not None:
            purger.stop()
        _close_logging()  # writes out the access log lines still buffered
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
        from qimem.cli import CliError

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
