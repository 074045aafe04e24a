"""Write the seed files of ``fuzz/corpus/<target>/`` (deterministic; rerun to refresh).

Seeds are valid inputs of every shape (envelopes and streams under each key of the fuzz
store, manifests, a valid body per endpoint) and a few near misses (truncated, bad magic,
wrong type). Regression inputs found by fuzzing are named ``crash-*`` or ``regress-*`` and
are kept: this script only (re)writes files named ``seed-*``.

Usage (from the repository root)::

    python fuzz/make_corpus.py
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _fuzzlib import BY_KEY_ID, KEYS, REALM, FuzzKey, open_app  # noqa: E402

from qimem import envelope as env  # noqa: E402
from qimem import stream  # noqa: E402
from qimem.registry import Registry, make_plugin_manager  # noqa: E402

REGISTRY = Registry(make_plugin_manager())
UNKNOWN_KEY_ID = "00000000-0000-4000-8000-00000000dead"


def _pattern(size: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


def _material(key: FuzzKey) -> bytes:
    return key.material if key.material is not None else bytes(32)


def _seal(key: FuzzKey, plaintext: bytes, nonce_byte: int = 1) -> bytes:
    algorithm = REGISTRY.algorithm(key.algorithm)
    nonce = bytes([nonce_byte]) * algorithm.nonce_size
    return env.seal(algorithm, _material(key), key.key_id, key.version, nonce, plaintext)


def envelope_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for key in KEYS:
        label = f"{key.name}-v{key.version}"
        seeds[f"{label}-empty"] = _seal(key, b"")
        seeds[f"{label}-text"] = _seal(key, b"attack at dawn", 2)
    seeds["fuzz-aes-v2-100-bytes"] = _seal(BY_KEY_ID[KEYS[1].key_id], _pattern(100), 3)
    good = seeds["fuzz-aes-v2-text"]
    unknown = FuzzKey("unknown", UNKNOWN_KEY_ID, UNKNOWN_KEY_ID, 1, "aes-256-gcm", KEYS[1].state)
    seeds["unknown-key"] = _seal(unknown, b"x")
    seeds["bad-magic"] = b"QMEX" + good[4:]
    seeds["version-2"] = good[:4] + b"\x02" + good[5:]
    seeds["algorithm-99"] = good[:5] + b"\x63" + good[6:]
    seeds["key-version-0"] = good[:22] + b"\x00\x00\x00\x00" + good[26:]
    seeds["nonce-size-0"] = good[:26] + b"\x00" + good[27:]
    seeds["nonce-size-8"] = good[:26] + b"\x08" + good[27:]
    seeds["truncated-header"] = good[:30]
    seeds["truncated-body"] = good[:-1]
    seeds["trailing-byte"] = good + b"\x00"
    seeds["flipped-tag"] = good[:-1] + bytes([good[-1] ^ 1])
    seeds["empty"] = b""
    seeds["magic-only"] = b"QMEV"
    return seeds


def _stream(key: FuzzKey, plaintext: bytes, segment_size: int) -> bytes:
    algorithm = REGISTRY.algorithm(key.algorithm)
    keyring = stream.RawKeyring(
        algorithm,
        _material(key),
        key.key_id,
        key.version,
        data_key=bytes(range(0xA0, 0xC0)),
        wrap_nonce=bytes([5]) * algorithm.nonce_size,
    )
    out = io.BytesIO()
    stream.encrypt_stream(
        io.BytesIO(plaintext),
        out,
        keyring,
        segment_size=segment_size,
        nonce_prefix=bytes([7]) * (algorithm.nonce_size - stream.NONCE_SUFFIX),
    )
    return out.getvalue()


def stream_seeds() -> dict[str, bytes]:
    aes_v1, aes_v2, chacha, destroyed, disabled, _, derived = KEYS
    seeds = {
        "aes-v2-empty": _stream(aes_v2, b"", 16),
        "aes-v2-one-byte": _stream(aes_v2, b"*", 16),
        "aes-v2-one-full-segment": _stream(aes_v2, _pattern(16), 16),
        "aes-v2-two-and-a-half": _stream(aes_v2, _pattern(40), 16),
        "aes-v2-three-exact": _stream(aes_v2, _pattern(48), 16),
        "aes-v1-rotated": _stream(aes_v1, _pattern(33), 32),
        "chacha-v1-four": _stream(chacha, _pattern(64), 16),
        "chacha-v1-seg64": _stream(chacha, _pattern(100), 64),
        "disabled-version": _stream(disabled, b"x", 16),
        "destroyed-version": _stream(destroyed, b"x", 16),
        "derived-key": _stream(derived, b"x", 16),
    }
    good = seeds["aes-v2-two-and-a-half"]
    header = stream.parse_header(good)
    body = good[header.size :]
    full = 16 + 16
    seeds["truncated-in-header"] = good[: header.size - 1]
    seeds["truncated-at-segment"] = good[: header.size + full]
    seeds["truncated-in-segment"] = good[:-3]
    seeds["appended-byte"] = good + b"\x00"
    seeds["segments-swapped"] = (
        good[: header.size] + body[full : 2 * full] + body[:full] + body[2 * full :]
    )
    seeds["segment-duplicated"] = good[: header.size] + body[:full] + body
    seeds["header-only"] = good[: header.size]
    seeds["bad-magic"] = b"QMSX" + good[4:]
    seeds["version-2"] = good[:4] + b"\x02" + good[5:]
    seeds["segment-size-0"] = good[:6] + b"\x00\x00\x00\x00" + good[10:]
    seeds["segment-size-17"] = good[:6] + b"\x00\x00\x00\x11" + good[10:]
    seeds["flipped-header-tag"] = (
        good[: header.size - 1] + bytes([good[header.size - 1] ^ 1]) + body
    )
    seeds["envelope-not-stream"] = _seal(aes_v2, b"x")
    seeds["magic-only"] = b"QMST"
    return seeds


MANIFEST = {
    "name": "aes-gcm-siv",
    "version": "1.0.0",
    "description": "AES-256-GCM-SIV and a JSON-lines audit sink",
    "qimem_api": ">=1,<2",
    "homepage": "https://example.org/qimem-plugin-aes-gcm-siv",
    "provides": {
        "algorithms": ["aes-256-gcm-siv"],
        "keystores": [],
        "auth_providers": [],
        "event_hooks": ["qimem_key_event"],
    },
}
MANIFEST_TOML = """\
name = "aes-gcm-siv"
version = "1.0.0"
description = "AES-256-GCM-SIV and a JSON-lines audit sink"
qimem_api = ">=1,<2"
homepage = "https://example.org/qimem-plugin-aes-gcm-siv"

