"""The ``qimem keys`` click group and what its commands share: the subcommands register on
it from :mod:`qimem.cli.keys`, :mod:`qimem.cli.keys_lifecycle` and
:mod:`qimem.cli.keys_backup` (which import this module, never each other)."""

from __future__ import annotations

import getpass

import click


@click.group()
def keys() -> None:
    """Create, list, show and rotate keys; policies, states, deletion, backups."""


def cli_actor() -> str:
    """Who the audit log names for a CLI operation: the local OS user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@cli"
