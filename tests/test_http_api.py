"""The /v1/security API through Falcon's TestClient: keys, crypto, batches, operations."""

from __future__ import annotations

import base64
import json
import logging

import falcon
import falcon.inspect
import pytest
from conftest import make_app
from falcon import testing

from qimem.app import AppContext
from qimem.server.app import create_app
from qimem.server.ops import SHORT_PATHS, openapi_document

SECRET = b"attack at dawn -- do not log me"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client(sqlite_app: AppContext) -> testing.TestClient:
    return testing.TestClient(create_app(sqlite_app, insecure_no_auth=True))


@pytest.fixture
def api_client(memory_app: AppContext) -> testing.TestClient:
    """The qimem-api flavour (short paths)."""
    return testing.TestClient(create_app(memory_app, insecure_no_auth=True, short_paths=True))


def create(client: testing.TestClient, **body: object) -> dict:
    result = client.simulate_post("/v1/security/keys", json=body)
    assert result.status_code == 201, result.text
    return result.json


def error_code(result: testing.Result) -> str:
    body = result.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


# ---- keys ------------------------------------------------------------------------------


def test_create_list_show(client: testing.TestClient) -> None:
    key = create(client, name="orders", algorithm="chacha20-poly1305")
    assert key["version"] == 1 and key["active"] and key["algorithm"] == "chacha20-poly1305"
    other = create(client)
    assert other["name"] is None and other["algorithm"] == "aes-256-gcm"

    listed = client.simulate_get("/v1/security/keys").json["keys"]
    assert {k["key_id"] for k in listed} == {key["key_id"], other["key_id"]}

    for ref in (key["key_id"], key["lineage_id"], "orders"):
        shown = client.simulate_get(f"/v1/security/keys/{ref}")
        assert shown.status_code == 200
        assert shown.json["lineage_id"] == key["lineage_id"]
        assert shown.json["active_key_id"] == key["key_id"]
        assert [v["version"] for v in shown.json["versions"]] == [1]


def test_create_sets_location(client: testing.TestClient) -> None:
    result = client.simulate_post("/v1/security/keys", json={"name": "loc"})
    assert result.headers["location"] == f"/v1/security/keys/{result.json['key_id']}"


def test_create_errors(client: testing.TestClient) -> None:
    create(client, name="dup")
    taken = client.simulate_post("/v1/security/keys", json={"name": "dup"})
    assert taken.status_code == 409 and error_code(taken) == "name_taken"
    bad_algo = client.simulate_post("/v1/security/keys", json={"algorithm": "rot13"})
    assert bad_algo.status_code == 400 and error_code(bad_algo) == "unsupported_algorithm"
    bad_name = client.simulate_post("/v1/security/keys", json={"name": "1-starts-with-digit"})
    assert bad_name.status_code == 400 and error_code(bad_name) == "invalid_name"


def test_unknown_key_is_404(client: testing.TestClient) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    for result in (
        client.simulate_get(f"/v1/security/keys/{missing}"),
        client.simulate_get("/v1/security/keys/no-such-name"),
        client.simulate_post("/v1/security/rotate", json={"key_id": missing}),
        client.simulate_post("/v1/security/encrypt", json={"key": "nope", "plaintext": "AA=="}),
        client.simulate_post("/v1/security/datakey", json={"key_id": missing}),
    ):
        assert result.status_code == 404, result.text
        assert error_code(result) == "not_found"


def test_rotate_by_key_id_then_409(client: testing.TestClient) -> None:
    key = create(client, name="rot")
    rotated = client.simulate_post("/v1/security/rotate", json={"key_id": key["key_id"]})
    assert rotated.status_code == 200
    assert rotated.json["version"] == 2 and rotated.json["lineage_id"] == key["lineage_id"]

    again = client.simulate_post("/v1/security/rotate", json={"key_id": key["key_id"]})
    assert again.status_code == 409 and error_code(again) == "key_not_active"
    assert rotated.json["key_id"] in again.json["error"]["message"]

    by_name = client.simulate_post("/v1/security/rotate", json={"key": "rot"})
    assert by_name.status_code == 200 and by_name.json["version"] == 3
    versions = client.simulate_get("/v1/security/keys/rot").json["versions"]
    assert [v["state"] for v in versions] == ["decrypt-only", "decrypt-only", "active"]


