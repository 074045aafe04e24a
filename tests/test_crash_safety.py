"""Crash safety: SIGKILL at seeded random points, on SQLite and PostgreSQL stores.

Four scenarios, each a loop of runs; every run starts a real child process, SIGKILLs its
whole process group at a kill point drawn from ``random.Random(seed/scenario/store/run)``
(counted in the child's operations: printed SQL statements, COMMITs and results, or files
seen in a directory, then a random 0-3 ms delay), and checks the invariants afterwards:

* rotation (python child on the service layer, rotating a key and encrypting after each
  rotation): versions exactly 1..N, one active (the last), no duplicate version or key_id,
  every rotation reported before the kill is there and at most the one in flight besides,
  every ciphertext printed before the kill decrypts, the store rotates again.
* batch encryption (``qimem encrypt --jobs 2`` over 160 small files and one 8.1 MiB file
  split across workers): every visible output is complete and decrypts to its input, the
  only other entries are hidden temp files of the killed run (``.NAME.qimem.qimem-tmp-PID-
  HEX``: never ``*.qimem``, so never taken for an output), inputs are byte-identical, and
  the next run removes the dead run's temp files.
* rewrap (``qimem rewrap`` over 40 files after a rotation): each file is either its old
  bytes or the new header (version 2) over the same segment bytes, and always decrypts.
* migrations (python child running :func:`qimem.sql.migrate` on a populated store at an
  older Alembic revision): the schema is exactly the old revision's or HEAD's (never half
  migrated, no leftover batch-copy table), the upgrade reruns, every key decrypts the
  ciphertexts made before, and the store rotates again.

Seeds and run counts come from ``QIMEM_CRASH_SEED`` / ``QIMEM_CRASH_RUNS`` (see
tests/crash_harness.py); failure messages start with the line that reproduces the run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import shutil
import sqlite3
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import make_app
from crash_harness import (
    Child,
    Stats,
    describe,
    poll_until,
    python_child,
    reproducible,
    run_rng,
    runs,
    sleep_precise,
)
from migration_helpers import alembic, downgrade

from qimem import batch, fileio, stream
from qimem.builtin_plugins.sql.migrations import HEAD
from qimem.services import files as file_services
from qimem.services.crypto import decrypt, encrypt
from qimem.services.keys import create_key, rotate_key, show_key
from qimem.sql import create_engine, current_revision, migrate, normalize_url

pytestmark = pytest.mark.slow

QIMEM = str(Path(sys.executable).with_name("qimem"))
OLDER_REVISIONS = ("0001", "0002", "0003")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """``(name, url)`` of an empty SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path / 'store.db'}"
    return "postgres", str(request.getfixturevalue("postgres_url"))


def cli_env(home: Path, url: str, root_key_b64: str) -> dict[str, str]:
    """The environment of a ``qimem`` child: the store and root key from the environment."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(QIMEM_HOME=str(home), QIMEM_STORE=url, QIMEM_ROOT_KEY=root_key_b64)
    return env


class _Digest:
    """A write-only file object that hashes what is written to it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        return len(data)


def decrypt_digest(app: object, path: Path) -> str:
    """SHA-256 of ``path``'s plaintext (raises if it does not decrypt completely)."""
    sink = _Digest()
    with path.open("rb") as fh:
        file_services.decrypt_stream(app, fh, sink)  # type: ignore[arg-type]
    return sink.hash.hexdigest()


def temps_in(directory: Path) -> list[str]:
    """Our temp files in ``directory`` (hidden ``.NAME.qimem-tmp-PID-HEX``)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if fileio.temp_owner(p.name) is not None)


def assert_temps_are_the_dead_runs(directory: Path, pid: int) -> list[str]:
    """Every temp file left belongs to the killed run and can't be taken for an output."""
    temps = temps_in(directory)
    for name in temps:
        assert fileio.temp_owner(name) == pid, f"temp {name} not of the killed pid {pid}"
        assert name.startswith(".") and not name.endswith(batch.SUFFIX), name
    return temps


# ------------------------------------------------------------------------ rotation

