"""A real waitress server on a free 127.0.0.1 port, in a thread: HTTP round trips, body
limits over a real socket (declared, chunked, beyond waitress's backstop), graceful stop."""

from __future__ import annotations

import base64
import json
import logging
import os
import runpy
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from qimem.app import AppContext
from qimem.server.app import create_app
from qimem.server.ops import openapi_document
from qimem.server.runner import Server, backstop_body_size

LIMIT = 4096


@contextmanager
def running(app_ctx: AppContext, **options: object) -> Iterator[Server]:
    """Serve ``app_ctx`` on a free loopback port until the block ends."""
    limit = int(options.pop("max_body_bytes", LIMIT))  # type: ignore[call-overload]
    wsgi = create_app(app_ctx, insecure_no_auth=True, max_body_bytes=limit, **options)  # type: ignore[arg-type]
    server = Server(
        wsgi, host="127.0.0.1", port=0, threads=2, max_body_bytes=limit, drain_timeout=10
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture
def server(memory_app: AppContext) -> Iterator[Server]:
    with running(memory_app) as srv:
        yield srv


def raw_exchange(
    port: int, payload: bytes, *, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; return status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def post_head(path: str, length: int | None, *, chunked: bool = False) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        "Connection: close",
    ]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_waitress_queue_warning_is_silenced(server: Server) -> None:
    """Waitress logs "Task queue depth" per queued request under load (~10% throughput)."""
    queue_logger = logging.getLogger("waitress.queue")
    assert not queue_logger.isEnabledFor(logging.WARNING)


def test_round_trip_over_http(server: Server) -> None:
    with requests.Session() as http:
        created = http.post(f"{server.url}/v1/security/keys", json={"name": "live"}, timeout=10)
        assert created.status_code == 201
        assert created.headers["Server"] == "qimem"
        sealed = http.post(
            f"{server.url}/v1/security/encrypt",
            json={"key": "live", "plaintext": base64.b64encode(b"over the wire").decode()},
            headers={"X-Request-Id": "live-1"},
            timeout=10,
        )
        assert sealed.status_code == 200 and sealed.headers["X-Request-Id"] == "live-1"
        opened = http.post(
            f"{server.url}/v1/security/decrypt",
            json={"envelope": sealed.json()["envelope"]},
            timeout=10,
        )
        assert base64.b64decode(opened.json()["plaintext"]) == b"over the wire"
        metrics = http.get(f"{server.url}/metrics", timeout=10).text
        assert 'qimem_crypto_operations_total{operation="decrypt",outcome="ok"} 1.0' in metrics


def test_declared_body_over_limit_is_json_413(server: Server) -> None:
    body = b'{"key": "k", "plaintext": "' + b"A" * LIMIT + b'"}'
    status, headers, raw = raw_exchange(
        server.port, post_head("/v1/security/encrypt", len(body)) + body
    )
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert json.loads(raw)["error"]["code"] == "payload_too_large"


def test_chunked_body_over_limit_is_json_413(server: Server) -> None:
    chunk = b"A" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    status, headers, raw = raw_exchange(
        server.port, post_head("/v1/security/encrypt", None, chunked=True) + chunks
    )
    assert status == 413 and json.loads(raw)["error"]["code"] == "payload_too_large"


def test_chunked_body_under_limit_works(server: Server) -> None:
    requests.post(f"{server.url}/v1/security/keys", json={"name": "k"}, timeout=10)
    body = json.dumps({"key": "k", "plaintext": "AAAA"}).encode()
    chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, _, raw = raw_exchange(
        server.port, post_head("/v1/security/encrypt", None, chunked=True) + chunks
    )
    assert status == 200 and json.loads(raw)["version"] == 1


def test_body_beyond_waitress_backstop_is_refused_before_buffering(server: Server) -> None:
    """Far over the limit, waitress itself answers 413 from the headers alone (its body is
    plain text): the body is never read."""
    huge = backstop_body_size(LIMIT) + 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post_head("/v1/security/encrypt", huge))
        status, _, _ = read_response(sock)
    assert status == 413


