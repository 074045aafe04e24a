"""Deterministic keys (aes-256-siv) over /v1/security/encrypt and /decrypt: the same
plaintext and aad give the same envelope (equality leaks by design), batches included;
signing and MAC keys are refused with wrong_purpose."""

from __future__ import annotations

import base64

from falcon import testing

from qimem.app import AppContext
from qimem.server.app import create_app

S = "/v1/security"


def test_deterministic_envelopes_over_http(memory_app: AppContext) -> None:
    client = testing.TestClient(create_app(memory_app, insecure_no_auth=True))
    created = client.simulate_post(S + "/keys", json={"name": "ssn", "algorithm": "aes-256-siv"})
    assert created.status_code == 201, created.text
    shown = client.simulate_get(S + "/keys/ssn").json
    assert shown["purpose"] == "deterministic"
    body = {"key": "ssn", "plaintext": base64.b64encode(b"123-45-6789").decode(), "aad": "dA=="}
    first = client.simulate_post(S + "/encrypt", json=body).json
    again = client.simulate_post(S + "/encrypt", json={"items": [body, body]}).json["items"]
    assert first["envelope"] == again[0]["envelope"] == again[1]["envelope"]
    other = client.simulate_post(S + "/encrypt", json={**body, "aad": "dQ=="}).json
    assert other["envelope"] != first["envelope"]
    opened = client.simulate_post(
        S + "/decrypt", json={"envelope": first["envelope"], "aad": "dA=="}
    )
    assert base64.b64decode(opened.json["plaintext"]) == b"123-45-6789"
    assert (
        client.simulate_post(S + "/decrypt", json={"envelope": first["envelope"]}).status_code
        == 422
    )
    client.simulate_post(S + "/keys", json={"name": "sig", "algorithm": "ed25519"})
    refused = client.simulate_post(S + "/encrypt", json={**body, "key": "sig"})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "wrong_purpose"
    # a data key from a deterministic key would be a deterministic wrap of random bytes: refused
    assert client.simulate_post(S + "/datakey", json={"key": "ssn"}).status_code == 400
