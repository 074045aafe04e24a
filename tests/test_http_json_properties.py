"""Property tests: arbitrary JSON bodies for every body-taking endpoint, with authentication.

Through the real Falcon app of ``fuzz/fuzz_http_json.py`` (authentication on, an admin and
a user whose grants are scoped to ``fuzz-*`` keys, so the authorization middleware parses
each body too): any JSON value, or an object built from the endpoints' own field names with
values of any type, gets a status below 500 and, for an error, exactly the JSON error body.
Plus manifests of arbitrary structure through the manifest target's contract, and the
regressions found while writing the fuzz targets (fuzz/).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

import fuzz_http_json as http  # noqa: E402
import fuzz_manifest  # noqa: E402
from _fuzzlib import KEYS  # noqa: E402

from qimem import manifest  # noqa: E402
from qimem.errors import ValidationError  # noqa: E402
from qimem.server import auth_api, crypto, keys, lifecycle, media, signing  # noqa: E402

SPECS = [
    crypto.ENCRYPT_SPEC,
    crypto.DECRYPT_SPEC,
    crypto.DATAKEY_SPEC,
    crypto.REWRAP_SPEC,
    signing.SIGN_SPEC,
    signing.VERIFY_SPEC,
    signing.MAC_SPEC,
    signing.VERIFY_MAC_SPEC,
    signing.RANDOM_SPEC,
    signing.HASH_SPEC,
    keys.CREATE_SPEC,
    keys.ROTATE_SPEC,
    lifecycle.POLICY_SPEC,
    lifecycle.VERSION_SPEC,
    lifecycle.SCHEDULE_SPEC,
    lifecycle.IMPORT_SPEC,
    auth_api.REALM_SPEC,
    auth_api.USER_SPEC,
    auth_api.USER_PATCH_SPEC,
    auth_api.GRANT_SPEC,
    auth_api.ROLE_SPEC,
    auth_api.CLIENT_SPEC,
]
FIELD_NAMES = sorted(
    {name for spec in SPECS for name in spec.fields}
    | set(manifest.FIELDS)
    | {"items", "grant_type", "refresh_token", "client_secret", "token", "x"}
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)
likely_values = st.one_of(
    json_values,
    st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(
        ["fuzz-aes", "fuzz-gone", "fuzz-new", "admin", "encryptor", "password", "fuzz-*"]
        + ["fuzz-sign", "fuzz-mac", "asn1", "jws", "sha3-256"]
        + [k.key_id for k in KEYS]
    ),
    st.integers(min_value=-3, max_value=5),
)
shaped = st.dictionaries(st.sampled_from(FIELD_NAMES), likely_values, max_size=5)
bodies = st.one_of(
    json_values, shaped, st.builds(lambda items: {"items": items}, st.lists(shaped, max_size=3))
)


@pytest.fixture(autouse=True, scope="module")
def fresh_harness() -> Any:
    http.reset()
    yield
    http.reset()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.integers(0, len(http.ENDPOINTS) - 1), scoped=st.booleans(), body=bodies)
def test_any_json_body_gets_a_4xx_json_error_or_success(
    endpoint: int, scoped: bool, body: object
) -> None:
    selector = endpoint | (http.SCOPED if scoped else 0)
    http.test_one_input(bytes([selector]) + json.dumps(body).encode())


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.integers(0, len(http.ENDPOINTS) - 1), raw=st.binary(max_size=120))
def test_any_bytes_any_content_type_get_no_500(endpoint: int, raw: bytes) -> None:
    http.test_one_input(bytes([endpoint | http.FORM]) + raw)
    http.test_one_input(bytes([endpoint | http.SCOPED]) + raw)


def test_export_with_arbitrary_bodies() -> None:
    """Export is not in the fuzz loop (each success costs Argon2id at 64 MiB): its bodies,
    checked here once each."""
    http.request(b"\x00")  # make sure the harness is up
    client = http._harness.client  # type: ignore[union-attr]
    headers = {"Authorization": f"Bearer {http._harness.tokens[False]}"}  # type: ignore[union-attr]
    path = "/v1/security/keys/fuzz-chacha/export"
    for body in ({}, [], {"passphrase": 5}, {"passphrase": "short"}, {"x": 1}, "passphrase"):
        result = client.simulate_post(path, json=body, headers=headers)
        assert result.status_code == 400, result.text
        http.check_response(result)
    result = client.simulate_post(path, json={"passphrase": "long enough"}, headers=headers)
    assert result.status_code == 200 and http.check_response(result)["backup"]


# ---- regressions (found writing fuzz/; their inputs are in fuzz/corpus too) ---------------


def _scoped(path: str, body: bytes) -> Any:
    return http.request(bytes([http.ENDPOINTS.index(("POST", path)) | http.SCOPED]) + body)


@pytest.mark.parametrize("name", [b"5", b"[1]", b'{"a": 1}', b"true", b"1.5"])
def test_scoped_grant_with_a_key_name_that_is_not_a_string_is_403(name: bytes) -> None:
    """The middleware matched ``{"name": 5}`` against the grant's patterns with fnmatch, which
    raised TypeError: a 500. A name that is not a string proves no permission."""
    result = _scoped("/v1/security/keys", b'{"name": ' + name + b"}")
    assert result.status_code == 403, result.text
    assert http.check_response(result)["error"]["code"] == "forbidden"
    allowed = _scoped("/v1/security/keys", b'{"name": "fuzz-allowed"}')
    assert allowed.status_code in (201, 409), allowed.text  # the control: a string is matched


def test_scoped_grant_with_a_deeply_nested_body_is_403() -> None:
    """The middleware's own ``json.loads`` let RecursionError out: a 500."""
    result = _scoped("/v1/security/encrypt", b"[" * 3000)
    assert result.status_code == 403, result.text
    http.check_response(result)


