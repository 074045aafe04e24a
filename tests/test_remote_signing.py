"""``qimem --server URL sign|verify|mac|verify-mac|keys public|random`` (issue 16): the
server signs, verifies and computes tags through ``/v1/security/*``, and the CLI prints and
writes exactly what it does locally (same bytes, same exit codes). A real waitress server
with authentication on a SQLite store that the local CLI opens too, so a signature made on
one side is checked on the other."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import make_app
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from identity_helpers import password_login, password_of, serving, serving_wsgi, with_identity
from serve_process import QIMEM_ARGV, home_env

from qimem.app import AppContext
from qimem.cli import cli
from qimem.errors import StoreUnavailableError
from qimem.remote import RemoteKeys
from qimem.rootkey import encode_root_key, generate_root_key
from qimem.services import identity as ids
from qimem.services.keys import create_key

MESSAGE = b"pay 100 to alice\x00\xff" * 7
SIGNING = ("keys:read", "keys:sign", "keys:verify", "keys:mac", "keys:verify-mac")


@dataclass
class Live:
    url: str
    token: str = field(repr=False)  # keys:sign, keys:verify, keys:mac, keys:verify-mac
    weak_token: str = field(repr=False)  # encryptor: no signing or MAC permission
    store_url: str = ""
    root_key: str = field(default="", repr=False)
    app: AppContext = field(default=None, repr=False)  # type: ignore[assignment]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    store_url = f"sqlite:///{tmp_path_factory.mktemp('server') / 'qimem.db'}"
    root_key = encode_root_key(generate_root_key())
    app = with_identity(make_app(store_url, root_key))
    ids.create_realm(app, "acme")
    ids.create_role(app, "acme", "signer", SIGNING)
    ids.add_user(app, "acme", "sam", password_of("sam"), ["signer"])
    ids.add_user(app, "acme", "eve", password_of("eve"), ["encryptor"])
    for name, algorithm in (("ed", "ed25519"), ("ec", "ecdsa-p256"), ("hm", "hmac-sha256")):
        create_key(app, name=name, algorithm=algorithm, realm="acme")
    create_key(app, name="aes", realm="acme")
    ids.create_realm(app, "beta")  # another tenant with a key of the same name
    create_key(app, name="ed", algorithm="ed25519", realm="beta")
    token = password_login(app, "acme", "sam", password_of("sam")).access_token
    weak = password_login(app, "acme", "eve", password_of("eve")).access_token
    with serving(app) as url:
        yield Live(url, token, weak, store_url, root_key, app)
    ids.close_identity(app)
    app.close()


@pytest.fixture
def env(live: Live, qimem_home: Path, monkeypatch: pytest.MonkeyPatch) -> Live:
    for var in ("QIMEM_SERVER", "QIMEM_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return live


def remote(live: Live, *args: str, weak: bool = False, **kwargs: Any) -> Any:
    """``qimem --server URL --realm acme ARGS`` with the token in the environment."""
    token = live.weak_token if weak else live.token
    result = CliRunner().invoke(
        cli, ["--server", live.url, "--realm", "acme", *args], env={"QIMEM_TOKEN": token}, **kwargs
    )
    assert token not in result.stdout and token not in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def local(live: Live, *args: str, **kwargs: Any) -> Any:
    """``qimem --store URL --realm acme ARGS``: the server's store, opened here."""
    result = CliRunner().invoke(
        cli,
        ["--store", live.store_url, "--realm", "acme", *args],
        env={"QIMEM_ROOT_KEY": live.root_key},
        **kwargs,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_sign_remotely_verify_locally_and_back(env: Live, tmp_path: Path) -> None:
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    made = remote(env, "sign", "--key", "ed", str(msg), "-o", str(tmp_path / "r.sig"))
    assert made.exit_code == 0, made.stderr
    here = local(env, "sign", "--key", "ed", str(msg), "-o", str(tmp_path / "l.sig"))
    assert here.exit_code == 0, here.stderr
    # Ed25519 is deterministic: the same signature, header included, from either side.
    assert (tmp_path / "r.sig").read_bytes() == (tmp_path / "l.sig").read_bytes()
    for sig, check in (("r.sig", local), ("l.sig", remote)):
        ok = check(env, "verify", "--key", "ed", str(msg), "--signature", str(tmp_path / sig))
        assert (ok.exit_code, ok.stdout) == (0, "valid\n"), ok.stderr
    # Standard input, and --json: the same document as locally.
    piped = remote(env, "sign", "--key", "ed", "--json", input=MESSAGE)
    assert piped.exit_code == 0, piped.stderr
    assert json.loads(piped.stdout) == json.loads(local(env, "sign", "--key", "ed", "--json",
                                                        input=MESSAGE).stdout)  # fmt: skip


def test_invalid_signature_is_exit_7_like_locally(env: Live, tmp_path: Path) -> None:
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    sig = tmp_path / "s.sig"
    assert remote(env, "sign", "--key", "ec", str(msg), "-o", str(sig)).exit_code == 0
    other = tmp_path / "other"
    other.write_bytes(MESSAGE + b"!")
    for check in (remote, local):
        bad = check(env, "verify", "--key", "ec", str(other), "--signature", str(sig))
        assert (bad.exit_code, bad.stdout) == (7, "invalid\n")
        as_json = check(env, "verify", "--key", "ec", str(other), "--signature", str(sig), "--json")
        assert as_json.exit_code == 7
        assert json.loads(as_json.stdout) == {"valid": False, "key_id": None, "version": None}
    # A signature file over the size limit is invalid unread, on both sides.
    huge = tmp_path / "huge.sig"
    huge.write_bytes(b"\x00" * (64 * 1024 + 1))
    for check in (remote, local):
        assert (
            check(env, "verify", "--key", "ec", str(msg), "--signature", str(huge)).exit_code == 7
        )
    # Another key's signature (another lineage) is invalid, not an error.
    ed_sig = tmp_path / "ed.sig"
    assert remote(env, "sign", "--key", "ed", str(msg), "-o", str(ed_sig)).exit_code == 0
    assert remote(env, "verify", "--key", "ec", str(msg), "--signature", str(ed_sig)).exit_code == 7


def test_raw_signatures_and_public_keys(env: Live, tmp_path: Path) -> None:
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    raw = remote(env, "sign", "--key", "ed", "--raw", str(msg), "-o", str(tmp_path / "raw.sig"))
    assert raw.exit_code == 0, raw.stderr
    bare = (tmp_path / "raw.sig").read_bytes()
    assert len(bare) == 64  # the bare Ed25519 signature, no header
    pem = remote(env, "keys", "public", "ed")
    assert pem.exit_code == 0 and pem.stdout == local(env, "keys", "public", "ed").stdout
    public = load_pem_public_key(pem.stdout.encode())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(bare, MESSAGE)  # a third-party verifier accepts it
    for check in (remote, local):
        ok = check(env, "verify", "--key", "ed", "--raw", "--version", "1", str(msg),
                   "--signature", str(tmp_path / "raw.sig"))  # fmt: skip
        assert ok.exit_code == 0, ok.stderr
    no_version = remote(env, "verify", "--key", "ed", "--version", "1", str(msg),
                        "--signature", str(tmp_path / "raw.sig"))  # fmt: skip
    assert no_version.exit_code == 3 and "--raw" in no_version.stderr
    # ECDSA over JWS marshaling (r || s, 64 bytes for P-256), verified on the other side.
    jws = remote(env, "sign", "--key", "ec", "--raw", "--marshaling", "jws", str(msg),
                 "-o", str(tmp_path / "jws.sig"))  # fmt: skip
    assert jws.exit_code == 0 and len((tmp_path / "jws.sig").read_bytes()) == 64
    back = local(env, "verify", "--key", "ec", "--raw", "--marshaling", "jws", str(msg),
                 "--signature", str(tmp_path / "jws.sig"))  # fmt: skip
    assert back.exit_code == 0, back.stderr
    for fmt in ("jwk", "jwks"):
        got = remote(env, "keys", "public", "ec", "--format", fmt)
        assert got.exit_code == 0, got.stderr
        assert json.loads(got.stdout) == json.loads(local(env, "keys", "public", "ec",
                                                          "--format", fmt).stdout)  # fmt: skip
    for args in (["--json"], ["--format", "jwks", "--json"], ["--version", "1", "--json"]):
        got = remote(env, "keys", "public", "ec", *args)
        assert got.exit_code == 0, got.stderr
        assert json.loads(got.stdout) == json.loads(
            local(env, "keys", "public", "ec", *args).stdout
        )
    no_public = remote(env, "keys", "public", "hm")
    assert no_public.exit_code == 3 and "MAC" in no_public.stderr


def test_mac_remote_and_local_agree(env: Live, tmp_path: Path) -> None:
    data = tmp_path / "hook.json"
    data.write_bytes(b'{"event": "paid"}')
    made = remote(env, "mac", "--key", "hm", str(data), "-o", str(tmp_path / "r.tag"))
    assert made.exit_code == 0, made.stderr
    assert local(env, "mac", "--key", "hm", str(data), "-o", str(tmp_path / "l.tag")).exit_code == 0
    assert (tmp_path / "r.tag").read_bytes() == (tmp_path / "l.tag").read_bytes()
    for tag, check in (("r.tag", local), ("l.tag", remote)):
        ok = check(env, "verify-mac", "--key", "hm", str(data), "--tag", str(tmp_path / tag))
        assert (ok.exit_code, ok.stdout) == (0, "valid\n"), ok.stderr
    raw = remote(env, "mac", "--key", "hm", "--raw", "--json", str(data))
    assert raw.exit_code == 0
    assert json.loads(raw.stdout) == json.loads(local(env, "mac", "--key", "hm", "--raw",
                                                      "--json", str(data)).stdout)  # fmt: skip
    (tmp_path / "raw.tag").write_bytes(base64.b64decode(json.loads(raw.stdout)["tag"]))
    ok = remote(env, "verify-mac", "--key", "hm", "--raw", str(data), "--tag",
                str(tmp_path / "raw.tag"))  # fmt: skip
    assert ok.exit_code == 0, ok.stderr
    data.write_bytes(b'{"event": "paid twice"}')
    for check in (remote, local):
        bad = check(env, "verify-mac", "--key", "hm", str(data), "--tag", str(tmp_path / "r.tag"))
        assert (bad.exit_code, bad.stdout) == (7, "invalid\n")


@pytest.mark.parametrize(
    "args",
    [
        ["sign", "--key", "hm"],  # a MAC key cannot sign
        ["sign", "--key", "aes"],  # nor an encryption key
        ["mac", "--key", "ed"],  # a signing key computes no MAC
        ["verify-mac", "--key", "ed", "--tag", "TAGFILE"],
        ["verify", "--key", "hm", "--signature", "TAGFILE"],
        ["sign", "--key", "nobody"],  # unknown key: 5
        ["sign", "--key", "ed", "--prehashed"],  # Ed25519 takes no digest: 3
    ],
)
def test_errors_have_the_local_exit_codes(env: Live, tmp_path: Path, args: list[str]) -> None:
    tag = tmp_path / "t"
    tag.write_bytes(b"QMTG" + b"\x00" * 40)
    args = [str(tag) if a == "TAGFILE" else a for a in args]
    here = local(env, *args, input=MESSAGE)
    there = remote(env, *args, input=MESSAGE)
    assert here.exit_code in (3, 5) and there.exit_code == here.exit_code, there.stderr
    assert there.stderr.startswith("qimem: error: server " + env.url)
    assert len(there.stderr.strip().splitlines()) == 1
    assert there.stdout == ""


def test_a_token_without_signing_rights_is_refused(env: Live, tmp_path: Path) -> None:
    sig = tmp_path / "s"
    assert remote(env, "sign", "--key", "ed", "-o", str(sig), input=MESSAGE).exit_code == 0
    for args, permission in (
        (["sign", "--key", "ed", "-o", str(tmp_path / "x")], "keys:sign"),
        (["verify", "--key", "ed", "--signature", str(sig)], "keys:verify"),
        (["mac", "--key", "hm", "-o", str(tmp_path / "x")], "keys:mac"),
        (["verify-mac", "--key", "hm", "--tag", str(sig)], "keys:verify-mac"),
    ):
        refused = remote(env, *args, weak=True, input=MESSAGE)
        assert refused.exit_code == 4, refused.stderr
        assert f"needs the {permission} permission" in refused.stderr
        assert not (tmp_path / "x").exists()
    # A bad token is 4 too, and never printed.
    result = CliRunner().invoke(
        cli,
        ["--server", env.url, "sign", "--key", "ed", "-o", str(tmp_path / "x")],
        env={"QIMEM_TOKEN": "forged-token-value"},
        input=MESSAGE,
    )
    assert result.exit_code == 4 and "forged-token-value" not in result.output
    assert not (tmp_path / "x").exists()


def test_random_from_the_server_and_hash_stays_local(env: Live, tmp_path: Path) -> None:
    got = remote(env, "random", "48", "--format", "hex")
    assert got.exit_code == 0, got.stderr
    assert len(bytes.fromhex(got.stdout.strip())) == 48
    raw = remote(env, "random", "1048576", "-o", str(tmp_path / "r.bin"), "--format", "raw")
    assert raw.exit_code == 0 and len((tmp_path / "r.bin").read_bytes()) == 1 << 20
    assert remote(env, "random", "0").exit_code == 3  # refused before any request
    # The server drew them (twice; the refused size never left): its audit has both.
    events = ids.audit_events(env.app, "acme", action="crypto.random")
    assert len(events) == 2 and {e.actor for e in events} == {events[0].actor}

    (tmp_path / "f").write_bytes(b"abc")
    down = f"http://127.0.0.1:{_free_port()}"
    hashed = CliRunner().invoke(cli, ["--server", down, "hash", str(tmp_path / "f")])
    assert hashed.exit_code == 0, hashed.stderr  # no server needed
    assert hashed.stdout.startswith("ba7816bf")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "args",
    [
        ["sign", "--key", "ed"],
        ["verify", "--key", "ed", "--signature", "SIG"],
        ["mac", "--key", "hm"],
        ["verify-mac", "--key", "hm", "--tag", "SIG"],
        ["keys", "public", "ed"],
        ["random", "16"],
    ],
)
def test_server_down_is_exit_10(qimem_home: Path, tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "sig").write_bytes(b"x" * 90)
    args = [str(tmp_path / "sig") if a == "SIG" else a for a in args]
    url = f"http://127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(
        cli, ["--server", url, *args], env={"QIMEM_TOKEN": "secret-token-value"}, input=MESSAGE
    )
    assert result.exit_code == 10, result.output
    assert result.stderr == f"qimem: error: cannot reach server {url}: ConnectionRefusedError\n"
    assert result.stdout == "" and "secret-token-value" not in result.output


