"""``qimem root status|rotate|split|recover``: the store's root of trust (docs/operations.md,
"Root of trust")."""

from __future__ import annotations

import click

from qimem.cli.context import CliState, echo_json, json_option, pass_state


@click.group("root")
def root() -> None:
    """Show, rotate and escrow the root key (root-key providers, root versions)."""


@root.command("status")
@json_option
@pass_state
def root_status(state: CliState, json_: bool) -> None:
    """Show the root versions, their providers and how many rows each wraps."""
    from qimem.root import rotation

    found = rotation.status(state.app)
    if json_:
        echo_json(found)
        return
    click.echo(f"active root version: {found['active']}  (store check {found['check']})")
    click.echo(f"configured provider: {found['configured_provider']}")
    for v in found["versions"]:
        where = ", ".join(f"{k}={val}" for k, val in sorted(v.get("settings", {}).items()))
        kind = "direct" if v.get("direct") else "wrapped"
        click.echo(
            f"  v{v['version']}  {v['state']:<8}  {v['provider']:<8} {kind:<7}  "
            f"rows={v['rows']}  {where}".rstrip()
        )


@root.command("rotate")
@click.option(
    "--create-key",
    is_flag=True,
    help="First have the configured provider make its root key (PKCS#11: a non-extractable "
    "AES-256 key in the token); for moving an existing store to a new token.",
)
@json_option
@pass_state
def root_rotate(state: CliState, create_key: bool, json_: bool) -> None:
    """Move every wrapped row to a new root version wrapped by the configured provider.

    Safe while servers run (they pick up the new version without a restart) and after a
    crash (run it again: it resumes). To move to another provider (file to PKCS#11), set
    [root_key] provider and its settings first, keeping the old file configured.
    """
    from qimem.root import rotation

    def say(line: str) -> None:
        click.echo(line, err=True)

    if create_key:
        from qimem.root.opening import create_configured_key

        create_configured_key(state.config(), lambda: state.app.registry)
        say("the configured provider made its root key")
    report = rotation.rotate(state.app, progress=say)
    if json_:
        echo_json(report.to_json())
    else:
        moved = sum(report.moved.values())
        retired = ", ".join(map(str, report.retired))
        click.echo(
            f"root version {report.active} is active; {moved} row(s) moved"
            + (f"; retired version(s) {retired}" if retired else "")
        )


from qimem.cli.root_escrow import register as _register_escrow  # noqa: E402

_register_escrow(root)  # qimem root split|recover