_ROTATE_CHILD = textwrap.dedent(
    """
    import base64, json, sys
    import sqlalchemy as sa
    from qimem.app import AppContext
    from qimem.config import Config
    from qimem.services.crypto import encrypt
    from qimem.services.keys import rotate_key

    job = json.loads(sys.argv[1])

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    # One line per SQL statement and per COMMIT: the parent's kill points.
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", lambda *a: say("S"))
    sa.event.listen(sa.engine.Engine, "commit", lambda *a: say("C"))
    config = Config(store_url=job["url"], root_key_b64=job["root_key"], cache_ttl=0)
    app = AppContext(config).open()
    app.store
    say("ready")
    aad = job["tag"].encode()
    i = 0
    while True:
        say(f"R {i}")
        v = rotate_key(app, "r")
        say(f"V {v.version} {v.key_id}")
        sealed = encrypt(app, "r", f"{job['tag']} {i} {v.version}".encode(), aad=aad)
        say(f"E {sealed.version} {sealed.key_id} {base64.b64encode(sealed.envelope).decode()}")
        i += 1
    """
)


def _rotation_kill_point(lines: list[str]) -> tuple[str, bool]:
    """Where the child was when killed (from the last line it printed) and whether a
    rotation was in flight (started, not reported)."""
    phase, point, in_flight = "startup", "startup", False
    for line in lines:
        kind = line[:1]
        if kind == "R":
            phase, point, in_flight = "rotate", "rotate:statements", True
        elif kind == "V":
            phase, point, in_flight = "encrypt", "encrypt", False
        elif kind == "E":
            phase, point = "idle", "between-operations"
        elif kind == "C" and phase == "rotate":
            point = "rotate:commit" if point == "rotate:statements" else "rotate:after-commit"
        elif kind == "S" and phase == "rotate" and point != "rotate:statements":
            point = "rotate:after-commit"
    return point, in_flight


def test_rotation_killed(store: tuple[str, str], root_key_b64: str) -> None:
    """A child rotates and encrypts in a loop and is SIGKILLed at a random statement."""
    name, url = store
    app = make_app(url, root_key_b64, cache_ttl=0)
    try:
        create_key(app, name="r")
    finally:
        app.close()
    expected = 1  # versions known to exist
    sealed: list[tuple[bytes, bytes, bytes]] = []  # (plaintext, aad, envelope)
    stats = Stats("rotation", name)
    try:
        for index in range(runs(6)):
            rng = run_rng("rotation", name, index)
            # Two thirds: after the n-th line; one third: right at the COMMIT of the k-th
            # rotation (the first COMMIT after its "R" line).
            at_commit = rng.random() < 1 / 3
            kill_after = rng.randint(1, 8) if at_commit else rng.randint(1, 240)
            delay = rng.uniform(0, 0.001 if at_commit else 0.002)
            mode = "commit-of-rotation" if at_commit else "lines"
            context = describe("rotation", name, index, **{mode: kill_after}, delay=f"{delay:.6f}")
            tag = f"run{index}"
            job = json.dumps({"url": url, "root_key": root_key_b64, "tag": tag})
            child = python_child(_ROTATE_CHILD, job)
            try:
                child.wait_ready()
                if at_commit:
                    _read_to_rotation_commit(child, kill_after)
                else:
                    child.read_lines(kill_after)
                sleep_precise(delay)
                child.kill()
                rc, err = child.finish()
            finally:
                child.close()
            with reproducible(context):
                assert rc == -9, f"child died by itself ({rc}): {err[-2000:]}"
                point, in_flight = _rotation_kill_point(child.lines)
                expected, outcome = _check_rotation(
                    url, root_key_b64, child.lines, expected, in_flight, tag, sealed, rng
                )
            stats.record(index, kill_point=point, outcome=outcome, mode=mode, n=kill_after)
        with reproducible(describe("rotation", name, -1, check="final")):
            app = make_app(url, root_key_b64, cache_ttl=0)
            try:  # every ciphertext of every run, once more
                for plaintext, aad, envelope in sealed:
                    assert decrypt(app, envelope, aad=aad).plaintext == plaintext
            finally:
                app.close()
    finally:
        stats.close()


def _read_to_rotation_commit(child: Child, rotation: int) -> None:
    """Read the child's lines up to the COMMIT line of its ``rotation``-th rotation."""
    started = 0
    while (line := child.readline()) is not None:
        started += line.startswith("R ")
        if started == rotation and line == "C":
            return