def test_real_processes_sign_and_verify_over_the_server(env: Live, tmp_path: Path) -> None:
    """The qimem program itself, token and server in its environment (not argv)."""
    home = tmp_path / "home"
    variables = {"QIMEM_SERVER": env.url, "QIMEM_TOKEN": env.token}

    def qimem(*args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*QIMEM_ARGV, "--realm", "acme", *args],
            env=home_env(home, **variables),
            cwd=tmp_path,
            input=data,
            capture_output=True,
            timeout=60,
        )

    signed = qimem("sign", "--key", "ec", data=MESSAGE)
    assert signed.returncode == 0, signed.stderr
    assert signed.stderr == b""
    (tmp_path / "sig").write_bytes(signed.stdout)
    ok = qimem("verify", "--key", "ec", "--signature", "sig", data=MESSAGE)
    assert (ok.returncode, ok.stdout) == (0, b"valid\n"), ok.stderr
    bad = qimem("verify", "--key", "ec", "--signature", "sig", data=MESSAGE[1:])
    assert (bad.returncode, bad.stdout) == (7, b"invalid\n")
    here = local(env, "verify", "--key", "ec", "--signature", str(tmp_path / "sig"), input=MESSAGE)
    assert here.exit_code == 0
    for out in (signed, ok, bad):
        assert env.token.encode() not in out.stdout + out.stderr