# ---- crypto ----------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip_with_aad(client: testing.TestClient) -> None:
    key = create(client, name="rt")
    sealed = client.simulate_post(
        "/v1/security/encrypt", json={"key": "rt", "plaintext": b64(SECRET), "aad": b64(b"ctx")}
    )
    assert sealed.status_code == 200
    assert sealed.json["key_id"] == key["key_id"] and sealed.json["version"] == 1
    envelope = sealed.json["envelope"]

    opened = client.simulate_post(
        "/v1/security/decrypt", json={"envelope": envelope, "aad": b64(b"ctx")}
    )
    assert opened.status_code == 200
    assert base64.b64decode(opened.json["plaintext"]) == SECRET

    wrong_aad = client.simulate_post("/v1/security/decrypt", json={"envelope": envelope})
    assert wrong_aad.status_code == 422 and error_code(wrong_aad) == "decryption_failed"


def test_encrypt_with_exact_key_id_after_rotation_is_409(client: testing.TestClient) -> None:
    key = create(client)
    body = {"key_id": key["key_id"], "plaintext": b64(b"x")}
    assert client.simulate_post("/v1/security/encrypt", json=body).status_code == 200
    client.simulate_post("/v1/security/rotate", json={"key_id": key["key_id"]})
    stale = client.simulate_post("/v1/security/encrypt", json=body)
    assert stale.status_code == 409 and error_code(stale) == "key_not_active"


@pytest.mark.parametrize("where", [0, 10, 30, -1])
def test_tampered_envelope_is_422(client: testing.TestClient, where: int) -> None:
    create(client, name="tamper")
    envelope = base64.b64decode(
        client.simulate_post(
            "/v1/security/encrypt", json={"key": "tamper", "plaintext": b64(SECRET)}
        ).json["envelope"]
    )
    flipped = bytearray(envelope)
    flipped[where] ^= 0x01
    result = client.simulate_post("/v1/security/decrypt", json={"envelope": b64(bytes(flipped))})
    # a flipped key-id byte names a key that does not exist (404); every other flip is 422
    assert result.status_code in ((404,) if 6 <= where < 22 else (422,)), result.text
    assert SECRET.decode() not in result.text


def test_garbage_and_truncated_envelopes_are_422(client: testing.TestClient) -> None:
    create(client, name="g")
    envelope = base64.b64decode(
        client.simulate_post(
            "/v1/security/encrypt", json={"key": "g", "plaintext": b64(b"abc")}
        ).json["envelope"]
    )
    for blob in (b"", b"not an envelope", envelope[:-1], envelope + b"\x00"):
        result = client.simulate_post("/v1/security/decrypt", json={"envelope": b64(blob)})
        assert result.status_code == 422, (blob, result.text)


def test_rewrap_moves_to_the_new_version(client: testing.TestClient) -> None:
    key = create(client, name="rw")
    envelope = client.simulate_post(
        "/v1/security/encrypt", json={"key": "rw", "plaintext": b64(SECRET)}
    ).json["envelope"]
    client.simulate_post("/v1/security/rotate", json={"key_id": key["key_id"]})
    rewrapped = client.simulate_post("/v1/security/rewrap", json={"envelope": envelope})
    assert rewrapped.status_code == 200 and rewrapped.json["version"] == 2
    opened = client.simulate_post(
        "/v1/security/decrypt", json={"envelope": rewrapped.json["envelope"]}
    )
    assert base64.b64decode(opened.json["plaintext"]) == SECRET and opened.json["version"] == 2


