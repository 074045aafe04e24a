"""Write the envelope v1 known-answer vectors: ``tests/vectors/envelope_v1.json``.

Deterministic: fixed keys, nonces, key ids, versions, plaintexts and associated data, sealed
with :func:`qimem.envelope.seal` through the algorithm plugins of a fresh registry. Running
it twice gives the same file byte for byte. ``tests/test_envelope.py`` rebuilds the vectors
and compares them with the committed file, so a change of the format cannot slip in
silently: if the format changes on purpose, bump the format version instead.

Usage (from the repository root)::

    python tests/make_vectors.py           # (re)write the file
    python tests/make_vectors.py --check   # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from qimem import envelope
from qimem.registry import Registry, make_plugin_manager

OUTPUT = Path(__file__).resolve().parent / "vectors" / "envelope_v1.json"

# name, algorithm, key, key id, key version, nonce, plaintext, caller aad (None = none).
CASES: tuple[tuple[str, str, bytes, str, int, bytes, bytes, bytes | None], ...] = (
    (
        "aes-256-gcm-empty",
        "aes-256-gcm",
        bytes(range(0x00, 0x20)),
        "00112233-4455-6677-8899-aabbccddeeff",
        1,
        bytes.fromhex("000102030405060708090a0b"),
        b"",
        None,
    ),
    (
        "aes-256-gcm-text",
        "aes-256-gcm",
        bytes(range(0x00, 0x20)),
        "00112233-4455-6677-8899-aabbccddeeff",
        1,
        bytes.fromhex("cafebabefacedbaddecaf888"),
        b"attack at dawn",
        None,
    ),
    (
        "aes-256-gcm-text-aad",
        "aes-256-gcm",
        bytes(range(0x20, 0x40)),
        "6f9619ff-8b86-d011-b42d-00c04fc964ff",
        7,
        bytes.fromhex("f0e1d2c3b4a5968778695a4b"),
        b"The quick brown fox jumps over the lazy dog.",
        b'{"tenant":"acme","purpose":"invoice"}',
    ),
    (
        "aes-256-gcm-binary-maxversion-aad",
        "aes-256-gcm",
        bytes.fromhex("ff" * 32),
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
        0xFFFFFFFF,
        bytes.fromhex("ffffffffffffffffffffffff"),
        bytes(range(256)),
        b"\x00",
    ),
    (
        "chacha20-poly1305-empty",
        "chacha20-poly1305",
        bytes(range(0x80, 0xA0)),
        "00112233-4455-6677-8899-aabbccddeeff",
        1,
        bytes.fromhex("070000004041424344454647"),
        b"",
        None,
    ),
    (
        "chacha20-poly1305-text",
        "chacha20-poly1305",
        bytes(range(0x80, 0xA0)),
        "00112233-4455-6677-8899-aabbccddeeff",
        2,
        bytes.fromhex("000000000000000000000001"),
        b"attack at dawn",
        None,
    ),
    (
        "chacha20-poly1305-text-aad",
        "chacha20-poly1305",
        bytes(range(0xA0, 0xC0)),
        "6f9619ff-8b86-d011-b42d-00c04fc964ff",
        7,
        bytes.fromhex("f0e1d2c3b4a5968778695a4b"),
        b"The quick brown fox jumps over the lazy dog.",
        b'{"tenant":"acme","purpose":"invoice"}',
    ),
    (
        "chacha20-poly1305-binary-maxversion-aad",
        "chacha20-poly1305",
        bytes.fromhex("ff" * 32),
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
        0xFFFFFFFF,
        bytes.fromhex("ffffffffffffffffffffffff"),
        bytes(range(256)),
        b"\x00",
    ),
)


def build_vectors() -> dict[str, Any]:
    """The vectors document, as written to ``envelope_v1.json``."""
    registry = Registry(make_plugin_manager())
    vectors = []
    for name, algorithm_name, key, key_id, version, nonce, plaintext, aad in CASES:
        algorithm = registry.algorithm(algorithm_name)
        sealed = envelope.seal(algorithm, key, key_id, version, nonce, plaintext, aad)
        parsed = envelope.parse(sealed)
        vectors.append(
            {
                "name": name,
                "algorithm": algorithm_name,
                "algorithm_id": algorithm.algorithm_id,
                "key": key.hex(),
                "key_id": key_id,
                "key_id_hex": uuid.UUID(key_id).bytes.hex(),
                "key_version": version,
                "nonce": nonce.hex(),
                "plaintext": plaintext.hex(),
                "aad": None if aad is None else aad.hex(),
                "header": parsed.header.hex(),
                "associated_data": envelope.associated_data(parsed.header, aad).hex(),
                "ciphertext": parsed.ciphertext.hex(),
                "envelope": sealed.hex(),
            }
        )
    return {
        "format": "qimem envelope v1",
        "generator": "tests/make_vectors.py",
        "notes": (
            "All byte strings are lowercase hex. 'aad' is the caller's associated data "
            "(null: none). 'associated_data' is what the AEAD authenticates: header || aad. "
            "'ciphertext' is ciphertext || 16-byte tag. See docs/formats.md."
        ),
        "vectors": vectors,
    }


def render(document: dict[str, Any]) -> str:
    """The exact file text: two-space indented JSON with a final newline."""
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render(build_vectors())
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is out of date: run python tests/make_vectors.py", file=sys.stderr
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {len(CASES)} vectors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
