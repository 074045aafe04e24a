"""Attacks on the root keyring (qimem.root.keyring) and the key wrapper that follows it
(qimem.rootkey.KeyWrapper): malformed documents, blobs naming versions that do not exist,
keyrings and blobs carried to another store, secrets in reprs, a provider-held root on a
store that has a root key of its own, and two processes creating one store's keyring."""

from __future__ import annotations

import base64
import copy
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qimem import services
from qimem.app import AppContext, build
from qimem.config import Config
from qimem.errors import ConfigError, DecryptionError
from qimem.root import keyring as kr
from qimem.root.provider import KWK_SIZE, kwk_context
from qimem.rootkey import KeyWrapper, encode_root_key

DAMAGED = "the store's root keyring is damaged ("


# -- parse(): every malformed document is a ConfigError naming the problem -----------------


def _valid() -> dict[str, Any]:
    """A well-formed keyring document (two versions, one retired)."""
    blob = base64.b64encode(os.urandom(60)).decode()
    version: dict[str, Any] = {
        "version": 1,
        "provider": "env",
        "settings": {"variable": "ROOT"},
        "check": "00" * 16,
        "created": "2026-12-04T01:00:00Z",
        "state": "retired",
        "wrapped": blob,
    }
    return {
        "format": 1,
        "id": str(uuid.uuid4()),
        "check": "00" * 16,
        "active": 2,
        "derive": {"version": 2, "blob": blob},
        "versions": [version, {**version, "version": 2, "state": "active"}],
    }


def test_the_valid_document_parses() -> None:
    keyring = kr.parse(json.dumps(_valid()))
    assert keyring.active == 2 and [r.version for r in keyring.versions] == [1, 2]
    assert kr.parse(keyring.dump()) == keyring


def _edit(path: str, value: Any) -> str:
    """The valid document with ``path`` (``a.b.0.c``) set to ``value`` (``DELETE``: removed)."""
    doc = _valid()
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return json.dumps(doc)


DELETE = object()
_DEEP = "[" * 100_000 + "]" * 100_000

MALFORMED: dict[str, tuple[str, str]] = {
    "empty": ("", "not JSON"),
    "not json": ("root keyring", "not JSON"),
    "truncated": (json.dumps(_valid())[:-1], "not JSON"),
    "huge": (" " * (kr.MAX_DOCUMENT + 1), "too large"),
    "huge valid json": (json.dumps({**_valid(), "pad": "x" * kr.MAX_DOCUMENT}), "too large"),
    "deep nesting": (_DEEP, "not JSON"),
    "deep nesting in settings": (
        _edit("versions.0.settings", "DEEP").replace('"DEEP"', _DEEP),
        "not JSON",
    ),
    "4301-digit number": (
        _edit("active", 0).replace('"active": 0', '"active": ' + "9" * 4301),
        "not JSON",
    ),
    "a list": ("[]", "unknown format"),
    "null": ("null", "unknown format"),
    "format 2": (_edit("format", 2), "unknown format"),
    "format as text": (_edit("format", "1"), "unknown format"),
    "format true": (_edit("format", True), "unknown format"),
    "no format": (_edit("format", DELETE), "unknown format"),
    "id a number": (_edit("id", 5), "malformed"),
    "id empty": (_edit("id", ""), "malformed"),
    "id huge": (_edit("id", "i" * 1000), "malformed"),
    "no check": (_edit("check", DELETE), "malformed"),
    "active as text": (_edit("active", "2"), "malformed"),
    "active true": (_edit("active", True), "malformed"),
    "active float": (_edit("active", 2.0), "malformed"),
    "active NaN": (_edit("active", 0).replace('"active": 0', '"active": NaN'), "malformed"),
    "derive a list": (_edit("derive", [2, "x"]), "malformed"),
    "derive a string": (_edit("derive", "2"), "malformed"),
    "derive without blob": (_edit("derive.blob", DELETE), "malformed"),
    "derive blob bad base64": (_edit("derive.blob", "!!!not base64!!!"), "malformed"),
    "derive blob bad padding": (_edit("derive.blob", "abc"), "malformed"),
    "derive blob a number": (_edit("derive.blob", 7), "malformed"),
    "versions a dict": (_edit("versions", {"1": {}}), "malformed"),
    "versions a string": (_edit("versions", "12"), "malformed"),
    "versions a number": (_edit("versions", 2), "malformed"),
    "a version a list": (_edit("versions.0", [1]), "malformed"),
    "settings a list": (_edit("versions.0.settings", ["file"]), "malformed"),
    "no settings": (_edit("versions.0.settings", DELETE), "malformed"),
    "state unknown": (_edit("versions.0.state", "dormant"), "malformed"),
    "provider a number": (_edit("versions.0.provider", 3), "malformed"),
    "created null": (_edit("versions.0.created", None), "malformed"),
    "wrapped bad base64": (_edit("versions.0.wrapped", "%%%"), "malformed"),
    "wrapped missing": (_edit("versions.0.wrapped", DELETE), "malformed"),
    "direct 'yes', no wrapped": (
        _edit("versions.0.wrapped", DELETE).replace('"state"', '"direct": "yes", "state"', 1),
        "malformed",
    ),
    "no versions": (_edit("versions", []), "duplicate or no versions"),
    "duplicate versions": (_edit("versions.0.version", 2), "duplicate or no versions"),
    "version 0": (_edit("versions.0.version", 0), "malformed"),
    "version negative": (_edit("versions.0.version", -1), "malformed"),
    "version 2^31": (_edit("versions.0.version", 2**31), "malformed"),
    "version 2^64": (_edit("versions.0.version", 2**64), "malformed"),
    "active 0": (_edit("active", 0), "malformed"),
    "active negative": (_edit("active", -2), "malformed"),
    "no active version": (_edit("versions.1.state", "draining"), "exactly one version"),
    "two active versions": (_edit("versions.0.state", "active"), "exactly one version"),
    "active names a draining version": (_edit("active", 1), "exactly one version"),
    "active names no version": (_edit("active", 9), "exactly one version"),
    "derive version missing": (_edit("derive.version", 3), "derive"),
    "derive version huge": (_edit("derive.version", 2**40), "malformed"),
}


