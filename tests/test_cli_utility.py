"""``qimem random`` and ``qimem hash`` through click's CliRunner: formats, files, and bad
input (sizes, algorithms, missing files, raw bytes to a terminal) as one-line errors."""

from __future__ import annotations

import base64
import hashlib
import io
import stat
import sys
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, ok, run

from qimem.cli.utility import random_
from qimem.errors import ValidationError
from qimem.services.randomness import HASH_ALGORITHMS, MAX_RANDOM_BYTES

# The CLI needs no store: every test runs in an empty QIMEM_HOME (qimem_home), so a
# command that opened one would fail with "run qimem init".


def test_random_prints_base64_by_default(qimem_home: Path) -> None:
    out = ok("random", "32").stdout
    assert out.endswith("\n") and out.count("\n") == 1
    assert len(base64.b64decode(out.strip(), validate=True)) == 32
    assert ok("random", "32").stdout != out


def test_random_hex_and_raw(qimem_home: Path) -> None:
    out = ok("random", "16", "--format", "hex").stdout.strip()
    assert len(bytes.fromhex(out)) == 16
    raw = ok("random", "1000", "--format", "raw").stdout_bytes
    assert len(raw) == 1000


def test_random_largest_size(qimem_home: Path) -> None:
    raw = ok("random", str(MAX_RANDOM_BYTES), "--format", "raw").stdout_bytes
    assert len(raw) == MAX_RANDOM_BYTES


@pytest.mark.parametrize("n", ["0", "-1", "-9999999999999999999999", str(MAX_RANDOM_BYTES + 1)])
def test_random_refuses_a_bad_size(qimem_home: Path, n: str) -> None:
    result = run("random", n)
    assert_one_line_error(result, 3, "1 to 1048576")
    assert result.stdout == ""


@pytest.mark.parametrize("n", ["abc", "1.5", "0x10", ""])
def test_random_refuses_a_size_that_is_not_a_number(qimem_home: Path, n: str) -> None:
    result = run("random", n)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.stdout == ""


def test_random_to_a_new_private_file(qimem_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "seed.bin"
    assert ok("random", "64", "--format", "raw", "-o", str(target)).stdout == ""
    assert len(target.read_bytes()) == 64
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    before = target.read_bytes()
    assert_one_line_error(run("random", "64", "-o", str(target)), 6, str(target))
    assert target.read_bytes() == before  # never overwritten without --force
    ok("random", "64", "--format", "raw", "-o", str(target), "--force")
    assert target.read_bytes() != before


def test_random_to_a_missing_directory_is_one_line(qimem_home: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("random", "8", "-o", str(tmp_path / "nope" / "x")), 3, "nope")


def test_random_raw_refuses_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw bytes on a terminal would garble it (and show the secret): refused before any
    byte is written. (CliRunner replaces stdout with a pipe, so the command's callback is
    called with a terminal-like stdout in place.)"""

    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    terminal = io.TextIOWrapper(Terminal())
    monkeypatch.setattr(sys, "stdout", terminal)
    with pytest.raises(ValidationError, match="terminal"):
        random_.callback(8, "raw", None, False)  # type: ignore[misc]
    random_.callback(8, "hex", None, False)  # type: ignore[misc]  # text is fine
    written = terminal.buffer.getvalue()  # type: ignore[attr-defined]
    assert len(bytes.fromhex(written.decode())) == 8


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_hash_of_a_file_matches_hashlib(qimem_home: Path, tmp_path: Path, algorithm: str) -> None:
    data = bytes(range(256)) * 9000  # over one read chunk
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    name = algorithm.replace("sha2-", "sha").replace("sha3-", "sha3_")
    expected = hashlib.new(name, data)
    assert ok("hash", str(path), "--algorithm", algorithm).stdout == expected.hexdigest() + "\n"
    out = ok("hash", str(path), "-a", algorithm, "--format", "base64").stdout
    assert base64.b64decode(out) == expected.digest()


def test_hash_of_standard_input_defaults_to_sha2_256(qimem_home: Path) -> None:
    assert ok("hash", input=b"abc").stdout.strip() == hashlib.sha256(b"abc").hexdigest()
    assert ok("hash", "-", input=b"").stdout.strip() == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "SHA2-256", "sha256", "x" * 5000])
def test_hash_refuses_an_unknown_algorithm(qimem_home: Path, algorithm: str) -> None:
    result = run("hash", "--algorithm", algorithm, input=b"abc")
    assert_one_line_error(result, 3, "unknown hash algorithm", "sha3-512")
    assert result.stdout == ""


def test_hash_of_a_missing_file_or_a_directory(qimem_home: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("hash", str(tmp_path / "missing")), 3, "no such file")
    result = run("hash", str(tmp_path))
    assert result.exit_code in (2, 3) and "Traceback" not in result.output


# --------------------------------------------------------------------------- deterministic keys


def test_file_commands_refuse_a_deterministic_key(qimem_home: Path, tmp_path: Path) -> None:
    """Files always use a random data key (stream v1): a deterministic key is refused with
    one line before any output is written."""
    ok("init")
    ok("keys", "create", "--name", "tokens", "--algorithm", "aes-256-siv")
    source = tmp_path / "card.txt"
    source.write_bytes(b"4111 1111 1111 1111\n")
    result = run("encrypt", "--key", "tokens", str(source))
    assert_one_line_error(result, 3, "deterministic key", "need an encrypt key")
    assert not (tmp_path / "card.txt.qimem").exists()
    piped = run("encrypt", "--key", "tokens", input=b"data")
    assert_one_line_error(piped, 3, "deterministic key")
    assert piped.stdout_bytes == b""
