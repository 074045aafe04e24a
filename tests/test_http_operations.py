"""One declaration per operation (qimem.server.operations): the routes, the authorization
rules and the OpenAPI paths all come from the declarations, and adding an operation is one
declaration in a module listed in ``operations.MODULES``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import falcon
import falcon.inspect
import pytest
from conftest import make_app
from falcon import testing
from identity_helpers import password_of, with_identity

from qimem.app import AppContext
from qimem.server import auth_middleware, operations, ops
from qimem.server.app import create_app
from qimem.server.media import Field, Spec, base64_bytes
from qimem.server.operations import PREFIX, Doc, Operation
from qimem.services import identity as ids


def _served(app: falcon.App) -> set[tuple[str, str]]:
    return {
        (method.method, route.path)
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    }


def test_every_declaration_is_served_ruled_and_documented(memory_app: AppContext) -> None:
    declared = operations.security_operations()
    assert len({op.name for op in declared}) == len(declared)  # operationIds are unique
    served = _served(create_app(memory_app, short_paths=True, security_only=True))
    doc = ops.openapi_document()
    for op in declared:
        paths = [PREFIX + op.path] + ([op.short] if op.short else [])
        for path in paths:
            assert (op.method, path) in served, (op.name, path)
            rule = auth_middleware.RULES[(op.method, path)]
            assert (rule.permission, rule.key_names, rule.audit, rule.also) == (
                op.permission,
                op.key_names,
                op.audit,
                op.also,
            )
            entry = doc["paths"][path][op.method.lower()]
            assert entry["operationId"].startswith(op.name)
            for ref in _refs(entry):
                assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], (op.name, ref)
        for name, schema in op.doc.schemas.items():  # not replaced by another part's schema
            assert doc["components"]["schemas"][name] == schema, (op.name, name)
        if op.batch and op.spec is not None:
            assert (
                "oneOf"
                in doc["paths"][PREFIX + op.path]["post"]["requestBody"]["content"][
                    "application/json"
                ]["schema"]
            )


def test_a_facade_finds_declarations_by_name(memory_app: AppContext) -> None:
    """Another facade (issue 17's Transit paths) binds the same declarations: the call
    takes parsed arguments, never an HTTP request."""
    from qimem import services

    services.create_key(memory_app, name="f", algorithm="ed25519")
    sign = operations.operation("sign")
    assert (sign.permission, sign.audit, sign.batch) == ("keys:sign", "crypto.sign", True)
    signed = sign.call(memory_app, "master", {"key": "f", "message": b"m"})
    verify = operations.operation("verify").call
    args = {"key": "f", "message": b"m", "signature": base64.b64decode(signed["signature"])}
    assert verify(memory_app, "master", args)["valid"] is True
    with pytest.raises(KeyError):
        operations.operation("nope")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and value.startswith("#/components/schemas/"):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_a_mistyped_batch_body_of_every_batch_operation_is_400(memory_app: AppContext) -> None:
    client = testing.TestClient(create_app(memory_app, insecure_no_auth=True))
    for op in operations.security_operations():
        if op.batch:
            for body in ({"items": []}, {"items": {}}, {"items": [1], "x": 1}):
                result = client.simulate_post(PREFIX + op.path, json=body)
                assert result.status_code == 400, (op.name, body, result.text)


# ---- adding an operation: one declaration ------------------------------------------------

LENGTH_SPEC = Spec(Field("data", base64_bytes, required=True))


def _length(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"length": len(args["data"])}


#: The operation this module adds (operations.MODULES lists modules with OPERATIONS).
OPERATIONS = (
    Operation(
        "length",
        "POST",
        "/length",
        _length,
        Doc(
            "The length of some data.",
            "Length",
            "The length.",
            request="LengthRequest",
            schemas={
                "LengthRequest": {"type": "object", "properties": {"data": {"type": "string"}}},
                "Length": {"type": "object", "properties": {"length": {"type": "integer"}}},
            },
        ),
        spec=LENGTH_SPEC,
        permission="keys:read",
        audit="crypto.length",
        batch=True,
    ),
)


@pytest.fixture
def with_length_operation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(operations, "MODULES", (*operations.MODULES, __name__))
    caches = (operations.security_operations, ops.openapi_document)
    for cached in caches:
        cached.cache_clear()
    monkeypatch.setattr(auth_middleware, "RULES", auth_middleware.default_rules())
    yield
    for cached in caches:
        cached.cache_clear()


def test_one_declaration_adds_route_rule_audit_and_document(with_length_operation: None) -> None:
    app = with_identity(make_app("memory://", None))
    try:
        ids.create_role(app, "master", "reader", ["keys:read"])
        ids.add_user(app, "master", "reader", password_of("reader"), ["reader"])
        ids.add_user(app, "master", "nobody", password_of("nobody"))
        client = testing.TestClient(create_app(app))
        token = {r: ids.mint_token(app, "master", r).access_token for r in ("reader", "nobody")}
        body = {"data": base64.b64encode(b"four").decode()}

        def post(who: str, payload: Any) -> testing.Result:
            headers = {"Authorization": f"Bearer {token[who]}"}
            return client.simulate_post(PREFIX + "/length", json=payload, headers=headers)

        assert post("reader", body).json == {"length": 4}
        assert post("reader", {"items": [body, {"data": "!"}]}).json["items"][1]["error"]
        assert post("reader", {"data": 4}).status_code == 400
        assert post("nobody", body).status_code == 403  # the declared permission
        assert client.simulate_post(PREFIX + "/length", json=body).status_code == 401
        ident = ids.identity(app)
        ident.audit.flush()
        outcomes = [r.outcome for r in ident.audit_events("master", action="crypto.length")]
        assert sorted(outcomes) == ["denied", "failure", "success", "success"]
        headers = {"Authorization": f"Bearer {token['reader']}"}
        served = client.simulate_get("/v1/openapi.json", headers=headers).json
        assert served["paths"][PREFIX + "/length"]["post"]["operationId"] == "length"
        assert "Length" in served["components"]["schemas"]
    finally:
        ids.close_identity(app)
        app.close()
