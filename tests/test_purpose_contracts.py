"""The optional parts of the purpose plugin contracts (issue 16 follow-ups): a deterministic
algorithm's prepared ``cipher(key)`` (AES-SIV: Wycheproof through it, no key bytes left in
the cache entry, plugins without it still work), MAC verification through the plugin's own
``verify`` (never a comparison with a recomputed ``mac``; only ``True`` is valid), the
built-in HMAC's fast path agreeing with its checked path, and a deterministic algorithm's
own message bound and reason in usage-limit errors."""

from __future__ import annotations

import gc
import hashlib
import hmac
import os
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from test_wycheproof_purposes import Tally, _load

from qimem.app import AppContext, build
from qimem.config import Config
from qimem.errors import DecryptionError, ValidationError
from qimem.hooks import hookimpl
from qimem.registry import Registry, make_plugin_manager
from qimem.services import crypto, lifecycle, macs
from qimem.services.deterministic import DeterministicCipher
from qimem.services.keys import create_key


@pytest.fixture(scope="module")
def siv() -> Any:
    return Registry(make_plugin_manager()).algorithm("aes-256-siv", "deterministic")


def _app_with(*algorithms: Any) -> AppContext:
    """An in-memory app whose registry also has ``algorithms`` (a third-party plugin)."""

    class Plugin:
        @hookimpl
        def qimem_register_algorithms(self, register: Any) -> None:
            for algorithm in algorithms:
                register(algorithm)

    pm = make_plugin_manager()
    pm.register(Plugin(), name="third-party")
    return build(Config(store_url="memory://", root_key_b64=None), pm=pm, open=True)


@pytest.fixture
def app() -> Iterator[AppContext]:
    made = build(Config(store_url="memory://", root_key_b64=None), open=True)
    yield made
    made.close()


# ---- AES-SIV's prepared cipher ------------------------------------------------------------


def test_wycheproof_aes_siv_through_the_prepared_cipher(siv: Any) -> None:
    tally = Tally()
    for group in _load("aes_siv_cmac_test.json")["testGroups"]:
        if group["keySize"] != siv.key_size * 8:
            continue
        for case in group["tests"]:
            key, aad, msg, ct = (bytes.fromhex(case[k]) for k in ("key", "aad", "msg", "ct"))
            prepared = siv.cipher(bytearray(key))
            if case["result"] == "valid":
                assert prepared.encrypt(msg, aad) == ct, case["tcId"]
            try:
                accepted = prepared.decrypt(ct, aad) == msg
            except DecryptionError:
                accepted = False
            tally.record(case, accepted)
    assert tally.failures == []
    assert tally.applicable == 147  # the count test_wycheproof_purposes pins


def test_prepared_cipher_refuses_bad_keys_and_bad_ciphertexts(siv: Any) -> None:
    for key in (b"", b"k" * 32, b"k" * 65, "k" * 64, None):
        with pytest.raises(ValidationError, match="64-byte key"):
            siv.cipher(key)
    prepared = siv.cipher(os.urandom(64))
    sealed = prepared.encrypt(b"4111 1111 1111 1111", b"cards.pan")
    assert prepared.encrypt(b"4111 1111 1111 1111", b"cards.pan") == sealed
    assert prepared.encrypt(b"x", None) == prepared.encrypt(b"x", b"")  # one "no AAD"
    for bad in (b"", sealed[:15], sealed[:16], sealed[:-1], bytes([sealed[0] ^ 1]) + sealed[1:]):
        with pytest.raises(DecryptionError):
            prepared.decrypt(bad, b"cards.pan")
    with pytest.raises(DecryptionError):
        prepared.decrypt(sealed, b"cards.cvv")
    assert "key" not in repr(prepared).lower().replace("aes-256-siv", "")


def _reachable(root: object, depth: int = 4) -> Iterator[object]:
    seen: set[int] = set()
    layer = [root]
    for _ in range(depth):
        following = []
        for obj in layer:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield obj
            following.extend(gc.get_referents(obj))
        layer = following


def _entry(app: AppContext, name: str) -> Any:
    return app.cache.by_ref["master"][name]


def test_a_deterministic_entry_holds_no_key_bytes(app: AppContext) -> None:
    version = create_key(app, name="col", algorithm="aes-256-siv")
    sealed = crypto.encrypt(app, "col", b"alice@example.com", aad=b"users.email").envelope
    material = bytes(app.store.material("master", version.key_id))
    entry = _entry(app, "col")
    assert isinstance(entry.cipher, DeterministicCipher) and entry.cipher.holds_key is False
    held = [o for o in _reachable(entry) if isinstance(o, bytes | bytearray)]
    assert held and material not in held  # the entry's bytes, but never the key
    assert crypto.decrypt(app, sealed, aad=b"users.email").plaintext == b"alice@example.com"
    assert crypto.encrypt(app, "col", b"alice@example.com", aad=b"users.email").envelope == sealed


