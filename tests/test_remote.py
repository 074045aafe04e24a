"""Remote keys (issue 3 item 5, issue 5 item 6): ``qimem --server URL --token T`` gets data
keys from a real waitress server (authentication on, SQLite store) and seals the file data
locally. Every request and response body is recorded at the WSGI layer to prove that no
file data crosses the network."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import password_login, serving_wsgi, with_identity

from qimem import stream
from qimem.app import AppContext
from qimem.cli import cli
from qimem.errors import AuthError, StoreUnavailableError
from qimem.http_client import HttpClient, insecure_warning
from qimem.remote import RemoteKeys
from qimem.rootkey import encode_root_key, generate_root_key
from qimem.services import identity as ids

SECRET = b"TOP-SECRET-FILE-DATA:" + bytes(range(256)) * 40 + b":END-OF-SECRET"


@dataclass
class Recorder:
    """A WSGI wrapper keeping every request and response body the server saw."""

    app: Any
    bodies: list[bytes] = field(default_factory=list, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        chunks = list(self.app(environ, start_response))
        with self.lock:
            self.bodies.append(body)
            self.bodies.append(b"".join(chunks))
        return chunks

    def assert_never_seen(self, data: bytes) -> None:
        """Neither ``data`` nor any base64 rendering of a 48-byte piece of it was sent."""
        with self.lock:
            seen = list(self.bodies)
        assert seen, "the server saw no requests at all"
        needles = [data[:64], data[-64:]]
        for shift in range(3):  # base64 of a piece, whatever its alignment in a larger blob
            piece = data[100 + shift : 100 + shift + 48]
            needles.append(base64.b64encode(piece)[:60])
        needles.append(base64.b64encode(data))
        for body in seen:
            for needle in needles:
                assert needle not in body


@dataclass
class Live:
    url: str
    token: str = field(repr=False)
    store_url: str = ""
    root_key: str = field(default="", repr=False)
    recorder: Recorder = field(default=None, repr=False)  # type: ignore[assignment]
    app: AppContext = field(default=None, repr=False)  # type: ignore[assignment]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from qimem.server.app import create_app

    store_url = f"sqlite:///{tmp_path_factory.mktemp('server') / 'qimem.db'}"
    root_key = encode_root_key(generate_root_key())
    app = with_identity(make_app(store_url, root_key))
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "alice", "nyvpr-password", ["key-manager", "encryptor"])
    token = password_login(app, "acme", "alice", "nyvpr-password").access_token
    recorder = Recorder(create_app(app))
    with serving_wsgi(recorder) as url:
        yield Live(url, token, store_url, root_key, recorder, app)
    ids.close_identity(app)
    app.close()


@pytest.fixture
def env(live: Live, qimem_home: Path, monkeypatch: pytest.MonkeyPatch) -> Live:
    for var in ("QIMEM_SERVER", "QIMEM_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return live


def run(live: Live, *args: str, bad_token: bool = False, **kwargs: Any) -> Any:
    """``qimem --server URL --token T ARGS`` (the token is not an argument, so that no
    failure report prints it)."""
    token = "not-a-valid-token" if bad_token else live.token
    kwargs.setdefault("catch_exceptions", False)
    result = CliRunner().invoke(cli, ["--server", live.url, "--token", token, *args], **kwargs)
    assert token not in result.stdout and token not in result.stderr
    assert "Traceback" not in result.stderr
    return result


def _key(live: Live, name: str) -> dict[str, Any]:
    made = run(live, "keys", "create", "--name", name, "--json")
    assert made.exit_code == 0, made.stderr
    return json.loads(made.stdout)


def test_encrypt_and_decrypt_through_the_server(env: Live, tmp_path: Path) -> None:
    key = _key(env, "remote-files")
    assert key["realm"] == "acme" and key["version"] == 1
    src = tmp_path / "secret.bin"
    src.write_bytes(SECRET)

    enc = run(env, "encrypt", "--key", "remote-files", str(src), "--json")
    assert enc.exit_code == 0, enc.stderr
    summary = json.loads(enc.stdout)
    assert summary["results"][0]["key_id"] == key["key_id"] and summary["succeeded"] == 1
    sealed = tmp_path / "secret.bin.qimem"
    data = sealed.read_bytes()
    assert SECRET[:64] not in data
    with sealed.open("rb") as fh:
        header = stream.read_header(fh)
    assert header.key_id == key["key_id"] and header.key_version == 1

    dec = run(env, "decrypt", str(sealed), "-o", str(tmp_path / "back.bin"))
    assert dec.exit_code == 0, dec.stderr
    assert (tmp_path / "back.bin").read_bytes() == SECRET

    # The same file decrypts locally against the server's store: one format.
    local = CliRunner().invoke(
        cli,
        ["--store", env.store_url, "--realm", "acme", "decrypt", "-o", "-"],
        env={"QIMEM_ROOT_KEY": env.root_key},
        input=data,
        catch_exceptions=False,
    )
    assert local.exit_code == 0, local.stderr
    assert local.stdout_bytes == SECRET

    # And a file encrypted locally decrypts through the server.
    other = tmp_path / "local.bin"
    other.write_bytes(SECRET[::-1])
    locally = CliRunner().invoke(
        cli,
        ["--store", env.store_url, "--realm", "acme", "encrypt", "--key", "remote-files"]
        + [str(other)],
        env={"QIMEM_ROOT_KEY": env.root_key},
        catch_exceptions=False,
    )
    assert locally.exit_code == 0, locally.stderr
    other.unlink()
    back = run(env, "decrypt", str(other) + ".qimem")
    assert back.exit_code == 0, back.stderr
    assert other.read_bytes() == SECRET[::-1]

    env.recorder.assert_never_seen(SECRET)
    env.recorder.assert_never_seen(SECRET[::-1])
    # The recorder does see what goes over the wire: the wrapped data key, to unwrap.
    wrapped = base64.b64encode(header.wrapped_key)
    assert any(wrapped in body for body in env.recorder.bodies)


def test_stdin_stdout_and_aad(env: Live) -> None:
    _key(env, "remote-pipe")
    enc = run(
        env, "encrypt", "--key", "remote-pipe", "--aad", "ctx", input=SECRET, catch_exceptions=False
    )
    assert enc.exit_code == 0, enc.stderr
    wrong = run(env, "decrypt", "--aad", "other", input=enc.stdout_bytes)
    assert wrong.exit_code == 7
    dec = run(env, "decrypt", "--aad", "ctx", input=enc.stdout_bytes)
    assert dec.exit_code == 0 and dec.stdout_bytes == SECRET
    env.recorder.assert_never_seen(SECRET)


def test_jobs_rotate_rewrap_and_key_commands(env: Live, tmp_path: Path) -> None:
    key = _key(env, "remote-batch")
    tree = tmp_path / "tree"
    tree.mkdir()
    contents = {f"f{i}.txt": SECRET + str(i).encode() for i in range(6)}
    for name, data in contents.items():
        (tree / name).write_bytes(data)

    enc = run(env, "encrypt", "--key", "remote-batch", "--jobs", "2", str(tree), "--json")
    assert enc.exit_code == 0, enc.stderr
    for name in contents:
        (tree / name).unlink()

    rotated = run(env, "keys", "rotate", "remote-batch", "--json")
    assert rotated.exit_code == 0, rotated.stderr
    v2 = json.loads(rotated.stdout)
    assert v2["version"] == 2 and v2["lineage_id"] == key["lineage_id"]

    rewrapped = run(env, "rewrap", str(tree), "--json")
    assert rewrapped.exit_code == 0, rewrapped.stderr
    for name in contents:
        with (tree / (name + ".qimem")).open("rb") as fh:
            assert stream.read_header(fh).key_id == v2["key_id"]
    again = run(env, "rewrap", str(tree), "--json")
    assert again.exit_code == 0
    assert not any(r.get("changed") for r in json.loads(again.stdout)["results"])

    dec = run(env, "decrypt", "--jobs", "2", str(tree))
    assert dec.exit_code == 0, dec.stderr
    for name, data in contents.items():
        assert (tree / name).read_bytes() == data

    shown = run(env, "keys", "show", "remote-batch", "--json")
    assert shown.exit_code == 0
    details = json.loads(shown.stdout)
    assert details["active_version"] == 2 and len(details["versions"]) == 2
    listed = run(env, "keys", "list", "--json")
    names = {k["name"]: k for k in json.loads(listed.stdout)}
    assert names["remote-batch"]["key_id"] == v2["key_id"]
    # The same rendering as local: compare with the store itself.
    local = CliRunner().invoke(
        cli,
        ["--store", env.store_url, "--realm", "acme", "keys", "show", "remote-batch", "--json"],
        env={"QIMEM_ROOT_KEY": env.root_key},
    )
    assert json.loads(local.stdout) == details
    table = run(env, "keys", "list")
    assert "remote-batch" in table.stdout and "NAME" in table.stdout
    for data in contents.values():
        env.recorder.assert_never_seen(data)


def test_errors_map_to_local_exit_codes(env: Live, tmp_path: Path) -> None:
    _key(env, "remote-errors")
    src = tmp_path / "plain.txt"
    src.write_bytes(b"hello")

    wrong = run(env, "encrypt", "--key", "remote-errors", str(src), bad_token=True)
    assert wrong.exit_code == 4
    assert wrong.stderr.startswith("qimem: error: ") and env.url in wrong.stderr
    assert not (tmp_path / "plain.txt.qimem").exists()

    unknown = run(env, "encrypt", "--key", "no-such-key", str(src))
    assert unknown.exit_code == 5, unknown.stderr
    assert env.url in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1

    dup = run(env, "keys", "create", "--name", "remote-errors")
    assert dup.exit_code == 6

    # A header naming a key the server does not know (another store's file): 404 → 5.
    foreign = make_app("memory://", None)
    foreign_key = __import__("qimem").services.create_key(foreign, name="x")
    out = io.BytesIO()
    from qimem.services import files as file_services

    file_services.encrypt_stream(foreign, io.BytesIO(b"abc"), out, foreign_key.key_id)
    (tmp_path / "foreign.qimem").write_bytes(out.getvalue())
    missing = run(env, "decrypt", str(tmp_path / "foreign.qimem"))
    assert missing.exit_code == 5 and not (tmp_path / "foreign").exists()

    # --realm goes to the server (X-Qimem-Realm): another realm's keys are not found.
    own = run(env, "--realm", "acme", "keys", "show", "remote-errors")
    assert own.exit_code == 0 and "remote-errors" in own.stdout
    other = run(env, "--realm", "master", "keys", "show", "remote-errors")
    assert other.exit_code == 5, other.stderr

    # Commands that only exist locally refuse --server instead of touching the store.
    lifecycle = run(env, "keys", "disable", "remote-errors", "--version", "1")
    assert lifecycle.exit_code == 3 and "not with --server" in lifecycle.stderr


def test_server_down_is_exit_10_without_traceback(qimem_home: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = tmp_path / "a.txt"
    src.write_bytes(b"data")
    url = f"http://127.0.0.1:{port}"
    result = CliRunner().invoke(
        cli,
        ["--server", url, "encrypt", "--key", "k", str(src)],
        env={"QIMEM_TOKEN": "secret-token-value"},
        catch_exceptions=False,
    )
    assert result.exit_code == 10
    assert result.stderr == f"qimem: error: cannot reach server {url}: ConnectionRefusedError\n"
    assert "secret-token-value" not in result.output
    assert not (tmp_path / "a.txt.qimem").exists()


def test_real_subprocess_with_env_token(env: Live, tmp_path: Path) -> None:
    _key(env, "remote-proc")
    src = tmp_path / "p.bin"
    src.write_bytes(SECRET)
    qimem = Path(sys.executable).with_name("qimem")
    proc_env = {
        **os.environ,
        "QIMEM_SERVER": env.url,
        "QIMEM_TOKEN": env.token,
        "QIMEM_HOME": str(tmp_path / "home"),
    }
    done = subprocess.run(
        [str(qimem), "encrypt", "--key", "remote-proc", str(src), "--json"],
        env=proc_env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert env.token.encode() not in done.stdout + done.stderr
    assert done.stderr == b""  # loopback http: no warning
    dec = run(env, "decrypt", str(src) + ".qimem", "-o", str(tmp_path / "p.out"))
    assert dec.exit_code == 0 and (tmp_path / "p.out").read_bytes() == SECRET
    env.recorder.assert_never_seen(SECRET)


def test_no_token_in_reprs_and_plain_http_warning() -> None:
    client = HttpClient("https://keys.example.com/", "tok-123-secret")
    keys = RemoteKeys("https://keys.example.com", "tok-123-secret")
    for text in (repr(client), repr(keys), repr(keys.keyring("k")), repr(keys.for_worker())):
        assert "tok-123-secret" not in text
    assert client.base_url == "https://keys.example.com"
    assert insecure_warning("https://keys.example.com") is None
    assert insecure_warning("http://127.0.0.1:8080") is None
    assert insecure_warning("http://localhost:8080") is None
    assert insecure_warning("http://[::1]:8080") is None
    warning = insecure_warning("http://keys.example.com:8080/")
    assert warning is not None and "http://keys.example.com:8080" in warning
    assert "\n" not in warning


def test_bad_server_url_is_a_usage_error(qimem_home: Path) -> None:
    result = CliRunner().invoke(cli, ["--server", "ftp://x", "keys", "list"])
    assert result.exit_code == 3 and "http://" in result.stderr


def test_wrong_token_from_the_client_api(env: Live) -> None:
    client = HttpClient(env.url, "wrong-token")
    with pytest.raises(AuthError) as caught:
        client.request("GET", "/v1/security/keys")
    assert "wrong-token" not in str(caught.value) and env.url in str(caught.value)
    client.close()
    with pytest.raises(StoreUnavailableError):
        HttpClient("http://127.0.0.1:1", "t").request("GET", "/healthz")


def test_derived_key_files_through_the_server(env: Live, tmp_path: Path) -> None:
    """With --server, ``--context`` travels in the datakey, decrypt and rewrap requests."""
    from qimem.services.keys import create_key, rotate_key

    create_key(env.app, name="remote-tenants", derived=True, realm="acme")
    src = tmp_path / "t.bin"
    src.write_bytes(SECRET)
    sealed = tmp_path / "t.bin.qimem"

    assert run(env, "encrypt", "--key", "remote-tenants", str(src)).exit_code == 3
    enc = run(env, "encrypt", "--key", "remote-tenants", "--context", "acme-7", str(src))
    assert enc.exit_code == 0, enc.stderr
    assert (
        run(env, "decrypt", "--context", "acme-8", str(sealed), "-o", str(tmp_path / "x")).exit_code
        != 0
    )
    dec = run(env, "decrypt", "--context", "acme-7", str(sealed), "-o", str(tmp_path / "back"))
    assert dec.exit_code == 0, dec.stderr
    assert (tmp_path / "back").read_bytes() == SECRET

    rotate_key(env.app, "remote-tenants", realm="acme")
    assert run(env, "rewrap", "--context", "acme-7", str(sealed)).exit_code == 0
    with sealed.open("rb") as fh:
        assert stream.read_header(fh).key_version == 2
    again = run(env, "decrypt", "--context", "acme-7", str(sealed), "-o", str(tmp_path / "b2"))
    assert again.exit_code == 0 and (tmp_path / "b2").read_bytes() == SECRET
