"""The CLI's lazy application context and output helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qimem.app import AppContext
from qimem.config import Config, load_config


class CliState:
    """Global options, and an AppContext opened on first use (so --help never opens a store)."""

    def __init__(
        self, config_path: str | None, store_url: str | None, plugins: list[str], realm: str
    ) -> None:
        self.config_path = Path(config_path) if config_path else None
        self.store_url = store_url
        self.plugins = plugins
        self.realm = realm
        self._app: AppContext | None = None

    def config(self, *, required: bool = True) -> Config:
        config = load_config(self.config_path, store_url=self.store_url, required=required)
        config.plugins_enabled = list(dict.fromkeys(config.plugins_enabled + self.plugins))
        return config

    @property
    def app(self) -> AppContext:
        if self._app is None:
            self._app = AppContext(self.config())
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


pass_state = click.make_pass_decorator(CliState)

json_option = click.option("json_", "--json", is_flag=True, help="Output as JSON.")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def echo_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
