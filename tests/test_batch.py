"""File services and batch runs on real stores: qimem.services.files and qimem.batch."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from qimem import batch, services, stream
from qimem.app import AppContext
from qimem.errors import DecryptionError, NotFoundError
from qimem.fileio import TEMP_MARKER, cleanup_stale_temps
from qimem.services import files

SEG = stream.DEFAULT_SEGMENT_SIZE


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*"))


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_tree(root: Path) -> dict[str, bytes]:
    """A small tree: empty, tiny, exact segment multiple, multi-segment, nested."""
    files_ = {
        "empty": b"",
        "one": b"\x01",
        "exact": os.urandom(2 * SEG),
        "multi.bin": os.urandom(3 * SEG + 123),
        "sub/deeper/note.txt": b"hello\n" * 100,
        "sub/b": os.urandom(4000),
    }
    for rel, data in files_.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files_


# ------------------------------------------------------------------------ services


def test_service_stream_round_trip_on_every_store(any_app: AppContext) -> None:
    services.create_key(any_app, name="files")
    data = os.urandom(2 * SEG + 7)
    sealed = io.BytesIO()
    info = files.encrypt_stream(any_app, io.BytesIO(data), sealed, "files", aad="ctx")
    assert info.version == 1 and info.plaintext_bytes == len(data)
    out = io.BytesIO()
    back = files.decrypt_stream(any_app, io.BytesIO(sealed.getvalue()), out, aad="ctx")
    assert out.getvalue() == data and back.key_id == info.key_id
    with pytest.raises(DecryptionError):
        files.decrypt_stream(any_app, io.BytesIO(sealed.getvalue()), io.BytesIO(), aad="other")


def test_decrypt_respects_realms_and_key_states(sqlite_app: AppContext) -> None:
    from qimem.services import identity as ids

    ids.create_realm(sqlite_app, "tenant-a")  # a store with identity: only its realms
    services.create_key(sqlite_app, name="k", realm="tenant-a")
    sealed = io.BytesIO()
    files.encrypt_stream(sqlite_app, io.BytesIO(b"x"), sealed, "k", realm="tenant-a")
    with pytest.raises(NotFoundError):
        files.decrypt_stream(sqlite_app, io.BytesIO(sealed.getvalue()), io.BytesIO())
    out = io.BytesIO()
    files.decrypt_stream(sqlite_app, io.BytesIO(sealed.getvalue()), out, realm="tenant-a")
    assert out.getvalue() == b"x"


def test_unknown_key_writes_nothing(memory_app: AppContext) -> None:
    out = io.BytesIO()
    with pytest.raises(NotFoundError):
        files.encrypt_stream(memory_app, io.BytesIO(b"data"), out, "ghost")
    assert out.getvalue() == b""


def test_every_header_byte_is_authenticated_through_the_store(memory_app: AppContext) -> None:
    """Edits of the key id/version inside the wrapped key fail at unwrap (not found or
    authentication); every other header edit fails authentication."""
    services.create_key(memory_app, name="h")
    sealed = io.BytesIO()
    files.encrypt_stream(memory_app, io.BytesIO(os.urandom(100)), sealed, "h")
    blob = sealed.getvalue()
    header = stream.parse_header(blob)
    for i in range(header.size):
        tampered = bytearray(blob)
        tampered[i] ^= 0x04
        out = io.BytesIO()
        with pytest.raises((DecryptionError, NotFoundError)):
            files.decrypt_stream(memory_app, io.BytesIO(bytes(tampered)), out)
        assert out.getvalue() == b""


# ------------------------------------------------------------------------ rewrap


def test_rewrap_changes_only_the_header(sqlite_app: AppContext, tmp_path: Path) -> None:
    key = services.create_key(sqlite_app, name="r")
    data = os.urandom(3 * SEG + 5)
    path = tmp_path / "data.qimem"
    with path.open("wb") as fh:
        files.encrypt_stream(sqlite_app, io.BytesIO(data), fh, "r")
    os.chmod(path, 0o640)
    before = path.read_bytes()
    old = stream.parse_header(before)

    info, changed = files.rewrap_file(sqlite_app, path)
    assert not changed and path.read_bytes() == before  # already under the newest version

    rotated = services.rotate_key(sqlite_app, "r")
    info, changed = files.rewrap_file(sqlite_app, path)
    after = path.read_bytes()
    new = stream.parse_header(after)
    assert changed and info.version == 2 and info.key_id == rotated.key_id
    assert new.key_id == rotated.key_id != key.key_id
    assert new.core == old.core
    assert after[new.size :] == before[old.size :]  # segment bytes unchanged
    assert (path.stat().st_mode & 0o777) == 0o640
    assert hidden(tmp_path) == []
    out = io.BytesIO()
    with path.open("rb") as fh:
        files.decrypt_stream(sqlite_app, fh, out)
    assert out.getvalue() == data


def test_rewrap_refuses_a_tampered_file_and_leaves_it(
    memory_app: AppContext, tmp_path: Path
) -> None:
    services.create_key(memory_app, name="r")
    path = tmp_path / "x.qimem"
    with path.open("wb") as fh:
        files.encrypt_stream(memory_app, io.BytesIO(b"abc"), fh, "r")
    services.rotate_key(memory_app, "r")
    blob = bytearray(path.read_bytes())
    blob[12] ^= 0x01  # nonce prefix (immutable core): caught by the header tag
    path.write_bytes(bytes(blob))
    with pytest.raises(DecryptionError):
        files.rewrap_file(memory_app, path)
    assert path.read_bytes() == bytes(blob)
    assert hidden(tmp_path) == []


# ------------------------------------------------------------------------ batch


@pytest.mark.parametrize("jobs", [1, 2])
def test_batch_tree_round_trip(sqlite_app: AppContext, tmp_path: Path, jobs: int) -> None:
    services.create_key(sqlite_app, name="b")
    src = tmp_path / "src"
    expected = make_tree(src)
    enc = tmp_path / "enc"
    tasks = batch.plan([src], batch.ENCRYPT, out_dir=enc)
    seen: list[tuple[int, int]] = []
    result = batch.run(
        sqlite_app,
        tasks,
        batch.ENCRYPT,
        key_ref="b",
        jobs=jobs,
        progress=lambda b, f: seen.append((b, f)),
    )
    assert result.failures == [] and result.exit_code == 0
    assert sum(f for _, f in seen) == len(expected)
    assert sum(b for b, _ in seen) == sum(len(v) for v in expected.values())
    assert sorted(tree(enc)) == sorted(k + ".qimem" for k in expected)
    assert tree(src) == expected  # inputs untouched

    dec = tmp_path / "dec"
    result = batch.run(
        sqlite_app, batch.plan([enc], batch.DECRYPT, out_dir=dec), batch.DECRYPT, jobs=jobs
    )
    assert result.failures == []
    assert tree(dec) == expected
    assert hidden(tmp_path) == []
    summary = result.to_dict()
    assert summary["files"] == summary["succeeded"] == len(expected)


def test_large_files_are_split_across_workers(
    sqlite_app: AppContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file over the split size is sealed as segment ranges by several processes, and
    the result is an ordinary stream (decrypts serially, and in ranges again)."""
    monkeypatch.setattr(batch, "SPLIT_BYTES", 2 * SEG)
    services.create_key(sqlite_app, name="big")
    data = os.urandom(7 * SEG + 99)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    result = batch.run(
        sqlite_app, batch.plan([src], batch.ENCRYPT), batch.ENCRYPT, key_ref="big", jobs=2
    )
    assert result.failures == []
    sealed = tmp_path / "big.bin.qimem"
    assert result.results[0].bytes_out == sealed.stat().st_size
    out = io.BytesIO()
    with sealed.open("rb") as fh:
        files.decrypt_stream(sqlite_app, fh, out)
    assert out.getvalue() == data

    src.unlink()
    result = batch.run(sqlite_app, batch.plan([sealed], batch.DECRYPT), batch.DECRYPT, jobs=2)
    assert result.failures == [] and src.read_bytes() == data

    # A tampered segment in the middle of a split decrypt: no output at all.
    src.unlink()
    blob = bytearray(sealed.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    sealed.write_bytes(bytes(blob))
    result = batch.run(sqlite_app, batch.plan([sealed], batch.DECRYPT), batch.DECRYPT, jobs=2)
    assert [r.error for r in result.failures] == ["decryption_failed"]
    assert not src.exists() and hidden(tmp_path) == []


def test_memory_store_works_with_workers(memory_app: AppContext, tmp_path: Path) -> None:
    services.create_key(memory_app, name="m")
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(os.urandom(i * 100))
    result = batch.run(
        memory_app, batch.plan([tmp_path], batch.ENCRYPT), batch.ENCRYPT, key_ref="m", jobs=2
    )
    assert result.failures == [] and len(result.results) == 5


def test_one_bad_file_does_not_stop_the_others(sqlite_app: AppContext, tmp_path: Path) -> None:
    services.create_key(sqlite_app, name="k")
    good = [tmp_path / f"good{i}" for i in range(3)]
    for path in good:
        path.write_bytes(os.urandom(500))
    batch.run(sqlite_app, batch.plan(good, batch.ENCRYPT), batch.ENCRYPT, key_ref="k")
    for path in good:
        path.unlink()
    tampered = tmp_path / "good1.qimem"
    blob = bytearray(tampered.read_bytes())
    blob[-3] ^= 0x10
    tampered.write_bytes(bytes(blob))
    (tmp_path / "garbage.qimem").write_bytes(b"not a stream at all")
    (tmp_path / "good2").write_bytes(b"in the way")  # an existing output
    inputs = [
        tmp_path / n
        for n in ("good0.qimem", "good1.qimem", "garbage.qimem", "good2.qimem", "gone.qimem")
    ]
    result = batch.run(sqlite_app, batch.plan(inputs, batch.DECRYPT), batch.DECRYPT, jobs=1)
    by_name = {Path(r.input).name: r for r in result.results}
    assert by_name["good0.qimem"].ok and (tmp_path / "good0").stat().st_size == 500
    assert by_name["good1.qimem"].error == "decryption_failed"
    assert by_name["garbage.qimem"].error == "invalid_envelope"
    assert by_name["good2.qimem"].error == "output_exists"
    assert "no such file" in (by_name["gone.qimem"].message or "")
    assert not (tmp_path / "good1").exists() and not (tmp_path / "garbage").exists()
    assert (tmp_path / "good2").read_bytes() == b"in the way"
    assert result.exit_code == 1  # different error classes
    assert hidden(tmp_path) == []


def test_plan_names_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "a.qimem").write_bytes(b"old")
    (tmp_path / f".a.qimem{TEMP_MARKER}1-x").write_bytes(b"temp")
    walked = batch.plan([tmp_path], batch.ENCRYPT)
    assert [t.src.name for t in walked if t.src] == ["a"]  # .qimem and temp files skipped
    assert [t.src.name for t in batch.plan([tmp_path], batch.DECRYPT) if t.src] == ["a.qimem"]
    no_name = batch.plan([tmp_path / "a"], batch.DECRYPT)
    assert "does not end in .qimem" in (no_name[0].result.message or "")
    same = batch.plan([tmp_path / "a"], batch.ENCRYPT, output=tmp_path / "a")
    assert "overwrite the input" in (same[0].result.message or "")


