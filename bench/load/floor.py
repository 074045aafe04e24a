"""The durable floor: the peer's routes with qimem's durability, on qimem's stack.

The bare peer (``bench.load.peer``) keeps everything in shared memory. The floor is the
least a server can do and still keep qimem's promises on the same stack (Falcon +
waitress, SQLAlchemy Core + psycopg on PostgreSQL, PyJWT, argon2-cffi, cryptography), so
``qimem / floor`` is qimem's own overhead and ``floor / peer`` is the price of the
promises themselves:

- key versions live in PostgreSQL, wrapped under a root key; a rotation is one
  compare-and-swap ``UPDATE ... RETURNING``, one ``INSERT`` of the wrapped version and one
  ``pg_notify``, committed; every process keeps unwrapped versions in memory and learns of
  rotations and revocations by ``LISTEN``;
- access tokens are Ed25519 JWTs (verified once per token string, then cached, as qimem
  does); a revocation is an ``INSERT`` plus ``pg_notify``, committed;
- a password login claims a lockout attempt before hashing (one ``UPDATE ... RETURNING``,
  committed), verifies Argon2id at qimem's default cost, then resets the counter, stores a
  refresh token and its audit record in one transaction;
- a client login reads the client's secret digest and writes its audit record;
- every encrypt, decrypt and rotation leaves an audit record, buffered and written by one
  ``COPY`` every 0.5 s.

What it leaves out is everything else qimem does: realms, roles and permissions, MACs
over rows, the envelope format, usage bounds, metrics, access and request ids, error
mapping, plugins; and what only matters when things fail: the audit spill and its retries
(a failed ``COPY`` here loses its batch), the polling fallback when ``LISTEN`` drops,
locking an account out, audit records of refusals. A review put that skipped work at
2-5 % of its throughput; its one extra commit per login (the claim) goes the other way.
The bench checks its ciphertexts and its propagation, not its audit records. It is a
measuring stick, not a server anyone should run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.load.common import Target
from bench.load.peer import script_server
from bench.load.servers import fresh_database

_FLOOR_SERVER = r"""
import base64, hashlib, json, logging, os, secrets, signal, socket, struct, sys, threading
import time, urllib.parse, uuid
import falcon, jwt, psycopg, waitress
import sqlalchemy as sa
from argon2 import PasswordHasher, Type
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

logging.getLogger("waitress.queue").setLevel(logging.ERROR)
config = json.loads(sys.stdin.readline())
URL = config["url"]
hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)
names = config["keys"]
# qimem's login-flood bound (max_concurrent_hashes) when the run asks for it (0: none)
import contextlib
hash_slot = (threading.BoundedSemaphore(config["hash_slots"]) if config["hash_slots"]
             else contextlib.nullcontext())
root = AESGCM(os.urandom(32))
signing = Ed25519PrivateKey.generate()
public = signing.public_key()

SCHEMA = '''
CREATE TABLE users (name text PRIMARY KEY, hash text NOT NULL, kind text NOT NULL,
                    attempts int NOT NULL DEFAULT 0, locked_until float8 NOT NULL DEFAULT 0);
CREATE TABLE keys (name text PRIMARY KEY, version int NOT NULL);
CREATE TABLE key_versions (name text, version int, wrapped bytea NOT NULL,
                           PRIMARY KEY (name, version));
CREATE TABLE revoked (jti text PRIMARY KEY, expires float8 NOT NULL);
CREATE TABLE refresh (digest text PRIMARY KEY, name text NOT NULL, expires float8 NOT NULL);
CREATE TABLE audit (id bigserial PRIMARY KEY, at float8 NOT NULL, realm text NOT NULL,
                    actor text NOT NULL, action text NOT NULL, target text NOT NULL,
                    outcome text NOT NULL, detail text NOT NULL, record_id text UNIQUE);
CREATE INDEX audit_at ON audit (at);
'''


def wrap(name, version, material):
    nonce = os.urandom(12)
    return nonce + root.encrypt(nonce, material, f"{name}.{version}".encode())


def unwrap(name, version, wrapped):
    return root.decrypt(wrapped[:12], wrapped[12:], f"{name}.{version}".encode())


setup = sa.create_engine(URL)
with setup.begin() as conn:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.exec_driver_sql(statement)
    for u, p in config["users"]:
        conn.execute(sa.text("INSERT INTO users (name, hash, kind) VALUES (:n, :h, 'user')"),
                     {"n": u, "h": hasher.hash(p)})
    client, secret = config["client"]
    conn.execute(sa.text("INSERT INTO users (name, hash, kind) VALUES (:n, :h, 'client')"),
                 {"n": client, "h": hashlib.sha256(secret.encode()).hexdigest()})
    for name in names:
        conn.execute(sa.text("INSERT INTO keys VALUES (:n, 1)"), {"n": name})
        conn.execute(sa.text("INSERT INTO key_versions VALUES (:n, 1, :w)"),
                     {"n": name, "w": wrap(name, 1, os.urandom(32))})
