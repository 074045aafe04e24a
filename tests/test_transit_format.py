"""The Transit facade's pieces without a server: ciphertext format, key types, Vault's
lenient field parsing, batch statuses, the ``[transit]`` settings, the mount, and that every
facade route has an authorization rule bound to a /v1/security operation."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import falcon.inspect
import pytest
from falcon import testing

from qimem import services
from qimem.app import AppContext
from qimem.config import Config, TransitSettings, load_config, parse_transit
from qimem.errors import ConfigError
from qimem.server.app import create_app
from qimem.server.auth_middleware import transit_rules
from qimem.server.operations import operation
from qimem.server.transit import transit_operations
from qimem.server.transit.ciphertext import format_ciphertext, parse_ciphertext
from qimem.server.transit.framework import (
    BatchAnswer,
    VaultError,
    b64_field,
    batch_input,
    boolean,
    integer,
)
from qimem.server.transit.keytypes import TO_ALGORITHM, algorithm_of, type_of


def app_with(transit: TransitSettings) -> AppContext:
    return AppContext(Config(store_url="memory://", transit=transit)).open()


@pytest.fixture
def ctx() -> Iterator[AppContext]:
    app = app_with(TransitSettings())
    yield app
    app.close()


# ---- ciphertexts ------------------------------------------------------------------------


def test_a_ciphertext_round_trips_and_its_prefix_must_match(ctx: AppContext) -> None:
    services.create_key(ctx, name="k")
    sealed = services.encrypt(ctx, "k", b"data")
    text = format_ciphertext(sealed.version, sealed.envelope)
    assert text.startswith("vault:v1:")
    version, blob, parsed = parse_ciphertext(text)
    assert (version, blob, parsed.key_id_str) == (1, sealed.envelope, sealed.key_id)
    with pytest.raises(VaultError, match="does not match"):
        parse_ciphertext(format_ciphertext(2, sealed.envelope))


@pytest.mark.parametrize(
    "text",
    [
        None,
        5,
        "",
        "vault:",
        "vault:v:QUJD",
        "vault:v0:QUJD",
        "vault:v01:QUJD",
        "vault:v12345678901:QUJD",
        "vault:v1:QUJD=",  # bad padding
        "vault:v1:QU JD",
        "vault:v1:QUJD\n",
        "vault:v1:" + base64.b64encode(b"not an envelope").decode(),
        "vault:v1:" + base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
        "VAULT:v1:QUJD",
    ],
)
def test_malformed_ciphertexts_are_vault_errors(text: object) -> None:
    with pytest.raises(VaultError) as caught:
        parse_ciphertext(text)
    assert caught.value.http_status == 400


# ---- key types --------------------------------------------------------------------------


def test_key_types_map_to_registered_algorithms_both_ways(ctx: AppContext) -> None:
    purposes = ctx.registry.algorithm_purposes
    for vault_type, algorithm in TO_ALGORITHM.items():
        assert algorithm in purposes, algorithm
        assert type_of(algorithm) == vault_type
    assert algorithm_of(None) == "aes-256-gcm"
    assert type_of("rsa-pkcs1-3072") == "rsa-3072"
    for missing in ("aes128-gcm96", "xchacha20-poly1305", "rsa-2048", "ecdsa-p521", 5):
        with pytest.raises(VaultError, match="unsupported key type"):
            algorithm_of(missing)


# ---- lenient fields ---------------------------------------------------------------------


def test_integers_and_booleans_may_be_strings_but_nothing_else() -> None:
    assert integer({"v": "3"}, "v") == 3 and integer({"v": 3}, "v") == 3
    assert integer({"v": None}, "v", 7) == 7 and integer({}, "v") is None
    for bad in ("3.5", "x", True, [1], "9" * 30):
        with pytest.raises(VaultError):
            integer({"v": bad}, "v")
    assert boolean({"b": "true"}, "b") is True and boolean({"b": "0"}, "b") is False
    assert boolean({}, "b", True) is True
    for bad in ("yes", 2, [True]):
        with pytest.raises(VaultError):
            boolean({"b": bad}, "b")


def test_base64_is_strict_and_null_is_absent() -> None:
    assert b64_field({"p": "QUJD"}, "p") == b"ABC"
    assert b64_field({"p": None}, "p") is None and b64_field({"p": ""}, "p") is None
    assert b64_field({"p": ""}, "p", empty_is_none=False) == b""
    for bad in ("QUJ", "QU JD", "@@@@", "QUJD=", "QUJD\n", "QUJDé", "QUJD====", 5):
        with pytest.raises(VaultError):
            b64_field({"p": bad}, "p")


def test_batches_are_bounded_and_fail_with_400_unless_asked() -> None:
    assert batch_input({}) is None
    for bad in ([], "x", [1], [{}] * 1001):
        with pytest.raises(VaultError):
            batch_input({"batch_input": bad})
    ok, bad = {"ciphertext": "c"}, {"error": "e"}
    assert BatchAnswer.of([ok, ok], {}).status == 200
    assert BatchAnswer.of([ok, bad], {}).status == 400
    assert BatchAnswer.of([ok, bad], {"partial_failure_response_code": "207"}).status == 207
    assert BatchAnswer.of([bad, bad], {"partial_failure_response_code": 207}).status == 400
    assert BatchAnswer.of([ok, bad], {"partial_failure_response_code": 99}).status == 400


# ---- settings, mount and rules -----------------------------------------------------------


def test_transit_settings_are_checked(tmp_path: Path) -> None:
    assert parse_transit({}, None) == TransitSettings(enabled=True, mount="transit")
    assert parse_transit({"transit": {"mount": "kms"}}, None).mount == "kms"
    for table in (
        {"mount": "a/b"},
        {"mount": "security"},
        {"mount": "Transit"},
        {"mount": ""},
        {"enabled": "yes"},
        {"mounts": "x"},
    ):
        with pytest.raises(ConfigError):
            parse_transit({"transit": table}, "config.toml")
    path = tmp_path / "config.toml"
    path.write_text('[store]\nurl = "memory://"\n[transit]\nmount = "vault"\nenabled = false\n')
    path.chmod(0o600)
    assert load_config(path).transit == TransitSettings(enabled=False, mount="vault")


def test_the_mount_is_configurable_and_the_facade_can_be_off() -> None:
    for settings, served, absent in (
        (TransitSettings(mount="kms"), "/v1/kms/keys/k", "/v1/transit/keys/k"),
        (TransitSettings(enabled=False), None, "/v1/transit/keys/k"),
    ):
        app = app_with(settings)
        try:
            services.create_key(app, name="k")
            client = testing.TestClient(create_app(app, insecure_no_auth=True))
            if served is not None:
                answer = client.simulate_get(served)
                assert answer.status_code == 200, answer.text
                assert answer.headers["Content-Type"] == "application/json"
                assert answer.json["data"]["type"] == "aes256-gcm96"
            missing = client.simulate_get(absent)
            assert missing.status_code == 404
            assert "error" in missing.json  # qimem's shape: not the facade's path
        finally:
            app.close()


def test_every_facade_route_has_a_rule_bound_to_a_security_operation(ctx: AppContext) -> None:
    app = create_app(ctx, insecure_no_auth=True)
    served = {
        (method, route.path)
        for route in falcon.inspect.inspect_routes(app)
        if route.path.startswith(("/v1/transit", "/v1/auth/token"))
        for method in (m.method for m in route.methods if m.internal is False)
    }
    rules = transit_rules()
    assert served == set(rules)
    for op in transit_operations():
        rule = rules[(op.method, op.full_path("transit"))]
        if op.binds is not None:
            bound = operation(op.binds)
            assert (rule.permission, rule.audit, rule.pair) == (  # type: ignore[attr-defined]
                bound.permission,
                bound.audit,
                bound.pair,
            )
        else:
            assert rule.permission is None and rule.audit is None  # type: ignore[attr-defined]


def test_unknown_fields_are_warned_and_errors_have_vault_shape(ctx: AppContext) -> None:
    services.create_key(ctx, name="k")
    client = testing.TestClient(create_app(ctx, insecure_no_auth=True))
    answer = client.simulate_post(
        "/v1/transit/encrypt/k", json={"plaintext": "QUJD", "colour": "blue"}
    )
    assert answer.status_code == 200
    assert answer.json["warnings"] == ["Endpoint ignored these unrecognized parameters: [colour]"]
    assert set(answer.json) == {
        "request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info",
        "warnings", "auth",
    }  # fmt: skip
    bad = client.simulate_post("/v1/transit/encrypt/k", json={"plaintext": "%%"})
    assert (bad.status_code, bad.headers["Content-Type"]) == (400, "application/json")
    assert bad.json == {"errors": ["failed to base64-decode plaintext"]}
    gone = client.simulate_post("/v1/transit/encrypt/nope", json={"plaintext": "QUJD"})
    assert gone.status_code == 400 and gone.json["errors"]
    listing = client.simulate_request("LIST", "/v1/transit/keys")
    assert listing.json["data"]["keys"] == ["k"]
