"""Project Wycheproof vectors for the signing, MAC and deterministic algorithm plugins.

The files in ``tests/vectors/wycheproof/`` are byte-for-byte copies of C2SP/wycheproof
``testvectors_v1`` (the same commit as ``../shared/vectors/wycheproof/``, Apache-2.0). Every
case runs through the plugin's own interface, taken from a fresh registry exactly as the
service layer gets it (``registry.algorithm(name, purpose)``), never through cryptography.

Outcome rules, per case:

* ``valid``: must verify (MAC: ``mac`` gives the tag too; AES-SIV: ``encrypt`` gives ``ct``
  and ``decrypt`` gives ``msg``);
* ``invalid``: must be rejected: ``verify`` returns False, ``decrypt`` raises
  :class:`DecryptionError`, or the group's public key is refused with
  :class:`ValidationError` when it is loaded (malformed or wrong-size keys);
* ``acceptable``: either outcome is allowed (nothing else, no other exception); the count
  accepted is printed. The two such cases (RSA PKCS#1 files) are legacy encodings that a
  strict verifier may refuse; ours, cryptography's, refuses or accepts as it does.

Cases are not applicable, and counted as such, when the plugin has fixed parameters the
group does not match: HMAC groups whose key size is not the plugin's (qimem's HMAC keys are
exactly the hash size: 128- and 520-bit keys are skipped), AES-SIV groups with 256/384-bit
keys (``aes-256-siv`` takes 512-bit keys), RSA-PSS groups with another hash, MGF hash or salt
length (none in the pinned files), and ML-DSA cases with a non-empty context string (the
plugin signs with the empty context). The applicable counts are pinned: a change means the
files or the filters changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qimem.errors import DecryptionError, ValidationError
from qimem.registry import Registry, make_plugin_manager

WYCHEPROOF = Path(__file__).resolve().parent / "vectors" / "wycheproof"


@dataclass
class Tally:
    """What happened to one file's cases."""

    applicable: int = 0
    passed: int = 0
    not_applicable: int = 0
    acceptable_accepted: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, case: dict[str, Any], accepted: bool) -> None:
        self.applicable += 1
        result = case["result"]
        if result == "acceptable":
            self.passed += 1
            self.acceptable_accepted += accepted
        elif accepted == (result == "valid"):
            self.passed += 1
        else:
            outcome = "accepted" if accepted else "rejected"
            self.failures.append(f"tcId {case['tcId']} ({result}, {case['flags']}): {outcome}")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(make_plugin_manager())


