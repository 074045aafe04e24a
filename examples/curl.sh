#!/usr/bin/env bash
# A walk through the qimem HTTP API with curl (and jq to pick fields out of responses).
#
#   qimem init && qimem serve --insecure-no-auth &        # local development, loopback only
#   bash examples/curl.sh
#
# Against a server that requires tokens, set QIMEM_TOKEN to an access token
# (see docs/identity.md) and QIMEM_URL to its address.
set -euo pipefail

URL="${QIMEM_URL:-http://127.0.0.1:8080}"
AUTH=()
if [[ -n "${QIMEM_TOKEN:-}" ]]; then
    AUTH=(-H "Authorization: Bearer ${QIMEM_TOKEN}")
fi
NAME="curl-demo-$$"

post() {  # post PATH JSON  -> prints the response body, fails on HTTP errors
    curl -sS --fail-with-body "${AUTH[@]}" -H 'Content-Type: application/json' \
        -X POST "${URL}$1" -d "$2"
}
get() {
    curl -sS --fail-with-body "${AUTH[@]}" "${URL}$1"
}

echo "== health and readiness"
get /healthz; echo
get /readyz; echo

echo "== create a key"
key=$(post /v1/security/keys "{\"name\": \"${NAME}\"}")
echo "$key" | jq .
key_id=$(echo "$key" | jq -r .key_id)

echo "== encrypt (plaintext is standard base64) with associated data"
plaintext=$(printf 'hello from curl' | base64)
aad=$(printf 'order-42' | base64)
sealed=$(post /v1/security/encrypt "{\"key\": \"${NAME}\", \"plaintext\": \"${plaintext}\", \"aad\": \"${aad}\"}")
echo "$sealed" | jq .
envelope=$(echo "$sealed" | jq -r .envelope)

echo "== decrypt"
post /v1/security/decrypt "{\"envelope\": \"${envelope}\", \"aad\": \"${aad}\"}" | jq -r .plaintext | base64 -d; echo

echo "== a batch: one result or error per item"
post /v1/security/encrypt "{\"items\": [
    {\"key\": \"${NAME}\", \"plaintext\": \"$(printf one | base64)\"},
    {\"key\": \"no-such-key\", \"plaintext\": \"$(printf two | base64)\"}]}" | jq .

echo "== rotate by key_id, then again (409 key_not_active)"
post /v1/security/rotate "{\"key_id\": \"${key_id}\"}" | jq '{key_id, version, state}'
curl -sS "${AUTH[@]}" -H 'Content-Type: application/json' -o /dev/stderr -w 'HTTP %{http_code}\n' \
    -X POST "${URL}/v1/security/rotate" -d "{\"key_id\": \"${key_id}\"}"

echo "== rewrap the old envelope under the new version"
post /v1/security/rewrap "{\"envelope\": \"${envelope}\", \"aad\": \"${aad}\"}" | jq '{key_id, version}'

echo "== a data key for local bulk encryption"
post /v1/security/datakey "{\"key\": \"${NAME}\"}" | jq '{key_id, version, wrapped_key}'

echo "== show the key and its versions; list keys"
get "/v1/security/keys/${NAME}" | jq '{name, active_version, versions: [.versions[] | {version, state}]}'
get /v1/security/keys | jq '.keys | length'

echo "== a tampered envelope is 422, bad input is 400"
tampered=$(echo "$envelope" | base64 -d | head -c -1 | base64 -w0)
curl -sS "${AUTH[@]}" -H 'Content-Type: application/json' -X POST "${URL}/v1/security/decrypt" \
    -d "{\"envelope\": \"${tampered}\", \"aad\": \"${aad}\"}" -w ' HTTP %{http_code}\n'
curl -sS "${AUTH[@]}" -H 'Content-Type: application/json' -X POST "${URL}/v1/security/encrypt" \
    -d '{"key": "x", "plaintext": "not base64!"}' -w ' HTTP %{http_code}\n'

echo "== metrics (Prometheus text format)"
get /metrics | grep '^qimem_crypto_operations_total'
