"""``qimem serve`` and the console scripts ``qimem-api`` and ``qauth-api``.

``qimem serve`` and ``qauth-api`` run the unified server; ``qimem-api`` runs the security
API alone, with the short paths ``POST /keys``, ``/encrypt``, ``/decrypt``, ``/rotate``.
Every endpoint except health, metrics and JWKS needs a bearer token (see docs/identity.md);
``--insecure-no-auth`` serves without tokens for local development, loopback binds only.
A non-loopback bind needs ``--trusted-proxy`` (TLS at a reverse proxy) or
``--insecure-plain-http``; behind a proxy, peers that bypass it get 403 unless
``--insecure-plain-http`` is also given. Connection limits, timeouts, allowed hosts and
trusted proxies also come from the config file's ``[serve]`` table; options override it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from qimem.cli.context import CliError, CliState, config_option, pass_state, store_option
from qimem.errors import ConfigError, QimemError
from qimem.hardening import disable_core_dumps, ensure_open_files

if TYPE_CHECKING:
    import socket

    from qimem.app import AppContext
    from qimem.purger import DeletionPurger
    from qimem.server.runner import Server

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: ``[serve]`` numbers: default, minimum, maximum (the defaults match qimem.server.runner).
_NUMBERS: dict[str, tuple[int, int, int]] = {
    "connection_limit": (1000, 1, 100_000),
    "channel_timeout": (60, 1, 86_400),
    "request_timeout": (30, 1, 86_400),
    "cleanup_interval": (5, 1, 3_600),
}
_LISTS = ("allowed_hosts", "trusted_proxies")
#: File descriptors beyond the connections: store, logs, listening socket, trigger.
_SPARE_FILES = 128
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


@dataclass(frozen=True)
class ServeSettings:
    """Connection limits, timeouts and exposure of ``qimem serve``: options over
    ``[serve]`` over defaults."""

    connection_limit: int
    channel_timeout: int
    request_timeout: int
    cleanup_interval: int
    allowed_hosts: tuple[str, ...]
    trusted_proxies: tuple[str, ...]


def serve_settings(table: dict[str, Any], options: dict[str, Any]) -> ServeSettings:
    """Resolve the settings from the ``[serve]`` table and the command-line options.

    :raises ConfigError: an unknown key or a value of the wrong type or range.
    """
    unknown = sorted(set(table) - set(_NUMBERS) - set(_LISTS))
    if unknown:
        raise ConfigError(f"[serve] has unknown setting(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, (default, low, high) in _NUMBERS.items():
        value = options.get(name)
        if value is None:
            value = table.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"[serve] {name} must be a whole number from {low} to {high}")
        values[name] = value
    for name in _LISTS:
        given: Sequence[str] = options.get(name) or ()
        if not given:
            given = table.get(name, [])
            if not isinstance(given, list) or not all(isinstance(v, str) for v in given):
                raise ConfigError(f"[serve] {name} must be a list of strings")
        values[name] = tuple(given)
    return ServeSettings(**values)


def configure_logging(access_log: bool) -> None:
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


def close_logging() -> None:
    for handler in logging.getLogger("qimem.server.access").handlers:
        handler.close()


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
        from qimem.server.prefork import run_master

        run_master(state, prog=prog, short_paths=short_paths, workers=workers, **options)
        return
    from qimem.server.runner import serve

    app_ctx = state.app
    server, banner = open_server(app_ctx, short_paths=short_paths, **options)
    configure_logging(options["access_log"])
    click.echo(f"{prog}: {banner}", err=True)
    purger = start_purger(app_ctx, options["purge_interval"])
    try:
        serve(server)
    finally:
        if purger is not None:
            purger.stop()
        close_logging()  # writes out the access log lines still buffered
    click.echo(f"{prog}: stopped", err=True)


def check_bind(
    config: Any,
    *,
    host: str,
    port: int,
    insecure_no_auth: bool,
    insecure_plain_http: bool = False,
    **options: Any,
) -> tuple[ServeSettings, str, str | None, str]:
    """Validate the options against ``config``'s ``[serve]`` table: the settings, the
    address to bind, a warning to print (or None) and how the server is exposed.

    :raises ConfigError: bad settings, or an exposure the options do not allow.
    """
    from qimem.server.auth import resolve_loopback_bind
    from qimem.server.exposure import check_exposure, parse_trusted_proxies

    limits = {k: v for k, v in options.items() if k in _NUMBERS or k in _LISTS}
    settings = serve_settings(config.serve, limits)
    proxies = parse_trusted_proxies(settings.trusted_proxies)
    if insecure_no_auth and proxies:
        raise ConfigError(
            "--insecure-no-auth serves loopback clients only and cannot sit behind a proxy "
            "(--trusted-proxy / [serve] trusted_proxies)"
        )
    if insecure_no_auth:
        return settings, resolve_loopback_bind(host, port), None, "no authentication, loopback only"
    warning = check_exposure(
        host, port, trusted_proxies=proxies, insecure_plain_http=insecure_plain_http
    )
    mode = "bearer tokens required"
    if proxies:
        mode += f", behind trusted proxies {', '.join(str(p) for p in proxies)}"
    return settings, host, warning, mode


def open_server(
    app_ctx: AppContext,
    *,
    short_paths: bool,
    host: str,
    port: int,
    threads: int,
    insecure_no_auth: bool,
    max_body_bytes: int,
    insecure_plain_http: bool = False,
    sock: socket.socket | None = None,
    **options: Any,
) -> tuple[Server, str]:
    """Open the store and identity layer, build the app and its waitress server (bound to
    ``host:port``, or serving ``sock`` when a ``--workers`` master bound it); return the
    server and the banner ("serving on URL (mode)"), after a warning line if any.

    :raises ConfigError: bad settings, an exposure the options do not allow, a store
        without realm 'master', an address that cannot be bound.
    """
    from qimem.server.app import create_app
    from qimem.server.exposure import LOOPBACK_HOSTS, parse_trusted_proxies
    from qimem.server.runner import Server

    settings, bind, warning, mode = check_bind(
        app_ctx.config,
        host=host,
        port=port,
        insecure_no_auth=insecure_no_auth,
        insecure_plain_http=insecure_plain_http,
        **options,
    )
    proxies = parse_trusted_proxies(settings.trusted_proxies)
    ensure_open_files(settings.connection_limit + _SPARE_FILES)
    app_ctx.open()
    if not insecure_no_auth:
        from qimem.identity.settings import bounded_by_threads, settings_from_mapping
        from qimem.services.identity import configure, identity

        table = settings_from_mapping(app_ctx.config.identity, str(app_ctx.config.path))
        configure(app_ctx, bounded_by_threads(table, threads))
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
        # unauthenticated: a browser page whose name was rebound to 127.0.0.1 is refused
        allowed_hosts=LOOPBACK_HOSTS if insecure_no_auth else settings.allowed_hosts,
        trusted_proxies=proxies,
        # behind a TLS proxy, peers that bypass it get 403 unless plain HTTP was chosen
        require_tls_proxy=bool(proxies) and not insecure_plain_http,
    )
    try:
        server = Server(
            wsgi,
            host=bind,
            port=port,
            threads=threads,
            max_body_bytes=max_body_bytes,
            connection_limit=settings.connection_limit,
            channel_timeout=settings.channel_timeout,
            request_timeout=settings.request_timeout,
            cleanup_interval=settings.cleanup_interval,
            trusted_proxies=bool(proxies),
            sock=sock,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    banner = f"serving on {server.url} ({mode})"
    return server, f"{warning}\n{banner}" if warning else banner


def start_purger(app_ctx: AppContext, interval: float) -> DeletionPurger | None:
    """The background purge of due deletions every ``interval`` seconds (0: none), each
    run counted in ``qimem_background_job_runs_total{job="purge"}``."""
    if not interval:
        return None
    from qimem.purger import DeletionPurger
    from qimem.server.metrics import job_runs_counter

    runs = job_runs_counter().labels("purge")

    class CountedPurger(DeletionPurger):
        def run_once(self) -> list[str]:
            runs.inc()
            return super().run_once()

    return CountedPurger(app_ctx, interval).start()


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