setup.dispose()

CLAIM = sa.text("UPDATE users SET attempts = attempts + 1 WHERE name = :n AND kind = 'user' "
                "RETURNING hash, locked_until")
RESET = sa.text("UPDATE users SET attempts = 0 WHERE name = :n")
REFRESH = sa.text("INSERT INTO refresh VALUES (:d, :n, :e)")
CLIENT = sa.text("SELECT hash FROM users WHERE name = :n AND kind = 'client'")
AUDIT = sa.text("INSERT INTO audit (at, realm, actor, action, target, outcome, detail, "
                "record_id) VALUES (:at, :realm, :actor, :action, :target, :outcome, "
                ":detail, :record_id)")
REVOKE = sa.text("INSERT INTO revoked VALUES (:j, :e) ON CONFLICT DO NOTHING")
NOTIFY = sa.text("SELECT pg_notify(:c, :p)")
BUMP = sa.text("UPDATE keys SET version = version + 1 WHERE name = :n RETURNING version")
BUMP_IF = sa.text("UPDATE keys SET version = version + 1 WHERE name = :n AND version = :v "
                  "RETURNING version")
NEW_VERSION = sa.text("INSERT INTO key_versions VALUES (:n, :v, :w)")
VERSION = sa.text("SELECT wrapped FROM key_versions WHERE name = :n AND version = :v")
CURRENT = sa.text("SELECT name, version FROM keys")
REVOKED = sa.text("SELECT jti FROM revoked")
COLUMNS = ("at", "realm", "actor", "action", "target", "outcome", "detail", "record_id")

engine = None  # per process, made after the fork
current = {}  # key index -> its active version (ENVELOPE's current[index])
ciphers = {}
revoked = set()
verified = {}
audit_buffer = []
state = threading.Lock()


def audit_row(actor, action, target, outcome="success"):
    return {"at": time.time(), "realm": "load", "actor": actor, "action": action,
            "target": target, "outcome": outcome, "detail": "{}",
            "record_id": str(uuid.uuid4())}


