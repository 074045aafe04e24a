"""Findings 6 and 7: batch encryption and decryption of directory trees an attacker shaped.

Finding 6: odd file names. A file named ``.qimem`` crashed ``decrypt DIR`` (nothing was
decrypted); ``..qimem`` with ``--out-dir d`` wrote its plaintext to the path ``d`` itself.
Finding 7: directory walks followed symbolic links, so ``in/link -> /etc/passwd`` was
encrypted (and a link to a directory anywhere was walked). The attacker is whoever can
put names or links into a directory the victim encrypts or decrypts.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_process import qimem_process

from qimem import batch, batch_plan, services
from qimem.app import AppContext
from qimem.cli import cli
from qimem.errors import ValidationError
from qimem.services import files as file_services

SECRET = b"root:x:0:0:the file the attacker wants sealed or overwritten\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized QIMEM_HOME (SQLite) with key 'k', shared by this module's tests."""
    path = tmp_path_factory.mktemp("home") / "home"
    for args in (["init"], ["keys", "create", "--name", "k"]):
        done = qimem_process(path, *args)
        assert done.returncode == 0, done.stderr
    return path


def run(home: Path, *args: str) -> Result:
    env = {"QIMEM_HOME": str(home), "QIMEM_CONFIG": None, "QIMEM_STORE": None}
    return CliRunner().invoke(cli, list(args), env=env)  # type: ignore[arg-type]