def _check_rotation(
    url: str,
    root_key_b64: str,
    lines: list[str],
    expected: int,
    in_flight: bool,
    tag: str,
    sealed: list[tuple[bytes, bytes, bytes]],
    rng: object,
) -> tuple[int, str]:
    """The invariants after one kill; returns the new version count and the outcome."""
    reported = [line.split() for line in lines if line.startswith("V ")]
    printed = [line.split() for line in lines if line.startswith("E ")]
    app = make_app(url, root_key_b64, cache_ttl=0)  # a fresh process' view of the store
    try:
        versions = show_key(app, "r").versions
        numbers = [v.version for v in versions]
        count = len(versions)
        assert numbers == list(range(1, count + 1)), f"versions not contiguous: {numbers}"
        assert len({v.key_id for v in versions}) == count, "duplicate key_id"
        assert [v.active for v in versions] == [False] * (count - 1) + [True], "active"
        low = expected + len(reported)
        assert low <= count <= low + int(in_flight), (
            f"{count} versions; {expected} before, {len(reported)} reported, in flight: {in_flight}"
        )
        if in_flight:
            outcome = "in-flight-committed" if count > low else "in-flight-rolled-back"
        else:
            outcome = "nothing-in-flight"
        for _, number, key_id in reported:  # the reported versions are the stored ones
            assert versions[int(number) - 1].key_id == key_id
        aad = tag.encode()
        fresh: list[tuple[bytes, bytes, bytes]] = []
        for i, (_, number, key_id, b64) in enumerate(printed):
            assert versions[int(number) - 1].key_id == key_id
            plaintext = f"{tag} {i} {number}".encode()
            fresh.append((plaintext, aad, base64.b64decode(b64)))
        sample = rng.sample(sealed, min(20, len(sealed)))  # type: ignore[attr-defined]
        for plaintext, aad_, envelope in fresh + sample:
            assert decrypt(app, envelope, aad=aad_).plaintext == plaintext
        sealed.extend(fresh)
        # The store keeps working: one more rotation, and the new version seals and opens.
        again = rotate_key(app, "r")
        assert again.version == count + 1
        after = encrypt(app, "r", b"after the kill", aad=aad)
        assert after.version == count + 1
        assert decrypt(app, after.envelope, aad=aad).plaintext == b"after the kill"
        sealed.append((b"after the kill", aad, after.envelope))
    finally:
        app.close()
    return count + 1, outcome


# ------------------------------------------------------------------------ batch encryption

SMALL_FILES = 160
LARGE_SIZE = batch.SPLIT_BYTES + 100 * 1024  # split into segment ranges across the workers


def _make_inputs(src: Path, seed_rng: object) -> dict[str, str]:
    rng = seed_rng
    src.mkdir()
    digests = {}
    sizes = [0, 1, stream.DEFAULT_SEGMENT_SIZE, stream.DEFAULT_SEGMENT_SIZE + 1]
    sizes += [rng.randint(2, 48 * 1024) for _ in range(SMALL_FILES - len(sizes))]  # type: ignore[attr-defined]
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)  # type: ignore[attr-defined]
        (src / f"f{i:03}").write_bytes(data)
        digests[f"f{i:03}"] = hashlib.sha256(data).hexdigest()
    big = os.urandom(LARGE_SIZE)
    (src / "large.bin").write_bytes(big)
    digests["large.bin"] = hashlib.sha256(big).hexdigest()
    return digests


def _file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_batch_encrypt_killed(store: tuple[str, str], root_key_b64: str, tmp_path: Path) -> None:
    """``qimem encrypt --jobs 2`` over a directory, SIGKILLed after the n-th file it touched."""
    name, url = store
    app = make_app(url, root_key_b64)
    try:
        create_key(app, name="b")
        src = tmp_path / "src"
        digests = _make_inputs(src, run_rng("batch-inputs", name, 0))
        env = cli_env(tmp_path / "home", url, root_key_b64)
        total = len(digests)
        stats = Stats("batch", name)
        try:
            for index in range(runs(4)):
                rng = run_rng("batch", name, index)
                # Half the runs count files started (temp or output), half committed
                # outputs only (these land inside a group's burst of renames).
                mode = rng.choice(["files", "outputs"])
                target = rng.randint(0, total)
                delay = rng.uniform(0, 0.003)
                cleanup_check = index == 0 or rng.random() < 0.25
                # A quarter of the kills hit the parent alone: its workers must die with it
                # (PR_SET_PDEATHSIG) instead of writing on as orphans.
                group = index != 1 and rng.random() >= 0.25
                context = describe(
                    "batch", name, index, **{mode: target}, delay=f"{delay:.6f}", group=group
                )
                out = tmp_path / f"out{index}"
                child = Child(
                    [QIMEM, "encrypt", "--key", "b", str(src), "--out-dir", str(out)]
                    + ["--jobs", "2", "--quiet"],
                    env=env,
                )
                try:
                    trigger = functools.partial(
                        _touched_more_than, out, set(), target, outputs_only=mode == "outputs"
                    )
                    if poll_until(child, trigger):
                        sleep_precise(delay)
                    child.kill(group=group)
                    rc, err = child.finish()  # returns once no process of the group is left
                finally:
                    child.close()
                with reproducible(context):
                    assert not child.timed_out, "the child or an orphaned worker hung"
                    assert child.gone_after is not None and child.gone_after < 10, (
                        f"workers outlived the killed parent by {child.gone_after}s"
                    )
                    record = _check_batch(app, src, out, digests, rc, err, child.pid)
                    if cleanup_check:
                        record["cleanup"] = _finish_batch(app, src, out, digests, env)
                stats.record(index, mode=mode, n=target, group=group, **record)
                shutil.rmtree(out, ignore_errors=True)
        finally:
            stats.close()
    finally:
        app.close()