def test_stale_temp_files_of_dead_runs_are_removed(memory_app: AppContext, tmp_path: Path) -> None:
    services.create_key(memory_app, name="t")
    (tmp_path / "in").write_bytes(b"x")
    dead = tmp_path / f".in.qimem{TEMP_MARKER}999999999-abcd"
    alive = tmp_path / f".in.qimem{TEMP_MARKER}{os.getppid()}-abcd"
    dead.write_bytes(b"partial")
    alive.write_bytes(b"someone else's, in progress")
    batch.run(memory_app, batch.plan([tmp_path / "in"], batch.ENCRYPT), batch.ENCRYPT, key_ref="t")
    assert not dead.exists() and alive.exists()
    assert cleanup_stale_temps(tmp_path, owner=os.getppid()) == 1
    assert hidden(tmp_path) == []


def test_workers_on_postgres(postgres_url: str, root_key_b64: str, tmp_path: Path) -> None:
    """Forked workers open their own PostgreSQL connections (never the parent's), and the
    parent's connection still works afterwards."""
    from conftest import make_app

    app = make_app(postgres_url, root_key_b64)
    try:
        services.create_key(app, name="pg")
        expected = make_tree(tmp_path / "src")
        tasks = batch.plan([tmp_path / "src"], batch.ENCRYPT, out_dir=tmp_path / "enc")
        assert batch.run(app, tasks, batch.ENCRYPT, key_ref="pg", jobs=2).failures == []
        services.rotate_key(app, "pg")  # the parent's own connection is intact
        tasks = batch.plan([tmp_path / "enc"], batch.DECRYPT, out_dir=tmp_path / "dec")
        assert batch.run(app, tasks, batch.DECRYPT, jobs=2).failures == []
        assert tree(tmp_path / "dec") == expected
    finally:
        app.close()


