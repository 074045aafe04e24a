"""The ``qauth`` command line: realms, users, roles and tokens (DESIGN.md §7)."""

from __future__ import annotations

import click

from qimem.cli import QimemGroup
from qimem.cli.context import CliState


class QauthGroup(QimemGroup):
    prog = "qauth"


@click.group(cls=QauthGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="QIMEM_CONFIG")
@click.option("--store", "store_url", envvar="QIMEM_STORE")
@click.version_option(package_name="qimem")
@click.pass_context
def qauth(ctx: click.Context, config_path: str | None, store_url: str | None) -> None:
    """qauth: realms, users, roles and tokens for qimem."""
    ctx.obj = CliState(config_path, store_url, [], "master")
    ctx.call_on_close(ctx.obj.close)


def main() -> None:
    """Console entry point of ``qauth``."""
    qauth(prog_name="qauth")