def _touched_more_than(out: Path, seen: set[str], target: int, *, outputs_only: bool) -> bool:
    """Kill trigger: more than ``target`` steps seen, a step being the output directory's
    creation or a new file in it (a temp file and the output it becomes are one step;
    with ``outputs_only``, only committed outputs count)."""
    try:
        for entry in os.scandir(out):
            if outputs_only and fileio.TEMP_MARKER in entry.name:
                continue
            seen.add(entry.name.split(fileio.TEMP_MARKER)[0].lstrip("."))
    except FileNotFoundError:
        return target < 0
    return len(seen) + 1 > target


def _check_batch(
    app: object, src: Path, out: Path, digests: dict[str, str], rc: int, err: str, pid: int
) -> dict[str, object]:
    assert rc in (0, -9), f"child failed by itself ({rc}): {err[-2000:]}"
    assert _file_digests(src) == digests, "an input changed (or an entry appeared in src)"
    temps = assert_temps_are_the_dead_runs(out, pid)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    outputs = [n for n in names if n not in temps]
    expected_names = {n + batch.SUFFIX for n in digests}
    assert set(outputs) <= expected_names, f"unexpected entries: {set(outputs) - expected_names}"
    for output in outputs:
        plain = output[: -len(batch.SUFFIX)]
        assert decrypt_digest(app, out / output) == digests[plain], f"{output} is wrong"
    if rc == 0:
        assert len(outputs) == len(digests) and not temps, "a completed run is complete"
    large = "output" if "large.bin.qimem" in outputs else "absent"
    if any(t.startswith(".large.bin.qimem") for t in temps):
        large = "temp"
    if rc == 0:
        point = "completed"
    elif not outputs:
        point = "before-first-output"
    elif len(outputs) == len(digests):
        point = "after-last-output"
    else:
        point = "mid-batch"
    return {
        "kill_point": point,
        "outcome": "temps-left" if temps else "no-temps",
        "outputs": len(outputs),
        "temps": len(temps),
        "large": large,
    }


def _finish_batch(
    app: object, src: Path, out: Path, digests: dict[str, str], env: dict[str, str]
) -> int:
    """The next run into the same directory: completes the batch (existing outputs are
    conflicts, exit 6) and removes the killed run's temp files. Returns how many it removed."""
    left = len(temps_in(out))
    child = Child(
        [QIMEM, "encrypt", "--key", "b", str(src), "--out-dir", str(out), "--jobs", "2"]
        + ["--quiet"],
        env=env,
    )
    try:
        rc, err = child.finish()
    finally:
        child.close()
    assert rc in (0, 6), err[-2000:]
    assert temps_in(out) == [], "the next run left the dead run's temp files"
    assert sorted(p.name for p in out.iterdir()) == sorted(n + batch.SUFFIX for n in digests)
    for plain, digest in digests.items():
        assert decrypt_digest(app, out / (plain + batch.SUFFIX)) == digest
    return left


# ------------------------------------------------------------------------ rewrap

REWRAP_FILES = 40


