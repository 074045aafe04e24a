"""The ``qimem`` root-key provider (auto-unseal through another qimem server) against a
real upstream ``qimem serve`` (one per module, :mod:`root_qimem_helpers`): attacks and
failures first (upstream down or hanging, refused or revoked tokens, wrong key or realm,
tampered and foreign blobs, malformed answers, credential files others can read, secrets
in messages), then TLS, round trips, rotation upstream, threads and fork."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from identity_helpers import serving_wsgi
from pg_instance import free_port
from root_qimem_helpers import (
    OTHER_KEY,
    ROOT_KEY,
    Upstream,
    fresh_login,
    hanging_server,
    upstream,
)
from serve_process import wait_for

from qimem import envelope
from qimem.builtin_plugins.root_qimem_provider import QimemRootKeyProvider
from qimem.errors import ConfigError, DecryptionError
from qimem.root.provider import KWK_SIZE, RootKeyProvider, kwk_context
from qimem.testing_rootkey import RootKeyProviderContract

CONTEXT = kwk_context("keyring-under-test", 1)
KWK = bytes(range(KWK_SIZE))


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with upstream(tmp_path_factory.mktemp("upstream")) as found:
        yield found


@pytest.fixture(scope="module")
def sealed(up: Upstream) -> bytes:
    """KWK wrapped by the service account's provider under CONTEXT."""
    provider = up.provider()
    try:
        return provider.wrap(KWK, CONTEXT)
    finally:
        provider.close()


def refused(call: Any, *args: Any, error: type[Exception] = ConfigError) -> str:
    with pytest.raises(error) as caught:
        call(*args)
    return str(caught.value)


# ---- the upstream cannot be reached: a startup error, bounded by the timeout ------------


def test_upstream_down_is_a_quick_config_error(up: Upstream, sealed: bytes) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    provider = up.provider(url=url, timeout=3)
    started = time.monotonic()
    message = refused(provider.wrap, KWK, CONTEXT)
    assert message.startswith(f"the qimem root provider cannot reach {url} (")
    assert "ConnectionRefusedError" in message
    refused(provider.unwrap, sealed, CONTEXT)
    assert time.monotonic() - started < 3


def test_upstream_that_never_answers_fails_within_the_timeout(up: Upstream) -> None:
    with hanging_server() as url:
        provider = up.provider(url=url, timeout=1)
        started = time.monotonic()
        message = refused(provider.wrap, KWK, CONTEXT)
        assert 0.9 < time.monotonic() - started < 4
    assert f"cannot reach {url}" in message and "TimeoutError" in message


def test_unknown_host_is_a_config_error(up: Upstream) -> None:
    provider = up.provider(url="https://no-such-host.invalid:8443")
    assert "cannot reach https://no-such-host.invalid:8443" in refused(provider.wrap, KWK, CONTEXT)


@pytest.mark.parametrize(
    "status,body,expected",
    [
        ("200 OK", b"not json", "not JSON"),
        ("200 OK", b'["a list"]', "unexpected"),
        ("200 OK", b'{"envelope": 42, "key_id": "x"}', "without a valid envelope"),
        ("200 OK", b'{"envelope": "!!", "key_id": "x"}', "without a valid envelope"),
        ("200 OK", b'{"envelope": "UU1FVg==", "key_id": "x"}', "malformed envelope"),
        ("200 OK", b"x" * (2 * 1024 * 1024), "more than"),
        ("500 Internal Server Error", b'{"error": {"code": "boom", "message": "m"}}', "failed"),
        ("503 Service Unavailable", b"", "failed"),
        ("302 Found", b"", "redirect"),
        ("418 I'm a teapot", b"<html>", "HTTP 418"),
    ],
)
def test_unexpected_answers_are_config_errors(
    up: Upstream, status: str, body: bytes, expected: str
) -> None:
    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(status, headers + [("Location", "https://evil.example/x?token=1")])
        return [body]

    with serving_wsgi(wsgi) as url:
        provider = up.provider(url=url)
        message = refused(provider.wrap, KWK, CONTEXT)
    assert expected in message and url in message
    assert "evil.example/x" not in message


