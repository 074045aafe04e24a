"""Online root rotation (``qimem root rotate``, ``POST /v1/root/rotate``) and the root's
status (``qimem root status``).

A rotation is resumable and crash-safe by construction:

1. **A new version, in one compare-and-set.** A fresh key-wrapping key (KWK) is wrapped by
   the configured root-key provider; the keyring document gains it as ``active`` (the
   previous active version becomes ``draining``) and the store's derive base is re-sealed
   under it, in one compare-and-set of the keyring row. Before that commit nothing changed;
   after it, every process wraps new rows under the new version within
   :data:`qimem.rootkey.REFRESH_SECONDS` and opens either version.
2. **Rows move in small transactions.** Each wrapped row (key material, token signing keys,
   OTP secrets, realms' sealed login settings) is unwrapped and re-wrapped under the active
   version, and written back only if it is still the blob that was read (compare-and-set),
   a batch per transaction. A row is under the old or the new version, never neither.
3. **Passes until none is left**, then the draining versions are marked ``retired`` (a
   retired version is no longer opened at startup, so its provider may go away).

A SIGKILL anywhere leaves a keyring with a draining version: the next ``qimem root
rotate`` resumes the move instead of making another version. Migrating between providers
(file to PKCS#11) is a rotation whose configured provider is the new one.

What the rows hold is unchanged (the same key versions, signing keys and secrets), and so
is the store's derive base, so derived values (MACs of authorization data, refresh-token
hashes, sealed client secrets) stay valid. Audit spill files hold no wrapped data (audit
records carry no secrets), so there is nothing in them to move.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from qimem.errors import ConfigError, ConflictError, DecryptionError
from qimem.root import keyring as kr
from qimem.root.columns import RootRows, WrappedColumn
from qimem.rootkey import REFRESH_SECONDS, blob_root_version

if TYPE_CHECKING:
    import sqlalchemy as sa

    from qimem.app import AppContext
    from qimem.rootkey import KeyWrapper

#: Rows re-wrapped per transaction.
BATCH = 100
#: How long a rotation waits, after the last pass that moved rows, before it retires the
#: old versions: every process re-reads the keyring at least this often before it wraps.
SETTLE_SECONDS = REFRESH_SECONDS * 1.5

Progress = Callable[[str], None]


def root_rows(app: AppContext) -> RootRows | None:
    """Where the store's wrapped rows are (``Backend(root_rows=...)``: the SQL stores), or
    ``None``: a store root rotation cannot reach."""
    found = app.backend.root_rows
    return found() if found is not None else None


def _rows_of(app: AppContext) -> RootRows:
    rows = root_rows(app)
    if rows is None:
        raise ConfigError(
            f"the {app.backend.scheme!r} key store keeps its rows where root rotation cannot "
            "reach them; root rotation needs an SQL store (SQLite or PostgreSQL)"
        )
    return rows


@dataclass
class RotationReport:
    """What a rotation did."""

    active: int
    created: bool
    moved: dict[str, int] = field(default_factory=dict)
    retired: list[int] = field(default_factory=list)
    passes: int = 0
    #: Rows that did not unwrap (``"<what> <key>"``): left under their old version, which
    #: is therefore not retired.
    unopenable: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "created": self.created,
            "moved": dict(self.moved),
            "retired": list(self.retired),
            "passes": self.passes,
            "unopenable": list(self.unopenable),
        }


def _wrapper(app: AppContext) -> KeyWrapper:
    wrapper = app.wrapper
    app.backend  # noqa: B018 - the store attaches its keyring when it opens
    if wrapper is None or wrapper.slot is None:
        raise ConfigError("no root configured for this store (run 'qimem init')")
    wrapper.refresh()
    return wrapper


def _legacy_keyring(app: AppContext, wrapper: KeyWrapper) -> kr.Keyring:
    """The keyring of a store that had none: version 1 is the root key file or variable."""
    from qimem.root.opening import RootOpener

    opener = RootOpener(app.config, lambda: app.registry)
    if app.config.root_key_b64:
        provider = opener.build("env", {})
    elif app.config.root_key_file is not None:
        provider = opener.build("file", {"file": str(app.config.root_key_file)})
    else:  # pragma: no cover - a store without keyring was opened with a direct key
        raise ConfigError("no root key file or QIMEM_ROOT_KEY for this store's version 1")
    record = kr.direct_record(provider, wrapper.check_value)
    provider.close()
    return kr.Keyring(
        id=str(uuid.uuid4()),
        check=wrapper.check_value,
        active=1,
        derive_version=1,
        derive_blob=b"",
        versions=(record,),
    )


def _new_version(app: AppContext, wrapper: KeyWrapper, progress: Progress) -> None:
    """Add a version wrapped by the configured provider and make it active (one CAS)."""
    from qimem.root.opening import RootOpener

    slot = wrapper.slot
    # What the wrapper verified (rotate() refreshed it just now); the compare-and-set
    # below refuses it if another process changed the keyring since.
    old_text = wrapper.document
    keyring = wrapper.keyring if old_text is not None else _legacy_keyring(app, wrapper)
    opener = RootOpener(app.config, lambda: app.registry)
    _ensure_file_root(app)
    provider = opener.configured()
    number = max(r.version for r in keyring.versions) + 1
    try:
        record, kwk = kr.new_wrapped_version(keyring.id, number, provider)
    finally:
        provider.close()
    try:
        sealed = wrapper.seal_derive_base(keyring.id, keyring.check, kwk)
        versions = tuple(
            replace(r, state=kr.DRAINING) if r.state == kr.ACTIVE else r for r in keyring.versions
        )
        updated = replace(
            keyring,
            active=number,
            derive_version=number,
            derive_blob=sealed,
            versions=(*versions, replace(record, state=kr.ACTIVE)),
        )
        document = wrapper.sign(updated, {number: kwk})  # tagged by every version held
    finally:
        kwk[:] = bytes(len(kwk))
    if not slot.replace(old_text, document):
        raise ConflictError(
            "another process changed the root keyring during the rotation; run it again",
            code="root_keyring_changed",
        )
    progress(f"root version {number} ({record.provider}) is active")
    wrapper.refresh()


def _ensure_file_root(app: AppContext) -> None:
    """A file provider whose configured key file does not exist yet gets a new one (how a
    rotation replaces the root key file: point ``[root_key] file`` at a new path)."""
    from pathlib import Path

    from qimem.root.opening import configured_provider_name
    from qimem.rootkey import write_root_key_file

    if configured_provider_name(app.config) != "file" or app.config.root_key_settings:
        return
    path = app.config.root_key_file
    if path is not None and not Path(path).exists():
        write_root_key_file(Path(path))[:] = bytes(32)


def _rows(
    conn: sa.Connection, table: sa.Table, column: WrappedColumn, after: tuple[Any, ...] | None
) -> list[Any]:
    import sqlalchemy as sa

    keys = [table.c[k] for k in column.key]
    query = sa.select(table).order_by(*keys).limit(BATCH)
    if after is not None:
        query = query.where(sa.tuple_(*keys) > sa.tuple_(*after))
    return list(conn.execute(query))


def _table(engine: sa.Engine, column: WrappedColumn) -> sa.Table:
    """``column``'s table, reflected once per pass (not per batch: a reflection is several
    catalog queries, and a pass over many rows has many batches)."""
    import sqlalchemy as sa

    from qimem.sql import translate_errors

    with translate_errors(), engine.connect() as conn:
        return sa.Table(column.table, sa.MetaData(), autoload_with=conn)


def _move_column(
    engine: sa.Engine,
    wrapper: KeyWrapper,
    column: WrappedColumn,
    progress: Progress,
    unopenable: set[tuple[str, tuple[Any, ...]]] | None = None,
) -> int:
    """Re-wrap every row of ``column`` not under the active version; the number moved.
    Rows that do not unwrap are left as they are and added to ``unopenable``."""
    import sqlalchemy as sa

    from qimem.sql import translate_errors

    moved = 0
    after: tuple[Any, ...] | None = None
    table = _table(engine, column)
    while True:
        with translate_errors(), engine.begin() as conn:
            rows = _rows(conn, table, column, after)
            if not rows:
                return moved
            after = tuple(getattr(rows[-1], k) for k in column.key)
            batch = 0
            for row in rows:
                blob = getattr(row, column.blob)
                if blob is None or blob_root_version(bytes(blob)) in (0, wrapper.active_version):
                    continue
                try:
                    new = wrapper.rewrap(bytes(blob), column.context(row))
                except DecryptionError:
                    # A damaged or tampered row must not stop the rotation of every other
                    # row (nor keep the store on a root the operator wants to leave): it
                    # stays under its version, which is then not retired; say which row.
                    if unopenable is not None:
                        unopenable.add((column.what, tuple(getattr(row, k) for k in column.key)))
                    continue
                if new is None:
                    continue
                where = [table.c[k] == getattr(row, k) for k in column.key]
                done = conn.execute(
                    sa.update(table)
                    .where(*where, table.c[column.blob] == bytes(blob))
                    .values({column.blob: new})
                )
                batch += done.rowcount
        if batch:
            moved += batch
            progress(f"moved {batch} {column.what}")


def _move_all(
    engine: sa.Engine,
    wrapper: KeyWrapper,
    columns: list[WrappedColumn],
    report: RotationReport,
    progress: Progress,
) -> int:
    total = 0
    unopenable: set[tuple[str, tuple[Any, ...]]] = set()
    for column in columns:
        count = _move_column(engine, wrapper, column, progress, unopenable)
        report.moved[column.what] = report.moved.get(column.what, 0) + count
        total += count
    report.passes += 1
    for what, key in sorted(unopenable, key=repr):
        label = f"{what} {'/'.join(map(str, key))}"
        if label not in report.unopenable:
            report.unopenable.append(label)
            progress(f"{label}: does not unwrap (damaged or tampered); left where it is")
    return total


def rotate(
    app: AppContext, *, progress: Progress | None = None, settle: float = SETTLE_SECONDS
) -> RotationReport:
    """Rotate the store's root: a new version wrapped by the configured provider (or,
    after an interrupted rotation, the same one), every wrapped row moved to it, the old
    versions retired. Safe to run while servers serve, and to rerun after a crash.

    :raises ConfigError: the store cannot rotate, or a provider cannot be opened.
    :raises ConflictError: another rotation changed the keyring meanwhile.
    """
    say = progress or (lambda _line: None)
    rows = _rows_of(app)
    engine, columns = rows.engine, rows.columns
    wrapper = _wrapper(app)
    keyring = wrapper.keyring
    resuming = keyring is not None and any(r.state == kr.DRAINING for r in keyring.versions)
    if resuming:
        say(f"resuming the rotation to root version {wrapper.active_version}")
    else:
        _new_version(app, wrapper, say)
    report = RotationReport(active=wrapper.active_version, created=not resuming)
    _move_all(engine, wrapper, columns, report, say)
    while True:  # rows a process wrapped under the old version before it saw the new one
        time.sleep(settle)
        wrapper.refresh()
        if _move_all(engine, wrapper, columns, report, say) == 0:
            break
    report.retired = _retire(wrapper, engine, columns, say)
    return report


def _retire(
    wrapper: KeyWrapper, engine: sa.Engine, columns: list[WrappedColumn], progress: Progress
) -> list[int]:
    """Mark the draining versions no row is wrapped under any more as retired."""
    for _ in range(5):
        wrapper.refresh()
        text, keyring = wrapper.document, wrapper.keyring  # read and verified once
        counts = count_rows(engine, columns)
        done = [
            r.version
            for r in keyring.versions
            if r.state == kr.DRAINING and not counts.get(r.version)
        ]
        if not done:
            return []
        retired = keyring.with_states(dict.fromkeys(done, kr.RETIRED))
        if wrapper.slot.replace(text, wrapper.sign(retired)):
            progress("retired root version(s) " + ", ".join(map(str, done)))
            wrapper.refresh()
            return done
    raise ConflictError(
        "the root keyring kept changing; run 'qimem root rotate' again",
        code="root_keyring_changed",
    )


def count_rows(engine: sa.Engine, columns: list[WrappedColumn]) -> dict[int, int]:
    """How many wrapped rows each root version wraps."""
    from qimem.sql import translate_errors

    counts: dict[int, int] = {}
    with translate_errors(), engine.connect() as conn:
        for column in columns:
            for version in _versions_of(conn, column):
                counts[version] = counts.get(version, 0) + 1
    return counts


def _versions_of(conn: sa.Connection, column: WrappedColumn) -> Iterator[int]:
    import sqlalchemy as sa

    table = sa.Table(column.table, sa.MetaData(), autoload_with=conn)
    for (blob,) in conn.execute(sa.select(table.c[column.blob])):
        version = blob_root_version(bytes(blob)) if blob is not None else 0
        if version:
            yield version


def status(app: AppContext) -> dict[str, Any]:
    """The root's versions (provider, settings, state, check value) and how many rows
    each wraps (``qimem root status``)."""
    wrapper = _wrapper(app)
    rows = root_rows(app)
    counts = count_rows(rows.engine, rows.columns) if rows is not None else {}
    keyring = wrapper.keyring
    if keyring is None:
        from qimem.root.opening import configured_provider_name

        return {
            "keyring": False,
            "active": 1,
            "check": wrapper.check_value,
            "versions": [
                {
                    "version": 1,
                    "provider": "env" if app.config.root_key_b64 else "file",
                    "direct": True,
                    "state": kr.ACTIVE,
                    "rows": counts.get(1, 0),
                }
            ],
            "configured_provider": configured_provider_name(app.config),
        }
    from qimem.root.opening import configured_provider_name

    return {
        "keyring": True,
        "active": keyring.active,
        "check": keyring.check,
        "versions": [
            {
                "version": r.version,
                "provider": r.provider,
                "settings": r.settings,
                "direct": r.direct,
                "state": r.state,
                "created": r.created,
                "check": r.check,
                "rows": counts.get(r.version, 0),
            }
            for r in keyring.versions
        ],
        "configured_provider": configured_provider_name(app.config),
    }
