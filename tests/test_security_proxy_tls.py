"""Issue 12, exposure beyond loopback: ``qimem serve`` refuses a non-loopback bind without
TLS, and runs behind a real nginx that terminates TLS (a test CA), with the deployment
config of docs/operations.md as is. The CLIs go through it with ``--ca-cert``; audit
records show the client's address, never the proxy's, and a forged ``X-Forwarded-For``
changes nothing.

nginx connects upstream from 127.0.0.2 (``proxy_bind``, in the test's own ``http`` block),
clients come from 127.0.0.1 (the CLIs) and 127.0.0.3 (``requests`` bound to it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon
import pytest
import requests
from falcon import testing
from helpers_tls import NGINX_SITE_TEMPLATE, Nginx, make_test_ca, nginx_binary, nginx_site
from requests.adapters import HTTPAdapter
from serve_process import ServeProcess, home_env

from qimem.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "violet-harbor-compass-5821-proxy"
FAST_IDENTITY = "\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\n"
PROXY_ADDR = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    env = home_env(home)
    return env


def run(prog: str, *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``qimem``/``qauth`` as a real process (from ``cwd``, so ./qimem does not shadow)."""
    module = "qimem.cli" if prog == "qimem" else "qimem.cli.qauth"
    return subprocess.run(
        [sys.executable, "-c", f"from {module} import main; main()", *args],
        env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@dataclass
class Deployment:
    url: str  # https://127.0.0.1:PORT (nginx)
    direct: str  # http://127.0.0.1:PORT (qimem serve itself)
    ca: Path
    workdir: Path
    env: dict[str, str] = field(repr=False)
    nginx: Nginx = field(repr=False)

    def cli(self, prog: str, *args: str, token: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        env = dict(self.env)
        if token is not None:
            env["QIMEM_TOKEN"] = token
        server = ["--server", self.url, "--ca-cert", str(self.ca)]
        return run(prog, *server, *args, env=env, cwd=self.workdir, stdin=stdin)

    def token(self) -> str:
        done = self.cli("qauth", "token", "--user", "admin", "--password-stdin",
                        stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def audit(self, token: str, action: str) -> list[dict[str, Any]]:
        done = self.cli("qauth", "audit", "--action", action, "--json", token=token)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))


def require_nginx() -> str:
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("nginx is not installed (.ci/run installs it)")
        pytest.skip("nginx is not installed")
    return binary


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_nginx()
    workdir = tmp_path_factory.mktemp("proxy")
    ca, _, _ = make_test_ca(workdir / "tls")
    home = workdir / "home"
    serve_env = clean_env(home)
    init = run("qimem", "init", "--admin-password-stdin", env=serve_env, cwd=workdir,
               stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
    assert init.returncode == 0, init.stderr
    with (home / "config.toml").open("a") as fh:
        fh.write(FAST_IDENTITY)
    server = ServeProcess(workdir, serve_env, "--trusted-proxy", PROXY_ADDR, insecure=False)
    nginx: Nginx | None = None
    try:
        server.wait_ready()
        assert f"behind trusted proxies {PROXY_ADDR}/32" in server.log()
        port = free_port()
        site = nginx_site(f"127.0.0.1:{port}", f"127.0.0.1:{server.port}", workdir / "tls")
        nginx = Nginx(workdir / "nginx", site, port, proxy_bind=PROXY_ADDR).wait_ready()
        yield Deployment(
            f"https://127.0.0.1:{port}", server.url, ca, workdir, clean_env(workdir / "client"),
            nginx,
        )  # fmt: skip
    finally:
        if nginx is not None:
            nginx.stop()
        assert server.stop() == 0
        assert "Traceback" not in server.log()


def test_exposure_the_clis_work_through_nginx_and_audit_shows_the_client(
    deployment: Deployment,
) -> None:
    token = deployment.token()
    made = deployment.cli("qimem", "keys", "create", "--name", "behind-nginx", "--json",
                          token=token)  # fmt: skip
    assert made.returncode == 0, made.stderr
    secret = deployment.workdir / "note.txt"
    secret.write_text("through nginx\n")
    sealed = deployment.cli("qimem", "encrypt", "--key", "behind-nginx", str(secret), token=token)
    assert sealed.returncode == 0, sealed.stderr
    secret.unlink()
    opened = deployment.cli("qimem", "decrypt", str(secret) + ".qimem", token=token)
    assert opened.returncode == 0, opened.stderr
    assert secret.read_text() == "through nginx\n"
    records = deployment.audit(token, "keys.create")
    assert [r["target"] for r in records] == [json.loads(made.stdout)["key_id"]]
    for action in ("login", "keys.create", "crypto.datakey", "crypto.decrypt"):
        records = deployment.audit(token, action)
        assert records, action
        for record in records:
            assert record["detail"]["source"] == "127.0.0.1", record  # the CLI, not nginx
    access = (deployment.nginx.workdir / "access.log").read_text()
    assert "POST /v1/security/keys" in access  # it did go through nginx


class BoundAdapter(HTTPAdapter):
    """requests from a chosen loopback source address."""

    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._source, 0)
        super().init_poolmanager(*args, **kwargs)


def test_exposure_forged_forwarded_for_does_not_change_the_recorded_source(
    deployment: Deployment,
) -> None:
    token = deployment.token()
    session = requests.Session()
    session.mount("https://", BoundAdapter(OTHER_CLIENT))
    session.mount("http://", BoundAdapter("127.0.0.1"))
    auth = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
    via_nginx = session.post(f"{deployment.url}/v1/security/keys", json={"name": "forged-1"},
                             headers=auth, verify=str(deployment.ca), timeout=30)  # fmt: skip
    assert via_nginx.status_code == 201, via_nginx.text
    # Straight to qimem from a peer that is not a trusted proxy: the header is ignored.
    direct = session.post(f"{deployment.direct}/v1/security/keys", json={"name": "forged-2"},
                          headers=auth, timeout=30)  # fmt: skip
    assert direct.status_code == 201, direct.text
    sources = {r["target"]: r["detail"]["source"] for r in deployment.audit(token, "keys.create")}
    assert sources[via_nginx.json()["key_id"]] == OTHER_CLIENT
    assert sources[direct.json()["key_id"]] == "127.0.0.1"
    assert PROXY_ADDR not in sources.values() and "203.0.113.9" not in sources.values()


def test_exposure_plain_http_to_the_tls_port_gets_no_token_through(
    deployment: Deployment,
) -> None:
    plain = deployment.url.replace("https://", "http://")
    answer = requests.get(f"{plain}/healthz", timeout=10)
    assert answer.status_code == 400  # nginx: "plain HTTP request was sent to HTTPS port"


# ---- the non-loopback bind refusal ------------------------------------------------------


def test_exposure_non_loopback_bind_without_tls_is_refused(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    init = run("qimem", "init", "--admin-password-stdin", env=env, cwd=tmp_path,
               stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
    assert init.returncode == 0, init.stderr
    for host in ("0.0.0.0", "::", ""):  # noqa: S104
        done = run("qimem", "serve", "--host", host, "--port", "0", env=env, cwd=tmp_path,
                   timeout=20)  # fmt: skip
        assert done.returncode == 9
        assert done.stderr.startswith(f"qimem: error: refusing to bind {host!r}")
        assert "--trusted-proxy" in done.stderr and "--insecure-plain-http" in done.stderr
        assert "serving on" not in done.stderr
    mixed = run("qimem", "serve", "--insecure-no-auth", "--trusted-proxy", "127.0.0.1",
                "--port", "0", env=env, cwd=tmp_path)  # fmt: skip
    assert mixed.returncode == 9 and "cannot sit behind a proxy" in mixed.stderr
    # The --insecure-no-auth refusal is unchanged: loopback binds only, whatever else is said.
    insecure = run("qimem", "serve", "--insecure-no-auth", "--insecure-plain-http", "--host",
                   "0.0.0.0", "--port", "0", env=env, cwd=tmp_path)  # fmt: skip  # noqa: S104
    assert insecure.returncode == 9 and "--insecure-no-auth refuses to bind" in insecure.stderr
    bad = run("qimem", "serve", "--trusted-proxy", "proxy.example", "--port", "0", env=env,
              cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 9 and "is not an IP address or network" in bad.stderr


def test_exposure_how_tls_is_provided_allows_a_non_loopback_bind() -> None:
    from qimem.server.exposure import check_exposure, parse_trusted_proxies

    proxies = parse_trusted_proxies(["10.0.0.5", "fd00::/64"])
    assert check_exposure("0.0.0.0", 0, trusted_proxies=proxies,  # noqa: S104
                          insecure_plain_http=False) is None  # fmt: skip
    warning = check_exposure("::", 0, trusted_proxies=(), insecure_plain_http=True)
    assert warning is not None and "unencrypted" in warning
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert check_exposure(loopback, 0, trusted_proxies=(), insecure_plain_http=False) is None
    with pytest.raises(ConfigError):
        check_exposure("0.0.0.0", 0, trusted_proxies=(), insecure_plain_http=False)  # noqa: S104


# ---- X-Forwarded-For: the right-most untrusted address ------------------------------------


class Echo:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"client": req.context.client_addr, "scheme": req.context.client_scheme}


def echo_as(peer: str, headers: dict[str, str], proxies: list[str], *,
            require_tls_proxy: bool = False) -> testing.Result:  # fmt: skip
    """GET / from ``peer`` on an app that echoes what :class:`ClientMiddleware` worked out
    (qimem's error handlers installed)."""
    from qimem.server import errors
    from qimem.server.exposure import ClientMiddleware, parse_trusted_proxies

    middleware = ClientMiddleware(trusted_proxies=parse_trusted_proxies(proxies),
                                  require_tls_proxy=require_tls_proxy)  # fmt: skip
    app = falcon.App(middleware=[middleware])
    errors.install(app)
    app.add_route("/", Echo())
    return testing.TestClient(app).simulate_get("/", headers=headers, remote_addr=peer)


def client_of(peer: str, headers: dict[str, str], proxies: list[str]) -> dict[str, str]:
    return dict(echo_as(peer, headers, proxies).json)


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("10.0.0.5", "198.51.100.7", "198.51.100.7"),
        ("10.0.0.5", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # forged left part ignored
        ("10.0.0.5", "198.51.100.7, 10.0.0.9", "198.51.100.7"),  # two trusted proxies
        ("10.0.0.5", "10.0.0.8, 10.0.0.9", "10.0.0.8"),  # all trusted: the left-most
        ("10.0.0.5", "198.51.100.7, not-an-ip", "10.0.0.5"),  # garbage: the proxy itself
        ("10.0.0.5", "2001:db8::7", "2001:db8::7"),
        ("10.0.0.5", "[2001:db8::7]:443", "2001:db8::7"),
        ("192.0.2.1", "198.51.100.7", "192.0.2.1"),  # not a trusted proxy: header ignored
    ],
)
def test_exposure_client_address_is_the_rightmost_untrusted(
    peer: str, forwarded: str, client: str
) -> None:
    seen = client_of(peer, {"X-Forwarded-For": forwarded, "X-Forwarded-Proto": "https"},
                     ["10.0.0.0/29", "10.0.0.8", "10.0.0.9"])  # fmt: skip
    assert seen["client"] == client
    assert seen["scheme"] == ("https" if peer.startswith("10.") else "http")


def test_exposure_without_trusted_proxies_forwarding_headers_mean_nothing() -> None:
    seen = client_of("127.0.0.1", {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"},
                     [])  # fmt: skip
    assert seen == {"client": "127.0.0.1", "scheme": "http"}


# ---- the documented config is the tested one ----------------------------------------------


def test_exposure_operations_doc_shows_exactly_the_tested_nginx_config() -> None:
    doc = (REPO / "docs" / "operations.md").read_text("utf-8")
    blocks = re.findall(r"```nginx\n(.*?)```", doc, flags=re.S)
    assert blocks == [NGINX_SITE_TEMPLATE.read_text("utf-8")]


# ---- behind a proxy, whoever bypasses it is refused (red-team RT-4) -----------------------

PROXY_NET = ["10.0.0.0/29"]
NETWORK_CLIENT = "203.0.113.7"  # a documentation address: only ever a simulated peer
HTTPS, HTTP = {"X-Forwarded-Proto": "https"}, {"X-Forwarded-Proto": "http"}


def assert_direct_access_refused(status: int, body: Any) -> None:
    assert status == 403, body
    assert body["error"]["code"] == "direct_access_refused"
    assert "TLS proxy" in body["error"]["message"]
    assert "access_token" not in json.dumps(body)


@pytest.mark.parametrize(
    ("peer", "headers", "served"),
    [
        (NETWORK_CLIENT, {}, False),  # straight to waitress, plain HTTP
        (f"::ffff:{NETWORK_CLIENT}", {}, False),
        ("2001:db8::7", {}, False),
        (NETWORK_CLIENT, {"X-Forwarded-For": "10.0.0.5", **HTTPS}, False),  # claims prove nothing
        ("127.0.0.1", {}, True),  # loopback: never leaves the host (health checks)
        ("::1", {}, True),
        ("127.0.0.3", HTTP, True),  # not a proxy: its header means nothing
        ("10.0.0.5", HTTPS, True),
        ("10.0.0.5", {"X-Forwarded-Proto": "HTTPS"}, True),
        ("10.0.0.5", {}, True),  # a proxy that says nothing is believed
        ("10.0.0.5", HTTP, False),  # the client reached the proxy over plain HTTP
        ("10.0.0.5", {"X-Forwarded-Proto": "https, http"}, False),  # the nearest hop decides
        ("10.0.0.5", {"X-Forwarded-Proto": "ws"}, False),
    ],
)
def test_exposure_peers_that_bypass_the_tls_proxy_are_refused(
    peer: str, headers: dict[str, str], served: bool
) -> None:
    result = echo_as(peer, headers, PROXY_NET, require_tls_proxy=True)
    if served:
        assert result.status_code == 200, result.text
    else:
        assert_direct_access_refused(result.status_code, result.json)
    # --insecure-plain-http (require_tls_proxy=False): everyone is served, as before
    assert echo_as(peer, headers, PROXY_NET).status_code == 200


class UnreadableBody:
    """A request body that must not be read."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, *args: Any) -> bytes:
        self.reads += 1
        raise AssertionError("the body was read")

    readline = read

    def readlines(self, *args: Any) -> list[bytes]:
        self.reads += 1
        raise AssertionError("the body was read")

    def __iter__(self) -> Iterator[bytes]:
        self.reads += 1
        raise AssertionError("the body was read")


@pytest.fixture
def master_app(tmp_path: Path) -> Iterator[Any]:
    """An identity app with realm master and its admin (``identity_helpers``)."""
    from identity_helpers import close_app, identity_app

    from qimem.rootkey import encode_root_key, generate_root_key

    app = identity_app(f"sqlite:///{tmp_path / 'qimem.db'}", encode_root_key(generate_root_key()))
    yield app
    close_app(app)


def test_exposure_the_app_behind_a_proxy_refuses_a_direct_peer_before_authentication(
    master_app: Any,
) -> None:
    from identity_helpers import ADMIN_PASSWORD as MASTER_PASSWORD

    from qimem.server.app import create_app
    from qimem.server.exposure import check_exposure, parse_trusted_proxies

    proxies = parse_trusted_proxies(PROXY_NET)
    assert check_exposure("0.0.0.0", 8080, trusted_proxies=proxies,  # noqa: S104
                          insecure_plain_http=False) is None  # fmt: skip
    client = testing.TestClient(create_app(master_app, trusted_proxies=proxies))
    login = {"grant_type": "password", "username": "admin", "password": MASTER_PASSWORD}
    token_path = "/v1/auth/realms/master/token"
    direct = client.simulate_post(token_path, json=login, remote_addr=NETWORK_CLIENT)
    assert_direct_access_refused(direct.status_code, direct.json)
    # before authentication (403, not 401) and before the body is read
    body = UnreadableBody()
    keys = client.simulate_post("/v1/security/keys", remote_addr=NETWORK_CLIENT,
                                headers={"Content-Length": "100"},
                                extras={"wsgi.input": body})  # fmt: skip
    assert_direct_access_refused(keys.status_code, keys.json)
    assert body.reads == 0
    assert client.simulate_get("/healthz", remote_addr="127.0.0.1").status_code == 200
    via_proxy = client.simulate_post(token_path, json=login, remote_addr="10.0.0.5",
                                     headers=HTTPS)  # fmt: skip
    assert via_proxy.status_code == 200 and via_proxy.json["access_token"]
    plain = client.simulate_post(token_path, json=login, remote_addr="10.0.0.5", headers=HTTP)
    assert_direct_access_refused(plain.status_code, plain.json)
    # create_app without proxies: nothing changes for a plain server
    open_client = testing.TestClient(create_app(master_app))
    assert open_client.simulate_get("/healthz", remote_addr=NETWORK_CLIENT).status_code == 200


def fetch(port: int, path: str, *, source: str, headers: dict[str, str],
          login: bool = False) -> tuple[int, Any]:  # fmt: skip
    """GET ``path`` (or POST the master admin's password login) to 127.0.0.1:``port`` from
    the loopback address ``source``; (status, JSON body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        if login:
            body = json.dumps({"grant_type": "password", "username": "admin",
                               "password": ADMIN_PASSWORD})  # fmt: skip
            conn.request("POST", path, body=body,
                         headers={**headers, "Content-Type": "application/json"})  # fmt: skip
        else:
            conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_exposure_a_real_server_on_every_interface_refuses_plain_http_via_its_proxy(
    tmp_path: Path,
) -> None:
    env = clean_env(tmp_path / "home")
    init = run("qimem", "init", "--admin-password-stdin", env=env, cwd=tmp_path,
               stdin=ADMIN_PASSWORD + "\n")  # fmt: skip
    assert init.returncode == 0, init.stderr
    with (tmp_path / "home" / "config.toml").open("a") as fh:
        fh.write(FAST_IDENTITY)
    token = "/v1/auth/realms/master/token"
    every = ("--host", "0.0.0.0", "--trusted-proxy", PROXY_ADDR)  # noqa: S104
    strict = ServeProcess(tmp_path, env, *every, insecure=False, name="strict")
    try:
        port = strict.wait_ready().port
        assert "warning" not in strict.log()
        status, body = fetch(port, token, source=PROXY_ADDR, headers=HTTP, login=True)
        assert_direct_access_refused(status, body)
        status, body = fetch(port, token, source=PROXY_ADDR, headers=HTTPS, login=True)
        assert status == 200 and body["access_token"]
        assert fetch(port, "/healthz", source="127.0.0.1", headers={})[0] == 200
    finally:
        assert strict.stop() == 0
    assert "Traceback" not in strict.log()
    plain = ServeProcess(tmp_path, env, *every, "--insecure-plain-http", insecure=False,
                         name="plain")  # fmt: skip
    try:
        port = plain.wait_ready().port
        assert "warning: serving plain HTTP on '0.0.0.0'" in plain.log()
        assert fetch(port, "/healthz", source=PROXY_ADDR, headers=HTTP)[0] == 200
    finally:
        assert plain.stop() == 0