#: Cases qimem gets wrong today (strict: once fixed, the marker must go).
KNOWN_BUGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[c]))
        if c in KNOWN_BUGS
        else c
        for c in sorted(MALFORMED)
    ],
)
def test_malformed_document_is_a_config_error(case: str) -> None:
    text, what = MALFORMED[case]
    with pytest.raises(ConfigError) as info:  # any other exception fails the test
        kr.parse(text)
    message = str(info.value)
    assert message.startswith(DAMAGED) and what in message, message
    assert "restore it from a backup" in message
    assert len(message) < 200, "the message quotes the document"


def test_deep_but_parseable_settings_round_trip() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(500):
        node["a"] = {}
        node = node["a"]
    doc = _valid()
    doc["versions"][0]["settings"] = deep
    keyring = kr.parse(json.dumps(doc))
    assert kr.parse(keyring.dump()) == keyring


# -- a store whose root an env provider holds ----------------------------------------------


@pytest.fixture
def root_variable(monkeypatch: pytest.MonkeyPatch) -> str:
    """An environment variable holding a fresh root secret (an ``env`` provider's)."""
    name = f"QIMEM_KEYRING_TEST_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(name, encode_root_key(os.urandom(32)))
    monkeypatch.delenv("QIMEM_ROOT_KEY", raising=False)
    return name


def _config(path: Path, variable: str) -> Config:
    return Config(
        store_url=f"sqlite:///{path}",
        root_key_provider="env",
        root_key_settings={"variable": variable},
        path=path.parent / "config.toml",
    )


@pytest.fixture
def app(tmp_path: Path, root_variable: str) -> Iterator[AppContext]:
    with build(_config(tmp_path / "a.db", root_variable)) as opened:
        opened.backend  # noqa: B018 - opens the store: attaches (creates) its keyring
        yield opened


def _wrapper(app: AppContext) -> KeyWrapper:
    assert app.wrapper is not None and app.wrapper.keyring is not None
    return app.wrapper


