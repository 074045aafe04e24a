"""Secret hygiene (issue 8, item 5): a full session with DEBUG logging and the audit log
on, then every log line, CLI output, HTTP response body and header, audit record and
exception repr is searched for the secrets used — root key, key material, passwords,
client secrets, tokens and plaintexts — in raw, hex and base64 forms. None may appear,
except a token in the response that issues it, a plaintext in the answer that decrypts it
and the data key in the datakey answer."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import secrets
import subprocess
import sys
import traceback
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from forge import tampered, wrong_key
from identity_helpers import serving

from qimem.app import AppContext
from qimem.cli import cli
from qimem.cli.qauth import qauth
from qimem.config import load_config
from qimem.errors import ConfigError, QimemError
from qimem.rootkey import read_root_key_file
from qimem.services import crypto as crypto_services
from qimem.services import identity as ids

# -- the reusable search ---------------------------------------------------------------


@dataclass(frozen=True)
class Haystack:
    """One place to search: ``location`` names it, ``allow`` names the secrets that may
    legitimately appear there (e.g. the token in the response that issued it)."""

    location: str
    text: str | bytes
    allow: frozenset[str] = field(default_factory=frozenset)


def secret_forms(secret: str | bytes) -> dict[str, bytes]:
    """The encodings a secret could leak in: raw, hex, base64 (standard, urlsafe, unpadded),
    and for text secrets also percent-encoded."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    forms = {
        "raw": raw,
        "hex": binascii.hexlify(raw),
        "HEX": binascii.hexlify(raw).upper(),
        "base64": base64.b64encode(raw),
        "base64-unpadded": base64.b64encode(raw).rstrip(b"="),
        "urlsafe-base64": base64.urlsafe_b64encode(raw),
        "urlsafe-base64-unpadded": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }
    if isinstance(secret, str):
        forms["percent-encoded"] = urllib.parse.quote_plus(secret).encode("ascii")
        forms["json-escaped"] = json.dumps(secret)[1:-1].encode("utf-8")
    # An encoding that changes nothing is reported as raw.
    return {name: blob for name, blob in forms.items() if name == "raw" or blob != raw}


def find_secrets(haystacks: Iterable[Haystack], named: dict[str, str | bytes]) -> list[str]:
    """Every (secret, form, location) found, as lines that name but never show the secret."""
    forms = {name: secret_forms(value) for name, value in named.items()}
    found: list[str] = []
    for hay in haystacks:
        text = hay.text if isinstance(hay.text, bytes) else hay.text.encode("utf-8", "replace")
        for name, encodings in forms.items():
            if name in hay.allow:
                continue
            hits = sorted({form for form, blob in encodings.items() if blob and blob in text})
            if hits:
                found.append(f"{name} ({'/'.join(hits)}) in {hay.location}")
    return found


def test_find_secrets_finds_each_planted_form() -> None:
    """Control: the helper finds a planted secret in every form, honours ``allow``, and its
    report names the secret without showing it."""
    key = secrets.token_bytes(32)
    password = "Pw-" + secrets.token_hex(8)
    for form, blob in secret_forms(key).items():
        hay = Haystack(f"planted-{form}", b"prefix " + blob + b" suffix")
        report = find_secrets([hay], {"the-key": key})
        assert report and report[0].startswith("the-key (") and form in report[0], form
        assert all(blob.decode("latin-1") not in line for line in report)
    text_hay = Haystack("log", f"user logged in with password={password}!")
    assert find_secrets([text_hay], {"pw": password}) == ["pw (raw) in log"]
    encoded = Haystack("form", "password=" + urllib.parse.quote_plus(password + "&x"))
    assert find_secrets([encoded], {"pw": password + "&x"})
    assert find_secrets([Haystack("ok", text_hay.text, frozenset({"pw"}))], {"pw": password}) == []
    assert find_secrets([Haystack("clean", "nothing here")], {"pw": password, "k": key}) == []


# -- capture ---------------------------------------------------------------------------


