"""Building the server ``qimem serve`` runs, shared by the single-process server
(:func:`qimem.cli.serve.run_server`) and each ``--workers`` worker
(:mod:`qimem.server.serve_workers`): the ``[serve]`` settings, the exposure checks, the
app and its waitress server, the background purge, the log handlers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qimem.errors import ConfigError
from qimem.hardening import ensure_open_files

if TYPE_CHECKING:
    import socket

    from qimem.app import AppContext
    from qimem.purger import DeletionPurger
    from qimem.server.runner import Server

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
        from qimem.identity.settings import server_settings, settings_from_mapping
        from qimem.services.identity import configure, identity

        table = settings_from_mapping(app_ctx.config.identity, str(app_ctx.config.path))
        configure(app_ctx, server_settings(table, threads))
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