def sealed(home: Path, tmp: Path, data: bytes) -> bytes:
    plain = tmp / "plain.tmp"
    plain.write_bytes(data)
    result = run(home, "encrypt", "--key", "k", str(plain), "-o", str(tmp / "sealed.tmp"))
    assert result.exit_code == 0, result.output
    out = (tmp / "sealed.tmp").read_bytes()
    plain.unlink()
    (tmp / "sealed.tmp").unlink()
    return out


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file contents, ``->target`` for links, ``/`` for dirs."""
    found: dict[str, bytes | str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "->" + os.readlink(path)
            elif path.is_dir():
                found[rel] = "/"
            else:
                found[rel] = path.read_bytes()
    return found


# ------------------------------------------------------------------------ finding 6


def test_finding6_a_file_named_dot_qimem_fails_alone(home: Path, tmp_path: Path) -> None:
    ciphertext = sealed(home, tmp_path, b"hello")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.qimem", ".qimem", "b.qimem"):
        (src / name).write_bytes(ciphertext)
    result = run(home, "decrypt", str(src), "--json")
    assert result.exit_code == ValidationError.exit_code == 3, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and "AssertionError" not in result.output
    summary = json.loads(result.stdout)
    assert (summary["succeeded"], summary["failed"]) == (2, 1)
    (failed,) = [r for r in summary["results"] if not r["ok"]]
    assert failed["input"] == str(src / ".qimem") and failed["error"] == "bad_file_name"
    assert (src / "a").read_bytes() == (src / "b").read_bytes() == b"hello"
    assert str(src / ".qimem") in result.stderr and "no safe output name" in result.stderr


@pytest.mark.parametrize("name", ["..qimem", "...qimem"])
def test_finding6_nothing_is_written_as_or_above_out_dir(
    home: Path, tmp_path: Path, name: str
) -> None:
    ciphertext = sealed(home, tmp_path, b"plaintext of the odd file")
    src = tmp_path / "in"
    src.mkdir()
    (src / name).write_bytes(ciphertext)
    (src / "ok.qimem").write_bytes(ciphertext)
    out = tmp_path / "work" / "d"
    before = tree(tmp_path)
    alone = run(home, "decrypt", str(src / name), "--out-dir", str(out))
    assert alone.exit_code == 3, alone.output
    assert "no safe output name" in alone.stderr
    assert not out.is_file() and tree(tmp_path) == before  # not written AS --out-dir
    for args in ([str(src)], [str(src / name), str(src / "ok.qimem")]):
        result = run(home, "decrypt", *args, "--out-dir", str(out), "--force")
        assert result.exit_code == 3, result.output
        assert "Traceback" not in result.output
        assert out.is_dir() and (out / "ok").read_bytes() == b"plaintext of the odd file"
        after = tree(tmp_path)
        changed = {k for k in after if before.get(k) != after[k]}
        assert changed <= {"work", "work/d", "work/d/ok"}, changed
        (out / "ok").unlink()


def test_finding6_explicit_odd_names_without_out_dir(home: Path, tmp_path: Path) -> None:
    ciphertext = sealed(home, tmp_path, b"x")
    for name in (".qimem", "..qimem", "...qimem"):
        (tmp_path / name).write_bytes(ciphertext)
        result = run(home, "decrypt", str(tmp_path / name), "--force")
        assert result.exit_code == 3 and "no safe output name" in result.stderr
    assert {p.name for p in tmp_path.iterdir()} == {".qimem", "..qimem", "...qimem"}


_CHARS = st.sampled_from(list(".q.imem-\n\t é\u202e\u00a0ß😀x") + ["..", ".qimem"])
_PLAIN = st.lists(_CHARS, min_size=1, max_size=12).map("".join)
_LONG = st.integers(200, 255).map(lambda n: "n" * n)
_NAMES = st.one_of(
    st.sampled_from([".qimem", "..qimem", "...qimem", "....qimem", ".qimem.qimem", "qimem"]),
    st.sampled_from([".x", "\n.qimem", " .qimem", "..\n.qimem", "\u2024\u2024.qimem"]),
    _PLAIN,
    _PLAIN.map(lambda s: s + ".qimem"),
    _LONG,
    _LONG.map(lambda s: s[:-6] + ".qimem"),
    st.text(min_size=1, max_size=30),
    st.text(min_size=1, max_size=30).map(lambda s: s + ".qimem"),
)


def _valid(name: str) -> bool:
    if name in (".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return len(os.fsencode(name)) <= 255
    except UnicodeEncodeError:
        return False


@pytest.fixture
def keyed(memory_app: AppContext) -> Iterator[tuple[AppContext, bytes]]:
    services.create_key(memory_app, name="p")
    out = io.BytesIO()
    file_services.encrypt_stream(memory_app, io.BytesIO(b"payload"), out, "p")
    yield memory_app, out.getvalue()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(names=st.lists(_NAMES.filter(_valid), min_size=1, max_size=5, unique=True))
@example(names=[".qimem", "a.qimem", "..qimem", "...qimem", "n" * 249 + ".qimem"])
def test_finding6_property_outputs_stay_strictly_inside_out_dir(
    keyed: tuple[AppContext, bytes], names: list[str]
) -> None:
    app, ciphertext = keyed
    for operation in (batch.ENCRYPT, batch.DECRYPT):
        for with_out_dir in (True, False):
            with tempfile.TemporaryDirectory() as raw:
                tmp = Path(raw)
                src = tmp / "src"
                (src / "sub").mkdir(parents=True)
                for name in names:
                    data = ciphertext if operation == batch.DECRYPT else b"plain"
                    (src / name).write_bytes(data)
                    (src / "sub" / name).write_bytes(data)
                out = tmp / "out" if with_out_dir else None
                before = tree(tmp)
                tasks = batch.plan([src], operation, out_dir=out)
                for task in tasks:
                    if task.dst is None:
                        assert task.result.error is not None
                        continue
                    assert task.dst.name not in ("", ".", "..")
                    if out is not None:
                        assert out in task.dst.parents, task.dst
                    else:
                        assert task.src is not None and task.dst.parent == task.src.parent
                result = batch.run(app, tasks, operation, key_ref="p")
                for r in result.failures:  # a name with no safe output, a name taken
                    # by another input's output, or one too long once suffixed
                    assert r.error in ("bad_file_name", "output_exists", "internal_error"), r
                    assert r.message and "internal error" not in r.message
                assert result.exit_code in (0, 1, 3, 6)
                after = tree(tmp)
                for rel, value in after.items():
                    if before.get(rel) == value:
                        continue
                    where = tmp / rel
                    if out is not None:  # new entries only strictly inside out/
                        assert rel == "out" or out in where.parents, rel
                    else:  # or beside their inputs
                        assert where.parent in (src, src / "sub"), rel
                for rel in before:
                    assert rel in after and after[rel] == before[rel], rel


# ------------------------------------------------------------------------ finding 7


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """in/ holds a real file, a link to another user's file, a link to a directory
    elsewhere, and a dangling link; outside/ is what the attacker wants sealed."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "passwd").write_bytes(SECRET)
    (outside / "dir" / "shadow").write_bytes(SECRET)
    src = tmp_path / "in"
    src.mkdir()
    (src / "real.txt").write_bytes(b"mine")
    (src / "link").symlink_to(outside / "passwd")
    (src / "dirlink").symlink_to(outside / "dir")
    (src / "dangling").symlink_to(tmp_path / "nothing")
    return src