@pytest.mark.parametrize("version", [0, 2, 3, 2**31, 2**32 - 1])
def test_blob_naming_a_version_the_keyring_lacks(app: AppContext, version: int) -> None:
    wrapper = _wrapper(app)
    blob = b"\x02" + version.to_bytes(4, "big") + os.urandom(12 + 48)
    with pytest.raises(DecryptionError) as info:
        wrapper.unwrap(blob, b"context")
    assert blob.hex()[:20] not in str(info.value)


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x01", b"\x02\x00\x00\x00\x01", b"\x03" + bytes(60), b"\x01" + bytes(28)],
    ids=["empty", "format-only", "v2-header-only", "format-3", "v1-short"],
)
def test_damaged_blobs_are_decryption_errors(app: AppContext, blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        _wrapper(app).unwrap(blob, b"context")


def test_version_1_blob_relabelled_as_another_version_does_not_open(app: AppContext) -> None:
    wrapper = _wrapper(app)
    blob = wrapper.wrap(b"m" * 32, b"row")
    assert blob[0] == 1  # version 1 keeps the short format
    for other in (b"\x02" + (2).to_bytes(4, "big") + blob[1:], blob[:1] + blob[2:]):
        with pytest.raises(DecryptionError):
            wrapper.unwrap(other, b"row")


def _document(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("SELECT document FROM qimem_root_keyring").fetchone()[0])


def _set_document(path: Path, text: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE qimem_root_keyring SET document = ?", (text,))


def test_keys_and_keyrings_do_not_cross_stores(tmp_path: Path, root_variable: str) -> None:
    """Two stores under one root secret: a row's blob, a keyring version's wrapped KWK and
    a keyring carried to the other store open nowhere but at home (kwk_context binds the
    keyring id and the version)."""
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with build(_config(a, root_variable)) as app_a, build(_config(b, root_variable)) as app_b:
        app_b.backend  # noqa: B018 - opens store b: creates its keyring
        services.create_key(app_a, name="k")
        sealed = services.encrypt(app_a, "k", b"secret", aad=b"x").envelope
        row = _wrapper(app_a).wrap(b"m" * 32, b"row")
        with pytest.raises(DecryptionError):
            _wrapper(app_b).unwrap(row, b"row")
        ring_a, ring_b = _wrapper(app_a).keyring, _wrapper(app_b).keyring
        assert ring_a.id != ring_b.id
    provider = app_a.registry.root_key_providers["env"]({"variable": root_variable}, tmp_path)
    wrapped_a = ring_a.version(1).wrapped
    assert len(provider.unwrap(wrapped_a, kwk_context(ring_a.id, 1))) == KWK_SIZE
    for context in (kwk_context(ring_b.id, 1), kwk_context(ring_a.id, 2)):
        with pytest.raises(DecryptionError):
            provider.unwrap(wrapped_a, context)
    # store b's keyring given store a's version 1 (wrapped KWK and its check value)
    doc = json.loads(_document(b))
    good_b = copy.deepcopy(doc)
    doc["versions"][0].update(wrapped=base64.b64encode(wrapped_a).decode(), check=ring_a.check)
    _set_document(b, json.dumps(doc))
    with pytest.raises(ConfigError) as info, build(_config(b, root_variable)) as app_b:
        app_b.backend  # noqa: B018
    assert "cannot unwrap its key" in str(info.value)
    # store a's keyring under store b's id
    doc = json.loads(_document(a))
    good_a = copy.deepcopy(doc)
    doc["id"] = ring_b.id
    _set_document(a, json.dumps(doc))
    with pytest.raises(ConfigError), build(_config(a, root_variable)) as app_a:
        app_a.backend  # noqa: B018
    _set_document(b, json.dumps(good_b))
    with build(_config(b, root_variable)) as app_b:  # its own document still opens
        services.create_key(app_b, name="k")
        sealed_b = services.encrypt(app_b, "k", b"b's", aad=b"x").envelope
        assert services.decrypt(app_b, sealed_b, aad=b"x").plaintext == b"b's"
    _set_document(a, json.dumps(good_a))
    with build(_config(a, root_variable)) as app_a:
        assert services.decrypt(app_a, sealed, aad=b"x").plaintext == b"secret"


def test_wrapper_repr_shows_no_key_material(app: AppContext, root_variable: str) -> None:
    wrapper = _wrapper(app)
    keyring = wrapper.keyring
    provider = app.registry.root_key_providers["env"]({"variable": root_variable}, Path.cwd())
    kwk = kr.open_version(keyring, keyring.version(1), lambda name, settings: provider)
    secrets = [
        bytes(kwk).hex(),
        base64.b64encode(bytes(kwk)).decode(),
        os.environ[root_variable],
        wrapper.derive_key("any").hex(),
    ]
    shown = [repr(wrapper), str(wrapper), repr(app), repr(app.config), repr(provider)]
    for secret in secrets:
        assert not any(secret in text for text in shown)
    assert not hasattr(wrapper, "__dict__")  # __slots__: no stray attribute holds a key
    assert f"check={keyring.check}" in repr(wrapper)


def test_pending_wrapper_refuses_to_work_before_attach() -> None:
    def nothing(*args: Any) -> Any:
        raise AssertionError("no provider may be opened before a store attaches")

    wrapper = KeyWrapper.pending(nothing, nothing)
    assert wrapper.active_version == 0 and not wrapper.attached
    with pytest.raises(ConfigError, match="no root key yet"):
        wrapper.wrap(b"m" * 32, b"row")
    with pytest.raises(ConfigError, match="no root key yet"):
        wrapper.derive_key("label")
    with pytest.raises(ConfigError, match="no root key yet"):
        wrapper.seal_derive_base("id", "check", bytes(32))
    with pytest.raises(DecryptionError):
        wrapper.unwrap(b"\x01" + os.urandom(60), b"row")


def test_provider_root_on_a_store_with_its_own_root_key_is_refused(
    tmp_path: Path, root_variable: str
) -> None:
    """A store made with a root key file (no keyring), opened with only a provider
    configured: refused, saying how to migrate, and the store is left as it was."""
    db, key_file = tmp_path / "old.db", tmp_path / "root.key"
    from qimem.rootkey import write_root_key_file

    write_root_key_file(key_file)[:] = bytes(32)
    old = Config(store_url=f"sqlite:///{db}", root_key_file=key_file, path=tmp_path / "c.toml")
    with build(old) as app:
        services.create_key(app, name="k")
        sealed = services.encrypt(app, "k", b"kept").envelope
    for _ in range(2):  # the fast path (current schema) both times
        with pytest.raises(ConfigError) as info, build(_config(db, root_variable)) as app:
            app.backend  # noqa: B018
        message = str(info.value)
        assert "qimem root rotate" in message and "[root_key] file" in message
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM qimem_root_keyring").fetchone()[0] == 0
    with build(old) as app:
        assert services.decrypt(app, sealed).plaintext == b"kept"


# -- two processes create a fresh store's keyring at once ----------------------------------

_RACER = """
import os, sys, time
from pathlib import Path
from qimem import services
from qimem.app import build
from qimem.config import Config

db, variable, go, name = sys.argv[1:5]
while not os.path.exists(go):
    time.sleep(0.001)
config = Config(store_url="sqlite:///" + db, root_key_provider="env",
                root_key_settings={"variable": variable}, path=Path(db).parent / "config.toml")
with build(config) as app:
    services.create_key(app, name=name)
    sealed = services.encrypt(app, name, name.encode()).envelope
    print(app.wrapper.keyring.id, sealed.hex())
"""


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_first_opens_agree_on_one_keyring(
    tmp_path: Path, root_variable: str, round_: int
) -> None:
    db, go = tmp_path / "fresh.db", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(db), root_variable, str(go), f"k{i}"],
            env=env,
            cwd=str(tmp_path),  # not the checkout: its ./qimem would shadow the installed one
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    time.sleep(1.0)  # every racer is importing qimem and waiting for the go file
    go.touch()
    answers = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err[-3000:]
        answers.append(out.split())
    assert len({keyring_id for keyring_id, _ in answers}) == 1, answers
    assert len(json.loads(_document(db))["versions"]) == 1
    with build(_config(db, root_variable)) as app:
        for i, (_, sealed) in enumerate(answers):
            opened = services.decrypt(app, bytes.fromhex(sealed)).plaintext
            assert opened == f"k{i}".encode()
