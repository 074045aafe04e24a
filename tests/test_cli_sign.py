"""``qimem sign|verify|mac|verify-mac`` and ``keys public`` through the real CLI (click's
runner, a real SQLite store in QIMEM_HOME): exit 0 valid / 7 invalid, one-line errors with
the error class's exit code, no partial output files, raw signatures that cryptography
verifies with the exported public key, public keys without private members."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from test_cli import as_json, assert_one_line_error, create, ok, run

from qimem.crypto_purposes import PRIVATE_JWK_FIELDS

MESSAGE = b"release v1.2.3 \x00\xff\n"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized home with signing key ``s``, MAC key ``m`` and AEAD key ``e``, made
    once per module (``init`` and key creation cost a second under load)."""
    home = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QIMEM_HOME", str(home))
        for var in ("QIMEM_CONFIG", "QIMEM_STORE", "QIMEM_ROOT_KEY"):
            patch.delenv(var, raising=False)
        ok("init")
        create("s", "--algorithm", "ed25519")
        create("m", "--algorithm", "hmac-sha256")
        create("e")
    return home


@pytest.fixture
def files(template: Path, qimem_home: Path, tmp_path: Path) -> Path:
    """A copy of the template home as this test's QIMEM_HOME, and ``msg.txt`` in the
    returned directory."""
    for item in template.iterdir():
        shutil.copy2(item, qimem_home / item.name)
    config = qimem_home / "config.toml"
    config.write_text(config.read_text().replace(str(template), str(qimem_home)))
    (tmp_path / "msg.txt").write_bytes(MESSAGE)
    return tmp_path


def test_sign_verify_file_and_stdin(files: Path) -> None:
    sig = files / "msg.sig"
    ok("sign", "--key", "s", str(files / "msg.txt"), "-o", str(sig))
    assert sig.read_bytes()[:4] == b"QMSG"
    assert ok("verify", "--key", "s", str(files / "msg.txt"), "--signature", str(sig)).stdout == (
        "valid\n"
    )
    assert ok("verify", "--key", "s", "--signature", str(sig), input=MESSAGE).stdout == "valid\n"
    stdout_sig = ok("sign", "--key", "s", input=MESSAGE).stdout_bytes
    (files / "stdin.sig").write_bytes(stdout_sig)
    assert ok("verify", "--key", "s", "--signature", str(files / "stdin.sig"), input=MESSAGE)


def test_invalid_is_exit_7_with_invalid_on_stdout(files: Path) -> None:
    sig = files / "msg.sig"
    ok("sign", "--key", "s", str(files / "msg.txt"), "-o", str(sig))
    result = run("verify", "--key", "s", "--signature", str(sig), input=MESSAGE + b"!")
    assert (result.exit_code, result.stdout, result.stderr) == (7, "invalid\n", "")
    result = run("verify", "--key", "s", "--signature", str(sig), "--json", input=b"other")
    assert result.exit_code == 7
    assert json.loads(result.stdout) == {"valid": False, "key_id": None, "version": None}


@pytest.mark.parametrize(
    "content",
    [b"", b"QMSG", b"garbage" * 3, b"QMSG\x01\x10" + b"\x00" * 100, b"\xff" * (64 * 1024 + 1)],
    ids=["empty", "magic-only", "garbage", "zero-key-id", "oversized"],
)
def test_truncated_garbage_and_oversized_signature_files_are_invalid(
    files: Path, content: bytes
) -> None:
    bad = files / "bad.sig"
    bad.write_bytes(content)
    result = run("verify", "--key", "s", "--signature", str(bad), input=MESSAGE)
    assert (result.exit_code, result.stdout) == (7, "invalid\n")
    assert "Traceback" not in result.output


def test_truncated_and_tampered_real_signatures_are_invalid(files: Path) -> None:
    good = ok("sign", "--key", "s", input=MESSAGE).stdout_bytes
    bad = files / "bad.sig"
    for form in (good[:-1], good[:26], good + b"\x00", good[:40] + b"\x00" + good[41:]):
        bad.write_bytes(form)
        assert run("verify", "--key", "s", "--signature", str(bad), input=MESSAGE).exit_code == 7