# ---- a hostile server: answers that must not pass for a valid signature or a public key --


def _hostile(answer: dict[str, Any]) -> Any:
    body = json.dumps(answer).encode()

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    return wsgi


@pytest.mark.parametrize(
    "answer", [{"valid": "true"}, {"valid": 1}, {"valid": None}, {"nothing": True}, {"valid": []}]
)
def test_only_a_json_true_is_valid(answer: dict[str, Any]) -> None:
    with serving_wsgi(_hostile(answer)) as url:
        keys = RemoteKeys(url, "t")
        try:
            if "valid" in answer:
                assert keys.verify("k", b"m", b"s").valid is False
                assert keys.verify_mac("k", b"m", b"s").valid is False
            else:
                with pytest.raises(StoreUnavailableError):
                    keys.verify("k", b"m", b"s")
        finally:
            keys.close()


def test_private_members_from_a_server_are_refused() -> None:
    leaked = {
        "key_id": "k", "version": 1, "algorithm": "ed25519",
        "pem": "-----BEGIN PRIVATE KEY-----\n", "jwk": {"kty": "OKP", "d": "c2VjcmV0"},
    }  # fmt: skip
    with serving_wsgi(_hostile(leaked)) as url:
        keys = RemoteKeys(url, "t")
        try:
            with pytest.raises(StoreUnavailableError, match="private"):
                keys.public_key("k")
        finally:
            keys.close()


