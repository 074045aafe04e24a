"""The peer: a bare Falcon + waitress server implementing the same routes in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.load.common import THREADS, LoadFailure, Target
from bench.load.servers import _call
from bench.servers import free_port

# -- the peer --------------------------------------------------------------------------------

_PEER_SERVER = r"""
import base64, hashlib, json, logging, os, secrets, struct, sys, threading, urllib.parse
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
keys = {n: [AESGCM(AESGCM.generate_key(256))] for n in names}
tokens = {}
lock = threading.Lock()


def bearer(req, need):
    token = (req.get_header("Authorization") or "")[7:]
    if tokens.get(token) not in need:
        raise falcon.HTTPUnauthorized()


def seal(name, plaintext, aad):
    versions = keys[name]
    v = len(versions)
    aead = versions[v - 1]  # not versions[-1]: a rotation may append in between
    nonce = os.urandom(12)
    header = struct.pack(">BI", names.index(name), v) + nonce
    sealed = aead.encrypt(nonce, plaintext, header + aad)
    return {"envelope": base64.b64encode(header + sealed).decode(), "key_id": f"{name}.{v}",
            "version": v}


def unseal(envelope, aad):
    raw = base64.b64decode(envelope)
    index, v = struct.unpack(">BI", raw[:5])
    header = raw[:17]
    plaintext = keys[names[index]][v - 1].decrypt(raw[5:17], raw[17:], header + aad)
    return {"plaintext": base64.b64encode(plaintext).decode(), "key_id": f"{names[index]}.{v}",
            "version": v}


def aad_of(item):
    return base64.b64decode(item["aad"]) if item.get("aad") else b""


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
        token = secrets.token_urlsafe(32)
        tokens[token] = kind
        resp.media = {"access_token": token, "token_type": "Bearer", "expires_in": 300}


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
        with lock:
            versions = keys[name]
            if "key_id" in body and body["key_id"] != f"{name}.{len(versions)}":
                raise falcon.HTTPConflict()
            versions.append(AESGCM(AESGCM.generate_key(256)))
            v = len(versions)
        resp.media = {"key_id": f"{name}.{v}", "version": v, "name": name}


class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


app = falcon.App()
app.add_route("/v1/auth/realms/{realm}/token", Token())
app.add_route("/v1/security/encrypt", Encrypt())
app.add_route("/v1/security/decrypt", Decrypt())
app.add_route("/v1/security/rotate", Rotate())
app.add_route("/healthz", Health())
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=int(sys.argv[2]),
               ident="peer", asyncore_use_poll=True, _quiet=True)
"""


@contextmanager
def peer_server(like: Target, workdir: Path) -> Iterator[Target]:
    """The bare peer with the same users, client and key names as ``like``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _PEER_SERVER, str(port), str(THREADS)],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "peer.log").open("wb"),
    )
    try:
        config = {"users": like.users, "client": like.client, "keys": like.keys + like.rotated}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if _call(url, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LoadFailure(f"peer did not start: {(workdir / 'peer.log').read_text()}")
            time.sleep(0.1)
        yield Target("peer", url, like.realm, like.users, like.client, like.keys, like.rotated)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
