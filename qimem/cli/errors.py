"""Click's usage errors in the house format.

Click prints a usage error as a block (``Usage: ...``, ``Try ...``, ``Error: ...``); qimem
prints every error as one line, ``PROG: error: MESSAGE``, so scripts and people read the
same shape whatever went wrong. A usage error keeps exit code 2 (click's, and the
convention for bad command lines) and adds one hint line naming the command's ``--help``.
"""

from __future__ import annotations

from typing import IO, Any

import click

__all__ = ["HouseUsageError", "house_usage_error"]


class HouseUsageError(click.ClickException):
    """A click usage error, shown as ``PROG: error: MESSAGE`` plus a ``--help`` hint."""

    exit_code = 2

    def __init__(self, prog: str, message: str, hint: str | None) -> None:
        super().__init__(message)
        self.prog = prog
        self.hint = hint

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{self.prog}: error: {self.message}", err=True)
        if self.hint:
            click.echo(self.hint, err=True)


def house_usage_error(prog: str, exc: click.UsageError) -> click.ClickException:
    """``exc`` converted to the house format; click's "no arguments: show the help" errors
    are returned unchanged (they print the help, which is what the user asked for)."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return exc
    message = exc.format_message()
    message = message[:1].lower() + message[1:] if message[:2] != message[:2].upper() else message
    ctx = exc.ctx
    hint = f"Try '{prog} --help' for help."
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        names = ctx.help_option_names
        hint = f"Try '{ctx.command_path} {names[-1] if names else '--help'}' for help."
    return HouseUsageError(prog, message.rstrip("."), hint)