class Capture(logging.Handler):
    """Every record at any level, formatted with its traceback and its extra attributes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record) + " " + repr(vars(record)))
        except Exception as exc:  # noqa: BLE001 - a broken record is itself evidence
            self.lines.append(f"unformattable record {record.name}: {exc!r}")


@dataclass
class Session:
    """Everything captured during the session, plus the secrets it used."""

    hay: list[Haystack] = field(default_factory=list)
    secrets: dict[str, str | bytes] = field(default_factory=dict)
    issued: set[str] = field(default_factory=set)  # names of token secrets (excluded per answer)

    def cli(self, group: Any, *args: str, input: Any = None, allow: Iterable[str] = ()) -> Result:  # noqa: A002
        result = CliRunner().invoke(group, list(args), input=input)
        where = f"cli {group.name} {' '.join(args[:3])}"
        allowed = frozenset(allow)
        self.hay.append(Haystack(where + " stdout", result.stdout_bytes, allowed))
        self.hay.append(Haystack(where + " stderr", result.stderr_bytes, allowed))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            self.exception(where, result.exception)
        return result

    def exception(self, where: str, exc: BaseException) -> None:
        text = "\n".join(
            [repr(exc), str(exc), *traceback.format_exception(type(exc), exc, exc.__traceback__)]
        )
        self.hay.append(Haystack(f"exception {where}: {type(exc).__name__}", text))

    def http(
        self,
        method: str,
        url: str,
        *,
        allow: Iterable[str] = (),
        **kwargs: Any,
    ) -> requests.Response:
        response = requests.request(method, url, timeout=20, **kwargs)
        where = f"http {method} {urllib.parse.urlsplit(url).path} -> {response.status_code}"
        allowed = frozenset(allow)
        self.hay.append(Haystack(where + " body", response.content, allowed))
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.hay.append(Haystack(where + " headers", headers, allowed))
        return response

    def tokens(self, label: str, response: requests.Response) -> dict[str, Any]:
        """Record the tokens of a successful grant as secrets; this answer may hold them."""
        assert response.status_code == 200, (label, response.status_code)
        body = response.json()
        names = []
        for kind in ("access_token", "refresh_token"):
            if kind in body:
                name = f"{label}.{kind}"
                self.secrets[name] = body[kind]
                names.append(name)
        # The answer that issued them is the one place they belong.
        last = self.hay[-2]
        self.hay[-2] = Haystack(last.location, last.text, last.allow | frozenset(names))
        return body


def _plain(label: str, session: Session) -> bytes:
    """A distinctive random plaintext (24 random bytes, hex-encoded), recorded as a secret."""
    value = secrets.token_hex(24).encode("ascii")
    session.secrets[label] = value
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def debug_everything(saved: dict[str, tuple[int, bool]]) -> None:
    """DEBUG on every logger that exists now, including those libraries quiet by default
    (SQLAlchemy sets its own to WARNING); the old levels go into ``saved``."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            saved.setdefault(name, (logger.level, logger.disabled))
            logger.setLevel(logging.DEBUG)
            logger.disabled = False


@pytest.fixture
def capture(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Capture, dict[str, Any]]]:
    root = logging.getLogger()
    handler = Capture()
    old_level = root.level
    saved: dict[str, tuple[int, bool]] = {}
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    debug_everything(saved)
    try:
        yield handler, saved
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for name, (level, disabled) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.disabled = disabled


# -- the session -----------------------------------------------------------------------