def test_a_signature_of_another_key_is_invalid(files: Path) -> None:
    create("t", "--algorithm", "ed25519")
    sig = files / "t.sig"
    sig.write_bytes(ok("sign", "--key", "t", input=MESSAGE).stdout_bytes)
    assert run("verify", "--key", "s", "--signature", str(sig), input=MESSAGE).exit_code == 7
    assert ok("verify", "--key", "t", "--signature", str(sig), input=MESSAGE)


def test_rotation_then_old_signature_verifies_and_json_names_the_version(files: Path) -> None:
    sig = files / "msg.sig"
    first = as_json(ok("sign", "--key", "s", str(files / "msg.txt"), "-o", str(sig), "--json"))
    assert isinstance(first, dict) and first["version"] == 1 and first["algorithm"] == "ed25519"
    ok("keys", "rotate", "s")
    result = as_json(
        ok("verify", "--key", "s", str(files / "msg.txt"), "--signature", str(sig), "--json")
    )
    assert result == {"valid": True, "key_id": first["key_id"], "version": 1}
    ok("keys", "disable", "s", "--version", "1")
    assert_one_line_error(
        run("verify", "--key", "s", "--signature", str(sig), input=MESSAGE), 6, "disabled"
    )


def test_raw_signature_verifies_with_the_exported_public_key(files: Path) -> None:
    raw = ok("sign", "--key", "s", "--raw", input=MESSAGE).stdout_bytes
    assert len(raw) == 64
    pem = ok("keys", "public", "s").stdout
    key = serialization.load_pem_public_key(pem.encode())
    key.verify(raw, MESSAGE)  # type: ignore[call-arg, union-attr]
    with pytest.raises(InvalidSignature):
        key.verify(raw, MESSAGE + b"!")  # type: ignore[call-arg, union-attr]
    (files / "raw.sig").write_bytes(raw)
    assert ok("verify", "--key", "s", "--raw", "--signature", str(files / "raw.sig"), input=MESSAGE)
    ok("keys", "rotate", "s")
    args = ["verify", "--key", "s", "--raw", "--signature", str(files / "raw.sig")]
    assert run(*args, input=MESSAGE).exit_code == 7
    assert ok(*args, "--version", "1", input=MESSAGE)
    assert_one_line_error(
        run("verify", "--key", "s", "--version", "1", "--signature", "x", input=MESSAGE), 3, "--raw"
    )


def test_ecdsa_jws_and_prehashed(files: Path) -> None:
    import hashlib

    create("ec", "--algorithm", "ecdsa-p256")
    jws = ok("sign", "--key", "ec", "--raw", "--marshaling", "jws", input=MESSAGE).stdout_bytes
    assert len(jws) == 64
    (files / "jws.sig").write_bytes(jws)
    args = ["verify", "--key", "ec", "--raw", "--signature", str(files / "jws.sig")]
    assert ok(*args, "--marshaling", "jws", input=MESSAGE)
    assert run(*args, input=MESSAGE).exit_code == 7  # read as DER: invalid
    digest = hashlib.sha256(MESSAGE).digest()
    (files / "pre.sig").write_bytes(
        ok("sign", "--key", "ec", "--prehashed", input=digest).stdout_bytes
    )
    assert ok("verify", "--key", "ec", "--signature", str(files / "pre.sig"), input=MESSAGE)
    assert_one_line_error(run("sign", "--key", "s", "--prehashed", input=digest), 3, "digest")


def test_wrong_purpose_is_one_line_exit_3_and_writes_no_file(files: Path) -> None:
    out = files / "never.sig"
    for args in (
        ["sign", "--key", "m", "-o", str(out)],
        ["sign", "--key", "e", "-o", str(out)],
        ["mac", "--key", "s", "-o", str(out)],
        ["keys", "public", "m"],
        ["keys", "public", "e"],
    ):
        assert_one_line_error(run(*args, input=MESSAGE), 3, "key")
        assert not out.exists()
    assert_one_line_error(run("encrypt", "--key", "s", input=MESSAGE), 3, "sign key")
    assert_one_line_error(run("keys", "create", "--algorithm", "ed25519", "--purpose", "mac"), 3)
    assert_one_line_error(run("keys", "create", "--algorithm", "hmac-sha256", "--derived"), 3)


