"""Issue 12, finding 10 and client TLS: ``qimem --server`` and ``qauth --server`` never
follow a redirect (so never carry the bearer token or a password to another host), bound
what they read, verify https servers against the system store or ``--ca-cert``, and refuse
plain http beyond loopback unless told ``--insecure-plain-http``.

Every server here is real and on loopback: waitress for the redirecting and oversized
answers, a raw TCP listener on 127.0.0.2 that records any connection at all, and a wsgiref
HTTPS server with a throw-away CA (tests/helpers_tls.py) in front of a real qimem app.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import make_app
from helpers_tls import make_test_ca, serving_tls
from identity_helpers import password_login, serving_wsgi, with_identity

from qimem.cli import cli
from qimem.cli.qauth import qauth
from qimem.services import identity as ids

TOKEN = "tok-SECRET-bearer-0123456789"
PASSWORD = "pw-SECRET-hunter2-password"
OPERATOR_PASSWORD = "quiet-harbor-lantern-7391-qimem"
MIB = 1024 * 1024
REDIRECTS = (301, 302, 303, 307, 308)


class Listener:
    """A TCP listener on a loopback address that records every connection it accepts and
    the bytes it received, and answers each with ``200 {}`` (so a client that follows a
    redirect here would succeed)."""

    def __init__(self, host: str) -> None:
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    data = conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
                    )
                except OSError:
                    data = b"<connection>"
                self.received.append(data)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def elsewhere() -> Iterator[Listener]:
    """The redirect target: another address and port, recording any connection."""
    listener = Listener("127.0.0.2")
    yield listener
    listener.close()


@dataclass
class Misbehaving:
    """A WSGI app answering every request with ``status``, ``headers`` and ``body_size``
    bytes of body (streamed in 1 MiB chunks when ``stream``), counting what it produced."""

    status: int = 302
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_size: int = 2
    payload: bytes = b"{}"
    stream: bool = False
    produced: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.requests.append({k: str(v) for k, v in environ.items() if k.startswith("HTTP_")})
        headers = [("Content-Type", "application/json"), *self.headers]
        if not self.stream:
            headers.append(("Content-Length", str(self.body_size)))
        start_response(f"{self.status} Whatever", headers)
        return self._body()

    def _body(self) -> Iterator[bytes]:
        if not self.stream:
            self.produced += self.body_size
            yield self.payload + b" " * (self.body_size - len(self.payload))
            return
        chunk = b" " * MIB
        while self.produced < self.body_size:
            self.produced += len(chunk)
            yield chunk


@pytest.fixture
def misbehaving() -> Iterator[tuple[Misbehaving, str]]:
    app = Misbehaving()
    with serving_wsgi(app) as url:
        yield app, url


def run_cli(prog: str, url: str, *args: str, input: str | None = None) -> Result:  # noqa: A002
    """``qimem|qauth --server URL ARGS`` with the token in the environment (never argv)."""
    group = cli if prog == "qimem" else qauth
    result = CliRunner().invoke(
        group, ["--server", url, *args], env={"QIMEM_TOKEN": TOKEN}, input=input
    )
    for secret in (TOKEN, PASSWORD):
        assert secret not in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


#: A GET and a credentialed POST per CLI.
GETS = {"qimem": ("keys", "list"), "qauth": ("realm", "list")}


def one_line_error(result: Result, prog: str, exit_code: int) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


# -- finding 10: redirects -------------------------------------------------------------


def redirecting(
    misbehaving: tuple[Misbehaving, str], status: int, location: str
) -> tuple[Misbehaving, str]:
    """The misbehaving server, now answering ``status`` with ``Location: location``."""
    app, _ = misbehaving
    app.status = status
    app.headers = [("Location", location)]
    return misbehaving


@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_finding10_redirect_is_never_followed_with_the_token(
    qimem_home: Path,
    misbehaving: tuple[Misbehaving, str],
    elsewhere: Listener,
    prog: str,
    status: int,
) -> None:
    app, url = redirecting(misbehaving, status, f"http://{elsewhere.address}/v1/steal?x=1")
    result = run_cli(prog, url, *GETS[prog])
    assert elsewhere.received == []  # not a single connection, let alone the token
    assert app.requests and app.requests[0]["HTTP_AUTHORIZATION"] == f"Bearer {TOKEN}"
    line = one_line_error(result, prog, 3)
    assert f"answered {status} redirect to http://{elsewhere.address}" in line
    assert "does not follow redirects" in line and "--server" in line
    assert "/v1/steal" not in line


@pytest.mark.parametrize("status", [302, 307])
def test_finding10_credentialed_posts_are_not_redirected_either(
    qimem_home: Path,
    misbehaving: tuple[Misbehaving, str],
    elsewhere: Listener,
    tmp_path: Path,
    status: int,
) -> None:
    _, url = redirecting(misbehaving, status, f"http://{elsewhere.address}/")
    src = tmp_path / "plain.txt"
    src.write_bytes(b"data")
    encrypted = run_cli("qimem", url, "encrypt", "--key", "k", str(src))
    assert "redirect" in one_line_error(encrypted, "qimem", 3)
    assert not (tmp_path / "plain.txt.qimem").exists()
    login = run_cli("qauth", url, "token", "--user", "admin", "--password-stdin", input=PASSWORD)
    assert "redirect" in one_line_error(login, "qauth", 3)
    assert elsewhere.received == []


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_finding10_redirect_from_http_to_https_is_not_followed(
    qimem_home: Path, misbehaving: tuple[Misbehaving, str], prog: str
) -> None:
    target = Listener("127.0.0.1")
    try:
        app, url = misbehaving
        app.status = 301
        app.headers = [("Location", f"https://{target.address}/v1/auth/realms")]
        line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 3)
        assert f"redirect to https://{target.address};" in line
        assert target.received == []  # not even a TLS ClientHello
    finally:
        target.close()


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_finding10_location_credentials_and_paths_are_not_echoed(
    qimem_home: Path, misbehaving: tuple[Misbehaving, str], elsewhere: Listener, prog: str
) -> None:
    app, url = misbehaving
    app.headers = [
        ("Location", f"http://admin:hunter2@{elsewhere.address}/p/secret-path?token=abc#f")
    ]
    line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 3)
    assert f"redirect to http://{elsewhere.address};" in line
    for leaked in ("hunter2", "admin:", "secret-path", "token=abc"):
        assert leaked not in line
    # A relative Location stays on the same server: it is named, still not followed.
    app.headers = [("Location", "/v1/other")]
    line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 3)
    assert f"redirect to {url};" in line and "/v1/other" not in line
    # No Location, or one that does not parse, is the same refusal.
    app.headers = [("Location", "http://[::1")]
    line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 3)
    assert "answered 302 redirect to an unusable location" in line
    app.headers = []
    line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 3)
    assert "answered 302 redirect" in line
    assert elsewhere.received == []


# -- finding 10: bounded reads -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["declared", "streamed"])
@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_finding10_huge_answer_is_refused_not_buffered(
    qimem_home: Path, misbehaving: tuple[Misbehaving, str], prog: str, stream: bool
) -> None:
    app, url = misbehaving
    app.status, app.stream = 200, stream
    app.body_size = 160 * MIB if stream else 100 * MIB
    line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 10)
    assert "more than 64 MiB" in line
    if stream:  # the client stopped reading: the server could not push everything
        assert app.produced < 130 * MIB, app.produced


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_finding10_huge_error_body_is_cut_short(
    qimem_home: Path, misbehaving: tuple[Misbehaving, str], prog: str
) -> None:
    app, url = misbehaving
    app.status, app.stream, app.body_size = 400, True, 160 * MIB
    line = one_line_error(run_cli(prog, url, *GETS[prog]), prog, 3)
    assert "HTTP 400" in line
    assert app.produced < 130 * MIB, app.produced


# -- TLS ---------------------------------------------------------------------------------


@dataclass
class TlsServer:
    url: str
    ca: Path
    token: str = field(repr=False)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def tls_server(tls_dir: Path) -> Iterator[TlsServer]:
    """A real qimem app (identity on) over HTTPS on 127.0.0.1 with a test CA."""
    from qimem.server.app import create_app

    ca, cert, key = make_test_ca(tls_dir)
    app = with_identity(make_app("memory://", None))
    ids.add_user(app, "master", "operator", OPERATOR_PASSWORD, ["admin"])
    token = password_login(app, "master", "operator", OPERATOR_PASSWORD).access_token
    try:
        with serving_tls(create_app(app), cert, key) as url:
            yield TlsServer(url, ca, token)
    finally:
        ids.close_identity(app)
        app.close()


def tls_run(prog: str, *args: str, env: dict[str, str], input: str | None = None) -> Result:  # noqa: A002
    group = cli if prog == "qimem" else qauth
    result = CliRunner().invoke(group, list(args), env=env, input=input)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def test_tls_with_the_right_ca_works_for_both_clis(qimem_home: Path, tls_server: TlsServer) -> None:
    env = {"QIMEM_TOKEN": tls_server.token}
    server = ["--server", tls_server.url, "--ca-cert", str(tls_server.ca)]
    made = tls_run("qimem", *server, "keys", "create", "--name", "over-tls", "--json", env=env)
    assert made.exit_code == 0, made.output
    listed = tls_run("qimem", *server, "keys", "list", "--json", env=env)
    assert "over-tls" in [k["name"] for k in json.loads(listed.stdout)]
    realms = tls_run("qauth", *server, "realm", "list", "--json", env=env)
    assert realms.exit_code == 0, realms.output
    assert "master" in [r["name"] for r in json.loads(realms.stdout)]
    login = tls_run(
        "qauth",
        *server,
        "token",
        "--user",
        "operator",
        "--password-stdin",
        env={},
        input=OPERATOR_PASSWORD + "\n",
    )
    assert login.exit_code == 0 and login.stdout.strip(), login.output
    # The environment variable does the same as the option, for both programs.
    by_env = {**env, "QIMEM_SERVER": tls_server.url, "QIMEM_CA_CERT": str(tls_server.ca)}
    assert tls_run("qimem", "keys", "list", env=by_env).exit_code == 0
    assert tls_run("qauth", "realm", "list", env=by_env).exit_code == 0


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_tls_untrusted_certificate_is_one_clear_error(
    qimem_home: Path, tls_server: TlsServer, tls_dir: Path, prog: str
) -> None:
    other_ca, _, _ = make_test_ca(tls_dir, prefix="other-")
    env = {"QIMEM_TOKEN": tls_server.token}
    for extra in (["--ca-cert", str(other_ca)], []):  # another CA; the system store
        result = tls_run(prog, "--server", tls_server.url, *extra, *GETS[prog], env=env)
        line = one_line_error(result, prog, 10)
        assert f"TLS certificate of {tls_server.url} not trusted" in line, line
        assert "certificate verify failed" in line and "--ca-cert" in line
        assert tls_server.token not in result.output


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_tls_hostname_mismatch_is_refused(
    qimem_home: Path, tls_server: TlsServer, tls_dir: Path, prog: str
) -> None:
    """The certificate names 127.0.0.1 and localhost; the server is reached as 127.0.0.2."""
    from qimem.server.app import create_app

    ca, cert, key = make_test_ca(tls_dir, prefix="mismatch-")
    app = make_app("memory://", None)
    try:
        with serving_tls(create_app(app), cert, key, host="127.0.0.2") as url:
            result = tls_run(prog, "--server", url, "--ca-cert", str(ca), *GETS[prog], env={})
            line = one_line_error(result, prog, 10)
            assert "127.0.0.2" in line and "mismatch" in line.lower(), line
    finally:
        app.close()


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_tls_unusable_ca_file_is_a_usage_error(qimem_home: Path, tmp_path: Path, prog: str) -> None:
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("hello\n")
    for path in (tmp_path / "missing.pem", garbage):
        result = tls_run(
            prog, "--server", "https://127.0.0.1:9", "--ca-cert", str(path), *GETS[prog], env={}
        )
        line = one_line_error(result, prog, 3)
        assert "--ca-cert" in line and str(path) in line


# -- plain http beyond loopback --------------------------------------------------------


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_plain_http_beyond_loopback_is_refused_without_the_flag(
    qimem_home: Path, prog: str
) -> None:
    result = tls_run(
        prog,
        "--server",
        "http://keys.example.invalid:8080",
        *GETS[prog],
        env={"QIMEM_TOKEN": TOKEN},
    )
    line = one_line_error(result, prog, 3)
    assert "plain http" in line and "--insecure-plain-http" in line and "https://" in line
    assert TOKEN not in result.output


def test_plain_http_opt_in_builds_a_client_and_warns() -> None:
    from qimem.errors import ValidationError
    from qimem.http_client import HttpClient, insecure_warning

    with pytest.raises(ValidationError):
        HttpClient("http://keys.example.invalid:8080", TOKEN)
    client = HttpClient("http://keys.example.invalid:8080", TOKEN, insecure_plain_http=True)
    assert TOKEN not in repr(client)
    warning = insecure_warning(client.base_url)
    assert warning is not None and "plain http" in warning
    for loopback in ("http://127.0.0.2:1", "http://localhost:1", "http://[::1]:1"):
        assert HttpClient(loopback, TOKEN).base_url == loopback


@pytest.mark.parametrize("prog", ["qimem", "qauth"])
def test_plain_http_opt_in_works_and_warns_once(
    qimem_home: Path, misbehaving: tuple[Misbehaving, str], prog: str
) -> None:
    """0.0.0.0 is not a loopback address (so plain http to it needs the flag), yet Linux
    delivers a connection to it locally: the opt-in path runs without leaving the host."""
    app, url = misbehaving
    app.status, app.payload = 200, b'{"keys": [], "realms": []}'
    app.body_size = len(app.payload)
    unspecified = url.replace("127.0.0.1", "0.0.0.0")  # noqa: S104 - a client URL, not a bind
    refused = run_cli(prog, unspecified, *GETS[prog])
    assert "--insecure-plain-http" in one_line_error(refused, prog, 3)
    assert app.requests == []
    allowed = run_cli(prog, unspecified, "--insecure-plain-http", *GETS[prog])
    assert allowed.exit_code == 0, allowed.output
    warnings = allowed.stderr.strip().splitlines()
    assert len(warnings) == 1 and "plain http" in warnings[0], allowed.stderr
    assert TOKEN not in allowed.output and len(app.requests) == 1