def test_rewrap_killed(store: tuple[str, str], root_key_b64: str, tmp_path: Path) -> None:
    """``qimem rewrap DIR`` after a rotation, SIGKILLed after the n-th file it replaced."""
    name, url = store
    app = make_app(url, root_key_b64)
    try:
        create_key(app, name="w")
        setup = run_rng("rewrap-inputs", name, 0)
        seg = stream.DEFAULT_SEGMENT_SIZE
        sizes = [0, 1, seg - 1, seg, seg + 1, 2 * seg + 7]
        sizes += [setup.randint(2, 3 * seg) for _ in range(REWRAP_FILES - len(sizes))]
        plaintexts: dict[str, bytes] = {}
        originals: dict[str, bytes] = {}
        for i, size in enumerate(sizes):
            fname = f"r{i:02}.qimem"
            plaintexts[fname] = setup.randbytes(size)
            sealed = io.BytesIO()
            file_services.encrypt_stream(app, io.BytesIO(plaintexts[fname]), sealed, "w")
            originals[fname] = sealed.getvalue()
        assert rotate_key(app, "w").version == 2
        env = cli_env(tmp_path / "home", url, root_key_b64)
        stats = Stats("rewrap", name)
        try:
            for index in range(runs(5)):
                rng = run_rng("rewrap", name, index)
                target = rng.randint(0, REWRAP_FILES)
                delay = rng.uniform(0, 0.003)
                finish_check = index == 0 or rng.random() < 0.3
                context = describe("rewrap", name, index, files=target, delay=f"{delay:.6f}")
                work = tmp_path / f"rw{index}"
                work.mkdir()
                inodes = {}
                for fname, data in originals.items():
                    (work / fname).write_bytes(data)
                    inodes[fname] = (work / fname).stat().st_ino

                child = Child([QIMEM, "rewrap", str(work), "--quiet"], env=env)
                try:
                    if poll_until(child, functools.partial(_rewrapped, work, inodes, target)):
                        sleep_precise(delay)
                    child.kill()
                    rc, err = child.finish()
                finally:
                    child.close()
                with reproducible(context):
                    record = _check_rewrap(app, work, originals, plaintexts, rc, err, child.pid)
                    if finish_check:
                        _finish_rewrap(app, work, originals, plaintexts)
                stats.record(index, mode="files", n=target, **record)
                shutil.rmtree(work, ignore_errors=True)
        finally:
            stats.close()
    finally:
        app.close()


def _rewrapped(work: Path, inodes: dict[str, int], target: int) -> bool:
    """Kill trigger: ``target`` files replaced (a new inode), or for 0 the first temp file."""
    replaced, temp = 0, False
    for entry in os.scandir(work):
        if entry.name in inodes:
            replaced += entry.inode() != inodes[entry.name]
        else:
            temp = True
    return replaced >= target and (target > 0 or temp)


def _check_rewrap(
    app: object,
    work: Path,
    originals: dict[str, bytes],
    plaintexts: dict[str, bytes],
    rc: int,
    err: str,
    pid: int,
) -> dict[str, object]:
    assert rc in (0, -9), f"child failed by itself ({rc}): {err[-2000:]}"
    temps = assert_temps_are_the_dead_runs(work, pid)
    names = sorted(p.name for p in work.iterdir() if p.name not in temps)
    assert names == sorted(originals), "a file vanished or appeared"
    old = new = 0
    for fname, before in originals.items():
        data = (work / fname).read_bytes()
        if data == before:
            old += 1
        else:
            was, now = stream.parse_header(before), stream.parse_header(data)
            assert (was.key_version, now.key_version) == (1, 2), fname
            assert data[now.size :] == before[was.size :], f"{fname}: segment bytes changed"
            new += 1
        expected = hashlib.sha256(plaintexts[fname]).hexdigest()
        assert decrypt_digest(app, work / fname) == expected, f"{fname} does not decrypt"
    if rc == 0:
        assert new == len(originals) and not temps
    if rc == 0:
        point = "completed"
    elif temps:
        point = "mid-file"
    elif new == 0:
        point = "before-first-file"
    else:
        point = "between-files"
    return {"kill_point": point, "outcome": f"temps-{len(temps)}", "old": old, "new": new}


def _finish_rewrap(
    app: object, work: Path, originals: dict[str, bytes], plaintexts: dict[str, bytes]
) -> None:
    """Rewrap again (as the next ``qimem rewrap`` would): everything ends under version 2
    and the dead run's temp files are gone."""
    result = batch.rewrap(app, batch.plan([work], batch.REWRAP))  # type: ignore[arg-type]
    assert result.failures == [], [r.message for r in result.failures]
    assert temps_in(work) == []
    for fname in originals:
        data = (work / fname).read_bytes()
        assert stream.parse_header(data).key_version == 2
        assert decrypt_digest(app, work / fname) == hashlib.sha256(plaintexts[fname]).hexdigest()


# ------------------------------------------------------------------------ migrations