# ---- credentials refused ----------------------------------------------------------------


def test_token_without_the_permission(up: Upstream) -> None:
    message = refused(up.provider("reader").wrap, KWK, CONTEXT)
    assert "lacks crypto:encrypt and crypto:decrypt on the key 'root-kwk'" in message


def test_service_account_scoped_to_another_key(up: Upstream) -> None:
    message = refused(up.provider(key=OTHER_KEY).wrap, KWK, CONTEXT)
    assert "lacks crypto:encrypt and crypto:decrypt on the key 'other-kwk'" in message


def test_revoked_token(up: Upstream, sealed: bytes) -> None:
    token = fresh_login(up, "crypto")
    provider = up.provider(token)
    provider.wrap(KWK, CONTEXT)
    revoked = up.api("POST", "/v1/auth/realms/master/revoke", data={"token": token})
    assert revoked.status_code == 200, revoked.text
    message = refused(provider.wrap, KWK, CONTEXT)
    assert "refused the token (expired, revoked" in message
    refused(provider.unwrap, sealed, CONTEXT)
    assert token not in message


def test_garbage_token_and_wrong_client_secret(up: Upstream) -> None:
    assert "refused the token" in refused(up.provider("qat_not-a-token").wrap, KWK, CONTEXT)
    settings = up.client_settings(secret_file=str(up.write("qcs_wrong")))
    provider = QimemRootKeyProvider.from_settings(settings, up.workdir)
    message = refused(provider.wrap, KWK, CONTEXT)
    assert "refused the login of service account 'unseal' in realm 'master'" in message


def test_wrong_key_and_wrong_realm(up: Upstream) -> None:
    assert "has no key 'no-such-key'" in refused(
        up.provider("crypto", key="no-such-key").wrap, KWK, CONTEXT
    )
    message = refused(up.provider("crypto", realm="nowhere").wrap, KWK, CONTEXT)
    assert "realm" in message and "nowhere" in message


def test_key_of_another_purpose(up: Upstream) -> None:
    message = refused(up.provider("crypto", key="signer").wrap, KWK, CONTEXT)
    assert f"{up.url} refused the request (wrong_purpose): key signer is a sign key" in message


def test_token_file_renewed_by_someone_else(up: Upstream, sealed: bytes) -> None:
    """A 401 makes the provider read its token file again (an agent may renew it)."""
    token = fresh_login(up, "crypto")
    settings = up.settings(token)
    provider = QimemRootKeyProvider.from_settings(settings, up.workdir)
    assert provider.unwrap(sealed, CONTEXT) == KWK
    up.ok("POST", "/v1/auth/realms/master/revoke", data={"token": token})
    assert "refused the token" in refused(provider.unwrap, sealed, CONTEXT)
    path = Path(settings["token_file"])
    path.write_text(up.service_token() + "\n")
    assert provider.unwrap(sealed, CONTEXT) == KWK


def test_disabled_upstream_version_is_a_config_error(up: Upstream) -> None:
    """The upstream admin disabled the version that sealed the KWK: not a damaged blob,
    a root that cannot be used (its lifecycle code is named)."""
    provider = up.provider("crypto", key="retired-kwk")
    blob = provider.wrap(KWK, CONTEXT)
    first = envelope.parse(blob[1:]).key_id_str  # the version that sealed it
    up.ok("POST", "/v1/security/rotate", json={"key": "retired-kwk"})
    up.ok("POST", f"/v1/security/keys/{first}/disable")
    message = refused(provider.unwrap, blob, CONTEXT)
    assert "refused the request (key_disabled)" in message
    assert provider.unwrap(provider.wrap(KWK, CONTEXT), CONTEXT) == KWK  # the new version


# ---- blobs that must not unwrap ---------------------------------------------------------


