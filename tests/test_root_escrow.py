"""``qimem root split|recover`` and :mod:`qimem.root.escrow` (issue 18 part 5): K-of-N
SLIP-39 shares of the file provider's root key. Attacks first, then the happy paths, the
published SLIP-39 vectors and one run of the real CLI in a subprocess."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimem.cli import QimemGroup
from qimem.cli.context import CliState
from qimem.cli.root_escrow import register
from qimem.config import Config
from qimem.errors import ConflictError
from qimem.root import escrow
from qimem.rootkey import KeyWrapper, read_root_key_file, write_root_key_file

VECTORS = Path(__file__).parent / "vectors" / "slip39" / "vectors.json"


def make_cli() -> click.Group:
    """A root group like ``qimem``'s (same error conversion and state) with ``root`` holding
    the escrow commands, as the lead's ``qimem root`` group will."""

    @click.group(cls=QimemGroup)
    @click.option("--config", "config_path", type=click.Path(dir_okay=False))
    @click.pass_context
    def cli(ctx: click.Context, config_path: str | None) -> None:
        ctx.obj = CliState(config_path, None, [], "master")

    @cli.group("root")
    def root() -> None:
        """Root of trust."""

    register(root)
    return cli


def run(*args: str) -> Result:
    return CliRunner().invoke(make_cli(), list(args), catch_exceptions=False)


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("QIMEM_ROOT_KEY", raising=False)
    path = tmp_path / "root.key"
    write_root_key_file(path)
    return path