class OneShotSiv:
    """A third-party deterministic plugin of plugin API 1.2 without ``cipher(key)``."""

    name = "third-siv"
    algorithm_id = 200
    purpose = "deterministic"
    key_size = 64
    tag_size = 16

    def generate_key(self) -> bytearray:
        return bytearray(os.urandom(64))

    def encrypt(self, key: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        return AESSIV(key).encrypt(plaintext, [aad or b""])

    def decrypt(self, key: bytes, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        try:
            return AESSIV(key).decrypt(ciphertext, [aad or b""])
        except Exception:
            raise DecryptionError("ciphertext failed authentication") from None


def test_a_plugin_without_a_prepared_cipher_keeps_working() -> None:
    app = _app_with(OneShotSiv())
    try:
        version = create_key(app, name="old", algorithm="third-siv")
        one = crypto.encrypt(app, "old", b"same", aad=b"t.c").envelope
        assert crypto.encrypt(app, "old", b"same", aad=b"t.c").envelope == one
        assert crypto.decrypt(app, one, aad=b"t.c").plaintext == b"same"
        with pytest.raises(DecryptionError):
            crypto.decrypt(app, one, aad=b"t.d")
        entry = _entry(app, "old")
        assert entry.cipher.holds_key is True  # the documented fallback
        material = bytes(app.store.material("master", version.key_id))
        assert material not in repr(entry).encode() and material.hex() not in repr(entry)
    finally:
        app.close()


def test_the_same_key_gives_the_same_bytes_with_or_without_preparation(siv: Any) -> None:
    key = bytearray(os.urandom(64))
    prepared = DeterministicCipher(siv, key)
    fallback = DeterministicCipher(OneShotSiv(), key)
    key[:] = bytes(64)  # the caller zeroes the unwrapped key once the entry is built
    sealed = prepared.encrypt(b"", b"v", b"aad")
    assert fallback.encrypt(b"", b"v", b"aad") == sealed
    assert prepared.decrypt(b"", sealed, b"aad") == fallback.decrypt(b"", sealed, b"aad") == b"v"


# ---- MAC verification is the plugin's verify() -----------------------------------------------


class NoncedMac:
    """A MAC whose tags carry their own randomness: nonce ‖ HMAC(key, nonce ‖ data). mac()
    is not deterministic, so a recomputed tag never equals a given one; verify() is right."""

    name = "nonced-mac"
    algorithm_id = 201
    purpose = "mac"
    key_size = 32
    tag_size = 48
    min_tag_size = 48

    def generate_key(self) -> bytearray:
        return bytearray(os.urandom(32))

    def mac(self, key: bytes, data: bytes) -> bytes:
        nonce = os.urandom(16)
        return nonce + hmac.digest(key, nonce + data, hashlib.sha256)

    def verify(self, key: bytes, data: bytes, tag: bytes, *, tag_size: int | None = None) -> bool:
        if len(tag) != self.tag_size:
            return False
        return hmac.compare_digest(hmac.digest(key, tag[:16] + data, hashlib.sha256), tag[16:])


class TruthyMac(NoncedMac):
    """A careless plugin: verify() answers a truthy string for every tag."""

    name = "truthy-mac"
    algorithm_id = 202

    def verify(self, key: bytes, data: bytes, tag: bytes, *, tag_size: int | None = None) -> Any:
        return "yes"


def test_a_mac_with_randomized_tags_verifies_through_its_own_verify() -> None:
    app = _app_with(NoncedMac())
    try:
        create_key(app, name="n", algorithm="nonced-mac")
        for raw in (False, True):
            made = macs.mac(app, "n", b"event", raw=raw)
            assert macs.mac(app, "n", b"event", raw=raw).tag != made.tag  # randomized
            for _ in range(2):  # the cold lookup, then the cached hot path
                assert macs.verify_mac(app, "n", b"event", made.tag, raw=raw).valid is True
            assert macs.verify_mac(app, "n", b"event!", made.tag, raw=raw).valid is False
    finally:
        app.close()


def test_only_true_from_a_plugin_is_valid() -> None:
    app = _app_with(TruthyMac())
    try:
        create_key(app, name="t", algorithm="truthy-mac")
        tag = macs.mac(app, "t", b"x").tag
        for forged in (tag, tag[:26] + bytes(48)):
            result = macs.verify_mac(app, "t", b"anything", forged)
            assert result.valid is False and result.key_id is None
    finally:
        app.close()


def test_builtin_hmac_fast_path_agrees_with_the_checked_path() -> None:
    registry = Registry(make_plugin_manager())
    for name in ("hmac-sha256", "hmac-sha512"):
        alg = registry.algorithm(name, "mac")
        key = bytes(alg.generate_key())
        tag = alg.mac(key, b"data")
        for k, d, t in (
            (key, b"data", tag),
            (bytearray(key), memoryview(b"data"), bytearray(tag)),  # the checked path
        ):
            assert alg.verify(k, d, t) is True
            assert alg.verify(k, d, bytes(t)[:-1]) is False  # short: no truncation unasked
            assert alg.verify(k, d, bytes(t) + b"\x00") is False
            assert alg.verify(k, d, b"") is False
            assert alg.verify(k, bytes(d) + b"!", t) is False
            assert alg.verify(k, d, bytes([t[0] ^ 1]) + bytes(t)[1:]) is False
        assert alg.verify(key, b"data", tag[:16], tag_size=16) is True
        for bad_key in (key[:-1], key + b"k", "k" * alg.key_size):
            with pytest.raises(ValidationError):
                alg.verify(bad_key, b"data", tag)
        with pytest.raises(ValidationError):
            alg.verify(key, "data", tag)
        with pytest.raises(ValidationError):
            alg.verify(key, b"data", "tag")


# ---- a deterministic algorithm's own message bound -------------------------------------------


def test_a_usage_limit_above_the_siv_bound_names_siv_not_nonces(app: AppContext) -> None:
    create_key(app, name="col", algorithm="aes-256-siv")
    lifecycle.set_policy(app, "col", usage_limit=2**32)  # at the bound: allowed
    with pytest.raises(ValidationError) as caught:
        lifecycle.set_policy(app, "col", usage_limit=2**32 + 1)
    text = str(caught.value)
    assert caught.value.code == "invalid_policy"
    assert "AES-SIV uses no nonce" in text and "96-bit" not in text and "NIST" not in text
    create_key(app, name="gcm")
    with pytest.raises(ValidationError, match="96-bit nonces"):  # AEADs keep their reason
        lifecycle.set_policy(app, "gcm", usage_limit=2**32 + 1)