def flusher():
    while True:
        time.sleep(0.5)
        with state:
            rows = audit_buffer[:]
            del audit_buffer[:]
        if not rows:
            continue
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            with raw.cursor().copy(f"COPY audit ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([row[c] for c in COLUMNS])


def listener():
    with psycopg.connect(URL.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        conn.execute("LISTEN keys")
        conn.execute("LISTEN revocations")
        for note in conn.notifies():
            if note.channel == "keys":
                name, _, v = note.payload.rpartition(".")
                advance(name, int(v))
            else:
                revoked.add(note.payload)


def cipher(index, v):
    aead = ciphers.get((index, v))
    if aead is None:
        name = names[index]
        with engine.connect() as conn:
            wrapped = conn.execute(VERSION, {"n": name, "v": v}).scalar_one()
        aead = ciphers[(index, v)] = AESGCM(unwrap(name, v, wrapped))
    return aead


def advance(name, v):  # version v of key name is the active one here, unless a newer one is
    index = names.index(name)
    with state:
        current[index] = max(current.get(index, 0), v)


def issue(subject, kind):
    now = int(time.time())
    claims = {"sub": subject, "kind": kind, "iat": now, "exp": now + 300,
              "jti": secrets.token_urlsafe(16), "aud": "qimem"}
    return jwt.encode(claims, signing, algorithm="EdDSA")


def claims_of(token):
    claims = verified.get(token)
    if claims is None or claims["exp"] <= time.time():
        try:
            claims = jwt.decode(token, public, algorithms=["EdDSA"], audience="qimem")
        except jwt.PyJWTError:
            raise falcon.HTTPUnauthorized()
        verified[token] = claims
    return claims


def bearer(req, kind):
    claims = claims_of((req.get_header("Authorization") or "")[7:])
    if claims["kind"] != kind or claims["jti"] in revoked:
        raise falcon.HTTPUnauthorized()
    return claims


def audited(actor, action, target):
    with state:
        audit_buffer.append(audit_row(actor, action, target))


class Token:
    def on_post(self, req, resp, realm):
        form = dict(urllib.parse.parse_qsl(req.bounded_stream.read().decode()))
        if form["grant_type"] == "password":
            name = form["username"]
            with engine.begin() as conn:  # the attempt counts before the hash is checked
                row = conn.execute(CLAIM, {"n": name}).first()
            try:
                if row is None or row.locked_until > time.time():
                    raise ValueError
                with hash_slot:
                    hasher.verify(row.hash, form["password"])
            except Exception:
                raise falcon.HTTPUnauthorized()
            refresh = secrets.token_urlsafe(32)
            with engine.begin() as conn:
                conn.execute(RESET, {"n": name})
                conn.execute(REFRESH, {"d": hashlib.sha256(refresh.encode()).hexdigest(),
                                       "n": name, "e": time.time() + 1800})
                conn.execute(AUDIT, audit_row(name, "login", name))
            resp.media = {"access_token": issue(name, "user"), "token_type": "Bearer",
                          "expires_in": 300, "refresh_token": refresh}
            return
        name = form["client_id"]
        with engine.begin() as conn:
            stored = conn.execute(CLIENT, {"n": name}).scalar()
            digest = hashlib.sha256(form["client_secret"].encode()).hexdigest()
            if stored is None or not secrets.compare_digest(stored, digest):
                raise falcon.HTTPUnauthorized()
            conn.execute(AUDIT, audit_row(name, "login", name))
        resp.media = {"access_token": issue(name, "client"), "token_type": "Bearer",
                      "expires_in": 300}


class Revoke:
    def on_post(self, req, resp, realm):
        form = dict(urllib.parse.parse_qsl(req.bounded_stream.read().decode()))
        try:
            claims = jwt.decode(form["token"], public, algorithms=["EdDSA"], audience="qimem")
        except jwt.PyJWTError:
            resp.media = {"revoked": False}
            return
        with engine.begin() as conn:
            conn.execute(REVOKE, {"j": claims["jti"], "e": claims["exp"]})
            conn.execute(NOTIFY, {"c": "revocations", "p": claims["jti"]})
            conn.execute(AUDIT, audit_row(claims["sub"], "token.revoke", claims["jti"]))
        revoked.add(claims["jti"])
        resp.media = {"revoked": True}


class Encrypt:
    def on_post(self, req, resp):
        claims = bearer(req, "user")
        body = json.loads(req.bounded_stream.read())
        resp.media = sealed = seal(body["key"], base64.b64decode(body["plaintext"]),
                                   aad_of(body))
        audited(claims["sub"], "crypto.encrypt", sealed["key_id"])


class Decrypt:
    def on_post(self, req, resp):
        claims = bearer(req, "user")
        body = json.loads(req.bounded_stream.read())
        if "items" in body:
            out = []
            for item in body["items"]:
                try:
                    out.append(unseal(item["envelope"], aad_of(item)))
                except (InvalidTag, IndexError, ValueError, KeyError):
                    out.append({"error": {"code": "decryption_failed"}})
            resp.media = {"items": out}
            audited(claims["sub"], "crypto.decrypt", "-")
            return
        try:
            resp.media = opened = unseal(body["envelope"], aad_of(body))
        except InvalidTag:
            raise falcon.HTTPUnprocessableEntity()
        audited(claims["sub"], "crypto.decrypt", opened["key_id"])


class Rotate:
    def on_post(self, req, resp):
        claims = bearer(req, "client")
        body = json.loads(req.bounded_stream.read())
        name = body.get("key") or body["key_id"].rsplit(".", 1)[0]
        with engine.begin() as conn:
            if "key_id" in body:
                v = conn.execute(BUMP_IF, {"n": name, "v": int(body["key_id"].rsplit(".", 1)[1])}
                                 ).scalar()
                if v is None:
                    raise falcon.HTTPConflict()
            else:
                v = conn.execute(BUMP, {"n": name}).scalar_one()
            conn.execute(NEW_VERSION, {"n": name, "v": v, "w": wrap(name, v, os.urandom(32))})
            conn.execute(NOTIFY, {"c": "keys", "p": f"{name}.{v}"})
        advance(name, v)
        audited(claims["sub"], "keys.rotate", f"{name}.{v}")
        resp.media = {"key_id": f"{name}.{v}", "version": v, "name": name}



def start_process():
    global engine
    engine = sa.create_engine(URL, pool_size=10, max_overflow=20)
    threading.Thread(target=listener, daemon=True).start()
    time.sleep(0.2)  # listening before the first read, so no change falls in between
    with engine.connect() as conn:
        current.update({names.index(r.name): r.version for r in conn.execute(CURRENT)})
        revoked.update(conn.execute(REVOKED).scalars())
    threading.Thread(target=flusher, daemon=True).start()


def serve_child(sock):
    def stop_child(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_child)
    start_process()
    try:
        waitress.serve(app, sockets=[sock], threads=config["threads"], ident="floor",
                       asyncore_use_poll=True, _quiet=True)
    except SystemExit:
        pass
    with state:  # the last records
        rows = audit_buffer[:]
    if rows:
        with engine.begin() as conn:
            conn.execute(AUDIT, rows)
"""


@contextmanager
def floor_server(
    like: Target,
    workdir: Path,
    admin_url: str,
    servers: int | None = None,
    workers: int | None = None,
    hash_slots: int = 0,
) -> Iterator[Target]:
    """The durable floor on a fresh database of ``admin_url``'s server, with the same
    users, client and key names as ``like``, and as many servers × workers.
    ``hash_slots``: at most that many password hashes at once per process (qimem's
    ``max_concurrent_hashes``, its login-flood bound); 0 = unbounded, like the peer."""
    with fresh_database(admin_url) as url:
        config = {"url": url, "hash_slots": hash_slots}
        with script_server("floor", _FLOOR_SERVER, config, like, workdir, servers, workers) as t:
            yield t
