"""Helpers of tests/test_redteam_root.py: the attacker's upstream server, the database
writer's keyring edit, what he reads back with a KWK he knows, his shared object, and a
FIFO reader that must not block."""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import root_helpers as rh
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qimem.app import AppContext
from qimem.errors import ConfigError
from qimem.root import rotation
from qimem.root.kwk import wrapping_key


class EvilUpstream:
    """A loopback HTTP server standing in for the attacker's machine (in the field: any
    https host with a publicly trusted certificate). It records every request's headers and
    body and answers a decrypt with ``kwk`` (the key-wrapping key the attacker chose)."""

    def __init__(self, kwk: bytes, key_id: str, *, status: int = 200, extra: bytes = b"") -> None:
        self.kwk, self.key_id, self.status, self.extra = kwk, key_id, status, extra
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                outer.seen.append((self.path, dict(self.headers), body))
                if outer.status in (301, 302, 307, 308):
                    self.send_response(outer.status)
                    self.send_header("Location", "http://127.0.0.1:9/steal")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = json.dumps(
                    {"plaintext": base64.b64encode(outer.kwk).decode(), "key_id": outer.key_id}
                ).encode()
                answer += outer.extra
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def sent(self) -> bytes:
        return b"".join(
            path.encode() + json.dumps(headers).encode() + body for path, headers, body in self.seen
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def inject(url: str, provider: str, settings: dict[str, Any], wrapped: bytes, check: str) -> None:
    """As the database writer: add version 3 (``provider`` with ``settings``) as the active
    version, the previous active one draining: what a rotation in progress looks like."""
    doc = json.loads(rh.keyring_text(url) or "")
    for version in doc["versions"]:
        if version["state"] == "active":
            version["state"] = "draining"
    doc["versions"].append(
        {
            "version": 3,
            "provider": provider,
            "settings": settings,
            "check": check,
            "created": "2026-12-04T01:00:00Z",
            "state": "active",
            "wrapped": base64.b64encode(wrapped).decode(),
        }
    )
    doc["active"] = 3
    rh.set_keyring_text(url, json.dumps(doc))


def envelope_key_id(envelope: bytes) -> str:
    from qimem import envelope as env

    return env.parse(envelope).key_id_str


def open_quietly(url: str, key_file: Path) -> AppContext | None:
    """The store opened as a server would at its next start (``None``: it refused)."""
    try:
        return rh.file_app(url, key_file)
    except ConfigError:
        return None


def rows_opened_with(app: AppContext, kwk: bytes) -> int:
    """How many wrapped rows of the store a reader holding ``kwk`` opens (what the attacker
    does with his database copy: the rows' contexts are public row identities)."""
    rows = rotation.root_rows(app)
    assert rows is not None
    aead = AESGCM(wrapping_key(kwk))
    opened = 0
    with rows.engine.connect() as conn:
        for column in rows.columns:
            table = sa.Table(column.table, sa.MetaData(), autoload_with=conn)
            for row in conn.execute(sa.select(table)):
                blob = row._mapping[column.blob]
                if blob is None or bytes(blob)[0] != 2:
                    continue
                blob = bytes(blob)
                try:
                    aead.decrypt(blob[5:17], blob[17:], column.context(row))
                    opened += 1
                except InvalidTag:
                    pass
    return opened


EVIL_SO = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void pwned(void) {
    const char *marker = getenv("REDTEAM_MARKER");
    if (marker) { FILE *f = fopen(marker, "w"); if (f) { fputs("code ran", f); fclose(f); } }
}
"""


def make_fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path, 0o600)
    return path


def returns_quickly(tmp_path: Path, name: str, read: Any) -> BaseException | None:
    """``read(fifo)`` in a thread: what it raised, or a failure if it blocked (the FIFO is
    then opened for writing and closed, so the blocked reader sees EOF and ends)."""
    fifo = make_fifo(tmp_path, name)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read(fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(3)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        pytest.fail(f"reading a FIFO as the {name} blocked (a startup that never ends)")
    return outcome[0]