def _load(filename: str) -> dict[str, Any]:
    return json.loads((WYCHEPROOF / filename).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _signature_file(
    registry: Registry,
    name: str,
    filename: str,
    marshaling: str = "asn1",
    group_applies: Callable[[dict[str, Any]], bool] = lambda group: True,
    case_applies: Callable[[dict[str, Any]], bool] = lambda case: True,
) -> Tally:
    algorithm = registry.algorithm(name, "sign")
    tally = Tally()
    for group in _load(filename)["testGroups"]:
        if not group_applies(group):
            tally.not_applicable += len(group["tests"])
            continue
        try:
            verifier = algorithm.verifier(bytes.fromhex(group["publicKeyDer"]))
        except ValidationError:
            verifier = None  # a malformed or wrong-size key: every case is rejected
        for case in group["tests"]:
            if not case_applies(case):
                tally.not_applicable += 1
                continue
            msg, sig = bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"])
            accepted = verifier is not None and verifier.verify(msg, sig, marshaling=marshaling)
            if verifier is not None:  # the one-shot interface agrees with the prepared one
                public = bytes.fromhex(group["publicKeyDer"])
                assert algorithm.verify(public, msg, sig, marshaling=marshaling) is accepted
            tally.record(case, accepted)
    return tally


def _pss_params(sha: str, salt: int) -> Callable[[dict[str, Any]], bool]:
    def applies(group: dict[str, Any]) -> bool:
        return (
            group["sha"] == sha
            and group["mgf"] == "MGF1"
            and group["mgfSha"] == sha
            and group["sLen"] == salt
        )

    return applies


def _mac_file(registry: Registry, name: str, filename: str) -> Tally:
    algorithm = registry.algorithm(name, "mac")
    tally = Tally()
    for group in _load(filename)["testGroups"]:
        if group["keySize"] != algorithm.key_size * 8:
            tally.not_applicable += len(group["tests"])
            continue
        tag_bytes = group["tagSize"] // 8
        truncated = None if tag_bytes == algorithm.tag_size else tag_bytes
        for case in group["tests"]:
            key, msg, tag = (bytes.fromhex(case[k]) for k in ("key", "msg", "tag"))
            accepted = algorithm.verify(key, msg, tag, tag_size=truncated)
            if case["result"] == "valid":
                assert algorithm.mac(key, msg)[:tag_bytes] == tag, case["tcId"]
            tally.record(case, accepted)
    return tally


def _siv_file(registry: Registry, name: str, filename: str) -> Tally:
    algorithm = registry.algorithm(name, "deterministic")
    tally = Tally()
    for group in _load(filename)["testGroups"]:
        if group["keySize"] != algorithm.key_size * 8:
            tally.not_applicable += len(group["tests"])
            continue
        for case in group["tests"]:
            key, aad, msg, ct = (bytes.fromhex(case[k]) for k in ("key", "aad", "msg", "ct"))
            if case["result"] == "valid":
                assert algorithm.encrypt(key, msg, aad) == ct, case["tcId"]
            try:
                accepted = algorithm.decrypt(key, ct, aad) == msg
            except DecryptionError:
                accepted = False
            tally.record(case, accepted)
    return tally


def _no_context(case: dict[str, Any]) -> bool:
    return not case.get("ctx")


#: (file, how to run it, (applicable, not applicable)) — pinned counts.
FILES: dict[str, tuple[Callable[[Registry], Tally], tuple[int, int]]] = {
    "ed25519_test.json": (lambda r: _signature_file(r, "ed25519", "ed25519_test.json"), (151, 0)),
    "ecdsa_secp256r1_sha256_test.json": (
        lambda r: _signature_file(r, "ecdsa-p256", "ecdsa_secp256r1_sha256_test.json"),
        (484, 0),
    ),
    "ecdsa_secp256r1_sha256_p1363_test.json": (
        lambda r: _signature_file(r, "ecdsa-p256", "ecdsa_secp256r1_sha256_p1363_test.json", "jws"),
        (262, 0),
    ),
    "ecdsa_secp384r1_sha384_test.json": (
        lambda r: _signature_file(r, "ecdsa-p384", "ecdsa_secp384r1_sha384_test.json"),
        (504, 0),
    ),
    "ecdsa_secp384r1_sha384_p1363_test.json": (
        lambda r: _signature_file(r, "ecdsa-p384", "ecdsa_secp384r1_sha384_p1363_test.json", "jws"),
        (280, 0),
    ),
    "rsa_pss_3072_sha256_mgf1_32_test.json": (
        lambda r: _signature_file(
            r,
            "rsa-pss-3072",
            "rsa_pss_3072_sha256_mgf1_32_test.json",
            group_applies=_pss_params("SHA-256", 32),
        ),
        (108, 0),
    ),
    "rsa_pss_4096_sha512_mgf1_64_test.json": (
        lambda r: _signature_file(
            r,
            "rsa-pss-4096",
            "rsa_pss_4096_sha512_mgf1_64_test.json",
            group_applies=_pss_params("SHA-512", 64),
        ),
        (179, 0),
    ),
    "rsa_signature_3072_sha256_test.json": (
        lambda r: _signature_file(r, "rsa-pkcs1-3072", "rsa_signature_3072_sha256_test.json"),
        (259, 0),
    ),
    "rsa_signature_4096_sha512_test.json": (
        lambda r: _signature_file(r, "rsa-pkcs1-4096", "rsa_signature_4096_sha512_test.json"),
        (259, 0),
    ),
    "mldsa_65_verify_test.json": (
        lambda r: _signature_file(
            r, "ml-dsa-65", "mldsa_65_verify_test.json", case_applies=_no_context
        ),
        (203, 7),
    ),
    "hmac_sha256_test.json": (
        lambda r: _mac_file(r, "hmac-sha256", "hmac_sha256_test.json"),
        (162, 12),
    ),
    "hmac_sha512_test.json": (
        lambda r: _mac_file(r, "hmac-sha512", "hmac_sha512_test.json"),
        (162, 12),
    ),
    "aes_siv_cmac_test.json": (
        lambda r: _siv_file(r, "aes-256-siv", "aes_siv_cmac_test.json"),
        (147, 295),
    ),
}


@pytest.mark.parametrize("filename", sorted(FILES))
def test_wycheproof_file(registry: Registry, filename: str) -> None:
    run, expected = FILES[filename]
    tally = run(registry)
    print(
        f"{filename}: applicable {tally.applicable}, passed {tally.passed}, "
        f"not applicable {tally.not_applicable}, acceptable accepted {tally.acceptable_accepted}"
    )
    assert not tally.failures, f"{filename}: {len(tally.failures)} failed: {tally.failures[:10]}"
    assert tally.passed == tally.applicable
    assert (tally.applicable, tally.not_applicable) == expected


def test_every_vector_file_of_the_readme_is_used() -> None:
    """Each signature/MAC/deterministic file copied here has a runner above."""
    aead = {"aes_gcm_test.json", "chacha20_poly1305_test.json", "aes_gcm_siv_test.json"}
    present = {p.name for p in WYCHEPROOF.glob("*.json")} - aead
    assert present == set(FILES)
