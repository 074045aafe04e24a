"""The peer: a bare Falcon + waitress server implementing the same routes in memory.

It gets as many processes as qimem: ``servers`` listening sockets (one port each, spread
over by the clients like qimem's servers) × ``workers`` processes per socket, forked by a
master after it bound the sockets (a pre-fork like ``qimem serve --workers``), each with
``THREADS`` threads. The processes share, through memory mapped before the fork, what
must be the same everywhere: the current version of each key (a rotation anywhere is seen
everywhere at once) and the revoked tokens. Key versions are derived from one random seed
(HMAC-SHA256(seed, key.version)), so every process opens every version; access tokens
carry an HMAC under the seed instead of living in one process's memory. Logins verify
Argon2id at qimem's default cost. The framework and crypto floor: no database, JWTs,
envelopes or auditing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.load.common import THREADS, LoadFailure, Target
from bench.load.servers import _call

#: The end of a server script (the peer's, the floor's): the routes to the script's
#: ``Token``, ``Revoke``, ``Encrypt``, ``Decrypt`` and ``Rotate``; ``config["servers"]``
#: loopback sockets, ``config["workers"]`` processes forked on each (each runs the script's
#: ``serve_child(sock)``); the ports printed; the children stopped on SIGTERM.
PREFORK_TAIL = r"""
class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


app = falcon.App()
app.add_route("/v1/auth/realms/{realm}/token", Token())
app.add_route("/v1/auth/realms/{realm}/revoke", Revoke())
app.add_route("/v1/security/encrypt", Encrypt())
app.add_route("/v1/security/decrypt", Decrypt())
app.add_route("/v1/security/rotate", Rotate())
app.add_route("/healthz", Health())

sockets = []
for _ in range(config["servers"]):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sockets.append(sock)
children = []
for sock in sockets:
    for _ in range(config["workers"]):
        pid = os.fork()
        if pid == 0:
            serve_child(sock)
            os._exit(0)
        children.append(pid)
print(json.dumps([s.getsockname()[1] for s in sockets]), flush=True)


def stop(signum, frame):
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        os.waitpid(pid, 0)
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""

#: The envelope of both server scripts: key index (1 byte), version (4), nonce (12), then
#: the AES-GCM ciphertext, the 17-byte header and the request's aad authenticated. The
#: script gives ``names``, ``current[index]`` (the active version) and
#: ``cipher(index, version)`` (its AESGCM).
ENVELOPE = r"""
def seal(name, plaintext, aad):
    index = names.index(name)
    v = current[index]
    nonce = os.urandom(12)
    header = struct.pack(">BI", index, v) + nonce
    sealed = cipher(index, v).encrypt(nonce, plaintext, header + aad)
    return {"envelope": base64.b64encode(header + sealed).decode(), "key_id": f"{name}.{v}",
            "version": v}


def unseal(envelope, aad):
    raw = base64.b64decode(envelope)
    index, v = struct.unpack(">BI", raw[:5])
    header = raw[:17]
    plaintext = cipher(index, v).decrypt(raw[5:17], raw[17:], header + aad)
    return {"plaintext": base64.b64encode(plaintext).decode(), "key_id": f"{names[index]}.{v}",
            "version": v}


def aad_of(item):
    return base64.b64decode(item["aad"]) if item.get("aad") else b""
"""

