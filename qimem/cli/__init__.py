"""The ``qimem`` command line: a thin layer over :mod:`qimem.services`.

Errors are converted in exactly one place (:class:`QimemGroup`): one line on stderr,
``qimem: error: ...``, and the exit code of the error class (see ``qimem.errors``).

Subcommands load lazily (Flask's pattern): :data:`COMMANDS` maps each name to the
``"module:attr"`` of its click command and its one-line help, so ``qimem --version`` and
``qimem --help`` import no service code, and ``qimem encrypt`` imports only what encrypt
uses.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import click

from qimem import __version__
from qimem.cli import context
from qimem.cli.context import (
    CliError,
    CliState,
    ca_cert_option,
    config_option,
    insecure_plain_http_option,
    store_option,
)
from qimem.cli.errors import house_usage_error
from qimem.errors import QimemError
from qimem.lazylog import get_logger

log = get_logger("qimem.cli")


class QimemGroup(click.Group):
    """Root group: turns qimem errors, interrupts and surprises into one-line errors."""

    prog = "qimem"

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:  # the root's own options
            raise house_usage_error(self.prog, exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QimemError as exc:
            raise CliError(self.prog, exc.message, exc.exit_code) from None
        except click.UsageError as exc:  # a subcommand's arguments
            raise house_usage_error(self.prog, exc) from None
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


#: Subcommand name → (``"module:attr"`` of the click command, its one-line help for
#: ``qimem --help``; tests/test_cli_imports.py checks it matches the command's own).
COMMANDS: dict[str, tuple[str, str]] = {
    "decrypt": ("qimem.cli.crypto:decrypt", "Decrypt FILES and directories (or standard..."),
    "encrypt": ("qimem.cli.crypto:encrypt", "Encrypt FILES and directories (or standard..."),
    "hash": ("qimem.cli.utility:hash_", "Print the SHA-2 or SHA-3 digest of FILE..."),
    "init": ("qimem.cli.init:init", "Create the config file, a 0600 root key..."),
    "keys": ("qimem.cli.keys:keys", "Create, list, show and rotate keys;..."),
    "mac": ("qimem.cli.sign:mac", "Compute the MAC tag of a file or standard..."),
    "plugins": ("qimem.cli.plugins:plugins", "List, inspect, enable, disable, register..."),
    "random": ("qimem.cli.utility:random_", "Print N random bytes from the operating..."),
    "rewrap": ("qimem.cli.crypto:rewrap", "Re-seal the data key of encrypted FILES..."),
    "root": ("qimem.cli.root:root", "Show, rotate and escrow the root key..."),
    "serve": ("qimem.cli.serve:serve", "Run the HTTP server (security API and..."),
    "sign": ("qimem.cli.sign:sign", "Sign a file or standard input."),
    "verify": ("qimem.cli.sign:verify", "Verify a signature: prints valid or invalid."),
    "verify-mac": ("qimem.cli.sign:verify_mac", "Verify a MAC tag: prints valid or invalid."),
}


class LazyGroup(QimemGroup):
    """A :class:`QimemGroup` whose subcommands are imported when one is invoked."""

    def __init__(self, *args: Any, lazy_commands: dict[str, tuple[str, str]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            import importlib

            module_name, _, attr = self.lazy_commands[cmd_name][0].partition(":")
            self.add_command(getattr(importlib.import_module(module_name), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table's help lines (importing no command)."""
        rows = [
            (name, self.lazy_commands[name][1])
            if name in self.lazy_commands and name not in self.commands
            else (name, self.commands[name].get_short_help_str(45))
            for name in self.list_commands(ctx)
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
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
@click.version_option(version=__version__, package_name="qimem")
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


def main() -> None:
    """Console entry point of ``qimem``."""
    # What is imported so far (click, qimem.cli) lives as long as the process: gc.freeze
    # moves it out of the cyclic collector's reach, so the collections that the command's
    # own imports trigger, and the one at exit, don't walk it again (~5-8 ms of a 3-byte
    # ``qimem encrypt``, issue 13). At worst a few cycles left over by those imports stay in
    # memory until exit; everything the command itself creates is collected as before.
    gc.freeze()
    context.freeze_gc = True  # and again once the command has imported the service modules
    cli(prog_name="qimem")