@pytest.mark.parametrize("size", [3 << 19, 3 << 20])
def test_a_message_over_the_server_body_limit_is_one_line(
    env: Live, tmp_path: Path, size: int
) -> None:
    """Locally these messages sign; the server's body limit (1 MiB) refuses them: exit 3
    with the server's reason, no signature file, the message not echoed. 1.5 MiB goes whole
    (the app answers 413); 3 MiB is cut off by waitress's backstop while the client still
    sends, and its early 413 must still be read (it was 'cannot reach server', exit 10)."""
    big = tmp_path / "big"
    big.write_bytes(b"A" * size)
    out = tmp_path / "big.sig"
    for _ in range(3):  # the early answer is a race on the server's side: try it a few times
        refused = remote(env, "sign", "--key", "ed", str(big), "-o", str(out))
        assert refused.exit_code == 3, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "AAAA" not in refused.stderr
        assert "--prehashed" in refused.stderr
        assert not out.exists()
    assert local(env, "sign", "--key", "ed", str(big), "-o", str(out)).exit_code == 0


def test_another_realm_is_not_reachable_with_an_acme_token(env: Live, tmp_path: Path) -> None:
    """--realm beta (which has a key 'ed' too) with a token of realm acme: refused by the
    server (the client sends the realm, the server decides) as if beta did not exist (a
    caller only learns about its own realm, docs/files.md), and no signature is written."""
    out = tmp_path / "x.sig"
    for args in (["sign", "--key", "ed", "-o", str(out)], ["keys", "public", "ed"]):
        result = CliRunner().invoke(
            cli,
            ["--server", env.url, "--realm", "beta", *args],
            env={"QIMEM_TOKEN": env.token},
            input=MESSAGE,
        )
        assert result.exit_code == 5, result.output
        assert "realm 'beta' does not exist" in result.stderr
        assert result.stdout == "" and not out.exists()
