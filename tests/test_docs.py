"""Docs that are executed: every fenced block of README.md and docs/*.md runs here, or is
marked illustrative.

How each block runs (one sandbox per document: a temp ``QIMEM_HOME``, a working directory,
shell variables and the current directory carried from block to block, blocks in order):

- ``console``: lines starting ``$ `` are commands (``\\`` continues a line), run one by one
  in bash; the lines after a command are its expected output (stdout and stderr), compared
  when shown. ``...`` matches anything; ``WORD...`` (``3f0c...``) matches one token and names
  it, so a later ``3f0c...`` in a command or an output means the same value. A command must
  exit 0 unless its shown output contains ``error:`` (then it must fail).
- ``bash`` / ``sh``: run as one script with ``set -euo pipefail``.
- ``python``: exec'd in one namespace per document, in the working directory; each
  ``test_*`` function it defines that needs only ``tmp_path``/``monkeypatch`` is called.
- ``toml``: parsed; a qimem config file (tables among store, root_key, plugins, cache,
  limits, serve, keys, identity) is loaded by qimem's config loaders; a plugin manifest
  (it has ``qimem_api``) is validated by ``qimem.manifest``.
- ``json``: parsed.

In shell blocks, ``pip install ...`` is not run (the test uses the installed qimem), a
``qimem serve ...`` line starts the document's one server instead (a free port; ``:8080``
in later commands becomes that port, ``$URL`` is its address), ``curl`` fails on an HTTP
error status (``--fail-with-body``), and ``config.toml`` in ``QIMEM_HOME`` gets cheap
Argon2 settings after ``qimem init``.

Markers: HTML comment lines directly above the opening fence (invisible when rendered):

- ``<!-- illustrative -->`` (or ``<!-- illustrative: why -->``): not run, only counted. Use
  it for byte layouts, grammar, other machines (``https://keys.example.com``, nginx,
  PostgreSQL URLs), long campaigns and fragments; everything else should run.
- ``<!-- docs-test: before SHELL -->``: hidden setup run first (e.g. create input files).
- ``<!-- docs-test: write NAME -->``: also save the block as NAME in the working directory
  (a module a later example imports).
- ``<!-- docs-test: file PATH -->``: the block is exactly the repository file PATH (which
  another test runs, e.g. docs/nginx-qimem.conf).
- ``<!-- docs-test: serve ARGS -->``: start the document's server (``qimem serve ARGS``)
  before this block.

Any other block fails this test, so a new example can never drift silently: run it, or mark
it. Byte layouts in docs/formats.md are checked against real output by the tests at the end.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import stat
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from helpers_docs import (
    DOC_FILES,
    RUNNABLE,
    Block,
    DocSandbox,
    console_commands,
    iter_blocks,
    output_matches,
    parse_blocks,
    same_shape,
)

from qimem import stream
from qimem.app import AppContext
from qimem.errors import ConfigError, DecryptionError, EnvelopeFormatError


def _unrunnable(block: Block) -> str | None:
    if block.illustrative or any(key == "file" for key, _ in block.directives):
        return None
    if block.lang not in RUNNABLE:
        return f"```{block.lang or '(no language)'}"
    if block.lang == "console":
        try:
            console_commands(block.text)
        except AssertionError as exc:
            return str(exc)
    return None


def test_every_block_runs_or_is_marked() -> None:
    blocks = list(iter_blocks())
    bad = [f"{b.where}: {why}" for b in blocks if (why := _unrunnable(b))]
    assert not bad, "blocks that can neither run nor are marked illustrative:\n" + "\n".join(bad)
    illustrative = sum(b.illustrative for b in blocks)
    print(
        f"docs blocks: {len(blocks)}, run {len(blocks) - illustrative}, illustrative {illustrative}"
    )
    assert len(blocks) - illustrative > illustrative  # most examples run


@pytest.mark.parametrize("path", DOC_FILES)
def test_document_examples_run(path: str, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    sandbox = DocSandbox(tmp_path)
    sandbox.env["TMPDIR"] = str(tmp_path / "tmp")
    try:
        for block in parse_blocks(path):
            if not block.illustrative:
                sandbox.run_block(block)
    finally:
        sandbox.close()


# -- the harness itself -------------------------------------------------------------------


def test_placeholders_bind_and_must_agree() -> None:
    bindings: dict[str, str] = {}
    assert output_matches("3f0c...\n", "1992879b-7c70\n", bindings)
    assert bindings == {"3f0c...": "1992879b-7c70"}
    assert output_matches("key 3f0c... is ... (v2)", "key 1992879b-7c70 is gone now (v2)", bindings)
    assert not output_matches("key 3f0c... is", "key 0000 is", bindings)
    assert not output_matches("exact", "exact but more", bindings)


def test_documented_answers_must_have_the_real_fields() -> None:
    real = {"key_id": "k", "version": 1, "items": [{"a": 1, "b": 2}]}
    assert same_shape({"key_id": "x", "version": 9, "items": [{"a": 0, "b": 0}]}, real) is None
    assert same_shape({"key_id": "x", "...": "..."}, real) is None
    assert "lacks ['kid']" in str(same_shape({"kid": "x", "...": "..."}, real))
    assert "undocumented" in str(same_shape({"key_id": "x", "version": 1}, real))
    assert "items[0]" in str(same_shape({"items": [{"a": 1}], "...": "..."}, real))


def test_unmarked_unknown_block_fails(tmp_path: Path) -> None:
    sandbox = DocSandbox(tmp_path)
    with pytest.raises(AssertionError, match="mark it"):
        sandbox.run_block(Block("x.md", 1, "nginx", "server {}\n"))
    with pytest.raises(AssertionError, match="unknown marker"):
        sandbox.run_block(Block("x.md", 1, "json", "{}", directives=[("typo", "")]))


def test_markers_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "d.md"
    doc.write_text(
        "<!-- illustrative -->\n```nginx\nx\n```\n\n"
        "<!-- docs-test: before touch a -->\n```console\n$ ls\na\n```\n"
    )
    monkeypatch.setattr("helpers_docs.REPO", tmp_path)
    first, second = parse_blocks("d.md")
    assert first.illustrative and first.lang == "nginx"
    assert second.directives == [("before", "touch a")] and not second.illustrative
    sandbox = DocSandbox(tmp_path / "box")
    sandbox.run_block(second)
    with pytest.raises(AssertionError, match="expected"):
        sandbox.run_block(Block("d.md", 9, "console", "$ ls\nb\n"))


# -- qimem.rootkey.generate (the README's Python API needs a root key) --------------------


def test_rootkey_generate_writes_a_private_key_once(tmp_path: Path) -> None:
    from qimem import rootkey

    path = rootkey.generate(tmp_path / "sub" / "root.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(rootkey.read_root_key_file(path)) == rootkey.ROOT_KEY_SIZE
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        rootkey.generate(str(path))
    assert path.read_bytes() == before
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        rootkey.generate(link)  # a dangling symlink is not followed
    assert not (tmp_path / "elsewhere").exists()


# -- byte layouts stated in docs/formats.md, checked against real output --------------------


@pytest.fixture
def app(tmp_path: Path) -> Iterator[AppContext]:
    import qimem
    from qimem import rootkey

    rootkey.generate(tmp_path / "root.key")
    context = qimem.connect(f"sqlite:///{tmp_path / 'k.db'}", root_key_file=tmp_path / "root.key")
    yield context
    context.close()


def _hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def test_cli_encrypt_writes_stream_v1_with_the_documented_offsets(tmp_path: Path) -> None:
    """formats.md: `qimem encrypt` always writes stream v1, even 3 bytes; the header fields
    sit at the documented offsets; header = 45 + P + W; total = header + n + T·k."""
    sandbox = DocSandbox(tmp_path)
    try:
        made = sandbox.shell(
            "qimem init >/dev/null && qimem keys create --name k >/dev/null\n"
            "printf abc | qimem encrypt --key k > small.qimem && qimem keys show k --json",
            strict=True,
        )
        assert made.returncode == 0, made.stdout
        data = (sandbox.work / "small.qimem").read_bytes()
    finally:
        sandbox.close()
    shown = json.loads(made.stdout)
    key_id = shown.get("active_key_id") or shown["versions"][-1]["key_id"]
    assert data[:4] == b"QMST" and data[4] == 1
    algorithm_id, segment_size, p = data[5], struct.unpack(">I", data[6:10])[0], data[10]
    assert (segment_size, p) == (262144, 7)
    (w,) = struct.unpack(">H", data[11 + p : 13 + p])
    wrapped = data[13 + p : 13 + p + w]
    nonce, tag = wrapped[26], 16
    assert w == 31 + nonce + 32 + tag == 91  # a 32-byte data key, sealed
    assert wrapped[:4] == b"QMEV" and wrapped[5] == algorithm_id  # the ids agree
    assert str(uuid.UUID(bytes=data[13 + p + 6 : 13 + p + 22])) == key_id
    assert struct.unpack(">I", data[13 + p + 22 : 13 + p + 26])[0] == 1
    header = 45 + p + w
    assert header == 143 == stream.parse_header(data).size
    assert len(data) == header + 3 + tag * 1


def test_stream_wrapped_key_length_bound_is_32(tmp_path: Path) -> None:
    """formats.md: W outside 32 ‥ 1024 is refused; 28 ‥ 31 pass the length check but are
    never a well-formed envelope; 32 (a 1-byte nonce, empty ciphertext) parses."""

    def header(wrapped: bytes) -> bytes:
        core = b"QMST" + bytes([1, 1]) + struct.pack(">IB", 64, 7) + bytes(7)
        return core + struct.pack(">H", len(wrapped)) + wrapped + bytes(32)

    minimal = b"QMEV" + bytes([1, 1]) + bytes(16) + struct.pack(">IB", 1, 1) + b"\0" + bytes(4)
    assert len(minimal) == 32
    assert stream.parse_header(header(minimal)).wrapped_key == minimal
    for size in range(20, 32):
        with pytest.raises(EnvelopeFormatError):
            stream.parse_header(header(minimal[:size]))


def test_stream_refuses_differing_algorithm_ids(app: AppContext) -> None:
    """formats.md: the stream's algorithm id must equal its wrapped key's. A data-key holder
    who writes chacha20 segments under an aes-256-gcm wrapped key is refused."""
    from qimem import services
    from qimem.services import files

    services.create_key(app, name="k")
    ring = files.StoreKeyring(app, "k")

    class Mismatched:
        def new_data_key(self):  # type: ignore[no-untyped-def]
            _, data_key, wrapped = ring.new_data_key()
            return app.registry.algorithm_by_id(2), data_key, wrapped

    sealed = io.BytesIO()
    stream.encrypt_stream(io.BytesIO(b"hello"), sealed, Mismatched())  # type: ignore[arg-type]
    data = sealed.getvalue()
    assert data[5] == 2 and stream.parse_header(data).wrapped_key[5] == 1
    with pytest.raises(DecryptionError):
        stream.decrypt_stream(io.BytesIO(data), io.BytesIO(), ring)


def test_root_key_wrap_layout_and_aad(app: AppContext, tmp_path: Path) -> None:
    """formats.md, "Key material at rest": 01 ‖ nonce ‖ AES-256-GCM under the HKDF wrapping
    key, the version's identity string as AAD, opened here with bare cryptography."""
    from qimem import rootkey, services

    made = services.create_key(app, name="k")
    root = bytes(rootkey.read_root_key_file(tmp_path / "root.key"))
    with sqlite3.connect(tmp_path / "k.db") as db:
        (blob,) = db.execute(
            "SELECT material FROM qimem_key_versions WHERE key_id = ?", (made.key_id,)
        ).fetchone()
    assert blob[0] == 1 and len(blob) == 1 + 12 + 32 + 16
    aad = f"qimem-key-v1|master|{made.lineage_id}|{made.key_id}|1|aes-256-gcm".encode()
    wrapping = AESGCM(_hkdf(root, b"qimem key wrapping v1"))
    material = wrapping.decrypt(blob[1:13], blob[13:], aad)
    assert material == bytes(app.store.material("master", made.key_id))
    with pytest.raises(InvalidTag):
        wrapping.decrypt(blob[1:13], blob[13:], aad.replace(b"|1|", b"|2|"))
    check = _hkdf(root, b"qimem root key check v1")[:16].hex()
    assert check == rootkey.KeyWrapper(root).check_value


