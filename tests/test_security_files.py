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

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_process import qimem_process

from qimem import batch, services
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
