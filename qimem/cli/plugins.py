"""``qimem plugins list|show|enable|disable|register|remove``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from qimem import manifest
from qimem.cli.context import (
    CliState,
    echo_json,
    echo_result,
    echo_table,
    json_option,
    pass_state,
)

if TYPE_CHECKING:
    from qimem.services.plugins import PluginInfo


def _service() -> Any:
    """The service module, imported on use (it loads SQLAlchemy; --help must stay light)."""
    from qimem.services import plugins

    return plugins


_HEADERS = ["NAME", "VERSION", "KIND", "INSTALLED", "ENABLED", "LOADED", "COMPATIBLE", "REASON"]


def _yes(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def _row(info: PluginInfo) -> list[str]:
    version = (info.manifest or info.registered_manifest or {}).get("version", "-")
    kind = "built-in" if info.builtin else ("registered" if info.registered else "third-party")
    return [
        info.name,
        str(version),
        kind,
        _yes(info.installed),
        _yes(info.enabled),
        _yes(info.loaded),
        _yes(info.compatible),
        info.reason or "",
    ]


def _details(info: PluginInfo) -> None:
    data = info.manifest or info.registered_manifest or {}
    lines = [
        ("name", info.name),
        ("version", data.get("version", "-")),
        ("description", data.get("description", "-")),
        ("qimem_api", data.get("qimem_api", "-")),
        ("homepage", data.get("homepage", "-")),
        ("built-in", _yes(info.builtin)),
        ("installed", _yes(info.installed)),
        ("enabled", _yes(info.enabled)),
        ("loaded", _yes(info.loaded)),
        ("compatible", _yes(info.compatible)),
        ("registered", _yes(info.registered)),
        ("module", info.module or "-"),
        ("distribution", info.distribution or "-"),
    ]
    provides = data.get("provides") if isinstance(data.get("provides"), dict) else {}
    for kind in manifest.PROVIDES_KINDS:
        names = provides.get(kind) if provides else None
        if names:
            lines.append((kind, ", ".join(map(str, names))))
    if info.reason:
        lines.append(("reason", info.reason))
    for problem in info.problems:
        lines.append(("problem", problem))
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        click.echo(f"{label.ljust(width)}  {value}")


@click.group()
def plugins() -> None:
    """List, inspect, enable, disable, register and remove plugins.

    Enabled plugins are recorded in the config file ([plugins] enabled); registered
    manifests are kept in the key store, shared by every process using it.
    """


@plugins.command("list")
@json_option
@pass_state
def plugins_list(state: CliState, json_: bool) -> None:
    """List built-in, installed, enabled and registered plugins, and why one is not loaded."""
    found = _service().list_plugins(state.app)
    if json_:
        echo_json([info.to_dict() for info in found])
    else:
        echo_table([_row(info) for info in found], _HEADERS)


@plugins.command("show")
@click.argument("name")
@json_option
@pass_state
def plugins_show(state: CliState, name: str, json_: bool) -> None:
    """Show one plugin: its manifest, state and problems."""
    info = _service().show_plugin(state.app, name)
    if json_:
        echo_json(info.to_dict())
    else:
        _details(info)


@plugins.command("enable")
@click.argument("name")
@json_option
@pass_state
def plugins_enable(state: CliState, name: str, json_: bool) -> None:
    """Enable an installed plugin in the config file, after checking that it loads."""
    info = _service().enable_plugin(state.app, name)
    echo_result(json_, info.to_dict(), f"enabled {info.name}")


@plugins.command("disable")
@click.argument("name")
@json_option
@pass_state
def plugins_disable(state: CliState, name: str, json_: bool) -> None:
    """Remove a plugin from the config file's enabled plugins (no-op when not enabled)."""
    info = _service().disable_plugin(state.app, name)
    echo_result(
        json_,
        info.to_dict() if info is not None else {"name": name, "enabled": False},
        f"disabled {name}",
    )


@plugins.command("register")
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False))
@json_option
@pass_state
def plugins_register(state: CliState, manifest_path: str, json_: bool) -> None:
    """Validate a manifest file (TOML, or JSON when it ends in .json) and record it in the
    store."""
    found = manifest.load(manifest_path)
    info = _service().register_manifest(state.app, found)
    echo_result(json_, info.to_dict(), f"registered {info.name} {found.version}")


@plugins.command("remove")
@click.argument("name")
@json_option
@pass_state
def plugins_remove(state: CliState, name: str, json_: bool) -> None:
    """Delete a registered manifest from the store (the package stays installed)."""
    _service().remove_manifest(state.app, name)
    echo_result(json_, {"name": name, "removed": True}, f"removed {name}")