def test_derived_key_envelope_is_sealed_under_the_documented_subkey(app: AppContext) -> None:
    from qimem import envelope as env
    from qimem import services

    made = services.create_key(app, name="tenants", derived=True)
    sealed = services.encrypt(app, "tenants", b"hi", context=b"tenant-a")
    parsed = env.parse(sealed.envelope)
    assert parsed.key_id_str == made.key_id and parsed.key_version == 1  # nothing else stored
    material = bytes(app.store.material("master", made.key_id))
    subkey = _hkdf(material, b"qimem-derived-v1\x00tenant-a", len(material))
    assert AESGCM(subkey).decrypt(parsed.nonce, parsed.ciphertext, parsed.header) == b"hi"


def test_backup_plaintext_layout(app: AppContext) -> None:
    """formats.md, "Key backup v1": Argon2id key, compact sorted JSON header as AAD, and
    the documented plaintext fields, the material in base64."""
    from argon2.low_level import Type, hash_secret_raw

    from qimem import backup, services

    made = services.create_key(app, name="k")
    passphrase = "correct horse battery staple"
    kdf = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}
    document = json.loads(backup.export_keys(app, ["k"], passphrase, kdf=kdf))
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    assert header["format"] == "qimem-key-backup" and header["cipher"] == "aes-256-gcm"
    salt = base64.b64decode(header["kdf"]["salt"])
    assert len(salt) == 16 and len(base64.b64decode(header["nonce"])) == 12
    key = hash_secret_raw(
        passphrase.encode(),
        salt,
        time_cost=1,
        memory_cost=8192,
        parallelism=1,
        hash_len=32,
        type=Type.ID,
    )
    aad = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    payload = json.loads(
        AESGCM(key).decrypt(
            base64.b64decode(header["nonce"]), base64.b64decode(document["ciphertext"]), aad
        )
    )
    assert set(payload) == {"created_at", "lineages"}
    (lineage,) = payload["lineages"]
    assert set(lineage) == {
        "lineage_id",
        "realm",
        "name",
        "algorithm",
        "created_at",
        "policy",
        "versions",
    }
    assert set(lineage["policy"]) == {
        "min_decryption_version",
        "min_encryption_version",
        "usage_limit",
        "auto_rotate_seconds",
        "deletion_protection",
        "deletion_date",
        "derived",
        "vault_layout_versions",
    }
    (version,) = lineage["versions"]
    assert set(version) == {"key_id", "version", "state", "created_at", "encryptions", "material"}
    assert base64.b64decode(version["material"]) == bytes(app.store.material("master", made.key_id))
