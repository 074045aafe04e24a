"""The CLI's lazy application context and output helpers."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from qimem.errors import ValidationError
from qimem.hardening import disable_core_dumps

if TYPE_CHECKING:  # imported on use: `qimem --help` loads no service code
    from qimem.app import AppContext
    from qimem.config import Config
    from qimem.http_client import HttpClient
    from qimem.remote import RemoteKeys


class CliError(click.ClickException):
    """A QimemError on its way out of click: one line, the error's own exit code."""

    def __init__(self, prog: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.prog = prog
        # click declares exit_code a class variable; this error carries its own.
        vars(self)["exit_code"] = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.prog}: error: {self.message}", err=True)


class Command(click.Command):
    """A click command whose parser matches a known short option (``-o``, ``-q``) directly.

    click first tries every option argument as a long option; for ``-o`` that lookup fails
    by building a ``NoSuchOption``, which imports difflib and ranks close matches (~2 ms of
    each call, issue 13) before click falls back to the short option. An argument that is
    exactly a known short option goes straight to the short-option code: the same result,
    without the detour. (Guarded: with a click whose parser differs, nothing changes.)
    """

    def make_parser(self, ctx: click.Context) -> Any:
        parser = super().make_parser(ctx)
        short = getattr(parser, "_short_opt", None)
        long_ = getattr(parser, "_long_opt", None)
        process = getattr(parser, "_process_opts", None)
        match_short = getattr(parser, "_match_short_opt", None)
        if not (isinstance(short, dict) and isinstance(long_, dict) and process and match_short):
            return parser

        def process_opts(arg: str, state: Any) -> None:
            if arg in short and arg not in long_:
                match_short(arg, state)
            else:
                process(arg, state)

        parser._process_opts = process_opts  # type: ignore[method-assign]
        return parser


class CliState:
    """Global options, and an AppContext opened on first use (so --help never opens a store)."""

    def __init__(
        self,
        config_path: str | None,
        store_url: str | None,
        plugins: list[str],
        realm: str,
        *,
        server: str | None = None,
        token: str | None = None,
        realm_given: bool = False,
        ca_cert: str | None = None,
        insecure_plain_http: bool = False,
    ) -> None:
        self.config_path = Path(config_path) if config_path else None
        self.store_url = store_url
        self.plugins = plugins
        self.realm = realm
        self.server = server or None
        self._token = token or None
        self.realm_given = realm_given
        #: --ca-cert and --insecure-plain-http, for every client of --server
        self.ca_cert = ca_cert or None
        self.insecure_plain_http = insecure_plain_http
        self._warned_plain_http = False
        #: commands that are local by nature (serve, init, plugins) ignore --server
        self.local_ok = False
        #: the app is for one job (see AppContext's ``one_shot``); ``serve`` clears it
        self.one_shot = True
        self._app: AppContext | None = None
        self._remote: RemoteKeys | None = None

    def __repr__(self) -> str:
        return f"<CliState server={self.server!r} realm={self.realm!r}>"

    @property
    def remote(self) -> RemoteKeys:
        """The --server client (keys and data keys over HTTP); warns once about plain http."""
        if self._remote is None:
            # Imported here: http.client and ssl cost ~10 ms of every local command's start-up.
            from qimem.remote import RemoteKeys

            assert self.server is not None
            disable_core_dumps()  # data keys and tokens pass through this process
            config = self.config(required=False)
            self._remote = RemoteKeys(
                self.server,
                self._token,
                realm=self.realm if self.realm_given else None,
                plugins=config.plugins_enabled,
                ca_cert=self.ca_cert,
                insecure_plain_http=self.insecure_plain_http,
            )
            self._warn_plain_http(self._remote.base_url)
        return self._remote

    def http_client(self, token: str | None) -> HttpClient:
        """A client of --server with ``token``, --ca-cert and --insecure-plain-http (for
        ``qauth --server``); warns once about plain http beyond loopback.

        :raises ValidationError: a bad URL or CA file, or plain http beyond loopback without
            --insecure-plain-http.
        """
        from qimem.http_client import HttpClient

        assert self.server is not None
        disable_core_dumps()  # passwords, tokens and client secrets pass through this process
        client = HttpClient(
            self.server,
            token,
            ca_cert=self.ca_cert,
            insecure_plain_http=self.insecure_plain_http,
        )
        self._warn_plain_http(client.base_url)
        return client

    def _warn_plain_http(self, url: str) -> None:
        from qimem.http_client import insecure_warning

        warning = insecure_warning(url)
        if warning and not self._warned_plain_http:
            self._warned_plain_http = True
            click.echo(warning, err=True)

    @property
    def backend(self) -> AppContext | RemoteKeys:
        """Where the file commands get their keys: the server with --server, else the store."""
        return self.remote if self.server else self.app

    def config(self, *, required: bool = True) -> Config:
        from qimem.config import load_config

        return load_config(
            self.config_path, store_url=self.store_url, required=required, plugins=self.plugins
        )

    @property
    def app(self) -> AppContext:
        if self.server and not self.local_ok:
            raise ValidationError(
                "this command works on the local store only, not with --server "
                "(with --server: encrypt, decrypt, rewrap, sign, verify, mac, verify-mac, random, "
                "keys create|list|show|rotate|public)"
            )
        if self._app is None:
            from qimem.app import build

            if freeze_gc:  # see qimem.cli.main: the app's modules are imported by now
                gc.freeze()
            disable_core_dumps()  # the root key and unwrapped keys live in this process
            self._app = build(self.config(), one_shot=self.one_shot)
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
        if self._remote is not None:
            self._remote.close()


pass_state = click.make_pass_decorator(CliState)

#: Set by :func:`qimem.cli.main` only (a ``qimem`` process, never an in-process CliRunner):
#: :attr:`CliState.app` calls ``gc.freeze()`` again once the service modules are imported.
freeze_gc = False

json_option = click.option("json_", "--json", is_flag=True, help="Output as JSON.")

# Global options shared by qimem, qauth, qimem-api and qauth-api.
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="QIMEM_CONFIG",
    help="Config file (default: the user config dir, or $QIMEM_HOME).",
)
store_option = click.option(
    "--store", "store_url", envvar="QIMEM_STORE", help="Key store URL (overrides config)."
)
# Client options next to --server, shared by qimem and qauth (docs/http.md "Clients").
ca_cert_option = click.option(
    "--ca-cert",
    "ca_cert",
    type=click.Path(dir_okay=False),
    envvar="QIMEM_CA_CERT",
    help="PEM file of the CA(s) to trust for an https --server, instead of the system store.",
)
insecure_plain_http_option = click.option(
    "--insecure-plain-http",
    is_flag=True,
    help="Allow an http:// --server that is not loopback (token and keys in the clear).",
)


def echo_json(data: Any) -> None:
    import json  # --json output only

    click.echo(json.dumps(data, indent=2, sort_keys=True))


def echo_result(json_: bool, data: Any, text: str) -> None:
    """A command's result: ``data`` as JSON with --json, else the one line ``text``."""
    if json_:
        echo_json(data)
    else:
        click.echo(text)


def echo_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