def test_short_lying_content_length_reads_only_what_was_declared(server: Server) -> None:
    body = b'{"key": "k", "plaintext": "AAAA"}'
    status, _, raw = raw_exchange(server.port, post_head("/v1/security/encrypt", 5) + body)
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_json"


def test_stop_finishes_a_request_in_flight(memory_app: AppContext) -> None:
    body = json.dumps({"name": "inflight"}).encode()
    with running(memory_app) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sock.sendall(post_head("/v1/security/keys", len(body)) + body[:5])
            time.sleep(0.2)  # let the server read the partial request
            srv.stop()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the listening socket closes first
                try:
                    socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the server kept accepting connections after stop()")
            sock.sendall(body[5:])
            status, _, raw = read_response(sock)
        finally:
            sock.close()
        assert status == 201 and json.loads(raw)["name"] == "inflight"
        assert srv.wait_stopped(10)


def test_stop_closes_idle_keep_alive_connections(memory_app: AppContext) -> None:
    with running(memory_app) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = read_response(sock)
            assert status == 200
            srv.stop()
            assert srv.wait_stopped(10)
            assert sock.recv(10) == b""  # closed by the server, not left hanging
        finally:
            sock.close()


# ---- the examples work against a live server ------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_http_client(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(EXAMPLES / "http_client.py"))
    module["main"](server.url)
    out = capsys.readouterr().out
    assert "wrong aad refused: 422 decryption_failed" in out
    assert "rotating the old key_id again: 409 key_not_active" in out
    assert "batch: 3 of 3 encrypted" in out


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
def test_example_curl_walkthrough(server: Server) -> None:
    env = {**os.environ, "QIMEM_URL": server.url}
    env.pop("QIMEM_TOKEN", None)
    done = subprocess.run(
        ["bash", str(EXAMPLES / "curl.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "hello from curl" in done.stdout
    assert "HTTP 409" in done.stderr + done.stdout
    assert '"invalid_base64"' in done.stdout and "HTTP 422" in done.stdout


# ---- property-based API testing against the live server (schemathesis, OpenAPI 3.1) ----

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_server() -> Iterator[Server]:
    """qimem-api (every documented path) on a memory store with a few keys to find."""
    from conftest import make_app

    app_ctx = make_app("memory://", None)
    try:
        with running(app_ctx, short_paths=True, max_body_bytes=16 * 1024 * 1024) as srv:
            for name in ("k", "a", "key-1"):
                requests.post(f"{srv.url}/v1/security/keys", json={"name": name}, timeout=10)
            yield srv
    finally:
        app_ctx.close()


def operations(api_server: Server) -> list[object]:
    """The operations of the document as the live server serves it (GET /v1/openapi.json)."""
    loaded = schemathesis.openapi.from_url(f"{api_server.url}/v1/openapi.json")
    loaded.config.update(base_url=api_server.url)
    return [result.ok() for result in loaded.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_live_api_conforms_to_openapi(api_server: Server, mode: str) -> None:
    """Schemathesis-generated requests (valid ones, and ones that violate the schema) for
    every documented operation: no 500, every status and body as documented, and every
    schema-violating request rejected with a 4xx."""
    ops = operations(api_server)
    documented = {f"{m.upper()} {p}" for p, o in openapi_document()["paths"].items() for m in o}
    # schemathesis skips the document's own URL, which it was loaded from
    assert {op.label for op in ops} == documented - {"GET /v1/openapi.json"}  # type: ignore[attr-defined]
    with requests.Session() as http:
        for op in ops:
            # the identity endpoints have their own live tests; keep the whole run short
            examples = 8 if op.path.startswith("/v1/auth") else 20  # type: ignore[attr-defined]

            @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))  # type: ignore[attr-defined]
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: object) -> None:
                case.call_and_validate(base_url=api_server.url, session=http, checks=CHECKS)  # type: ignore[attr-defined]

            try:
                check()
            except Unsatisfiable:
                # an operation without parameters or body has no invalid input to send
                assert mode == "negative" and op.method == "get" and "{" not in op.path  # type: ignore[attr-defined]
                continue
            except Exception as exc:
                raise AssertionError(f"{op.label}: {exc}") from exc  # type: ignore[attr-defined]