def test_tampered_blob(up: Upstream, sealed: bytes) -> None:
    provider = up.provider()
    damaged = [
        b"",
        sealed[:1],
        bytes([2]) + sealed[1:],
        sealed[:-1],
        sealed + b"\x00",
        sealed[:1] + b"QIMX" + sealed[5:],
    ]
    for index in (8, 30, len(sealed) // 2, len(sealed) - 1):  # header, nonce, body, tag
        flipped = bytearray(sealed)
        flipped[index] ^= 0x01
        damaged.append(bytes(flipped))
    for blob in damaged:
        refused(provider.unwrap, blob, CONTEXT, error=DecryptionError)
    assert provider.unwrap(sealed, CONTEXT) == KWK


def test_wrong_context(up: Upstream, sealed: bytes) -> None:
    provider = up.provider()
    for context in (kwk_context("keyring-under-test", 2), kwk_context("another", 1), b""):
        message = refused(provider.unwrap, sealed, context, error=DecryptionError)
        assert "does not unwrap under the key 'root-kwk'" in message


def test_blob_of_another_upstream_key(up: Upstream) -> None:
    """Sealed by ``other-kwk`` with the provider's own format and context: a token that may
    decrypt it still refuses it (it is not the configured key's); the service account,
    scoped to root-kwk, too; and a key the upstream does not have at all."""
    foreign = up.provider("crypto", key=OTHER_KEY).wrap(KWK, CONTEXT)
    assert up.provider("crypto", key=OTHER_KEY).unwrap(foreign, CONTEXT) == KWK
    message = refused(up.provider("crypto").unwrap, foreign, CONTEXT, error=DecryptionError)
    assert "does not unwrap under the key 'root-kwk'" in message  # the aad names the key
    message = refused(up.provider().unwrap, foreign, CONTEXT, error=DecryptionError)
    assert "was not sealed by the key 'root-kwk'" in message and "answered forbidden" in message
    unknown = bytearray(foreign)
    unknown[7:23] = os.urandom(16)  # the envelope's key id: a key the upstream never had
    for who, code in (("crypto", "not_found"), (None, "forbidden")):
        message = refused(up.provider(who).unwrap, bytes(unknown), CONTEXT, error=DecryptionError)
        assert (
            f"was not sealed by the key 'root-kwk' of {up.url} (the upstream answered {code})"
            in message
        )


def test_upstream_answers_a_key_of_the_wrong_size(up: Upstream) -> None:
    """A blob of the right format whose plaintext is not 32 bytes (made by someone who may
    encrypt with the root key): refused after the upstream opened it."""
    provider = up.provider()
    for size in (0, 16, 33):
        made = up.ok(
            "POST",
            "/v1/security/encrypt",
            "crypto",
            json={
                "key": ROOT_KEY,
                "plaintext": base64.b64encode(bytes(size)).decode(),
                "aad": base64.b64encode(provider._aad(CONTEXT)).decode(),
            },
        )
        blob = bytes([1]) + base64.b64decode(made["envelope"])
        message = refused(provider.unwrap, blob, CONTEXT, error=DecryptionError)
        assert f"unwrapped {size} bytes" in message


# ---- settings and credential files ------------------------------------------------------


def test_token_file_readable_by_others_is_refused(up: Upstream) -> None:
    for mode in (0o644, 0o640, 0o604, 0o620):
        settings = up.settings(token_file=str(up.write(up.token, mode)))
        message = refused(QimemRootKeyProvider.from_settings, settings, up.workdir)
        assert f"(mode {mode:04o}); run: chmod 600" in message
    secret = up.client_settings(secret_file=str(up.write(up.secret, 0o644)))
    assert "secret_file" in refused(QimemRootKeyProvider.from_settings, secret, up.workdir)


def test_bad_token_files(up: Upstream, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(up.write(up.token))
    two_lines = up.write(up.token + "\nX-Evil: 1")
    for path, expected in [
        (tmp_path / "missing", "does not exist"),
        (link, "cannot open"),
        (tmp_path, "not a regular file"),
        (two_lines, "does not hold one token"),
        (up.write(""), "does not hold one token"),
        (up.write("x" * 20000), "does not hold one token"),
    ]:
        settings = up.settings(token_file=str(path))
        assert expected in refused(QimemRootKeyProvider.from_settings, settings, up.workdir)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"url": None}, "needs [root_key] url"),
        ({"url": "ftp://127.0.0.1/"}, "http:// or https://"),
        ({"url": "https://admin:hunter2@127.0.0.1:1"}, "must not hold credentials"),
        ({"url": "https://127.0.0.1:1/?token=x"}, "query"),
        ({"url": "http://192.0.2.1:8080"}, "refuses plain http"),
        ({"key": None}, "needs [root_key] key"),
        ({"key": "../etc"}, "needs [root_key] key"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": "10"}, "timeout"),
        ({"realm": "a b"}, "realm"),
        ({"typo": 1}, "does not know the setting(s) typo"),
        ({"token_file": None}, "exactly one credential"),
        ({"client_id": "unseal"}, "exactly one credential"),
        ({"ca_file": "/no/such/ca.pem"}, "ca_file"),
    ],
)
def test_bad_settings(up: Upstream, overrides: dict[str, Any], expected: str) -> None:
    settings = up.settings(**overrides)
    for name, value in overrides.items():
        if value is None:
            settings.pop(name, None)
    message = refused(QimemRootKeyProvider.from_settings, settings, up.workdir)
    assert expected in message
    assert "hunter2" not in message and "token=x" not in message