def test_commit_never_replaces_an_existing_file(tmp_path: Path) -> None:
    from qimem import fileio
    from qimem.errors import ConflictError

    target = tmp_path / "out"
    fd, tmp = fileio.create_temp(target)
    os.write(fd, b"new")
    os.close(fd)
    target.write_bytes(b"appeared meanwhile")
    with pytest.raises(ConflictError):
        fileio.commit(tmp, target, force=False)
    assert target.read_bytes() == b"appeared meanwhile" and not tmp.exists()
    fd, tmp = fileio.create_temp(target)
    os.write(fd, b"new")
    os.close(fd)
    fileio.commit(tmp, target, force=True)
    assert target.read_bytes() == b"new" and hidden(tmp_path) == []
    target.unlink()
    fd, tmp = fileio.create_temp(target)
    os.close(fd)
    fileio.commit(tmp, target, force=False)
    assert target.exists() and hidden(tmp_path) == []


def test_library_streams_with_a_derived_key_context(sqlite_app: AppContext) -> None:
    from qimem.errors import ValidationError

    services.create_key(sqlite_app, name="tenants", derived=True)
    sealed = io.BytesIO()
    files.encrypt_stream(sqlite_app, io.BytesIO(b"per tenant"), sealed, "tenants", context=b"t1")
    out = io.BytesIO()
    files.decrypt_stream(sqlite_app, io.BytesIO(sealed.getvalue()), out, context=b"t1")
    assert out.getvalue() == b"per tenant"
    with pytest.raises(DecryptionError):
        files.decrypt_stream(sqlite_app, io.BytesIO(sealed.getvalue()), io.BytesIO(), context=b"t2")
    with pytest.raises(ValidationError, match="context"):
        files.decrypt_stream(sqlite_app, io.BytesIO(sealed.getvalue()), io.BytesIO())