_MIGRATE_CHILD = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa
    from qimem.sql import create_engine, migrate

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    def statement(conn, cursor, sql, *rest):
        say("S " + (sql.split(None, 1) or ["?"])[0].upper())

    engine = create_engine(sys.argv[1])
    sa.event.listen(engine, "before_cursor_execute", statement)
    sa.event.listen(engine, "commit", lambda *a: say("C"))
    say("ready")
    say(f"D {migrate(engine)}")
    """
)
_DDL = ("S CREATE", "S ALTER", "S DROP", "S INSERT", "S UPDATE")


class _Databases:
    """Creates and drops the per-run stores of one kind: SQLite files, or PostgreSQL schemas
    (a ``search_path`` in the URL) in one test database; ``CREATE DATABASE`` costs ~1 s."""

    def __init__(self, kind: str, tmp_path: Path, pg_url: str | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.pg_url = pg_url
        self.admin: sa.Engine | None = None
        if pg_url is not None:
            self.admin = sa.create_engine(normalize_url(pg_url), isolation_level="AUTOCOMMIT")

    def new(self, template: str | None = None) -> str:
        """A URL to a new empty store, or to a copy of ``template``'s schema and rows."""
        name = f"qimem_c_{uuid.uuid4().hex[:12]}"
        if self.kind == "sqlite":
            path = self.tmp_path / f"{name}.db"
            if template is not None:
                src = sqlite3.connect(template.removeprefix("sqlite:///"))
                path.touch(0o600)  # qimem refuses a store file others can read
                dst = sqlite3.connect(path)
                src.backup(dst)
                src.close()
                dst.close()
            return f"sqlite:///{path}"
        assert self.admin is not None and self.pg_url is not None
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        url = sa.engine.make_url(normalize_url(self.pg_url))
        url = url.update_query_dict({"options": f"-csearch_path={name}"})
        rendered = url.render_as_string(hide_password=False)
        if template is not None:
            self._copy(template, rendered)
        return rendered

    def _copy(self, template: str, url: str) -> None:
        """The template's revision (by Alembic, as that release created it), then its rows."""
        revision, tables = schema(template)
        assert revision is not None
        src_schema = sa.engine.make_url(template).query["options"].split("=", 1)[1]
        dst_schema = sa.engine.make_url(url).query["options"].split("=", 1)[1]
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                alembic(conn, "upgrade", revision)
                meta = sa.MetaData()
                meta.reflect(conn)
                for table in meta.sorted_tables:
                    if table.name == "alembic_version":
                        continue
                    cols = ", ".join(f'"{c}"' for c in tables[table.name])
                    conn.execute(
                        sa.text(
                            f'INSERT INTO "{dst_schema}"."{table.name}" ({cols}) '
                            f'SELECT {cols} FROM "{src_schema}"."{table.name}"'
                        )
                    )
        finally:
            engine.dispose()

    def drop(self, url: str) -> None:
        if self.kind == "sqlite":
            path = url.removeprefix("sqlite:///")
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(path + suffix).unlink(missing_ok=True)
            return
        assert self.admin is not None
        name = sa.engine.make_url(url).query["options"].split("=", 1)[1]
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))

    def close(self) -> None:
        if self.admin is not None:
            self.admin.dispose()


@pytest.fixture
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Databases]:
    pg_url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    dbs = _Databases(request.param, tmp_path, pg_url)
    yield dbs
    dbs.close()