@pytest.fixture
def shares(tmp_path: Path, key_file: Path) -> list[Path]:
    """Five shares of ``key_file``, threshold 3."""
    result = run("root", "split", "-n", "5", "-k", "3", "--out-dir", str(tmp_path / "out"),
                 "--root-key-file", str(key_file), "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    return [Path(p) for p in json.loads(result.stdout)["files"]]


def recover(*files: Path, out: Path, extra: tuple[str, ...] = ()) -> Result:
    return run("root", "recover", *map(str, files), "-o", str(out), *extra)


def refused(result: Result, code: int, pattern: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert re.search(pattern, result.stderr), result.stderr
    assert result.stderr.startswith("qimem: error: ") and "Traceback" not in result.stderr


def words_of(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return " ".join(line for line in lines if not line.startswith("#")).split()


def split_into(directory: str, key: bytes, n: int, k: int) -> list[Path]:
    """``key`` split K-of-N into share files in ``directory`` (no CLI)."""
    mnemonics = escrow.split_root_key(key, n, k)
    check_value = KeyWrapper(key).check_value
    return escrow.write_share_files(mnemonics, Path(directory), check_value=check_value)


def with_words(path: Path, words: list[str]) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    path.write_text("\n".join([*header, " ".join(words)]) + "\n")


# --- attacks ------------------------------------------------------------------------------


def test_fewer_than_threshold_refused(shares: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "new.key"
    refused(recover(*shares[:2], out=out), 3, r"need 3 shares, got 2")
    refused(recover(shares[4], out=out), 3, r"need 3 shares, got 1")
    assert not out.exists()


def test_duplicate_share_refused(shares: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "new.key"
    refused(recover(shares[0], shares[1], shares[0], out=out), 3, r"share 1 given twice")
    copy = tmp_path / "copy.txt"
    copy.write_bytes(shares[1].read_bytes())  # the same share under another name
    refused(recover(shares[0], shares[1], copy, out=out), 3, r"share 2 given twice")
    assert not out.exists()


def test_share_of_another_split_refused(shares: list[Path], key_file: Path, tmp_path: Path) -> None:
    again = run("root", "split", "-n", "5", "-k", "3", "--out-dir", str(tmp_path / "out2"),
                "--root-key-file", str(key_file), "--json")  # fmt: skip
    other = [Path(p) for p in json.loads(again.stdout)["files"]]
    # same key, another split: index 3 of the other split with 1 and 2 of the first
    refused(recover(shares[0], shares[1], other[2], out=tmp_path / "n"), 3, r"another split")


def test_one_word_changed_refused(shares: list[Path], tmp_path: Path) -> None:
    for position in (0, 5, 20, 32):  # identifier, value and checksum words
        words = words_of(shares[2])
        words[position] = "academic" if words[position] != "academic" else "acid"
        with_words(shares[2], words)
        refused(recover(*shares[:3], out=tmp_path / "n"), 3, r"checksum or length does not match")


def test_swapped_and_missing_words_refused(shares: list[Path], tmp_path: Path) -> None:
    words = words_of(shares[1])
    i = next(i for i in range(5, 30) if words[i] != words[i + 1])
    words[i], words[i + 1] = words[i + 1], words[i]
    with_words(shares[1], words)
    refused(recover(*shares[:3], out=tmp_path / "n"), 3, r"checksum or length does not match")
    with_words(shares[3], words_of(shares[3])[:-1])
    refused(recover(*shares[2:5], out=tmp_path / "n"), 3, r"32 words|checksum")


def test_unknown_word_named_by_position_not_quoted(shares: list[Path], tmp_path: Path) -> None:
    words = words_of(shares[0])
    secret_word, words[7] = words[7], words[7] + "x"
    with_words(shares[0], words)
    result = recover(*shares[:3], out=tmp_path / "n")
    refused(result, 3, r"word 8 is not in the SLIP-39 word list")
    assert secret_word not in result.stderr


@pytest.mark.parametrize(
    "damage, pattern",
    [
        (lambda p: p.write_text(p.read_text() + "trailing garbage\n"), r"not in the SLIP-39"),
        (lambda p: p.write_text(p.read_text() + "academic\n"), r"34 words|checksum"),
        (lambda p: p.write_bytes(p.read_bytes() + b"#" * 5000), r"larger than 4096 bytes"),
        (lambda p: p.write_bytes(os.urandom(600)), r"non-ASCII|control characters|not a qimem"),
        (lambda p: p.write_bytes(p.read_bytes().replace(b"\n", b"\x00", 3)), r"control char"),
        (lambda p: p.write_bytes(b""), r"is empty"),
        (lambda p: p.write_text("\n \n"), r"is empty"),
        (lambda p: p.write_text(p.read_text().split("\n", 1)[1]), r"not a qimem root key share"),
        (lambda p: p.unlink(), r"no such share file"),
    ],
)
def test_damaged_share_file_refused(shares: list[Path], tmp_path: Path, damage, pattern) -> None:  # type: ignore[no-untyped-def]
    damage(shares[1])
    refused(recover(*shares[:3], out=tmp_path / "n"), 3, pattern)
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "old, new, pattern",
    [
        ("# share: 2 of 5", "# share: 4 of 5", r"header says share 4.*words are share 2.*edited"),
        ("# threshold: 3", "# threshold: 2", r"header says .*threshold 2.*edited"),
        ("# identifier: ", "# identifier: 1", r"edited|malformed header"),
        ("# share: 2 of 5", "# share: 2 of 99", r"malformed header"),
        ("# check value: ", "# check value: zz", r"malformed header"),
        ("# passphrase: no", "# passphrase: maybe", r"malformed header"),
        ("# created: ", "# created: x\n# created: ", r"repeats 'created'"),
        ("# threshold: 3\n", "", r"header lacks 'threshold'"),
    ],
)
def test_edited_header_refused(
    shares: list[Path], tmp_path: Path, old: str, new: str, pattern: str
) -> None:
    text = shares[1].read_text()
    assert old in text
    shares[1].write_text(text.replace(old, new, 1))
    refused(recover(*shares[:3], out=tmp_path / "n"), 3, pattern)


def test_words_of_another_index_under_a_header_refused(shares: list[Path], tmp_path: Path) -> None:
    """Share 4's words pasted under share 2's header: the header no longer matches."""
    with_words(shares[1], words_of(shares[3]))
    refused(recover(*shares[:3], out=tmp_path / "n"), 3, r"header says share 2.*words are share 4")


def test_check_value_disagreement_and_forgery_refused(shares: list[Path], tmp_path: Path) -> None:
    cv = re.search(r"# check value: ([0-9a-f]{32})", shares[0].read_text())
    assert cv
    forged = ("0" if cv.group(1)[0] != "0" else "1") + cv.group(1)[1:]
    shares[0].write_text(shares[0].read_text().replace(cv.group(1), forged))
    refused(recover(*shares[:3], out=tmp_path / "n"), 3, r"another split")
    for path in shares[1:3]:  # all three agree on a forged value: the rebuilt key does not
        path.write_text(path.read_text().replace(cv.group(1), forged))
    refused(recover(*shares[:3], out=tmp_path / "n"), 7, r"does not match the check value")
    assert not (tmp_path / "n").exists()


def test_forged_share_value_caught_by_digest() -> None:
    """A share whose value was replaced (valid checksum: built with the library) breaks
    SLIP-39's digest, also when it is one of more than K shares given."""
    import dataclasses

    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = split_into(tmp, key, 4, 2)
        share = escrow.decode_share("s4", words_of(paths[3]))
        fake = dataclasses.replace(share, value=os.urandom(len(share.value))).mnemonic()
        with_words(paths[3], fake.split())
        assert bytes(escrow.recover_root_key(paths[:2])[0]) == key
        with pytest.raises(escrow.ShareError, match="altered or forged"):
            escrow.recover_root_key(paths)  # 4 given, threshold 2: share 4 takes part too


def test_out_dir_files_never_overwritten(tmp_path: Path) -> None:
    key = os.urandom(32)
    mnemonics = escrow.split_root_key(key, 3, 2)
    out = tmp_path / "out"
    out.mkdir()
    identifier = escrow.share_identifier(mnemonics[0])
    planted = out / escrow.share_file_name(identifier, 3, 3)
    planted.write_text("mine")
    with pytest.raises(ConflictError, match="refusing to overwrite"):
        escrow.write_share_files(mnemonics, out, check_value=KeyWrapper(key).check_value)
    assert planted.read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [planted.name]  # nothing half-written
    planted.unlink()
    os.symlink(tmp_path / "elsewhere", planted)  # a dangling link is not followed either
    with pytest.raises(ConflictError):
        escrow.write_share_files(mnemonics, out, check_value=KeyWrapper(key).check_value)
    assert not (tmp_path / "elsewhere").exists()


def test_recover_output_exists_refused(shares: list[Path], key_file: Path, tmp_path: Path) -> None:
    before = key_file.read_bytes()
    refused(recover(*shares[:3], out=key_file), 6, r"exists; refusing to overwrite")
    assert key_file.read_bytes() == before
    link = tmp_path / "link.key"
    os.symlink(tmp_path / "target.key", link)
    refused(recover(*shares[:3], out=link), 6, r"exists")
    assert not (tmp_path / "target.key").exists()


def test_wrong_or_missing_passphrase_refused(key_file: Path, tmp_path: Path) -> None:
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    made = run("root", "split", "-n", "3", "-k", "2", "--out-dir", str(tmp_path / "o"),
               "--root-key-file", str(key_file), "--passphrase-file", str(tmp_path / "pass"),
               "--json")  # fmt: skip
    assert made.exit_code == 0, made.output
    files = [Path(p) for p in json.loads(made.stdout)["files"]]
    out = tmp_path / "n.key"
    wrong = recover(*files[:2], out=out, extra=("--passphrase-file", str(tmp_path / "wrong")))
    refused(wrong, 7, r"wrong passphrase")
    refused(recover(*files[:2], out=out), 3, r"made with a passphrase")
    assert not out.exists()
    right = recover(*files[1:], out=out, extra=("--passphrase-file", str(tmp_path / "pass")))
    assert right.exit_code == 0, right.output
    assert read_root_key_file(out) == read_root_key_file(key_file)


def test_bad_passphrase_files_refused(key_file: Path, tmp_path: Path) -> None:
    args = ["root", "split", "-n", "3", "-k", "2", "--out-dir", str(tmp_path / "o"),
            "--root-key-file", str(key_file), "--passphrase-file"]  # fmt: skip
    (tmp_path / "empty").write_text("")
    (tmp_path / "utf8").write_text("pässword\n")
    (tmp_path / "big").write_text("a" * 5000)
    refused(run(*args, str(tmp_path / "empty")), 3, r"is empty")
    refused(run(*args, str(tmp_path / "utf8")), 3, r"printable ASCII")
    refused(run(*args, str(tmp_path / "big")), 3, r"larger than")
    refused(run(*args, str(tmp_path / "missing")), 3, r"cannot read passphrase file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "n, k, pattern",
    [("1", "1", "--shares must be between 2 and 16"), ("17", "2", "between 2 and 16"),
     ("5", "1", "threshold must be between 2"), ("3", "4", "--threshold must be between"),
     ("3", "0", "--threshold"), ("-1", "2", "--shares")],
)  # fmt: skip
def test_split_limits(key_file: Path, tmp_path: Path, n: str, k: str, pattern: str) -> None:
    result = run("root", "split", "-n", n, "-k", k, "--out-dir", str(tmp_path / "o"),
                 "--root-key-file", str(key_file))  # fmt: skip
    refused(result, 3, re.escape(pattern))
    assert not (tmp_path / "o").exists()


def test_split_usage_errors_exit_2(key_file: Path, tmp_path: Path) -> None:
    assert run("root", "split", "-n", "x", "-k", "2", "--out-dir", str(tmp_path)).exit_code == 2
    assert run("root", "split", "-k", "2", "--out-dir", str(tmp_path)).exit_code == 2
    assert run("root", "recover", "-o", str(tmp_path / "x")).exit_code == 2  # no share files


def test_split_refuses_a_store_whose_root_is_not_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_file: Path
) -> None:
    config = tmp_path / "config.toml"
    Config(store_url=f"sqlite:///{tmp_path / 'q.db'}").write(config)
    args = ["--config", str(config), "root", "split", "-n", "3", "-k", "2",
            "--out-dir", str(tmp_path / "o")]  # fmt: skip
    refused(run(*args), 9, r"no root key file is configured")
    monkeypatch.setenv("QIMEM_ROOT_KEY", base64.b64encode(os.urandom(32)).decode())
    refused(run(*args), 9, r"comes from QIMEM_ROOT_KEY")
    assert not (tmp_path / "o").exists()


def test_split_refuses_a_readable_root_key_file(key_file: Path, tmp_path: Path) -> None:
    key_file.chmod(0o644)
    result = run("root", "split", "-n", "3", "-k", "2", "--out-dir", str(tmp_path / "o"),
                 "--root-key-file", str(key_file))  # fmt: skip
    refused(result, 9, r"accessible by group or others")


def test_too_many_share_files_refused(tmp_path: Path) -> None:
    files = [tmp_path / f"s{i}" for i in range(17)]
    refused(recover(*files, out=tmp_path / "n"), 3, r"at most 16 share files")


# --- what it does -------------------------------------------------------------------------


def test_split_from_config_then_recover(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    Config(store_url=f"sqlite:///{tmp_path / 'q.db'}", root_key_file=key_file).write(config)
    old = os.umask(0)  # a permissive umask must not make shares readable
    try:
        made = run("--config", str(config), "root", "split", "--shares", "3", "--threshold",
                   "3", "--out-dir", str(tmp_path / "new" / "dir"))  # fmt: skip
    finally:
        os.umask(old)
    assert made.exit_code == 0, made.output
    assert "losing any one share loses the key" in made.stderr
    check = KeyWrapper(read_root_key_file(key_file)).check_value
    assert f"check value: {check}" in made.stdout
    files = sorted((tmp_path / "new" / "dir").iterdir())
    assert len(files) == 3
    assert stat.S_IMODE((tmp_path / "new" / "dir").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = tmp_path / "restored" / "root.key"
    done = recover(*files, out=out, extra=("--json",))
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["check_value"] == check and report["path"] == str(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert read_root_key_file(out) == read_root_key_file(key_file)
    assert out.read_text() == key_file.read_text()  # byte-identical root key file


def test_key_and_words_never_printed(shares: list[Path], key_file: Path, tmp_path: Path) -> None:
    key = read_root_key_file(key_file)
    words = words_of(shares[0])
    # Runs of three words: single SLIP-39 words are ordinary English ("again", "check"...)
    # that a message may contain by chance.
    runs = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    secrets = {base64.b64encode(key).decode(), key.hex(), *runs}
    outputs = [recover(*shares[:3], out=tmp_path / "n.key"),
               recover(*shares[1:4], out=tmp_path / "n.key"),  # refused: exists
               recover(*shares[:2], out=tmp_path / "m.key")]  # fmt: skip
    again = run("root", "split", "-n", "2", "-k", "2", "--out-dir", str(tmp_path / "o2"),
                "--root-key-file", str(key_file))  # fmt: skip
    for result in [*outputs, again]:
        text = result.stdout + result.stderr
        assert not any(re.search(rf"\b{re.escape(s)}\b", text) for s in secrets), text
    for path in shares:
        assert base64.b64encode(key).decode() not in path.read_text()
    assert repr(escrow.read_share_file(shares[0])).count(" ") == 5  # path and index only


def test_no_option_takes_a_secret_on_the_command_line() -> None:
    cli = make_cli()
    root = cli.commands["root"]
    assert isinstance(root, click.Group)
    assert sorted(root.commands) == ["recover", "split"]
    for command in root.commands.values():
        names = {n for p in command.params for n in getattr(p, "opts", [])}
        assert not names & {"--key", "--passphrase", "--root-key", "--secret"}, names


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(2, 6))
def test_any_k_subset_recovers_and_fewer_never(data: st.DataObject, n: int) -> None:
    k = data.draw(st.integers(2, n), label="k")
    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = split_into(tmp, key, n, k)
        order = data.draw(st.permutations(paths), label="order")
        size = data.draw(st.integers(k, n), label="size")
        rebuilt, first = escrow.recover_root_key(list(order[:size]))
        assert bytes(rebuilt) == key and first.threshold == k
        with pytest.raises(escrow.ShareError, match=f"need {k} shares, got {k - 1}"):
            escrow.recover_root_key(list(order[: k - 1]))


def test_every_subset_of_a_small_split() -> None:
    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = split_into(tmp, key, 4, 3)
        for size in range(1, 5):
            for subset in itertools.combinations(paths, size):
                if size < 3:
                    with pytest.raises(escrow.ShareError, match="need 3 shares"):
                        escrow.recover_root_key(list(subset))
                else:
                    assert bytes(escrow.recover_root_key(list(subset))[0]) == key


def test_slip39_published_vectors() -> None:
    """Trezor's published SLIP-39 vectors (tests/vectors/slip39/README.md), through qimem's
    checks: valid one-group sets give the published secret, every invalid set and every
    multi-group set is refused with a ShareError."""
    vectors = json.loads(VECTORS.read_text())
    assert len(vectors) == 24
    valid = 0
    for description, mnemonics, secret in vectors:
        try:
            files = []
            for i, mnemonic in enumerate(mnemonics):
                share = escrow.decode_share(f"vector {description[:3]}", mnemonic.split())
                index, threshold = share.index + 1, share.member_threshold
                files.append(escrow.ShareFile(Path(f"v{i}"), index, 16, threshold,
                                              share.identifier, "", True, mnemonic))  # fmt: skip
            got = escrow.combine(files, b"TREZOR")
        except escrow.ShareError:
            assert not secret or "groups" in description, description
            continue
        assert secret, f"{description}: should have been refused"
        assert bytes(got).hex() == secret, description
        valid += 1
    assert valid == 4  # vectors 1, 4, 20 and 23


def test_real_cli_end_to_end(tmp_path: Path) -> None:
    """``qimem root split`` then ``recover`` in real processes, through the installed
    console script."""
    from qimem.cli import COMMANDS

    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(tmp_path / "home")
    assert "root" in COMMANDS
    qimem = [str(Path(sys.executable).parent / "qimem")]

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*qimem, *args], env=env, capture_output=True, text=True, timeout=60)

    init = call("init", "--json")
    assert init.returncode == 0, init.stderr
    key_file = Path(json.loads(init.stdout)["root_key_file"])
    made = call("root", "split", "--shares", "3", "--threshold", "2", "--out-dir",
                str(tmp_path / "shares"), "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    files = json.loads(made.stdout)["files"]
    few = call("root", "recover", files[2], "-o", str(tmp_path / "r.key"))
    assert few.returncode == 3 and few.stderr == "qimem: error: need 2 shares, got 1\n"
    done = call("root", "recover", files[2], files[0], "-o", str(tmp_path / "r.key"))
    assert done.returncode == 0, done.stderr
    assert json.loads(made.stdout)["check_value"] in done.stdout
    assert (tmp_path / "r.key").read_bytes() == key_file.read_bytes()
    key_b64 = key_file.read_text().strip()
    for proc in (init, made, few, done):
        assert key_b64 not in proc.stdout + proc.stderr
