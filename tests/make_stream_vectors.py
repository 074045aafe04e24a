"""Write the stream v1 known-answer vectors: ``tests/vectors/stream_v1.json``.

Deterministic: fixed store keys, key ids, data keys, wrap nonces, nonce prefixes, segment
sizes, plaintexts and associated data, through :class:`qimem.stream.RawKeyring` (which
wraps data keys exactly like the key store does). Each vector also lists the intermediate
values (header key tag input, segment key, every segment nonce) so another implementation
can be checked step by step. ``tests/test_stream.py`` rebuilds the vectors and compares
them with the committed file.

Usage (from the repository root)::

    python tests/make_stream_vectors.py           # (re)write the file
    python tests/make_stream_vectors.py --check   # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from qimem import stream
from qimem.registry import Registry, make_plugin_manager

OUTPUT = Path(__file__).resolve().parent / "vectors" / "stream_v1.json"

STORE_KEY = bytes(range(0x40, 0x60))
KEY_ID = "00112233-4455-6677-8899-aabbccddeeff"
DATA_KEY = bytes(range(0xA0, 0xC0))
WRAP_NONCE = bytes.fromhex("101112131415161718191a1b")
PREFIX = bytes.fromhex("f0f1f2f3f4f5f6")


def _pattern(size: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


# name, algorithm, key version, segment size, plaintext, caller aad
CASES: tuple[tuple[str, str, int, int, bytes, bytes | None], ...] = (
    ("aes-256-gcm-empty", "aes-256-gcm", 1, 64, b"", None),
    ("aes-256-gcm-one-byte", "aes-256-gcm", 1, 64, b"\x2a", None),
    ("aes-256-gcm-exact-two-segments", "aes-256-gcm", 1, 64, _pattern(128), None),
    ("aes-256-gcm-three-and-a-half", "aes-256-gcm", 3, 64, _pattern(224), None),
    ("aes-256-gcm-aad", "aes-256-gcm", 1, 64, b"attack at dawn", b"tenant=acme"),
    ("chacha20-poly1305-two-segments", "chacha20-poly1305", 2, 16, _pattern(20), None),
    ("aes-256-gcm-default-segment", "aes-256-gcm", 1, stream.DEFAULT_SEGMENT_SIZE, b"x", None),
)


def build() -> dict[str, Any]:
    registry = Registry(make_plugin_manager())
    vectors = []
    for name, algorithm_name, version, segment_size, plaintext, aad in CASES:
        algorithm = registry.algorithm(algorithm_name)
        keyring = stream.RawKeyring(
            algorithm, STORE_KEY, KEY_ID, version, data_key=DATA_KEY, wrap_nonce=WRAP_NONCE
        )
        out = io.BytesIO()
        stream.encrypt_stream(
            io.BytesIO(plaintext),
            out,
            keyring,
            aad=aad,
            segment_size=segment_size,
            nonce_prefix=PREFIX[: algorithm.nonce_size - stream.NONCE_SUFFIX],
        )
        sealed = out.getvalue()
        header = stream.parse_header(sealed)
        count = stream.segment_count(len(plaintext), segment_size)
        vectors.append(
            {
                "name": name,
                "algorithm": algorithm_name,
                "algorithm_id": algorithm.algorithm_id,
                "store_key": STORE_KEY.hex(),
                "key_id": KEY_ID,
                "key_version": version,
                "wrap_nonce": WRAP_NONCE.hex(),
                "data_key": DATA_KEY.hex(),
                "nonce_prefix": header.nonce_prefix.hex(),
                "segment_size": segment_size,
                "aad": aad.hex() if aad is not None else None,
                "plaintext": plaintext.hex(),
                "header_core": header.core.hex(),
                "wrapped_key": header.wrapped_key.hex(),
                "header_tag": header.tag.hex(),
                "segment_key": stream.segment_key(
                    DATA_KEY, header.core, aad, algorithm.key_size
                ).hex(),
                "nonces": [
                    stream.nonce(header.nonce_prefix, i, i == count - 1).hex() for i in range(count)
                ],
                "stream": sealed.hex(),
            }
        )
    return {
        "format": "qimem stream v1",
        "description": (
            "Known-answer vectors for docs/formats.md 'Stream v1'. The wrapped key is an "
            "envelope v1 of data_key under store_key (key_id, key_version, wrap_nonce, no "
            "aad). Regenerate with tests/make_stream_vectors.py."
        ),
        "vectors": vectors,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text("utf-8") != text:
            print(f"{OUTPUT} is out of date", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, "utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
