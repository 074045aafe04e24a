"""Strict request validation: every bad body gets one clear 4xx JSON error, never a 500."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
from falcon import testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimem.app import AppContext
from qimem.errors import PayloadTooLargeError
from qimem.server.app import create_app
from qimem.server.media import LimitedStream

KEY_ID = "00000000-0000-4000-8000-000000000000"
POST_PATHS = (
    "/v1/security/keys",
    "/v1/security/encrypt",
    "/v1/security/decrypt",
    "/v1/security/rotate",
    "/v1/security/rewrap",
    "/v1/security/datakey",
    "/keys",
    "/encrypt",
    "/decrypt",
    "/rotate",
)


@pytest.fixture(scope="module")
def app_ctx() -> Iterator[AppContext]:
    from conftest import make_app

    app = make_app("memory://", None)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(app_ctx: AppContext) -> testing.TestClient:
    client = testing.TestClient(
        create_app(app_ctx, insecure_no_auth=True, short_paths=True, max_body_bytes=16384)
    )
    assert client.simulate_post("/v1/security/keys", json={"name": "k"}).status_code == 201
    return client


def check_error(result: testing.Result, status: int, code: str | None = None) -> None:
    assert result.status_code == status, result.text
    body = result.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.mark.parametrize(
    "path, body, code",
    [
        ("/v1/security/encrypt", {"key": "k"}, "missing_field"),
        ("/v1/security/encrypt", {"plaintext": "AA=="}, "missing_field"),
        (
            "/v1/security/encrypt",
            {"key": "k", "key_id": KEY_ID, "plaintext": "AA=="},
            "invalid_request",
        ),
        (
            "/v1/security/encrypt",
            {"key": "k", "plaintext": "AA==", "color": "red"},
            "unknown_field",
        ),
        ("/v1/security/encrypt", {"key": "k", "plaintext": 5}, "invalid_type"),
        ("/v1/security/encrypt", {"key": ["k"], "plaintext": "AA=="}, "invalid_type"),
        ("/v1/security/encrypt", {"key": "k", "plaintext": None}, "invalid_type"),
        ("/v1/security/encrypt", {"key": "k", "plaintext": "AA="}, "invalid_base64"),
        ("/v1/security/encrypt", {"key": "k", "plaintext": "A A=="}, "invalid_base64"),
        ("/v1/security/encrypt", {"key": "k", "plaintext": "AA==\n"}, "invalid_base64"),
        ("/v1/security/encrypt", {"key": "k", "plaintext": "AA-_"}, "invalid_base64"),
        ("/v1/security/encrypt", {"key": "k", "plaintext": "AA==", "aad": "%%"}, "invalid_base64"),
        ("/v1/security/encrypt", {"key": "", "plaintext": "AA=="}, "invalid_value"),
        ("/v1/security/encrypt", {"key": "a\u0000b", "plaintext": "AA=="}, "invalid_value"),
        ("/v1/security/encrypt", {"key": "x" * 129, "plaintext": "AA=="}, "invalid_value"),
        ("/v1/security/encrypt", {"key_id": "k", "plaintext": "AA=="}, "invalid_value"),
        (
            "/v1/security/encrypt",
            {"key_id": "ABCDEF00-0000-4000-8000-000000000000", "plaintext": "AA=="},
            "invalid_value",
        ),
        ("/v1/security/encrypt", [], "invalid_type"),
        ("/v1/security/encrypt", "text", "invalid_type"),
        ("/v1/security/decrypt", {}, "missing_field"),
        ("/v1/security/decrypt", {"envelope": "AA==", "key": "k"}, "unknown_field"),
        ("/v1/security/decrypt", {"envelope": True}, "invalid_type"),
        ("/v1/security/rewrap", {"envelope": "@@@@"}, "invalid_base64"),
        ("/v1/security/rotate", {}, "missing_field"),
        ("/v1/security/rotate", {"key_id": 7}, "invalid_type"),
        ("/v1/security/rotate", {"key_id": KEY_ID, "force": True}, "unknown_field"),
        ("/v1/security/datakey", {"key": "k", "size": 16}, "unknown_field"),
        ("/v1/security/keys", {"name": 5}, "invalid_type"),
        ("/v1/security/keys", {"name": "tab\there"}, "invalid_value"),
        ("/v1/security/keys", {"algorithm": {}}, "invalid_type"),
        ("/v1/security/keys", {"realm": "other"}, "unknown_field"),
        ("/keys", {"bogus": 1}, "unknown_field"),
    ],
)
def test_bad_fields_are_400(client: testing.TestClient, path: str, body: object, code: str) -> None:
    check_error(client.simulate_post(path, json=body), 400, code)


def test_bad_path_reference_is_400(client: testing.TestClient) -> None:
    check_error(client.simulate_get("/v1/security/keys/a%00b"), 400, "invalid_value")
    check_error(client.simulate_get("/v1/security/keys/" + "x" * 200), 400, "invalid_value")


def test_null_means_absent_for_optional_fields(client: testing.TestClient) -> None:
    sealed = client.simulate_post(
        "/v1/security/encrypt", json={"key": "k", "plaintext": "AA==", "aad": None}
    )
    assert sealed.status_code == 200
    key = client.simulate_post("/v1/security/keys", json={"name": None, "algorithm": None})
    assert key.status_code == 201 and key.json["algorithm"] == "aes-256-gcm"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"key": "k", "plaintext": "AA=="',
        b"{'key': 'k'}",
        b'{"key": "k", "plaintext": NaN}',
        b'{"key": "k", "plaintext": Infinity}',
        b'{"key": "k", "key": "k", "plaintext": "AA=="}',
        b'{"key": "k", "plaintext": "AA=="} trailing',
        b"\xff\xfe{}",
        b'{"key": "\xc3\x28", "plaintext": "AA=="}',
        b"[" * 3000 + b"]" * 3000,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b'{"key": "k", "plaintext": "AA==", "n": ' + b"9" * 5000 + b"}",
    ],
)
def test_malformed_json_is_400(client: testing.TestClient, raw: bytes) -> None:
    result = client.simulate_post(
        "/v1/security/encrypt", body=raw, headers={"Content-Type": "application/json"}
    )
    assert result.status_code == 400, result.text
    assert result.json["error"]["code"] in ("invalid_json", "invalid_type", "unknown_field")


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_non_json_content_type_is_415(client: testing.TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    result = client.simulate_post(
        "/v1/security/encrypt", body=json.dumps({"key": "k", "plaintext": "AA=="}), headers=headers
    )
    check_error(result, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(client: testing.TestClient) -> None:
    result = client.simulate_post(
        "/v1/security/encrypt",
        body=json.dumps({"key": "k", "plaintext": "AA=="}),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert result.status_code == 200


def test_declared_body_over_limit_is_413(client: testing.TestClient) -> None:
    body = json.dumps({"key": "k", "plaintext": base64.b64encode(b"x" * 16384).decode()})
    check_error(
        client.simulate_post("/v1/security/encrypt", body=body, content_type="application/json"),
        413,
        "payload_too_large",
    )
    check_error(client.simulate_get("/healthz", body=b"x" * 17000), 413, "payload_too_large")


def test_undeclared_body_over_limit_is_413_while_reading(client: testing.TestClient) -> None:
    """A body with no Content-Length (as a chunked body reaches some WSGI servers) is
    refused once more than the limit has been read, not buffered whole."""

    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            buffer[:] = b" " * len(buffer)
            self.served += len(buffer)
            return len(buffer)

    endless = Endless()
    stream = io.BufferedReader(endless, buffer_size=1024)
    result = client.simulate_request(
        "POST",
        "/v1/security/encrypt",
        headers={"Content-Type": "application/json"},
        extras={"wsgi.input": stream, "wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
    )
    check_error(result, 413, "payload_too_large")
    assert endless.served < 16384 + 64 * 1024 + 2048  # stopped near the limit, not at EOF


def test_lying_content_length_cannot_read_past_the_limit() -> None:
    stream = LimitedStream(io.BytesIO(b"a" * 100), 10)
    assert stream.read(10) == b"a" * 10
    with pytest.raises(PayloadTooLargeError):
        stream.read(5)
    whole = LimitedStream(io.BytesIO(b"b" * 100), 10)
    with pytest.raises(PayloadTooLargeError):
        whole.read()
    assert LimitedStream(io.BytesIO(b"c" * 10), 10).read() == b"c" * 10
    lines = LimitedStream(io.BytesIO(b"ab\ncd\n" + b"e" * 20), 10)
    assert lines.readline() == b"ab\n" and lines.readline() == b"cd\n"
    with pytest.raises(PayloadTooLargeError):
        lines.readline()


# ---- property-based: no input gives a 500 ----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
base64_text = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
field_values = st.one_of(
    base64_text, st.text(max_size=30), json_values, st.just(KEY_ID), st.just("k")
)
shaped_bodies = st.dictionaries(
    st.sampled_from(
        ["key", "key_id", "plaintext", "aad", "envelope", "name", "algorithm", "items", "x"]
    ),
    field_values,
    max_size=5,
)
bodies = st.one_of(
    json_values,
    shaped_bodies,
    st.builds(lambda items: {"items": items}, st.lists(shaped_bodies, max_size=4)),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(POST_PATHS), body=bodies)
def test_random_json_bodies_never_500(client: testing.TestClient, path: str, body: object) -> None:
    result = client.simulate_post(path, json=body)
    assert result.status_code < 500, result.text
    if result.status_code >= 400:
        check_error(result, result.status_code)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(POST_PATHS), raw=st.binary(max_size=200))
def test_random_bytes_never_500(client: testing.TestClient, path: str, raw: bytes) -> None:
    result = client.simulate_post(path, body=raw, headers={"Content-Type": "application/json"})
    assert result.status_code < 500, result.text


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(segment=st.text(min_size=1, max_size=40))
def test_random_key_paths_never_500(client: testing.TestClient, segment: str) -> None:
    from urllib.parse import quote

    result = client.simulate_get("/v1/security/keys/" + quote(segment, safe=""))
    assert result.status_code < 500, result.text