_PEER_SERVER = r"""
import base64, hashlib, hmac, json, logging, os, secrets, signal, socket, struct, sys
import threading, urllib.parse
import multiprocessing as mp
import falcon, waitress
from argon2 import PasswordHasher, Type
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

logging.getLogger("waitress.queue").setLevel(logging.ERROR)
config = json.loads(sys.stdin.readline())
hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)
users = {u: hasher.hash(p) for u, p in config["users"]}
clients = {config["client"][0]: hashlib.sha256(config["client"][1].encode()).digest()}
names = config["keys"]
seed = os.urandom(32)

# Shared by every process (mapped before the fork).
current = mp.RawArray("i", [1] * len(names))  # the active version of each key
rotating = mp.Lock()
REVOKED_MAX = 1 << 16
revoked = mp.RawArray("c", REVOKED_MAX * 16)  # sha256(token)[:16] of each revoked token
revoked_count = mp.RawValue("i", 0)
revoking = mp.Lock()

# Per process.
ciphers = {}
seen = [0]
local_revoked = set()
local = threading.Lock()


def mac(value):
    return hmac.new(seed, value.encode(), "sha256").hexdigest()[:32]


def cipher(index, v):
    aead = ciphers.get((index, v))
    if aead is None:
        key = hmac.new(seed, f"{index}.{v}".encode(), "sha256").digest()
        aead = ciphers[(index, v)] = AESGCM(key)
    return aead


def is_revoked(token):
    n = revoked_count.value
    if n > seen[0]:
        with local:
            for i in range(seen[0], n):
                local_revoked.add(revoked[i * 16 : (i + 1) * 16])
            seen[0] = max(seen[0], n)
    return hashlib.sha256(token.encode()).digest()[:16] in local_revoked


def bearer(req, need):
    token = (req.get_header("Authorization") or "")[7:]
    body, _, tag = token.rpartition(".")
    if not hmac.compare_digest(mac(body), tag) or body.split(".")[0] not in need:
        raise falcon.HTTPUnauthorized()
    if is_revoked(token):
        raise falcon.HTTPUnauthorized()


class Token:
    def on_post(self, req, resp, realm):
        form = dict(urllib.parse.parse_qsl(req.bounded_stream.read().decode()))
        if form["grant_type"] == "password":
            try:
                hasher.verify(users[form["username"]], form["password"])
            except Exception:
                raise falcon.HTTPUnauthorized()
            kind = "user"
        else:
            digest = hashlib.sha256(form["client_secret"].encode()).digest()
            if not secrets.compare_digest(clients[form["client_id"]], digest):
                raise falcon.HTTPUnauthorized()
            kind = "client"
        body = f"{kind}.{secrets.token_urlsafe(32)}"
        token = f"{body}.{mac(body)}"
        resp.media = {"access_token": token, "token_type": "Bearer", "expires_in": 300}


class Revoke:
    def on_post(self, req, resp, realm):
        form = dict(urllib.parse.parse_qsl(req.bounded_stream.read().decode()))
        digest = hashlib.sha256(form["token"].encode()).digest()[:16]
        with revoking:
            i = revoked_count.value
            revoked[i * 16 : (i + 1) * 16] = digest
            revoked_count.value = i + 1
        resp.media = {"revoked": True}


class Encrypt:
    def on_post(self, req, resp):
        bearer(req, ("user",))
        body = json.loads(req.bounded_stream.read())
        resp.media = seal(body["key"], base64.b64decode(body["plaintext"]), aad_of(body))


class Decrypt:
    def on_post(self, req, resp):
        bearer(req, ("user",))
        body = json.loads(req.bounded_stream.read())
        if "items" in body:
            out = []
            for item in body["items"]:
                try:
                    out.append(unseal(item["envelope"], aad_of(item)))
                except (InvalidTag, IndexError, ValueError):
                    out.append({"error": {"code": "decryption_failed"}})
            resp.media = {"items": out}
            return
        try:
            resp.media = unseal(body["envelope"], aad_of(body))
        except InvalidTag:
            raise falcon.HTTPUnprocessableEntity()


class Rotate:
    def on_post(self, req, resp):
        bearer(req, ("client",))
        body = json.loads(req.bounded_stream.read())
        name = body.get("key") or body["key_id"].rsplit(".", 1)[0]
        index = names.index(name)
        with rotating:
            v = current[index]
            if "key_id" in body and body["key_id"] != f"{name}.{v}":
                raise falcon.HTTPConflict()
            v = current[index] = v + 1
        resp.media = {"key_id": f"{name}.{v}", "version": v, "name": name}


def serve_child(sock):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    waitress.serve(app, sockets=[sock], threads=config["threads"], ident="peer",
                   asyncore_use_poll=True, _quiet=True)
"""


@contextmanager
def peer_server(
    like: Target, workdir: Path, servers: int | None = None, workers: int | None = None
) -> Iterator[Target]:
    """The bare peer with the same users, client and key names as ``like``, and as many
    servers × workers (default: ``like``'s)."""
    with script_server("peer", _PEER_SERVER, {}, like, workdir, servers, workers) as target:
        yield target


@contextmanager
def script_server(
    name: str,
    script: str,
    config: dict[str, Any],
    like: Target,
    workdir: Path,
    servers: int | None = None,
    workers: int | None = None,
) -> Iterator[Target]:
    """Run ``script`` + :data:`ENVELOPE` + :data:`PREFORK_TAIL` as ``python -c`` with
    ``config`` (and ``like``'s users, client and key names, servers × workers, threads) on
    its stdin; once every port answers ``/healthz``, the target (log: ``<name>.log`` in
    ``workdir``). Stopped (SIGTERM, then SIGKILL) on exit."""
    servers = servers or len(like.urls)
    workers = workers or like.workers
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", script + ENVELOPE + PREFORK_TAIL],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
    )
    try:
        config = {**config, "users": like.users, "client": like.client}
        config |= {"keys": like.keys + like.rotated}
        config |= {"servers": servers, "workers": workers, "threads": THREADS}
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.close()
        line = proc.stdout.readline()  # the ports, once the sockets are bound
        if not line:
            raise LoadFailure(f"{name} did not start: {log.read_text()}")
        urls = [f"http://127.0.0.1:{port}" for port in json.loads(line)]
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                try:
                    if _call(url, "GET", "/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LoadFailure(f"{name} did not start: {log.read_text()}")
                time.sleep(0.1)
        yield Target(
            name,
            urls,
            like.realm,
            like.users,
            like.client,
            like.keys,
            like.rotated,
            workers,
            pids=[proc.pid],
        )
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
