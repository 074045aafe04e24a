"""The ``qimem`` command line: a thin layer over :mod:`qimem.services`.

Errors are converted in exactly one place (:class:`QimemGroup`): one line on stderr,
``qimem: error: ...``, and the exit code of the error class (see ``qimem.errors``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from qimem.cli.context import (
    CliState,
    ca_cert_option,
    config_option,
    insecure_plain_http_option,
    store_option,
)
from qimem.errors import QimemError

log = logging.getLogger("qimem.cli")


class CliError(click.ClickException):
    """A QimemError on its way out of click: one line, the error's own exit code."""

    def __init__(self, prog: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.prog = prog
        # click declares exit_code a class variable; this error carries its own.
        vars(self)["exit_code"] = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.prog}: error: {self.message}", err=True)


class QimemGroup(click.Group):
    """Root group: turns qimem errors, interrupts and surprises into one-line errors."""

    prog = "qimem"

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QimemError as exc:
            raise CliError(self.prog, exc.message, exc.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo(f"{self.prog}: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)
        except Exception as exc:
            if os.environ.get("QIMEM_DEBUG"):
                raise
            log.debug("unexpected error", exc_info=True)
            raise CliError(
                self.prog,
                f"internal error ({type(exc).__name__}); rerun with QIMEM_DEBUG=1 for details",
                1,
            ) from None


@click.group(cls=QimemGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@store_option
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    help="Enable an installed third-party plugin for this run (repeatable).",
)
@click.option("--realm", default="master", show_default=True, help="Realm the keys belong to.")
@click.option(
    "--server",
    envvar="QIMEM_SERVER",
    help="Get keys from this qimem server (https://host:port) instead of the local store.",
)
@click.option(
    "--token", envvar="QIMEM_TOKEN", help="Bearer access token for --server (env QIMEM_TOKEN)."
)
@ca_cert_option
@insecure_plain_http_option
@click.version_option(package_name="qimem")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: str | None,
    store_url: str | None,
    plugins: tuple[str, ...],
    realm: str,
    server: str | None,
    token: str | None,
    ca_cert: str | None,
    insecure_plain_http: bool,
) -> None:
    """qimem: versioned, rotatable encryption keys and batch encryption.

    Start with 'qimem init', then 'qimem keys create --name NAME' and
    'qimem encrypt --key NAME FILE'.
    """
    realm_given = ctx.get_parameter_source("realm") is not click.core.ParameterSource.DEFAULT
    ctx.obj = CliState(
        config_path,
        store_url,
        list(plugins),
        realm,
        server=server,
        token=token,
        realm_given=realm_given,
        ca_cert=ca_cert,
        insecure_plain_http=insecure_plain_http,
    )
    ctx.obj.local_ok = ctx.invoked_subcommand in ("serve", "init", "plugins")
    ctx.call_on_close(ctx.obj.close)


def _register_commands() -> None:
    from qimem.cli import crypto, init, keys

    cli.add_command(init.init)
    cli.add_command(keys.keys)
    cli.add_command(crypto.encrypt)
    cli.add_command(crypto.decrypt)
    cli.add_command(crypto.rewrap)
    cli.add_command(__import__("qimem.cli.serve", fromlist=["serve"]).serve)
    cli.add_command(__import__("qimem.cli.plugins", fromlist=["plugins"]).plugins)


_register_commands()


def main() -> None:
    """Console entry point of ``qimem``."""
    cli(prog_name="qimem")