def test_client_id_needs_its_realm_and_secret(up: Upstream) -> None:
    settings = up.client_settings()
    del settings["realm"]
    assert "realm" in refused(QimemRootKeyProvider.from_settings, settings, up.workdir)
    settings = up.client_settings()
    del settings["secret_file"]
    assert "go together" in refused(QimemRootKeyProvider.from_settings, settings, up.workdir)


def test_no_secret_in_describe_repr_messages_or_logs(
    up: Upstream, sealed: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    providers = [
        up.provider(),
        QimemRootKeyProvider.from_settings(up.client_settings(), up.workdir),
    ]
    messages: list[str] = []
    for provider in providers:
        assert provider.unwrap(provider.wrap(KWK, CONTEXT), CONTEXT) == KWK
        text = json.dumps(provider.describe()) + repr(provider)
        for call in (
            lambda p=provider: p.unwrap(sealed[:-1], CONTEXT),
            lambda p=provider: p.unwrap(sealed, b"other"),
        ):
            with pytest.raises((ConfigError, DecryptionError)) as caught:
                call()
            messages.append(str(caught.value))
        messages.append(text)
    revoked = fresh_login(up, "crypto")
    up.api("POST", "/v1/auth/realms/master/revoke", data={"token": revoked})
    messages.append(refused(up.provider(revoked).wrap, KWK, CONTEXT))
    everything = "\n".join(messages) + caplog.text
    for secret in (up.token, up.secret, revoked, base64.b64encode(KWK).decode(), KWK.hex()):
        assert secret not in everything
    assert "Traceback" not in everything


# ---- TLS (a real nginx in front of the upstream) -----------------------------------------


def test_tls_upstream_with_ca_file_and_a_wrong_ca(up: Upstream, tmp_path: Path) -> None:
    from helpers_tls import Nginx, make_test_ca, nginx_binary, nginx_site

    if nginx_binary() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("nginx is not installed (.ci/run installs it)")
        pytest.skip("nginx is not installed")
    ca, _, _ = make_test_ca(tmp_path / "tls")
    other_ca, _, _ = make_test_ca(tmp_path / "other", prefix="other-")
    port = free_port()
    upstream_addr = up.url.removeprefix("http://")
    site = nginx_site(f"127.0.0.1:{port}", upstream_addr, tmp_path / "tls")
    nginx = Nginx(tmp_path / "nginx", site, port).wait_ready()
    try:
        url = f"https://127.0.0.1:{port}"
        provider = up.provider(url=url, ca_file=str(ca))
        assert provider.unwrap(provider.wrap(KWK, CONTEXT), CONTEXT) == KWK
        for ca_file in (str(other_ca), None):  # another CA; the system store
            message = refused(up.provider(url=url, ca_file=ca_file).wrap, KWK, CONTEXT)
            assert f"cannot reach {url}" in message and "not trusted" in message
            assert "give the CA that signed it with ca_file" in message
    finally:
        nginx.stop()


# ---- it works --------------------------------------------------------------------------


def test_round_trip_and_describe_reopens(up: Upstream, sealed: bytes) -> None:
    provider = up.provider()
    assert isinstance(provider, RootKeyProvider) and provider.name == "qimem"
    blob = provider.wrap(KWK, CONTEXT)
    assert blob != sealed  # a fresh nonce each time
    again = provider.unwrap(blob, CONTEXT)
    assert isinstance(again, bytearray) and again == KWK
    described = provider.describe()
    assert json.loads(json.dumps(described)) == described
    assert set(described) == {"url", "key", "token_file", "timeout"}
    reopened = QimemRootKeyProvider.from_settings(described, Path("/elsewhere"))
    assert reopened.unwrap(sealed, CONTEXT) == KWK
    provider.close()
    provider.close()
    assert up.provider().unwrap(blob, CONTEXT) == KWK  # a new provider, a new process's view


def test_service_account_login_and_renewal(up: Upstream, sealed: bytes) -> None:
    provider = QimemRootKeyProvider.from_settings(up.client_settings(), up.workdir)
    assert provider.unwrap(sealed, CONTEXT) == KWK
    assert provider.describe()["client_id"] == "unseal" and "secret_file" in provider.describe()
    provider._expires = 0.0  # the access token ran out: the next call logs in again
    assert provider.unwrap(provider.wrap(KWK, CONTEXT), CONTEXT) == KWK
    assert provider._expires > time.monotonic()


def test_upstream_records_every_unwrap(up: Upstream, sealed: bytes) -> None:
    def by_the_service_account() -> list[dict[str, Any]]:
        return [r for r in up.audit("crypto.decrypt") if "unseal" in json.dumps(r)]

    time.sleep(1.5)  # audit records are written in the background (buffered mode)
    before = len(by_the_service_account())
    up.provider().unwrap(sealed, CONTEXT)
    wait_for(lambda: len(by_the_service_account()) == before + 1, 10, "the audit record")
    time.sleep(1.5)
    assert len(by_the_service_account()) == before + 1  # one unwrap, one record


def test_upstream_rotation_keeps_old_blobs(up: Upstream) -> None:
    provider = up.provider("crypto", key="team-root")
    old = provider.wrap(KWK, CONTEXT)
    up.ok("POST", "/v1/security/rotate", json={"key": "team-root"})
    fresh = up.provider("crypto", key="team-root")  # knows nothing of the old version
    assert fresh.unwrap(old, CONTEXT) == KWK
    assert fresh.unwrap(fresh.wrap(KWK, CONTEXT), CONTEXT) == KWK
    assert provider.unwrap(old, CONTEXT) == KWK


def test_threads_share_one_provider(up: Upstream) -> None:
    provider = up.provider()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                key = bytes([n, i]) * 16
                assert (
                    provider.unwrap(provider.wrap(key, CONTEXT + bytes([n])), CONTEXT + bytes([n]))
                    == key
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_a_forked_child_opens_its_own_connection(up: Upstream, sealed: bytes) -> None:
    provider = up.provider()
    assert provider.unwrap(sealed, CONTEXT) == KWK  # the parent's connection is open
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it unwraps on a connection of its own
        try:
            ok = provider.unwrap(sealed, CONTEXT) == KWK and provider._pid == os.getpid()
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert provider.unwrap(sealed, CONTEXT) == KWK  # the parent's connection still works


# ---- the contract every root-key provider passes ----------------------------------------


class TestQimemProviderContract(RootKeyProviderContract):
    """qimem.testing_rootkey's contract, built through the registry: the service account's
    provider (root-kwk); another root is other-kwk through the ``crypto`` user's token."""

    provider_name = "qimem"
    threads = 4
    rounds = 5

    @pytest.fixture
    def provider_settings(self, up: Upstream) -> dict[str, Any]:
        return up.client_settings()

    @pytest.fixture
    def other_settings(self, up: Upstream) -> dict[str, Any]:
        return up.settings("crypto", key=OTHER_KEY)

    @pytest.fixture
    def secrets(self, up: Upstream) -> list[str]:
        return [up.secret, up.token, up.world.tokens["crypto"]]