def test_import_of_a_deeply_nested_backup_is_400() -> None:
    body = {"backup": base64.b64encode(b"[" * 3000).decode(), "passphrase": "passphrase"}
    index = http.ENDPOINTS.index(("POST", "/v1/security/import"))
    result = http.request(bytes([index]) + json.dumps(body).encode())
    assert result.status_code == 400, result.text
    assert http.check_response(result)["error"]["code"] == "invalid_backup"


# ---- manifests ---------------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)
manifest_values = st.one_of(
    names,
    st.sampled_from([">=1,<2", ">=2", "~=1.0", "==1", "!=1.0", "1", "", "1.0.0", "x"]),
    st.sampled_from(manifest.EVENT_HOOKS),
    json_values,
)
provides = st.dictionaries(
    st.sampled_from([*manifest.PROVIDES_KINDS, "other"]),
    st.lists(st.one_of(names, st.sampled_from(manifest.EVENT_HOOKS), json_values), max_size=3),
    max_size=4,
)
valid_manifests = st.fixed_dictionaries(
    {
        "name": names,
        "version": st.sampled_from(["1", "1.0.0", "2.1rc1"]),
        "description": st.text(min_size=1, max_size=20),
        "qimem_api": st.sampled_from([">=1,<2", ">=2", "~=1.0", "==1", "!=1.0"]),
        "provides": provides,
    }
)
manifests = st.one_of(
    st.dictionaries(
        st.sampled_from([*manifest.FIELDS, "qimem-api"]),
        st.one_of(manifest_values, provides),
        max_size=7,
    ),
    st.builds(
        lambda base, changes: {**base, **changes},
        valid_manifests,
        st.dictionaries(st.sampled_from(manifest.FIELDS), manifest_values, max_size=2),
    ),
)


@settings(max_examples=200, deadline=None)
@given(doc=manifests)
def test_any_manifest_structure_is_valid_or_a_manifest_error(doc: dict[str, Any]) -> None:
    fuzz_manifest.test_one_input(json.dumps(doc).encode())
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):  # TOML has no null, and no top-level non-table
        return
    fuzz_manifest.test_one_input(text.encode())


def test_manifest_strategy_reaches_valid_and_compatible_manifests() -> None:
    """The control: the strategy above does produce manifests that pass validation, so the
    round-trip checks of the target run, not only the error path."""
    from hypothesis import find

    found = find(
        manifests, lambda doc: not manifest.problems(doc) and manifest.validate(doc).compatible
    )
    assert manifest.validate(found).compatible


# ---- base64 fields: exactly RFC 4648 §4, padded, nothing else --------------------------

#: The grammar the decoder must accept, and nothing more (the reference the fast decoder in
#: qimem.server.media.base64_bytes is checked against).
_RFC4648 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_B64_NEAR = st.text(alphabet="AQgw+/=aZ09\n \r-_.é\x00", max_size=14)


def _agrees_with_the_rfc(text: str) -> None:
    valid = _RFC4648.fullmatch(text) is not None
    try:
        decoded = media.base64_bytes("data", text)
    except ValidationError as exc:
        assert not valid, text
        assert exc.code == "invalid_base64"
    else:
        assert valid, text
        assert decoded == base64.b64decode(text)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(_B64_NEAR, st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode())))
@example("QUJD====")
def test_base64_fields_accept_the_rfc_grammar_and_nothing_else(text: str) -> None:
    _agrees_with_the_rfc(text)


def test_base64_fields_agree_with_the_rfc_on_every_short_string() -> None:
    """Exhaustive where random search is thin: every string of up to 8 characters over a
    letter, a symbol, the pad and a newline (87,381 strings; "AAAA====" is one)."""
    for size in range(9):
        for chars in itertools.product("A/=\n", repeat=size):
            _agrees_with_the_rfc("".join(chars))


@pytest.mark.parametrize(
    "text", ["QQ==QQ==", "QUJD=", "QUJD====", "QUJDRA==\n", "=QUJ", "QUJ\u0663", "YQ"]
)
def test_base64_fields_refuse_what_a_lenient_decoder_takes(text: str) -> None:
    with pytest.raises(ValidationError):
        media.base64_bytes("data", text)
