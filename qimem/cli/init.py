"""``qimem init``: config, root key and store, without ever destroying existing keys."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qimem.app import build
from qimem.cli.context import CliState, echo_json, json_option, pass_state
from qimem.config import Config, data_dir, default_config_path, load_config
from qimem.errors import ValidationError
from qimem.rootkey import write_root_key_file


@click.command()
@click.option(
    "--admin-password-stdin",
    is_flag=True,
    help="Read the password of the master realm's 'admin' user from stdin "
    "(default: generate one and show it once).",
)
@click.option(
    "--root-key-provider",
    metavar="NAME",
    help="Hold the root in this root-key provider (file, env, pkcs11, qimem or a plugin's) "
    "instead of a root key file; only for a new config.",
)
@click.option(
    "--root-key-setting",
    "root_key_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A setting of the provider ([root_key] table), repeatable; never a secret "
    "(the PKCS#11 PIN and the upstream token are read from files).",
)
@json_option
@pass_state
def init(
    state: CliState,
    admin_password_stdin: bool,
    root_key_provider: str | None,
    root_key_settings: tuple[str, ...],
    json_: bool,
) -> None:
    """Create the config file, a 0600 root key file and the key store (SQLite by default).

    Safe to rerun: an existing config, root key or store is kept and only brought up to date
    (migrations). With --config PATH, the root key and the SQLite store go beside PATH.
    SQLite store files are created 0600 (a new directory 0700); existing ones that group or
    others can access are made owner-only, and each change is reported.
    """
    config_path = state.config_path or default_config_path()
    created: list[str] = []
    provider, settings = _provider_options(root_key_provider, root_key_settings)
    create_key = settings.pop("create_key", False) is True
    if config_path.exists():
        if provider is not None:
            raise ValidationError(
                f"{config_path} exists: set [root_key] provider there and run "
                "'qimem root rotate' to move an existing store to another provider"
            )
        config = load_config(config_path, store_url=state.store_url)
    else:
        base = config_path.parent if state.config_path else data_dir()
        direct = provider in (None, "file")
        config = Config(
            store_url=state.store_url or f"sqlite:///{(base / 'qimem.db').resolve()}",
            root_key_file=(base / "root.key").resolve() if direct else None,
            root_key_provider=None if direct else provider,
            root_key_settings=settings,
            plugins_enabled=list(state.plugins),
            path=config_path,
        )
    admin_password = None
    if admin_password_stdin:
        admin_password = sys.stdin.readline().rstrip("\r\n") or None
        if admin_password is None:
            raise ValidationError("no admin password on standard input")
        # refused before anything is made
        from qimem.identity.settings import settings_from_mapping

        identity_settings = settings_from_mapping(config.identity, str(config_path))
        policy = identity_settings.password_policy.for_realm("master")
        policy.check(admin_password, "admin", "master")
    root_file = config.root_key_file
    new_files: list[Path] = []
    try:
        if root_file is not None and not Path(root_file).exists() and not config.root_key_b64:
            write_root_key_file(Path(root_file))
            new_files.append(Path(root_file))
            created.append("root_key")
        if create_key:
            from qimem.registry import Registry, make_plugin_manager
            from qimem.root.opening import create_configured_key

            registry = Registry(make_plugin_manager(config.plugins_enabled))
            create_configured_key(config, lambda: registry)
            created.append("root_key")
        if not config_path.exists():
            config.write(config_path)
            new_files.append(config_path)
            created.append("config")
        # Imported here: the identity layer is heavy, and --help should stay fast.
        from qimem.services import identity as identity_services
        from qimem.sql import secure_sqlite_files, sqlite_database

        database = sqlite_database(config.store_url)
        fixed = secure_sqlite_files(database) if database is not None else []
        app = build(config)
        try:
            app.store.ping()  # opening the store applies pending migrations
            # Realm 'master' and user 'admin', unless they exist (never touches existing ones).
            generated = identity_services.bootstrap(app, admin_password)
        finally:
            identity_services.close_identity(app)
            app.close()
    except BaseException:
        # A failed init leaves nothing behind; above all not a fresh root key next to a
        # store whose keys are wrapped under another one (the user may still restore it).
        for path in new_files:
            path.unlink(missing_ok=True)
        raise
    result: dict[str, Any] = {
        "config": str(config_path),
        "root_key_file": str(root_file) if root_file else None,
        "root_key_provider": config.root_key_provider or ("env" if config.root_key_b64 else "file"),
        "store": _display_url(config.store_url),
        "created": created,
    }
    if fixed:
        result["fixed_permissions"] = [
            {"path": str(path), "old_mode": f"{mode:04o}", "mode": f"{mode & 0o700:04o}"}
            for path, mode in fixed
        ]
    if generated:
        result["admin_password"] = generated
    if json_:
        echo_json(result)
        return
    verb = "initialized" if created else "already initialized; store is up to date"
    click.echo(f"qimem {verb}")
    click.echo(f"  config:   {result['config']}")
    if root_file is not None:
        click.echo(f"  root key: {result['root_key_file']}")
    else:
        click.echo(f"  root key: held by the {result['root_key_provider']} provider")
    click.echo(f"  store:    {result['store']}")
    for path, mode in fixed:
        click.echo(
            f"  fixed permissions of {path}: {mode:04o} -> {mode & 0o700:04o} "
            "(group or others could access it)"
        )
    if generated:
        click.echo(f"  admin password for realm master (shown once): {generated}")


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://…"


def _provider_options(
    name: str | None, pairs: tuple[str, ...]
) -> tuple[str | None, dict[str, object]]:
    """``--root-key-provider`` and ``--root-key-setting KEY=VALUE`` as config values
    (``true``/``false`` and integers are typed, as TOML would)."""
    from qimem.root.provider import PROVIDER_NAME

    if name is not None and not PROVIDER_NAME.match(name):
        raise ValidationError(f"--root-key-provider {name!r} is not a provider name")
    if pairs and name is None:
        raise ValidationError("--root-key-setting needs --root-key-provider")
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValidationError(f"--root-key-setting {key!r}: use KEY=VALUE")
        if key in ("provider", "file") or key in settings:
            raise ValidationError(f"--root-key-setting {key!r} is not allowed or repeated")
        typed: object = value
        if value in ("true", "false"):
            typed = value == "true"
        elif value.isdigit() and len(value) < 10:
            typed = int(value)
        settings[key] = typed
    return name, settings