ADMIN_PASSWORD = "Adm-" + secrets.token_hex(10)
ALICE_PASSWORD = "Alc-" + secrets.token_hex(10)
MALLORY_PASSWORD = "Mal-" + secrets.token_hex(10)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_full_session_leaks_no_secret(
    store: str,
    request: pytest.FixtureRequest,
    qimem_home: Path,
    tmp_path: Path,
    capture: tuple[Capture, dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler, saved = capture
    s = Session()
    s.secrets.update(
        admin_password=ADMIN_PASSWORD,
        alice_password=ALICE_PASSWORD,
        mallory_password=MALLORY_PASSWORD,
        wrong_password="Wrong-" + secrets.token_hex(10),
    )
    # -- CLI: init, realm, users, client, keys, encrypt/decrypt ---------------------------
    debug_everything(saved)  # loggers the CLI modules created on import
    store_args = ["--store", request.getfixturevalue("postgres_url")] if store == "postgres" else []
    init = s.cli(
        cli, *store_args, "init", "--admin-password-stdin", "--json", input=ADMIN_PASSWORD + "\n"
    )
    assert init.exit_code == 0, init.stderr
    config_path = qimem_home / "config.toml"
    with config_path.open("a") as fh:
        fh.write(
            "\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\nlockout_threshold = 3\n"
        )
    config = load_config(config_path)
    assert config.root_key_file is not None
    assert config.store_url.startswith("postgresql" if store == "postgres" else "sqlite")
    root_key = bytes(read_root_key_file(Path(config.root_key_file)))
    s.secrets["root_key"] = root_key

    assert s.cli(qauth, "realm", "create", "acme", "--json").exit_code == 0
    for user, password, roles in (
        ("alice", ALICE_PASSWORD, ("key-manager", "encryptor", "auditor")),
        ("mallory", MALLORY_PASSWORD, ("encryptor",)),
    ):
        role_args = [a for r in roles for a in ("--role", r)]
        added = s.cli(
            qauth,
            "user",
            "add",
            "--realm",
            "acme",
            user,
            *role_args,
            "--password-stdin",
            "--json",
            input=password + "\n",
        )
        assert added.exit_code == 0, added.stderr
    client = s.cli(
        qauth,
        "client",
        "create",
        "--realm",
        "acme",
        "batch",
        "--role",
        "encryptor",
        "--json",
        allow=["client_secret"],
    )
    assert client.exit_code == 0, client.stderr
    client_secret = json.loads(client.stdout)["client_secret"]
    s.secrets["client_secret"] = client_secret

    key_ids: list[tuple[str, str]] = []  # (realm, key_id)
    made = s.cli(cli, "--realm", "acme", "keys", "create", "--name", "k1", "--json")
    assert made.exit_code == 0, made.stderr
    key_ids.append(("acme", json.loads(made.stdout)["key_id"]))
    rotated = s.cli(cli, "--realm", "acme", "keys", "rotate", "k1", "--json")
    assert rotated.exit_code == 0, rotated.stderr
    key_ids.append(("acme", json.loads(rotated.stdout)["key_id"]))
    master = s.cli(cli, "keys", "create", "--name", "m1", "--json")
    assert master.exit_code == 0, master.stderr
    key_ids.append(("master", json.loads(master.stdout)["key_id"]))

    stdin_plain = _plain("cli_stdin_plaintext", s)
    sealed = s.cli(
        cli, "--realm", "acme", "encrypt", "--key", "k1", "--aad", "ctx-1", input=stdin_plain
    )
    assert sealed.exit_code == 0, sealed.stderr
    opened = s.cli(
        cli,
        "--realm",
        "acme",
        "decrypt",
        "--aad",
        "ctx-1",
        input=sealed.stdout_bytes,
        allow=["cli_stdin_plaintext"],
    )
    assert opened.exit_code == 0 and opened.stdout_bytes == stdin_plain, opened.stderr
    wrong_aad = s.cli(
        cli, "--realm", "acme", "decrypt", "--aad", "ctx-2", input=sealed.stdout_bytes
    )
    assert wrong_aad.exit_code != 0
    bad = bytearray(sealed.stdout_bytes)
    bad[-3] ^= 0x01
    tampered_cli = s.cli(cli, "--realm", "acme", "decrypt", "--aad", "ctx-1", input=bytes(bad))
    assert tampered_cli.exit_code != 0

    file_plain = _plain("cli_file_plaintext", s)
    work = tmp_path / "work"
    work.mkdir()
    (work / "doc.txt").write_bytes(file_plain)
    enc = s.cli(cli, "--realm", "acme", "encrypt", "--key", "k1", "-q", str(work / "doc.txt"))
    assert enc.exit_code == 0, enc.stderr
    (work / "doc.txt").unlink()
    dec = s.cli(cli, "--realm", "acme", "decrypt", "-q", "--json", str(work / "doc.txt.qimem"))
    assert dec.exit_code == 0 and (work / "doc.txt").read_bytes() == file_plain, dec.stderr
    (work / "doc.txt").unlink()
    blob = bytearray((work / "doc.txt.qimem").read_bytes())
    blob[-5] ^= 0x01
    (work / "doc.txt.qimem").write_bytes(bytes(blob))
    dec_bad = s.cli(cli, "--realm", "acme", "decrypt", "-q", str(work / "doc.txt.qimem"))
    assert dec_bad.exit_code != 0 and not (work / "doc.txt").exists()

    cli_token = s.cli(
        qauth,
        "token",
        "--realm",
        "acme",
        "--user",
        "alice",
        "--password-stdin",
        input=ALICE_PASSWORD + "\n",
        allow=["cli.access_token"],
    )
    assert cli_token.exit_code == 0, cli_token.stderr
    s.secrets["cli.access_token"] = cli_token.stdout.strip()

    # -- HTTP on a real waitress server ------------------------------------------------
    app = AppContext(load_config(config_path)).open()
    try:
        with serving(app, max_body_bytes=64 * 1024) as url:
            debug_everything(saved)  # the server quiets waitress.queue when it starts
            _http_session(s, url, key_ids)
        # The realms' token signing keys (Ed25519 private bytes) are key bytes too.
        for realm in ("acme", "master"):
            kid, private = ids.identity(app).tokens._signing_key(realm)
            s.secrets[f"signing key {realm}/{kid}"] = private.private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()
            )
        for realm, key_id in key_ids:
            material = app.store.material(realm, key_id)
            s.secrets[f"material {realm}/{key_id}"] = bytes(material)
            material[:] = bytes(len(material))
        # Errors raised in-process: their repr, str and traceback are searched too.
        sealed_http = crypto_services.encrypt(app, "k1", b"x" + stdin_plain, realm="acme")
        s.secrets["inproc_plaintext"] = b"x" + stdin_plain
        broken = bytearray(sealed_http.envelope)
        broken[-1] ^= 0x01
        for where, call in (
            ("tampered", lambda: crypto_services.decrypt(app, bytes(broken), realm="acme")),
            (
                "wrong aad",
                lambda: crypto_services.decrypt(app, sealed_http.envelope, aad=b"z", realm="acme"),
            ),
            (
                "locked user",  # mallory's right password, refused while she is locked out
                lambda: ids.token(
                    app,
                    "acme",
                    {"grant_type": "password", "username": "mallory", "password": MALLORY_PASSWORD},
                ),
            ),
            (
                "unknown key",
                lambda: crypto_services.encrypt(app, "nope", stdin_plain, realm="acme"),
            ),
            (
                "wrong password",
                lambda: ids.token(
                    app,
                    "acme",
                    {"grant_type": "password", "username": "alice", "password": MALLORY_PASSWORD},
                ),
            ),
            (
                "forged token",
                lambda: ids.authenticate(app, wrong_key(s.secrets["cli.access_token"])),
            ),  # type: ignore[arg-type]
        ):
            with pytest.raises(QimemError) as info:
                call()
            s.exception(where, info.value)
    finally:
        ids.close_identity(app)
        app.close()

    # Audit records, read back after the server flushed its buffer.
    for realm in ("acme", "master"):
        audit = s.cli(qauth, "audit", "--realm", realm, "--limit", "1000", "--json")
        assert audit.exit_code == 0, audit.stderr
        assert json.loads(audit.stdout), realm

    # A wrong root key: in-process (ConfigError) and in a subprocess (its stderr).
    other = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(ConfigError) as wrong_root:
        wrong = AppContext(
            dataclasses.replace(config, root_key_b64=other, root_key_file=None)
        ).open()
        try:
            crypto_services.decrypt(wrong, sealed_http.envelope, realm="acme")
        finally:
            wrong.close()
    s.exception("wrong root key", wrong_root.value)
    env = {**os.environ, "QIMEM_ROOT_KEY": other, "QIMEM_HOME": str(qimem_home)}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "qimem"),
            "--realm",
            "acme",
            "decrypt",
            "--aad",
            "ctx-1",
        ],
        input=sealed.stdout_bytes,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ConfigError.exit_code, proc.returncode
    assert b"root key does not match" in proc.stderr and b"Traceback" not in proc.stderr
    s.hay.append(Haystack("subprocess wrong root key stdout", proc.stdout))
    s.hay.append(Haystack("subprocess wrong root key stderr", proc.stderr))

    # -- search ------------------------------------------------------------------------
    s.hay += [Haystack(f"log line {i}", line) for i, line in enumerate(handler.lines)]
    s.hay.append(Haystack("caplog", caplog.text))
    assert len(handler.lines) > 50, "DEBUG logging captured suspiciously little"
    assert any("qimem.server.access" in line for line in handler.lines), "no access log"
    # Positive control on the real haystacks: each secret that legitimately appears somewhere
    # (issued tokens, decrypted plaintexts, the data key, the client secret) is found there
    # when its exemption is lifted, so the capture and the search really see the traffic.
    unexempt = [Haystack(h.location, h.text) for h in s.hay if h.allow]
    expected = {name for h in s.hay for name in h.allow}
    seen = {line.split(" (")[0] for line in find_secrets(unexempt, s.secrets)}
    assert expected <= seen, sorted(expected - seen)
    assert {"cli.access_token", "datakey", "http_plaintext", "client.access_token"} <= expected
    print(f"searched {len(s.hay)} haystacks for {len(s.secrets)} secrets")
    leaks = find_secrets(s.hay, s.secrets)
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