def test_datakey_unwraps_through_decrypt(client: testing.TestClient) -> None:
    create(client, name="dk")
    result = client.simulate_post("/v1/security/datakey", json={"key": "dk"})
    assert result.status_code == 200
    plain = base64.b64decode(result.json["plaintext_key"])
    assert len(plain) == 32
    opened = client.simulate_post(
        "/v1/security/decrypt", json={"envelope": result.json["wrapped_key"]}
    )
    assert base64.b64decode(opened.json["plaintext"]) == plain


def test_encrypt_batch_has_one_result_per_item(client: testing.TestClient) -> None:
    create(client, name="batch")
    items = [
        {"key": "batch", "plaintext": b64(b"one")},
        {"key": "missing-key", "plaintext": b64(b"two")},
        {"key": "batch", "plaintext": "not base64!"},
        {"key": "batch", "plaintext": b64(b"four"), "extra": 1},
        "not an object",
        {"key": "batch", "plaintext": b64(b"six"), "aad": b64(b"a")},
    ]
    result = client.simulate_post("/v1/security/encrypt", json={"items": items})
    assert result.status_code == 200
    out = result.json["items"]
    assert len(out) == len(items)
    codes = [o["error"]["code"] if "error" in o else "ok" for o in out]
    assert codes == ["ok", "not_found", "invalid_base64", "unknown_field", "invalid_type", "ok"]

    decrypt_items = [
        {"envelope": out[0]["envelope"]},
        {"envelope": out[5]["envelope"]},
        {"envelope": out[5]["envelope"], "aad": b64(b"a")},
    ]
    opened = client.simulate_post("/v1/security/decrypt", json={"items": decrypt_items}).json[
        "items"
    ]
    assert base64.b64decode(opened[0]["plaintext"]) == b"one"
    assert opened[1]["error"]["code"] == "decryption_failed"
    assert base64.b64decode(opened[2]["plaintext"]) == b"six"


@pytest.mark.parametrize(
    "body, code",
    [
        ({"items": []}, "invalid_value"),
        ({"items": {}}, "invalid_type"),
        ({"items": [{}], "key": "x"}, "unknown_field"),
        ({"items": [{}] * 1001}, "invalid_value"),
    ],
)
def test_bad_batch_bodies(client: testing.TestClient, body: dict, code: str) -> None:
    result = client.simulate_post("/v1/security/encrypt", json=body)
    assert result.status_code == 400 and error_code(result) == code


def test_plaintext_over_envelope_limit_is_413() -> None:
    app = make_app("memory://", None, max_envelope_bytes=16)
    try:
        client = testing.TestClient(create_app(app, insecure_no_auth=True))
        create(client, name="small")
        ok = client.simulate_post(
            "/v1/security/encrypt", json={"key": "small", "plaintext": b64(b"x" * 16)}
        )
        assert ok.status_code == 200
        big = client.simulate_post(
            "/v1/security/encrypt", json={"key": "small", "plaintext": b64(b"x" * 17)}
        )
        assert big.status_code == 413 and error_code(big) == "payload_too_large"
    finally:
        app.close()


# ---- short paths (qimem-api) -------------------------------------------------------------


def test_short_paths(api_client: testing.TestClient) -> None:
    key = api_client.simulate_post("/keys", json={"name": "short"})
    assert key.status_code == 201
    sealed = api_client.simulate_post("/encrypt", json={"key": "short", "plaintext": b64(b"s")})
    opened = api_client.simulate_post("/decrypt", json={"envelope": sealed.json["envelope"]})
    assert base64.b64decode(opened.json["plaintext"]) == b"s"
    rotated = api_client.simulate_post("/rotate", json={"key_id": key.json["key_id"]})
    assert rotated.status_code == 200 and rotated.json["version"] == 2
    assert api_client.simulate_get("/keys").status_code == 405  # only POST /keys is short