def schema(url: str) -> tuple[str | None, dict[str, list[str]]]:
    """``(revision, {table: sorted columns})`` of a database, read without migrating."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            tables = {
                t: sorted(c["name"] for c in inspector.get_columns(t))
                for t in inspector.get_table_names()
            }
            return current_revision(conn), tables
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "databases", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_migration_killed(databases: _Databases, root_key_b64: str) -> None:
    """The upgrade of a populated store from an older revision, SIGKILLed at a random SQL
    statement (a third of the runs right around its COMMIT)."""
    name = databases.kind
    head_url = databases.new()
    app = make_app(head_url, root_key_b64, cache_ttl=0)
    sealed: list[tuple[bytes, bytes]] = []
    try:
        for key, algorithm in (("m1", "aes-256-gcm"), ("m2", "chacha20-poly1305")):
            create_key(app, name=key, algorithm=algorithm)
            for round_no in range(3):
                if round_no:
                    rotate_key(app, key)
                plaintext = f"{key} v{round_no + 1}".encode()
                sealed.append((plaintext, encrypt(app, key, plaintext).envelope))
    finally:
        app.close()
    head_schema = schema(head_url)
    bases: dict[str, tuple[str, tuple[str | None, dict[str, list[str]]]]] = {}
    calibration: dict[str, tuple[int, int]] = {}  # revision: (lines, COMMIT line)
    stats = Stats("migration", name)
    try:
        for index in range(runs(6)):
            rng = run_rng("migration", name, index)
            revision = rng.choice(OLDER_REVISIONS)
            if revision not in bases:
                base = databases.new(head_url)
                downgrade(base, revision)
                bases[revision] = (base, schema(base))
                assert bases[revision][1][0] == revision
                calibration[revision] = _calibrate(databases, base, head_schema)
            base, old_schema = bases[revision]
            total, commit_line = calibration[revision]
            mode = "near-commit" if rng.random() < 1 / 3 else "lines"
            if mode == "near-commit":
                kill_after = max(1, commit_line + rng.randint(-2, 1))
                delay = rng.uniform(0, 0.001)
            else:
                kill_after = rng.randint(1, total + 1)
                delay = rng.uniform(0, 0.002)
            context = describe(
                "migration", name, index, start=revision, lines=kill_after, delay=f"{delay:.6f}"
            )
            url = databases.new(base)
            child = python_child(_MIGRATE_CHILD, url)
            try:
                child.wait_ready()
                child.read_lines(kill_after)
                sleep_precise(delay)
                child.kill()
                rc, err = child.finish()
            finally:
                child.close()
            with reproducible(context):
                record = _check_migration(
                    url, root_key_b64, revision, old_schema, head_schema, child.lines, rc, err
                )
                _upgrade_and_use(url, root_key_b64, sealed)
            stats.record(index, start=revision, mode=mode, n=kill_after, **record)
            databases.drop(url)
    finally:
        stats.close()


def _calibrate(
    databases: _Databases, base: str, head_schema: tuple[str | None, dict[str, list[str]]]
) -> tuple[int, int]:
    """One uninterrupted upgrade of a copy of ``base``: its line count and the line number
    of the migration's COMMIT (the first COMMIT after DDL)."""
    url = databases.new(base)
    child = python_child(_MIGRATE_CHILD, url)
    try:
        child.wait_ready()
        rc, err = child.finish()
    finally:
        child.close()
    assert rc == 0, err[-2000:]
    lines = child.lines
    assert lines[-1] == "D True", lines[-5:]
    assert schema(url) == head_schema
    databases.drop(url)
    ddl_seen = False
    for number, line in enumerate(lines, start=1):
        ddl_seen = ddl_seen or line.startswith(_DDL)
        if ddl_seen and line == "C":
            return len(lines), number
    raise AssertionError(f"no COMMIT after the DDL: {lines}")


def _check_migration(
    url: str,
    root_key_b64: str,
    revision: str,
    old_schema: tuple[str | None, dict[str, list[str]]],
    head_schema: tuple[str | None, dict[str, list[str]]],
    lines: list[str],
    rc: int,
    err: str,
) -> dict[str, object]:
    assert rc in (0, -9), f"child failed by itself ({rc}): {err[-2000:]}"
    found = schema(url)
    assert found in (old_schema, head_schema), (
        f"half-migrated schema after the kill: revision {found[0]}, "
        f"tables {sorted(found[1])} (expected {revision} or {HEAD})"
    )
    last = lines[-1] if lines else ""
    ddl_seen = any(line.startswith(_DDL) for line in lines)
    commits_after_ddl = 0
    seen = False
    for line in lines:
        seen = seen or line.startswith(_DDL)
        commits_after_ddl += seen and line == "C"
    if rc == 0 or last.startswith("D"):
        point = "after-migration"
    elif commits_after_ddl and last == "C" and commits_after_ddl == 1:
        point = "at-commit"
    elif commits_after_ddl:
        point = "after-commit"
    elif ddl_seen:
        point = "mid-ddl"
    else:
        point = "before-ddl"
    outcome = "at-head" if found == head_schema else "at-old-revision"
    return {"kill_point": point, "outcome": outcome}


def _upgrade_and_use(url: str, root_key_b64: str, sealed: list[tuple[bytes, bytes]]) -> None:
    """Rerun the upgrade; every key decrypts what it sealed before; rotation still works."""
    engine = create_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            assert current_revision(conn) == HEAD
    finally:
        engine.dispose()
    app = make_app(url, root_key_b64, cache_ttl=0)
    try:
        for plaintext, envelope in sealed:
            assert decrypt(app, envelope).plaintext == plaintext
        for key in ("m1", "m2"):
            assert [v.version for v in show_key(app, key).versions] == [1, 2, 3]
        assert rotate_key(app, "m1").version == 4
        assert decrypt(app, encrypt(app, "m1", b"after").envelope).plaintext == b"after"
    finally:
        app.close()


# ------------------------------------------------------------------------ the checks have teeth