def _http_session(s: Session, url: str, key_ids: list[tuple[str, str]]) -> None:
    auth = f"{url}/v1/auth/realms"
    form = s.http(
        "POST",
        f"{auth}/acme/token",
        data={"grant_type": "password", "username": "alice", "password": ALICE_PASSWORD},
    )
    alice = s.tokens("alice-form", form)
    as_json = s.http(
        "POST",
        f"{auth}/acme/token",
        json={"grant_type": "password", "username": "alice", "password": ALICE_PASSWORD},
    )
    s.tokens("alice-json", as_json)
    refreshed = s.tokens(
        "alice-refreshed",
        s.http(
            "POST",
            f"{auth}/acme/token",
            data={"grant_type": "refresh_token", "refresh_token": alice["refresh_token"]},
        ),
    )
    service = s.tokens(
        "client",
        s.http(
            "POST",
            f"{auth}/acme/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "batch",
                "client_secret": s.secrets["client_secret"],
            },
        ),
    )
    admin = s.tokens(
        "admin",
        s.http(
            "POST",
            f"{auth}/master/token",
            json={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        ),
    )
    bearer = {"Authorization": f"Bearer {refreshed['access_token']}"}
    intro = s.http(
        "POST", f"{auth}/acme/introspect", data={"token": service["access_token"]}, headers=bearer
    )
    assert intro.status_code == 200 and intro.json()["active"] is True

    # Crypto over HTTP.
    sec = f"{url}/v1/security"
    created = s.http("POST", f"{sec}/keys", json={"name": "h1"}, headers=bearer)
    assert created.status_code == 201
    key_ids.append(("acme", created.json()["key_id"]))
    http_plain = _plain("http_plaintext", s)
    enc = s.http(
        "POST",
        f"{sec}/encrypt",
        json={"key": "h1", "plaintext": b64(http_plain), "aad": b64(b"a1")},
        headers=bearer,
    )
    assert enc.status_code == 200
    envelope = enc.json()["envelope"]
    dec = s.http(
        "POST",
        f"{sec}/decrypt",
        json={"envelope": envelope, "aad": b64(b"a1")},
        headers=bearer,
        allow=["http_plaintext"],
    )
    assert dec.status_code == 200 and base64.b64decode(dec.json()["plaintext"]) == http_plain
    rot = s.http("POST", f"{sec}/rotate", json={"key": "h1"}, headers=bearer)
    assert rot.status_code == 200, rot.text
    key_ids.append(("acme", rot.json()["key_id"]))
    rewrapped = s.http(
        "POST", f"{sec}/rewrap", json={"envelope": envelope, "aad": b64(b"a1")}, headers=bearer
    )
    assert rewrapped.status_code == 200
    dk = s.http("POST", f"{sec}/datakey", json={"key": "h1"}, headers=bearer, allow=["datakey"])
    assert dk.status_code == 200
    s.secrets["datakey"] = base64.b64decode(dk.json()["plaintext_key"])

    # Errors of every kind; each answer is searched (none of them may echo a secret).
    raw = bytearray(base64.b64decode(envelope))
    raw[-1] ^= 0x01
    other_plain = _plain("http_error_plaintext", s)
    errors: list[tuple[str, int, str, dict[str, Any]]] = [
        (
            "decrypt",
            422,
            "decryption_failed",
            {"json": {"envelope": b64(bytes(raw)), "aad": b64(b"a1")}},
        ),
        (
            "decrypt",
            422,
            "decryption_failed",
            {"json": {"envelope": envelope, "aad": b64(b"wrong")}},
        ),
        (
            "encrypt",
            400,
            "invalid_base64",
            {"json": {"key": "h1", "plaintext": other_plain.decode() + "!!"}},
        ),
        (
            "encrypt",
            404,
            "not_found",
            {"json": {"key": "no-such-key", "plaintext": b64(other_plain)}},
        ),
        (
            "encrypt",
            400,
            "invalid_json",
            {
                "data": b'{"key": "h1", "plaintext": "' + base64.b64encode(other_plain) + b'",',
                "headers": {"Content-Type": "application/json"},
            },
        ),
        (
            "encrypt",
            413,
            "payload_too_large",
            {"json": {"key": "h1", "plaintext": b64(other_plain * 3000)}},
        ),
    ]
    for path, status, code, kwargs in errors:
        headers = {**bearer, **kwargs.pop("headers", {})}
        answer = s.http("POST", f"{sec}/{path}", headers=headers, **kwargs)
        assert answer.status_code == status, (path, answer.status_code)
        assert answer.json()["error"]["code"] == code, (path, code)
    forged = {
        "forged.expired": tampered(refreshed["access_token"], exp=1),
        "forged.wrong_key": wrong_key(refreshed["access_token"]),
    }
    s.secrets.update(forged)
    for token in forged.values():
        refused = s.http(
            "POST",
            f"{sec}/encrypt",
            json={"key": "h1", "plaintext": b64(other_plain)},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert refused.status_code == 401
    wrong = s.http(
        "POST",
        f"{auth}/acme/token",
        data={
            "grant_type": "password",
            "username": "alice",
            "password": s.secrets["wrong_password"],
        },
    )
    assert wrong.status_code == 401
    # mallory is locked out after repeated failures; then even her right password fails.
    for _ in range(3):
        failed = s.http(
            "POST",
            f"{auth}/acme/token",
            json={"grant_type": "password", "username": "mallory", "password": ALICE_PASSWORD},
        )
        assert failed.status_code == 401
    locked = s.http(
        "POST",
        f"{auth}/acme/token",
        json={"grant_type": "password", "username": "mallory", "password": MALLORY_PASSWORD},
    )
    assert locked.status_code in (401, 403, 429), locked.status_code
    bad_client = s.http(
        "POST",
        f"{auth}/acme/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "batch",
            "client_secret": s.secrets["client_secret"] + "x",
        },
    )
    assert bad_client.status_code == 401

    # Revocation, then the revoked refresh token is refused.
    revoked = s.http("POST", f"{auth}/acme/revoke", data={"token": refreshed["refresh_token"]})
    assert revoked.status_code == 200
    replay = s.http(
        "POST",
        f"{auth}/acme/token",
        data={"grant_type": "refresh_token", "refresh_token": refreshed["refresh_token"]},
    )
    assert replay.status_code in (400, 401)

    # The audit log over HTTP, for both realms.
    for realm, token in (("acme", refreshed["access_token"]), ("master", admin["access_token"])):
        audit = s.http(
            "GET",
            f"{auth}/{realm}/audit",
            params={"limit": 1000},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert audit.status_code == 200, (realm, audit.status_code)