def test_unified_app_has_no_short_paths(client: testing.TestClient) -> None:
    for path in SHORT_PATHS:
        assert client.simulate_post(path, json={}).status_code == 404


# ---- operations -------------------------------------------------------------------------


def test_healthz_and_readyz(client: testing.TestClient) -> None:
    assert client.simulate_get("/healthz").json == {"status": "ok"}
    assert client.simulate_get("/readyz").json == {"status": "ready"}


@pytest.mark.postgres
def test_readyz_is_503_when_the_store_is_gone(postgres_url: str, root_key_b64: str) -> None:
    import sqlalchemy as sa

    app = make_app(postgres_url, root_key_b64)
    try:
        client = testing.TestClient(create_app(app, insecure_no_auth=True))
        assert client.simulate_get("/readyz").status_code == 200
        url = sa.engine.make_url(postgres_url)
        admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
        admin.dispose()
        result = client.simulate_get("/readyz")
        assert result.status_code == 503 and error_code(result) == "store_unavailable"
        assert result.headers["retry-after"]
        assert client.simulate_get("/healthz").status_code == 200
        listed = client.simulate_get("/v1/security/keys")
        assert listed.status_code == 503
    finally:
        app.close()


def test_metrics_count_requests_by_route_and_crypto_ops(client: testing.TestClient) -> None:
    create(client, name="m")
    client.simulate_post("/v1/security/encrypt", json={"key": "m", "plaintext": b64(b"1")})
    client.simulate_post(
        "/v1/security/encrypt",
        json={"items": [{"key": "m", "plaintext": b64(b"2")}, {"key": "m", "plaintext": "?"}]},
    )
    client.simulate_get("/v1/security/keys/m")
    client.simulate_get("/v1/security/keys/no-such")
    result = client.simulate_get("/metrics")
    assert result.status_code == 200 and result.headers["content-type"].startswith("text/plain")
    text = result.text
    assert (
        'qimem_http_requests_total{method="POST",route="/v1/security/encrypt",status="200"} 2.0'
        in text
    )
    assert (
        'qimem_http_requests_total{method="GET",route="/v1/security/keys/{key_id}",'
        'status="404"} 1.0' in text
    )
    assert (
        'qimem_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/security/keys"}'
        in text
    )
    assert 'qimem_crypto_operations_total{operation="encrypt",outcome="ok"} 2.0' in text
    assert 'qimem_crypto_operations_total{operation="encrypt",outcome="error"} 1.0' in text
    assert "no-such" not in text  # labels hold route templates, never raw paths


def test_metrics_registry_is_per_app(memory_app: AppContext) -> None:
    one = testing.TestClient(create_app(memory_app, insecure_no_auth=True))
    two = testing.TestClient(create_app(memory_app, insecure_no_auth=True))
    one.simulate_get("/healthz")
    assert 'route="/healthz"' in one.simulate_get("/metrics").text
    assert 'route="/healthz"' not in two.simulate_get("/metrics").text


def test_request_id_is_echoed_or_generated(client: testing.TestClient) -> None:
    given = client.simulate_get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    fresh = client.simulate_get("/healthz")
    assert len(fresh.headers["x-request-id"]) == 32
    hostile = client.simulate_get(
        "/healthz", headers={"X-Request-Id": 'x" injected=1 ' + "y" * 100}
    )
    assert hostile.headers["x-request-id"] != 'x" injected=1 ' + "y" * 100
    error = client.simulate_get("/nowhere", headers={"X-Request-Id": "err-1"})
    assert error.headers["x-request-id"] == "err-1"