def test_checks_catch_broken_states(tmp_path: Path, root_key_b64: str) -> None:
    """Each scenario's check fails on the damage it exists to find (so a green campaign
    means something): a lost rotation, a partial or foreign batch output, changed segment
    bytes after a rewrap, a half-migrated schema."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    app = make_app(url, root_key_b64, cache_ttl=0)
    try:
        key = create_key(app, name="r")
        # Rotation: the child reported version 2, the store has only version 1.
        lines = ["R 0", "C", f"V 2 {key.key_id}"]
        with pytest.raises(AssertionError, match="1 versions"):
            _check_rotation(url, root_key_b64, lines, 1, False, "t", [], run_rng("t", "t", 0))

        # Batch: a complete output passes; a truncated one, or a temp of another pid, fails.
        src, out = tmp_path / "src", tmp_path / "out"
        src.mkdir()
        out.mkdir()
        (src / "a").write_bytes(os.urandom(3 * stream.DEFAULT_SEGMENT_SIZE))
        digests = _file_digests(src)
        with (out / "a.qimem").open("wb") as fh:
            file_services.encrypt_stream(app, (src / "a").open("rb"), fh, "r")
        assert _check_batch(app, src, out, digests, -9, "", 4242)["outputs"] == 1
        (out / ".a.qimem.qimem-tmp-4243-beef").write_bytes(b"partial")
        with pytest.raises(AssertionError, match="not of the killed pid"):
            _check_batch(app, src, out, digests, -9, "", 4242)
        (out / ".a.qimem.qimem-tmp-4243-beef").unlink()
        sealed = (out / "a.qimem").read_bytes()
        (out / "a.qimem").write_bytes(sealed[: -stream.DEFAULT_SEGMENT_SIZE])
        with pytest.raises(Exception, match="(?i)truncat|integrity|decrypt"):
            _check_batch(app, src, out, digests, -9, "", 4242)

        # Rewrap: new header over the same segments passes; one flipped segment byte fails.
        work = tmp_path / "rw"
        work.mkdir()
        (work / "a.qimem").write_bytes(sealed)
        plaintexts = {"a.qimem": (src / "a").read_bytes()}
        rotate_key(app, "r")
        file_services.rewrap_file(app, work / "a.qimem")
        record = _check_rewrap(app, work, {"a.qimem": sealed}, plaintexts, -9, "", 4242)
        assert record["new"] == 1
        damaged = bytearray((work / "a.qimem").read_bytes())
        damaged[-1] ^= 1
        (work / "a.qimem").write_bytes(bytes(damaged))
        with pytest.raises(AssertionError, match="segment bytes changed"):
            _check_rewrap(app, work, {"a.qimem": sealed}, plaintexts, -9, "", 4242)
    finally:
        app.close()

    # Migrations: a leftover batch-copy table is a half-migrated schema.
    head = schema(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE _alembic_tmp_qimem_lineages (x INTEGER)")
    engine.dispose()
    with pytest.raises(AssertionError, match="half-migrated"):
        _check_migration(url, root_key_b64, "0003", head, head, [], -9, "")


# ------------------------------------------------------------------------ qimem init

# ``qimem init`` SIGKILLed between creating the root key file and filling it: the child
# kills itself as the fresh key is encoded (a fixed, deterministic kill point).
_INIT_KILLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import qimem.rootkey

    def killed(key):
        os.kill(os.getpid(), signal.SIGKILL)

    qimem.rootkey.encode_root_key = killed
    from qimem.cli import main

    sys.argv = ["qimem", "init"]
    main()
    """
)


def test_init_killed_while_writing_the_root_key_reruns(tmp_path: Path) -> None:
    """A SIGKILL while ``qimem init`` writes the root key leaves no root key file (an empty
    one used to be left behind, and every later ``qimem init`` failed on it, exit 9); the
    rerun creates the key, the store works, and the dead run's temp file is gone."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(home)
    child = python_child(_INIT_KILLED_CHILD, env=env)
    try:
        rc, err = child.finish()
    finally:
        child.close()
    assert rc == -9, err[-2000:]
    root_keys = [p for p in home.rglob("*") if p.name == "root.key"]
    assert all(p.stat().st_size > 0 for p in root_keys), "an empty root key file was left"

    rerun = Child([QIMEM, "init"], env=env)
    try:
        rc, err = rerun.finish()
    finally:
        rerun.close()
    assert rc == 0, err[-2000:]
    created = Child([QIMEM, "keys", "create", "--name", "after"], env=env)
    try:
        rc, err = created.finish()
    finally:
        created.close()
    assert rc == 0, err[-2000:]
    leftovers = [p.name for p in home.rglob("*") if fileio.temp_owner(p.name) is not None]
    assert leftovers == [], leftovers