def test_finding7_encrypt_dir_skips_symlinks_and_says_so(
    home: Path, planted: Path, tmp_path: Path
) -> None:
    outside_before = tree(tmp_path / "outside")
    result = run(home, "encrypt", "--key", "k", str(planted), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in planted.iterdir()) == [
        "dangling",
        "dirlink",
        "link",
        "real.txt",
        "real.txt.qimem",
    ]
    assert tree(tmp_path / "outside") == outside_before
    summary = json.loads(result.stdout)
    assert [r["input"] for r in summary["results"]] == [str(planted / "real.txt")]
    assert {(s["input"], s["reason"]) for s in summary["skipped"]} == {
        (str(planted / "dirlink"), "symlink"),
        (str(planted / "link"), "symlink"),
        (str(planted / "dangling"), "symlink"),
    }
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all("--follow-symlinks" in line for line in lines)
    assert any(str(planted / "link") in line for line in lines)


def test_finding7_encrypt_dir_with_out_dir_skips_symlinks(
    home: Path, planted: Path, tmp_path: Path
) -> None:
    result = run(home, "encrypt", "--key", "k", str(planted), "--out-dir", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert sorted(tree(tmp_path / "o")) == ["real.txt.qimem"]


def test_finding7_follow_symlinks_opts_in(home: Path, planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = run(
        home, "encrypt", "--key", "k", str(planted), "--out-dir", str(out), "--follow-symlinks"
    )
    assert result.exit_code == 0, result.output
    assert sorted(tree(out)) == ["dirlink", "dirlink/shadow.qimem", "link.qimem", "real.txt.qimem"]
    assert "dangling" in result.stderr  # a link to nothing is reported, not fatal
    back = run(home, "decrypt", str(out), "--out-dir", str(tmp_path / "back"))
    assert back.exit_code == 0, back.output
    assert (tmp_path / "back" / "link").read_bytes() == SECRET


def test_finding7_decrypt_and_rewrap_dir_skip_symlinks(home: Path, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.qimem"  # another user's ciphertext, under our key
    theirs.write_bytes(sealed(home, tmp_path, SECRET))
    src = tmp_path / "in"
    src.mkdir()
    (src / "mine.qimem").write_bytes(sealed(home, tmp_path, b"mine"))
    (src / "evil.qimem").symlink_to(theirs)
    result = run(home, "decrypt", str(src))
    assert result.exit_code == 0, result.output
    assert not (src / "evil").exists() and (src / "mine").read_bytes() == b"mine"
    assert f"skipped {src / 'evil.qimem'}" in result.stderr
    assert run(home, "keys", "rotate", "k").exit_code == 0
    before = theirs.read_bytes()
    result = run(home, "rewrap", str(src), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [s["input"] for s in summary["skipped"]] == [str(src / "evil.qimem")]
    assert theirs.read_bytes() == before
    result = run(home, "rewrap", str(src), "--follow-symlinks")
    assert result.exit_code == 0, result.output
    assert (src / "evil.qimem").is_symlink()  # the link stays a link ...
    assert theirs.read_bytes() != before  # ... and the file it points to is rewrapped


def test_finding7_symlink_loops_do_not_hang(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_bytes(b"f")
    (src / "a" / "b" / "up").symlink_to(src)  # a loop to the top
    (src / "a" / "self").symlink_to(".")  # a loop to itself
    (src / "a" / "b" / "side").symlink_to(src / "a")  # and one to a middle directory
    done = qimem_process(
        home, "encrypt", "--key", "k", str(src), "--out-dir", str(tmp_path / "o"),
        "--follow-symlinks", timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(
        str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*.qimem")
    ) == ["a/b/f.txt.qimem"]
    assert "loop" in done.stderr and "Traceback" not in done.stderr


def test_finding7_a_file_swapped_for_a_symlink_after_planning_is_refused(
    keyed: tuple[AppContext, bytes], tmp_path: Path
) -> None:
    app, _ = keyed
    (tmp_path / "passwd").write_bytes(SECRET)
    src = tmp_path / "in"
    src.mkdir()
    (src / "swap").write_bytes(b"harmless")
    tasks = batch.plan([src], batch.ENCRYPT)
    (src / "swap").unlink()
    (src / "swap").symlink_to(tmp_path / "passwd")  # the race an attacker can win
    result = batch.run(app, tasks, batch.ENCRYPT, key_ref="p")
    (failure,) = result.failures
    assert failure.message and "symbolic link" in failure.message
    assert not (src / "swap.qimem").exists()


def test_finding7_a_link_named_on_the_command_line_is_followed(home: Path, planted: Path) -> None:
    result = run(home, "encrypt", "--key", "k", str(planted / "link"))
    assert result.exit_code == 0, result.output
    assert (planted / "link.qimem").is_file()


# ------------------------------------------------------------------------ red team on 6 and 7
# RT-5: an output directory below --out-dir that is (or becomes) a symbolic link must not be
# written through. RT-6: O_NOFOLLOW covers only the last path component, so a walked
# directory swapped for a link after the walk must not let a file be read through it.


def _sealed_tree(home: Path, tmp_path: Path, files: dict[str, bytes]) -> Path:
    plain = tmp_path / "plain"
    for rel, data in files.items():
        (plain / rel).parent.mkdir(parents=True, exist_ok=True)
        (plain / rel).write_bytes(data)
    out = tmp_path / "sealed"
    result = run(home, "encrypt", "--key", "k", str(plain), "--out-dir", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_finding6_decrypt_never_writes_through_a_symlinked_subdir_of_out_dir(
    home: Path, tmp_path: Path
) -> None:
    sealed_dir = _sealed_tree(
        home, tmp_path, {"sub/payroll.csv": SECRET, "a/b/deep.txt": SECRET, "top.txt": b"top"}
    )
    out = tmp_path / "out"  # a shared, pre-created output directory
    (out / "a").mkdir(parents=True)
    outside = tmp_path / "attacker-readable"
    outside.mkdir()
    (out / "sub").symlink_to(outside)  # planted: out/sub -> outside
    (out / "a" / "b").symlink_to(outside)  # and one level deeper
    result = run(home, "decrypt", str(sealed_dir), "--out-dir", str(out))
    assert sorted(os.listdir(outside)) == []  # nothing written outside --out-dir
    assert result.exit_code == 3, result.output  # validation: the two inputs fail alone
    assert "Traceback" not in result.output
    assert "symbolic link" in result.output and str(out / "sub") in result.output
    assert (out / "top.txt").read_bytes() == b"top"  # the others proceed


def test_finding6_json_names_the_unsafe_output_directory(home: Path, tmp_path: Path) -> None:
    sealed_dir = _sealed_tree(home, tmp_path, {"sub/x.txt": b"x"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(tmp_path)
    result = run(home, "decrypt", str(sealed_dir), "--out-dir", str(out), "--json")
    data = json.loads(result.stdout)
    (failure,) = [r for r in data["results"] if not r["ok"]]
    assert failure["error"] == "unsafe_output_path"
    assert not (tmp_path / "x.txt").exists()


def test_finding6_a_file_in_place_of_an_output_subdir_fails_alone(
    home: Path, tmp_path: Path
) -> None:
    sealed_dir = _sealed_tree(home, tmp_path, {"sub/x.txt": b"x", "y.txt": b"y"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_bytes(b"not a directory")
    result = run(home, "decrypt", str(sealed_dir), "--out-dir", str(out))
    assert result.exit_code == 3 and "Traceback" not in result.output, result.output
    assert (out / "y.txt").read_bytes() == b"y"


def test_finding6_out_dir_itself_may_be_a_symlink_the_user_named(
    home: Path, tmp_path: Path
) -> None:
    sealed_dir = _sealed_tree(home, tmp_path, {"sub/x.txt": b"x"})
    real = tmp_path / "real-out"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    result = run(home, "decrypt", str(sealed_dir), "--out-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert (real / "sub" / "x.txt").read_bytes() == b"x"


@pytest.mark.parametrize("jobs", [1, 2])
def test_finding6_subdir_swapped_for_a_link_after_it_was_prepared(
    keyed: tuple[AppContext, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    jobs: int,
) -> None:
    """The race: out/sub is a real directory when the run creates it, and a link by the time
    the output is written (small files and, with jobs > 1, a file split across workers)."""
    app, _ = keyed
    monkeypatch.setattr(batch, "SPLIT_BYTES", 1 << 16)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "small.txt").write_bytes(SECRET)
    (src / "sub" / "big.bin").write_bytes(os.urandom(1 << 18))
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    tasks = batch.plan([src], batch.ENCRYPT, out_dir=out)
    real_prepare = batch._prepare_directories

    def prepare_then_swap(todo: list[batch.Task], created: list[Path]) -> set[Path]:
        directories = real_prepare(todo, created)
        os.rename(out / "sub", tmp_path / "moved")
        (out / "sub").symlink_to(outside)  # swapped after it was made and checked
        return directories

    monkeypatch.setattr(batch, "_prepare_directories", prepare_then_swap)
    result = batch.run(app, tasks, batch.ENCRYPT, key_ref="p", jobs=jobs)
    assert sorted(os.listdir(outside)) == []
    assert len(result.failures) == 2
    for failure in result.failures:
        assert failure.error == "unsafe_output_path", failure
    assert sorted(os.listdir(tmp_path / "moved")) == []  # no temp file left behind


def test_finding7_walked_file_read_through_a_parent_swapped_for_a_link_is_refused(
    keyed: tuple[AppContext, bytes], tmp_path: Path
) -> None:
    app, _ = keyed
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "notes.txt").write_bytes(b"harmless")
    (src / "keep.txt").write_bytes(b"keep")
    victim = tmp_path / "victim"  # e.g. the victim's ~/.ssh, not meant to be encrypted
    victim.mkdir()
    (victim / "notes.txt").write_bytes(SECRET)
    tasks = batch.plan([src], batch.ENCRYPT, out_dir=tmp_path / "o")
    os.rename(src / "sub", tmp_path / "moved")  # the walked directory is swapped ...
    (src / "sub").symlink_to(victim)  # ... for a link between the walk and the read
    [task] = [t for t in tasks if t.src is not None and t.src.name == "notes.txt"]
    with pytest.raises(OSError):
        os.close(batch_plan.open_input(task))
    result = batch.run(app, tasks, batch.ENCRYPT, key_ref="p")
    (failure,) = result.failures
    assert failure.error == "input_changed", failure
    assert failure.message and "changed since" in failure.message
    assert not (tmp_path / "o" / "sub" / "notes.txt.qimem").exists()
    assert (tmp_path / "o" / "keep.txt.qimem").is_file()


def test_finding7_split_file_read_through_a_swapped_parent_is_refused(
    keyed: tuple[AppContext, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = keyed
    monkeypatch.setattr(batch, "SPLIT_BYTES", 1 << 16)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "big.bin").write_bytes(os.urandom(1 << 18))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "big.bin").write_bytes(SECRET * 5000)
    tasks = batch.plan([src], batch.ENCRYPT, out_dir=tmp_path / "o")
    os.rename(src / "sub", tmp_path / "moved")
    (src / "sub").symlink_to(victim)
    result = batch.run(app, tasks, batch.ENCRYPT, key_ref="p", jobs=2)
    (failure,) = result.failures
    assert failure.error == "input_changed", failure
    assert not list((tmp_path / "o").rglob("big.bin*"))


def test_finding7_the_walk_does_not_descend_into_a_directory_swapped_for_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between listing in/ and reading in/sub, sub becomes a link: the walk refuses it."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "mine.txt").write_bytes(b"mine")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "id_rsa").write_bytes(SECRET)
    real_scandir = os.scandir
    swapped: list[bool] = []

    def scandir_then_swap(path: Any) -> Any:
        it = real_scandir(path)
        if not swapped:  # right after the top directory was listed
            swapped.append(True)
            os.rename(src / "sub", tmp_path / "moved")
            (src / "sub").symlink_to(victim)
        return it

    monkeypatch.setattr(os, "scandir", scandir_then_swap)
    tasks = batch.plan([src], batch.ENCRYPT)
    assert [t.src for t in tasks] == []
    assert [s.reason for s in tasks.skipped] == ["symlink"]  # type: ignore[attr-defined]