def test_output_is_never_overwritten_without_force_and_missing_files_are_errors(
    files: Path,
) -> None:
    out = files / "exists.sig"
    out.write_bytes(b"keep me")
    assert_one_line_error(run("sign", "--key", "s", "-o", str(out), input=MESSAGE), 6)
    assert out.read_bytes() == b"keep me"
    ok("sign", "--key", "s", "-o", str(out), "--force", input=MESSAGE)
    assert out.read_bytes()[:4] == b"QMSG"
    assert_one_line_error(run("sign", "--key", "s", str(files / "nope.txt")), 3, "no such file")
    missing = ["verify", "--key", "s", "--signature", str(files / "nope.sig")]
    assert_one_line_error(run(*missing, input=MESSAGE), 3, "no such file")
    assert_one_line_error(run("sign", "--key", "nope", input=MESSAGE), 5)
    assert not list(files.glob(".*tmp*"))


def test_mac_and_verify_mac(files: Path) -> None:
    tag = files / "msg.tag"
    ok("mac", "--key", "m", str(files / "msg.txt"), "-o", str(tag))
    assert tag.read_bytes()[:4] == b"QMTG" and len(tag.read_bytes()) == 26 + 32
    assert ok("verify-mac", "--key", "m", "--tag", str(tag), input=MESSAGE).stdout == "valid\n"
    result = run("verify-mac", "--key", "m", "--tag", str(tag), input=MESSAGE + b"!")
    assert (result.exit_code, result.stdout) == (7, "invalid\n")
    sig = files / "msg.sig"
    sig.write_bytes(ok("sign", "--key", "s", input=MESSAGE).stdout_bytes)
    assert run("verify-mac", "--key", "m", "--tag", str(sig), input=MESSAGE).exit_code == 7
    raw = ok("mac", "--key", "m", "--raw", input=MESSAGE).stdout_bytes
    assert raw == tag.read_bytes()[26:]
    data = as_json(ok("mac", "--key", "m", "--json", input=MESSAGE))
    assert isinstance(data, dict) and data["version"] == 1 and data["algorithm"] == "hmac-sha256"
    ok("keys", "rotate", "m")
    assert ok("verify-mac", "--key", "m", "--tag", str(tag), input=MESSAGE)
    assert_one_line_error(run("verify-mac", "--key", "s", "--tag", str(tag), input=MESSAGE), 3)


def test_keys_public_formats_never_show_private_members(files: Path) -> None:
    jwk = as_json(ok("keys", "public", "s", "--format", "jwk"))
    assert isinstance(jwk, dict) and jwk["kty"] == "OKP" and not set(jwk) & PRIVATE_JWK_FIELDS
    ok("keys", "rotate", "s")
    jwks = as_json(ok("keys", "public", "s", "--format", "jwks"))
    assert isinstance(jwks, dict) and len(jwks["keys"]) == 2
    assert all(not set(k) & PRIVATE_JWK_FIELDS for k in jwks["keys"])
    first = as_json(ok("keys", "public", "s", "--version", "1", "--json"))
    assert isinstance(first, dict) and first["version"] == 1
    assert first["jwk"]["kid"] == first["key_id"] == jwks["keys"][0]["kid"]
    assert "PRIVATE" not in ok("keys", "public", "s").stdout


def test_keys_list_show_and_create_name_the_purpose(files: Path) -> None:
    listed = as_json(ok("keys", "list", "--json"))
    assert isinstance(listed, list)
    assert {k["name"]: k["purpose"] for k in listed} == {"s": "sign", "m": "mac", "e": "encrypt"}
    shown = as_json(ok("keys", "show", "s", "--json"))
    assert isinstance(shown, dict) and shown["purpose"] == "sign"
    assert "purpose:    mac" in ok("keys", "show", "m").stdout
    rotated = as_json(ok("keys", "rotate", "m", "--json"))
    assert isinstance(rotated, dict) and rotated["purpose"] == "mac"
    made = create("p", "--algorithm", "ecdsa-p384", "--purpose", "sign")
    assert made["purpose"] == "sign"