[provides]
algorithms = ["aes-256-gcm-siv"]
event_hooks = ["qimem_key_event"]
"""


def manifest_seeds() -> dict[str, bytes]:
    def js(**changes: object) -> bytes:
        data = {**MANIFEST, **changes}
        return json.dumps({k: v for k, v in data.items() if v is not None}).encode()

    return {
        "valid.toml": MANIFEST_TOML.encode(),
        "valid.json": js(),
        "minimal.toml": b'name="x"\nversion="1"\ndescription="d"\nqimem_api=">=1"\n[provides]\n',
        "incompatible.json": js(qimem_api=">=2,<3"),
        "compatible-release.json": js(qimem_api="~=1.0"),
        "unknown-field.toml": MANIFEST_TOML.replace("qimem_api", "qimem-api").encode(),
        "bad-name.json": js(name="Bad Name"),
        "bad-range.json": js(qimem_api=">=one"),
        "bad-hook.json": js(provides={"event_hooks": ["qimem_nope"]}),
        "duplicate-name.json": js(provides={"algorithms": ["a", "a"]}),
        "provides-not-table.json": js(provides=["algorithms"]),
        "not-object.json": b"[1, 2, 3]",
        "not-toml.toml": b"name = \n",
        "control-char.json": js(description="line\u0001break"),
        "no-homepage.json": js(homepage=None),
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def http_seeds() -> dict[str, bytes]:
    from fuzz_http_json import ENDPOINTS, FORM, SCOPED

    index = {path: i for i, (method, path) in enumerate(ENDPOINTS) if method != "DELETE"}
    sealed = envelope_seeds()["fuzz-aes-v2-text"]
    backup = json.dumps(
        {
            "format": "qimem-key-backup",
            "version": 1,
            "cipher": "aes-256-gcm",
            "kdf": {
                "name": "argon2id",
                "salt": _b64(bytes(16)),
                "time_cost": 1,
                "memory_kib": 8192,
                "parallelism": 1,
            },
            "nonce": _b64(bytes(12)),
            "ciphertext": _b64(bytes(32)),
        }
    ).encode()
    bodies: list[tuple[str, object]] = [
        ("/v1/security/keys", {"name": "fuzz-new", "algorithm": "chacha20-poly1305"}),
        ("/v1/security/keys", {"name": "fuzz-derived-new", "derived": True}),
        ("/v1/security/encrypt", {"key": "fuzz-aes", "plaintext": "aGVsbG8=", "aad": "YQ=="}),
        ("/v1/security/encrypt", {"items": [{"key": "fuzz-chacha", "plaintext": ""}]}),
        ("/v1/security/encrypt", {"key": "fuzz-derived", "plaintext": "", "context": "Yw=="}),
        ("/v1/security/decrypt", {"envelope": _b64(sealed)}),
        ("/v1/security/decrypt", {"items": [{"envelope": _b64(sealed)}, {"envelope": "AA=="}]}),
        ("/v1/security/rotate", {"key": "fuzz-chacha"}),
        ("/v1/security/rotate", {"key_id": KEYS[0].key_id}),
        ("/v1/security/rewrap", {"envelope": _b64(sealed)}),
        ("/v1/security/datakey", {"key_id": KEYS[1].key_id}),
        ("/v1/security/keys/fuzz-gone/policy", {"min_decryption_version": 2, "usage_limit": None}),
        ("/v1/security/keys/fuzz-gone/disable", {"version": 2}),
        ("/v1/security/keys/fuzz-gone/enable", {"version": 2}),
        ("/v1/security/keys/fuzz-gone/destroy", {"version": 2}),
        ("/v1/security/keys/fuzz-gone/schedule-deletion", {"days": 30}),
        ("/v1/security/keys/fuzz-gone/cancel-deletion", {}),
        ("/v1/security/import", {"backup": _b64(backup), "passphrase": "passphrase"}),
        ("/v1/plugins", MANIFEST),
        ("/v1/auth/realms", {"name": "acme"}),
        (
            f"/v1/auth/realms/{REALM}/users",
            {"username": "bob", "password": "tundra-copper-lantern-52", "roles": []},
        ),
        (
            f"/v1/auth/realms/{REALM}/users/fuzzer",
            {"enabled": False, "password": "orchid-quartz-83"},
        ),
        (f"/v1/auth/realms/{REALM}/users/fuzzer/roles", {"role": "encryptor", "scope": "a-*"}),
        (
            f"/v1/auth/realms/{REALM}/roles",
            {"name": "r1", "permissions": ["keys:read"], "description": "d"},
        ),
        (f"/v1/auth/realms/{REALM}/clients", {"client_id": "svc", "roles": ["encryptor"]}),
        (
            f"/v1/auth/realms/{REALM}/token",
            {"grant_type": "password", "username": "scoped", "password": "glacier-pivot-64"},
        ),
        (f"/v1/auth/realms/{REALM}/revoke", {"token": "abc"}),
        (f"/v1/auth/realms/{REALM}/introspect", {"token": "abc"}),
        ("/keys", {"name": "fuzz-short"}),
        ("/encrypt", {"key": "fuzz-aes", "plaintext": "AA=="}),
        ("/decrypt", {"envelope": _b64(sealed)}),
        ("/rotate", {"key": "fuzz-aes"}),
    ]
    seeds: dict[str, bytes] = {}
    for n, (path, body) in enumerate(bodies):
        raw = json.dumps(body).encode()
        slug = path.rsplit("/", 1)[-1]
        seeds[f"{n:02d}-{slug}"] = bytes([index[path]]) + raw
        seeds[f"{n:02d}-{slug}-scoped"] = bytes([index[path] | SCOPED]) + raw
    revoke_role = ENDPOINTS.index(("DELETE", f"/v1/auth/realms/{REALM}/users/fuzzer/roles"))
    seeds["revoke-role"] = bytes([revoke_role]) + b'{"role": "encryptor", "scope": "a-*"}'
    token = index[f"/v1/auth/realms/{REALM}/token"]
    seeds["token-form"] = bytes([token | FORM]) + b"grant_type=password&username=a&password=b"
    seeds["token-form-repeated"] = bytes([token | FORM]) + b"a=1&a=2"
    seeds["encrypt-not-object"] = bytes([index["/v1/security/encrypt"]]) + b"[1]"
    seeds["encrypt-bad-json"] = bytes([index["/v1/security/encrypt"]]) + b'{"key": '
    seeds["keys-empty-body"] = bytes([index["/v1/security/keys"]])
    seeds["keys-deep-nesting"] = bytes([index["/v1/security/keys"]]) + b"[" * 5000
    return seeds


def write(target: str, seeds: dict[str, bytes]) -> None:
    folder = HERE / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    for name, data in seeds.items():
        (folder / f"seed-{name}").write_bytes(data)


def main() -> None:
    open_app().close()  # the store accepts the fixed lineages
    write("envelope", envelope_seeds())
    write("stream", stream_seeds())
    write("manifest", manifest_seeds())
    write("http_json", http_seeds())
    for target in ("envelope", "stream", "manifest", "http_json"):
        files = list((HERE / "corpus" / target).iterdir())
        print(f"{target}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
