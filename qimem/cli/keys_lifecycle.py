"""``qimem keys policy|disable|enable|destroy|schedule-deletion|cancel-deletion|purge``:
the lifecycle commands of the ``keys`` group (issue 7; docs/keys.md)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import click

from qimem import services
from qimem.cli.context import (
    CliState,
    echo_json,
    echo_result,
    echo_table,
    json_option,
    pass_state,
)
from qimem.cli.keys_group import cli_actor, keys
from qimem.errors import ValidationError
from qimem.keys import LineagePolicy
from qimem.services import lifecycle

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_period(text: str) -> int | None:
    """``90d``, ``12h``, ``30m``, ``3600s``, ``2w`` or plain seconds; ``never`` / ``0``: None."""
    text = text.strip().lower()
    if text in ("never", "0", "off", "none"):
        return None
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    if not number.isdigit() or int(number) < 1:
        raise ValidationError(
            f"invalid period {text!r}: use e.g. 90d, 12h, 30m, 3600s, 2w or 'never'"
        )
    return int(number) * (unit or 1)


def _limit(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise ValidationError(f"invalid usage limit {text!r}: a positive integer or 'default'")
    return int(text)


def _print_policy(state: CliState, ref: str, policy: LineagePolicy, json_: bool) -> None:
    details = services.show_key(state.app, ref, realm=state.realm)
    usage = lifecycle.key_usage(state.app, details.lineage_id, realm=state.realm)
    newest = details.versions[-1]
    default_limit = lifecycle.effective_usage_limit(
        state.app, newest, replace(policy, usage_limit=None)
    )
    if json_:
        echo_json(
            {
                "lineage_id": details.lineage_id,
                "name": details.name,
                "policy": policy.to_dict(),
                "effective_usage_limit": lifecycle.effective_usage_limit(state.app, newest, policy),
                "usage": {str(v.version): usage.get(v.key_id, 0) for v in details.versions},
            }
        )
        return
    click.echo(f"key:                    {details.name or details.lineage_id}")
    for name, value in policy.to_dict().items():
        if name == "usage_limit" and value is None:
            value = f"default ({default_limit})"
        click.echo(f"{name + ':':<24}{'-' if value is None else value}")
    click.echo("")
    rows = [
        [str(v.version), v.key_id, v.state.value, str(usage.get(v.key_id, 0))]
        for v in details.versions
    ]
    echo_table(rows, ["VERSION", "KEY_ID", "STATE", "ENCRYPTIONS"])


@keys.command("policy")
@click.argument("key")
@click.option("--min-decryption-version", type=int, help="Older versions refuse to decrypt.")
@click.option("--min-encryption-version", type=int, help="The active version must be >= N.")
@click.option(
    "--usage-limit",
    metavar="N|default",
    help="Messages one version encrypts before automatic rotation (at most the "
    "algorithm's bound: 2^32 for random 96-bit nonces).",
)
@click.option(
    "--auto-rotate-period",
    metavar="PERIOD|never",
    help="Rotate the active version at this age (90d, 12h, 30m, 3600s, 2w).",
)
@click.option(
    "--deletion-protection/--no-deletion-protection",
    default=None,
    help="Refuse destroying versions and scheduling deletion.",
)
@json_option
@pass_state
def keys_policy(
    state: CliState,
    key: str,
    min_decryption_version: int | None,
    min_encryption_version: int | None,
    usage_limit: str | None,
    auto_rotate_period: str | None,
    deletion_protection: bool | None,
    json_: bool,
) -> None:
    """Show or change KEY's lifecycle policy (and each version's usage count).

    Without options it only shows the policy.
    """
    changes: dict[str, Any] = {}
    if usage_limit is not None:
        changes["usage_limit"] = _limit(usage_limit)
    if auto_rotate_period is not None:
        changes["auto_rotate_seconds"] = parse_period(auto_rotate_period)
    if (
        changes
        or min_decryption_version is not None
        or min_encryption_version is not None
        or deletion_protection is not None
    ):
        policy = lifecycle.set_policy(
            state.app,
            key,
            min_decryption_version=min_decryption_version,
            min_encryption_version=min_encryption_version,
            deletion_protection=deletion_protection,
            realm=state.realm,
            actor=cli_actor(),
            **changes,
        )
    else:
        policy = lifecycle.get_policy(state.app, key, realm=state.realm)
    _print_policy(state, key, policy, json_)


def _state_command(name: str, func: Any, doc: str) -> None:
    @keys.command(name, help=doc)
    @click.argument("key")
    @click.option("--version", "version", type=int, help="Version number (KEY is then any ref).")
    @click.option("--yes", is_flag=True, hidden=name != "destroy", help="Do not ask to confirm.")
    @json_option
    @pass_state
    def command(state: CliState, key: str, version: int | None, yes: bool, json_: bool) -> None:
        if name == "destroy" and not yes:
            if not sys.stdin.isatty():
                raise ValidationError("destroying a version cannot be undone: add --yes")
            click.confirm(
                f"Destroy {key}{f' version {version}' if version else ''} for good?", abort=True
            )
        changed = func(state.app, key, version=version, realm=state.realm, actor=cli_actor())
        echo_result(
            json_,
            changed.to_dict(),
            f"{changed.key_id} (version {changed.version}): {changed.state.value}",
        )


_state_command(
    "disable",
    lifecycle.disable_version,
    "Disable one version of KEY: it refuses to decrypt until enabled. KEY is a key_id, or "
    "a name or lineage_id with --version N. The active version cannot be disabled (rotate "
    "first).",
)
_state_command(
    "enable", lifecycle.enable_version, "Enable a disabled version again (decrypt-only)."
)
_state_command(
    "destroy",
    lifecycle.destroy_version,
    "Destroy one version of KEY: its material is erased for good and what it encrypted can "
    "no longer be decrypted. Refused for the active version and under deletion protection.",
)


@keys.command("schedule-deletion")
@click.argument("key")
@click.option(
    "--days",
    type=int,
    default=lifecycle.DEFAULT_DELETION_DAYS,
    show_default=True,
    help="Waiting period (at least 7 days).",
)
@json_option
@pass_state
def keys_schedule_deletion(state: CliState, key: str, days: int, json_: bool) -> None:
    """Schedule KEY (all versions) for deletion after a waiting period.

    Until then the key refuses every operation; 'qimem keys cancel-deletion' restores it.
    """
    policy = lifecycle.schedule_deletion(
        state.app, key, days=days, realm=state.realm, actor=cli_actor()
    )
    assert policy.deletion_date is not None
    echo_result(
        json_, policy.to_dict(), f"{key} will be deleted on {policy.deletion_date.isoformat()}"
    )


@keys.command("cancel-deletion")
@click.argument("key")
@json_option
@pass_state
def keys_cancel_deletion(state: CliState, key: str, json_: bool) -> None:
    """Cancel KEY's scheduled deletion."""
    policy = lifecycle.cancel_deletion(state.app, key, realm=state.realm, actor=cli_actor())
    echo_result(json_, policy.to_dict(), f"{key}: deletion cancelled")


@keys.command("purge")
@json_option
@pass_state
def keys_purge(state: CliState, json_: bool) -> None:
    """Delete every key whose scheduled deletion date has passed (all realms)."""
    purged = lifecycle.purge_due_deletions(state.app, actor=cli_actor())
    if json_:
        echo_json({"deleted": purged})
    else:
        for lineage_id in purged:
            click.echo(lineage_id)