def test_access_log_is_structured_and_holds_no_secrets(
    client: testing.TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    create(client, name="logged")
    with caplog.at_level(logging.INFO, logger="qimem.server.access"):
        caplog.clear()
        sealed = client.simulate_post(
            "/v1/security/encrypt",
            json={"key": "logged", "plaintext": b64(SECRET)},
            headers={"X-Request-Id": "req-42"},
        )
        client.simulate_post("/v1/security/decrypt", json={"envelope": sealed.json["envelope"]})
        client.simulate_get("/v1/security/keys/logged")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "qimem.server.access"]
    assert len(lines) == 3
    first = lines[0]
    assert set(first) == {"event", "method", "route", "status", "duration_ms", "request_id"}
    assert first["method"] == "POST" and first["route"] == "/v1/security/encrypt"
    assert first["status"] == 200 and first["request_id"] == "req-42" and first["duration_ms"] >= 0
    assert lines[2]["route"] == "/v1/security/keys/{key_id}"  # the template, not the name
    logged = caplog.text
    for secret in (SECRET.decode(), b64(SECRET), sealed.json["envelope"], "logged"):
        assert secret not in logged


def test_access_log_handler_batches_lines_and_flushes_on_close(client: testing.TestClient) -> None:
    import io

    from qimem.server.middleware import AccessLogHandler

    logger = logging.getLogger("qimem.server.access")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    out = io.StringIO()
    handler = AccessLogHandler(out, flush_interval=60)  # only close() flushes in this test
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            client.simulate_get("/healthz")
        assert out.getvalue() == ""  # batched, not written on the request path
        handler.close()
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["route"], x["status"]) for x in lines] == [("/healthz", 200)] * 3


@pytest.mark.parametrize(
    "flavour",
    [{}, {"short_paths": True, "security_only": True}, {"short_paths": True}],
    ids=["unified", "qimem-api", "unified+short"],
)
def test_openapi_served_and_covers_every_route(memory_app: AppContext, flavour: dict) -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    app = create_app(memory_app, insecure_no_auth=True, **flavour)
    served = testing.TestClient(app).simulate_get("/v1/openapi.json").json
    routes = {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    }
    documented = {(path, method) for path, ops in served["paths"].items() for method in ops}
    assert routes == documented
    assert set(served["paths"]) <= set(doc["paths"])
    paths = {path for path, _ in routes}
    assert ("/keys" in paths) == bool(flavour.get("short_paths"))
    assert any(p.startswith("/v1/auth/") for p in paths) != bool(flavour.get("security_only"))


@pytest.mark.parametrize(
    "flavour",
    [{}, {"short_paths": True, "security_only": True}],
    ids=["unified", "qimem-api"],
)
def test_served_paths_lists_what_falcons_inspector_lists(
    memory_app: AppContext, flavour: dict
) -> None:
    """The app's own route walk (no source lookups) stays in step with falcon.inspect."""
    from qimem.server.app import served_paths

    app = create_app(memory_app, insecure_no_auth=True, **flavour)
    assert served_paths(app) == [route.path for route in falcon.inspect.inspect_routes(app)]
    assert "/v1/security/encrypt" in served_paths(app)


def test_openapi_documents_the_error_shape_for_every_error_status() -> None:
    doc = openapi_document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert response["$ref"].startswith("#/components/responses/E"), (
                        path,
                        method,
                        status,
                    )


def test_options_and_unknown_methods_never_500(client: testing.TestClient) -> None:
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
        for path in ("/v1/security/keys", "/v1/security/encrypt", "/healthz", "/nowhere"):
            result = client.simulate_request(method, path)
            assert result.status_code < 500
            if result.status_code >= 400 and method != "HEAD":
                assert error_code(result)


def test_non_loopback_client_is_refused_without_auth(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/security/keys", remote_addr="10.1.2.3")
    assert result.status_code == 403
    assert error_code(result) == "forbidden"
    assert client.simulate_get("/v1/security/keys", remote_addr="::1").status_code == 200


def test_create_app_without_no_auth_mode_requires_tokens(memory_app: AppContext) -> None:
    result = testing.TestClient(create_app(memory_app)).simulate_get("/v1/security/keys")
    assert result.status_code == 401
    assert error_code(result) == "unauthorized"
