"""``qimem encrypt/decrypt/rewrap`` over files and directories (CliRunner and real processes)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qimem import stream
from qimem.cli import cli
from qimem.fileio import TEMP_MARKER

QIMEM = Path(sys.executable).with_name("qimem")


def run(*args: str, input: bytes | None = None) -> Result:  # noqa: A002
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: bytes | None = None) -> Result:  # noqa: A002
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


@pytest.fixture
def home(qimem_home: Path) -> Path:
    ok("init")
    ok("keys", "create", "--name", "k")
    return qimem_home


def files_in(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".")]


def test_directory_round_trip_with_out_dir_and_json(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "photos"
    (src / "2024" / "june").mkdir(parents=True)
    content = {
        "a.jpg": os.urandom(3000),
        "2024/b.jpg": b"",
        "2024/june/c.raw": os.urandom(stream.DEFAULT_SEGMENT_SIZE * 2),
    }
    for rel, data in content.items():
        (src / rel).write_bytes(data)
    result = ok("encrypt", "--key", "k", str(src), "--out-dir", str(tmp_path / "enc"), "--json")
    assert result.stderr == ""  # not a terminal: no progress bar
    summary = json.loads(result.stdout)
    assert summary["files"] == summary["succeeded"] == 3 and summary["failed"] == 0
    assert summary["bytes_in"] == sum(len(v) for v in content.values())
    assert {r["version"] for r in summary["results"]} == {1}
    assert sorted(files_in(tmp_path / "enc")) == sorted(k + ".qimem" for k in content)
    ok("decrypt", str(tmp_path / "enc"), "--out-dir", str(tmp_path / "dec"), "--jobs", "2")
    assert files_in(tmp_path / "dec") == content
    assert files_in(src) == content


def test_many_files_beside_their_inputs_then_back(home: Path, tmp_path: Path) -> None:
    names = [tmp_path / f"doc{i}.txt" for i in range(4)]
    for path in names:
        path.write_bytes(path.name.encode() * 50)
    ok("encrypt", "--key", "k", *map(str, names), "--jobs", "2", "--quiet")
    sealed = [Path(str(p) + ".qimem") for p in names]
    assert all(p.is_file() for p in sealed)
    for path in names:
        path.unlink()
    ok("decrypt", *map(str, sealed))
    assert all(p.read_bytes() == p.name.encode() * 50 for p in names)


def test_aad_must_match(home: Path) -> None:
    sealed = ok("encrypt", "--key", "k", "--aad", "invoice=42", input=b"secret").stdout_bytes
    assert ok("decrypt", "--aad", "invoice=42", input=sealed).stdout_bytes == b"secret"
    wrong = run("decrypt", "--aad", "invoice=43", input=sealed)
    assert wrong.exit_code == 7 and wrong.stdout_bytes == b""


def test_stdin_to_named_output_and_json_on_stderr(home: Path, tmp_path: Path) -> None:
    result = ok("encrypt", "--key", "k", "-o", str(tmp_path / "s.qimem"), "--json", input=b"hi")
    info = json.loads(result.stdout)
    assert info["output"] == str(tmp_path / "s.qimem") and info["bytes_in"] == 2
    piped = ok("decrypt", "--json", input=(tmp_path / "s.qimem").read_bytes())
    assert piped.stdout_bytes == b"hi"  # the data owns stdout; the summary goes to stderr
    assert json.loads(piped.stderr)["bytes_out"] == 2


def test_several_failures_are_each_named(home: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_bytes(b"fine")
    bad = tmp_path / "bad.qimem"
    bad.write_bytes(b"QMST garbage")
    ok("encrypt", "--key", "k", str(good))
    good.unlink()
    result = run(
        "decrypt",
        str(bad),
        str(tmp_path / "good.txt.qimem"),
        str(tmp_path / "missing.qimem"),
        "--json",
    )
    assert result.exit_code == 1  # an integrity error and a missing file: different classes
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("qimem: error: ") for line in lines)
    assert "bad.qimem" in lines[0] and "missing.qimem" in lines[1]
    assert lines[2] == "qimem: error: 2 of 3 files failed"
    summary = json.loads(result.stdout)
    assert summary["failed"] == 2 and good.read_bytes() == b"fine"
    assert "Traceback" not in result.output


def test_usage_errors(home: Path, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    one_output = run("encrypt", "--key", "k", str(tmp_path / "a"), str(tmp_path / "b"), "-o", "x")
    assert one_output.exit_code == 3 and "--out-dir" in one_output.stderr
    assert run("encrypt", "--key", "k", str(tmp_path), "-o", "x").exit_code == 3
    assert run("encrypt", "--key", "k", "--jobs", "0", str(tmp_path / "a")).exit_code == 2
    ghost = run("encrypt", "--key", "ghost", str(tmp_path / "a"))
    assert ghost.exit_code == 5 and not (tmp_path / "a.qimem").exists()


def test_rewrap_command(home: Path, tmp_path: Path) -> None:
    data = os.urandom(3 * stream.DEFAULT_SEGMENT_SIZE + 1)
    (tmp_path / "f").write_bytes(data)
    ok("encrypt", "--key", "k", str(tmp_path / "f"))
    sealed = tmp_path / "f.qimem"
    before = sealed.read_bytes()
    ok("keys", "rotate", "k")
    result = json.loads(ok("rewrap", str(sealed), "--json").stdout)
    assert result["results"][0]["changed"] is True and result["results"][0]["version"] == 2
    after = sealed.read_bytes()
    old_h, new_h = stream.parse_header(before), stream.parse_header(after)
    assert after[new_h.size :] == before[old_h.size :]
    assert new_h.key_version == 2 and old_h.key_version == 1
    again = json.loads(ok("rewrap", str(tmp_path), "--json").stdout)  # directory: walked
    assert again["results"][0]["changed"] is False
    (tmp_path / "f").unlink()
    ok("decrypt", str(sealed))
    assert (tmp_path / "f").read_bytes() == data
    assert hidden(tmp_path) == []


def test_sigkill_mid_batch_leaves_only_complete_outputs(home: Path, tmp_path: Path) -> None:
    """A real ``qimem encrypt --jobs 2`` process group is SIGKILLed mid-batch: every
    visible output decrypts to its input, inputs are intact, and the next run removes the
    dead run's temp files."""
    src = tmp_path / "in"
    src.mkdir()
    digests = {}
    for i in range(1500):
        data = os.urandom(2048 + i)
        (src / f"f{i:04}").write_bytes(data)
        digests[f"f{i:04}"] = hashlib.sha256(data).hexdigest()
    env = dict(os.environ, QIMEM_HOME=str(home))
    proc = subprocess.Popen(
        [str(QIMEM), "encrypt", "--key", "k", str(src), "--jobs", "2", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(src.glob("*.qimem")) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.2)  # workers die with their parent (PDEATHSIG); let the kernel reap them
    outputs = sorted(src.glob("*.qimem"))
    assert 0 < len(outputs) < 1500, "the kill should land mid-batch"
    for name, digest in digests.items():  # inputs intact
        assert hashlib.sha256((src / name).read_bytes()).hexdigest() == digest
    out_dir = tmp_path / "check"
    ok("decrypt", *map(str, outputs), "--out-dir", str(out_dir), "--quiet")
    for path in out_dir.iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[path.name]

    finish = run("encrypt", "--key", "k", str(src), "--quiet")  # existing outputs: conflicts
    assert finish.exit_code == 6
    assert not [p for p in src.iterdir() if TEMP_MARKER in p.name]  # dead run's temps gone
    assert len(list(src.glob("*.qimem"))) == 1500


def _interrupted_outputs(proc: subprocess.Popen[bytes], out: Path, timeout: float) -> list[str]:
    """Wait for an interrupted batch (its process group is killed if it outlives
    ``timeout``): it exited 130 saying so and left no temp file; the names in ``out``."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.decode().strip() == "qimem: interrupted"
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in names if TEMP_MARKER in n]
    return names


def test_ctrl_c_mid_batch_cleans_up(home: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to a running ``--jobs 2`` batch: exit 130, no temp files, and every
    output that exists is complete."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(1500):
        (src / f"f{i:04}").write_bytes(bytes([i % 256]) * (1024 + i))
    out = tmp_path / "out"
    env = dict(os.environ, QIMEM_HOME=str(home))
    proc = subprocess.Popen(
        [str(QIMEM), "encrypt", "--key", "k", str(src), "--out-dir", str(out), "--jobs", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(out.glob("*.qimem"))) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    names = _interrupted_outputs(proc, out, timeout=60)  # (killed if it outlives that)
    assert 0 < len(names) < 1500, "the interrupt should land mid-batch"
    check = tmp_path / "check"
    ok("decrypt", str(out), "--out-dir", str(check), "--quiet")
    for path in check.iterdir():
        assert path.read_bytes() == (src / path.name).read_bytes()


# Run as ``python -c``: the CLI, with a SIGINT raised inside concurrent.futures.wait() just
# after it has locked the first future (the window of the CI hang: a KeyboardInterrupt
# there left that lock held, and the pool's shutdown then waited forever for its own
# manager thread, which needed it).
_SIGINT_INSIDE_WAIT = """
import signal, sys
from concurrent.futures import _base

def enter(self):
    for i, future in enumerate(self.futures):
        future._condition.acquire()
        if i == 0 and not getattr(_base, "interrupted", False):
            _base.interrupted = True
            signal.raise_signal(signal.SIGINT)

_base._AcquireFutures.__enter__ = enter
from qimem.cli import main
sys.argv[0] = "qimem"
main()
"""


def test_ctrl_c_inside_the_pools_locks_still_ends_the_run(home: Path, tmp_path: Path) -> None:
    """Ctrl-C while the parent holds a future's lock (deterministic: raised there): the
    run still ends with exit 130 and no temp files, instead of hanging in the shutdown."""
    from concurrent.futures import _base

    if not hasattr(_base, "_AcquireFutures"):
        pytest.skip("concurrent.futures without _AcquireFutures")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(bytes([i]) * 3000)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_INSIDE_WAIT, "encrypt", "--key", "k", str(src),
         "--out-dir", str(out), "--jobs", "2"],
        env=dict(os.environ, QIMEM_HOME=str(home)),
        cwd=tmp_path,  # not the repo root, whose ./qimem would shadow the installed package
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    names = _interrupted_outputs(proc, out, timeout=15)
    for name in names:
        assert (
            ok("decrypt", str(out / name), "-o", "-").stdout_bytes
            == (src / name.removesuffix(".qimem")).read_bytes()
        )


def test_derived_key_files_need_their_context(home: Path, tmp_path: Path) -> None:
    """``--context`` on encrypt, decrypt and rewrap: a derived key's per-context subkey wraps
    each file's data key (split files under --jobs 2 too); no context, or another one, fails."""
    ok("keys", "create", "--name", "tenants", "--derived")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"tenant a's data")
    (src / "sub" / "big.bin").write_bytes(os.urandom(9 << 20))  # split across the workers
    out, back = tmp_path / "out", tmp_path / "back"

    refused = run("encrypt", "--key", "tenants", str(src), "--out-dir", str(out))
    assert refused.exit_code == 3 and "context" in refused.stderr
    ok("encrypt", "--key", "tenants", "--context", "tenant-a", "--jobs", "2", str(src),
       "--out-dir", str(out))  # fmt: skip
    for args in ((), ("--context", "tenant-b")):
        wrong = run("decrypt", *args, str(out), "--out-dir", str(back))
        assert wrong.exit_code != 0 and "Traceback" not in wrong.stderr
        assert not back.exists() or files_in(back) == {}
    ok("decrypt", "--context", "tenant-a", "--jobs", "2", str(out), "--out-dir", str(back))
    assert files_in(back) == files_in(src)

    # standard input and output
    sealed = ok("encrypt", "--key", "tenants", "--context", "t-9", input=b"piped").stdout_bytes
    assert ok("decrypt", "--context", "t-9", input=sealed).stdout_bytes == b"piped"
    assert run("decrypt", input=sealed).exit_code == 3

    # rewrap after a rotation: the header moves to version 2 only with the context
    ok("keys", "rotate", "tenants")
    assert run("rewrap", str(out)).exit_code != 0
    ok("rewrap", "--context", "tenant-a", str(out))
    with (out / "a.txt.qimem").open("rb") as fh:
        assert stream.read_header(fh).key_version == 2
    ok("decrypt", "--context", "tenant-a", str(out), "--out-dir", str(tmp_path / "again"))
    assert files_in(tmp_path / "again") == files_in(src)
