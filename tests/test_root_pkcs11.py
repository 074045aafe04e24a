"""The ``pkcs11`` root-key provider against a real SoftHSM2 token (tests/softhsm_helpers.py):
attacks first (tampered blobs, wrong context or key, wrong PIN, token, slot, key label or
library, unfit keys, loose PIN files), then round trips, fork safety and concurrency."""

from __future__ import annotations

import io
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import softhsm_helpers
from softhsm_helpers import SoftHsm, softhsm

from qimem.builtin_plugins import root_pkcs11_session as tokens
from qimem.builtin_plugins.root_pkcs11_provider import Pkcs11RootKeyProvider, create_root_key
from qimem.errors import ConfigError, ConflictError, DecryptionError
from qimem.root.provider import KWK_SIZE, RootKeyProvider, kwk_context
from qimem.testing_rootkey import RootKeyProviderContract

CONTEXT = kwk_context("keyring-1", 1)
MakeProvider = Callable[..., Pkcs11RootKeyProvider]


@pytest.fixture
def hsm() -> SoftHsm:
    """This process's private SoftHSM2 (skipped without SoftHSM2, failed under CI=true)."""
    return softhsm()


def _label() -> str:
    return f"root-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make(hsm: SoftHsm, tmp_path: Path) -> Iterator[MakeProvider]:
    """``make(token, key_label, **settings)``: a provider, closed after the test."""
    made: list[Pkcs11RootKeyProvider] = []

    def factory(token: str = "qimem-a", key_label: str = "", **extra: Any) -> Pkcs11RootKeyProvider:
        settings = hsm.settings(tmp_path, token, key_label or _label(), **extra)
        provider = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        provider.close()


@pytest.fixture
def root(hsm: SoftHsm, tmp_path: Path, make: MakeProvider) -> Pkcs11RootKeyProvider:
    """A provider whose key create_root_key just made on token qimem-a."""
    label = _label()
    create_root_key(hsm.settings(tmp_path, "qimem-a", label), tmp_path)
    return make("qimem-a", label)


def _config_error(provider: Pkcs11RootKeyProvider) -> str:
    with pytest.raises(ConfigError) as info:
        provider.wrap(bytes(KWK_SIZE), CONTEXT)
    return str(info.value)


# --- attacks on the wrapped key ----------------------------------------------------------


@pytest.mark.parametrize(
    "where", [0, 1, 12, 13, 13 + KWK_SIZE - 1, 13 + KWK_SIZE, -1], ids=lambda w: f"byte{w}"
)
def test_tampered_blob_is_an_integrity_error(root: Pkcs11RootKeyProvider, where: int) -> None:
    # regions: format byte 0, IV 1..12, ciphertext 13..44, tag 45..60
    blob = bytearray(root.wrap(os.urandom(KWK_SIZE), CONTEXT))
    assert len(blob) == 1 + 12 + KWK_SIZE + 16
    blob[where] ^= 0x01
    with pytest.raises(DecryptionError):
        root.unwrap(bytes(blob), CONTEXT)


@pytest.mark.parametrize("cut", ["empty", "short", "no-tag", "extra"])
def test_truncated_or_extended_blob(root: Pkcs11RootKeyProvider, cut: str) -> None:
    blob = root.wrap(os.urandom(KWK_SIZE), CONTEXT)
    bad = {"empty": b"", "short": blob[:20], "no-tag": blob[:-16], "extra": blob + b"\0"}[cut]
    with pytest.raises(DecryptionError):
        root.unwrap(bad, CONTEXT)


def test_wrong_context_is_an_integrity_error(root: Pkcs11RootKeyProvider) -> None:
    blob = root.wrap(os.urandom(KWK_SIZE), CONTEXT)
    for other in (kwk_context("keyring-1", 2), kwk_context("keyring-2", 1), b""):
        with pytest.raises(DecryptionError):
            root.unwrap(blob, other)


def test_blob_from_another_key_or_token_does_not_unwrap(
    hsm: SoftHsm,
    tmp_path: Path,
    root: Pkcs11RootKeyProvider,
    make: MakeProvider,
) -> None:
    create_root_key(hsm.settings(tmp_path, "qimem-b", root.key_label), tmp_path)
    same_label_other_token = make("qimem-b", root.key_label)
    other_label = _label()
    create_root_key(hsm.settings(tmp_path, "qimem-a", other_label), tmp_path)
    other_key_same_token = make("qimem-a", other_label)
    blob = root.wrap(os.urandom(KWK_SIZE), CONTEXT)
    for other in (same_label_other_token, other_key_same_token):
        with pytest.raises(DecryptionError) as info:
            other.unwrap(blob, CONTEXT)
        assert "pkcs11" in str(info.value)
        other.unwrap(other.wrap(bytes(KWK_SIZE), CONTEXT), CONTEXT)  # the key itself works


# --- startup refusals --------------------------------------------------------------------


@pytest.fixture
def pin_token_key(hsm: SoftHsm) -> str:
    label = _label()
    hsm.make_key("qimem-pin", label)
    return label


def test_wrong_pin_is_a_config_error_without_the_pin(
    hsm: SoftHsm,
    tmp_path: Path,
    pin_token_key: str,
) -> None:
    wrong = "wrong-pin-7c1e"
    settings = hsm.settings(tmp_path, "qimem-pin", pin_token_key)
    settings["pin_file"] = str(hsm.pin_file(tmp_path, "qimem-pin", pin=wrong))
    provider = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    try:
        message = _config_error(provider)
        assert "wrong PIN" in message and "qimem-pin" in message
        assert wrong not in message and hsm.pin("qimem-pin") not in message
        with pytest.raises(ConfigError, match="not tried again"):  # a token would lock the PIN
            provider.unwrap(b"\x01" + bytes(60), CONTEXT)
    finally:
        provider.close()


def test_wrong_pin_refused_while_the_token_is_logged_in(
    make: MakeProvider,
    hsm: SoftHsm,
    tmp_path: Path,
    pin_token_key: str,
) -> None:
    good = make("qimem-pin", pin_token_key)
    good.check()  # the process is now logged in to the token
    wrong = "wrong-pin-while-in"
    bad = make(
        "qimem-pin", pin_token_key, pin_file=str(hsm.pin_file(tmp_path, "qimem-pin", pin=wrong))
    )
    message = _config_error(bad)
    assert "wrong PIN" in message and wrong not in message
    good.unwrap(good.wrap(bytes(KWK_SIZE), CONTEXT), CONTEXT)


def test_pin_locked_message() -> None:
    from pkcs11.exceptions import PinLocked

    error = tokens.login_error(PinLocked(), "'t'")  # SoftHSM2 never locks a PIN: mapped here
    assert isinstance(error, ConfigError) and "locked" in str(error)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"token_label": "no-such-token"}, "no token labelled 'no-such-token'"),
        ({"token_label": None, "slot": 987654}, "no token in slot 987654"),
        ({"key_label": "no-such-key"}, "no secret key 'no-such-key'"),
    ],
    ids=["token-label", "slot", "key-label"],
)
def test_wrong_token_slot_or_key_label(
    root: Pkcs11RootKeyProvider,
    hsm: SoftHsm,
    tmp_path: Path,
    change: dict[str, Any],
    expected: str,
) -> None:
    settings = {k: v for k, v in {**root.describe(), **change}.items() if v is not None}
    provider = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    try:
        message = _config_error(provider)
        assert expected in message
        assert hsm.pin("qimem-a") not in message
    finally:
        provider.close()


def test_missing_binding_is_a_config_error(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install python-pkcs11"):
        Pkcs11RootKeyProvider.from_settings(hsm.settings(tmp_path, "qimem-a", "k"), tmp_path)


def test_wrong_library(hsm: SoftHsm, tmp_path: Path) -> None:
    settings = hsm.settings(tmp_path, "qimem-a", "k", library=str(tmp_path / "nope.so"))
    with pytest.raises(ConfigError, match="does not exist"):
        Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    (tmp_path / "not-a-module.so").write_text("not a shared object\n")
    settings["library"] = "not-a-module.so"  # relative: to the config's directory
    provider = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    assert "cannot load or initialise the PKCS#11 library" in _config_error(provider)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"key_label": None}, "key_label"),
        ({"token_label": None}, "exactly one of token_label or slot"),
        ({"slot": 1}, "exactly one of token_label or slot"),
        ({"token_label": None, "slot": "1"}, "'slot' must be"),
        ({"token_label": None, "slot": True}, "'slot' must be"),
        ({"pin_file": None}, "exactly one of pin_file"),
        ({"pin": "stdin"}, "exactly one of pin_file"),
        ({"pin_file": None, "pin": "1111-user-a"}, "never goes in the config"),
        ({"library": None}, "libsofthsm2.so"),
        ({"create_key": "yes"}, "'create_key' must be"),
    ],
)
def test_bad_settings(
    hsm: SoftHsm,
    tmp_path: Path,
    change: dict[str, Any],
    expected: str,
) -> None:
    settings = {**hsm.settings(tmp_path, "qimem-a", "k"), **change}
    settings = {k: v for k, v in settings.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    assert expected in str(info.value)
    assert "1111-user-a" not in str(info.value)


@pytest.mark.parametrize("problem", ["mode-0644", "mode-0640", "empty", "missing", "two-lines"])
def test_bad_pin_file_refused(
    hsm: SoftHsm,
    tmp_path: Path,
    root: Pkcs11RootKeyProvider,
    problem: str,
) -> None:
    path = hsm.pin_file(tmp_path, "qimem-a")
    if problem.startswith("mode-"):
        path.chmod(int(problem[5:], 8))
    elif problem == "empty":
        path.write_text("\n")
    elif problem == "missing":
        path.unlink()
    else:
        path.write_text(hsm.pin("qimem-a") + "\nsecond\n")
    provider = Pkcs11RootKeyProvider.from_settings(
        {**root.describe(), "pin_file": str(path)}, tmp_path
    )
    try:
        message = _config_error(provider)
        expected = {"empty": "is empty", "missing": "does not exist", "two-lines": "one PIN line"}
        assert expected.get(problem, "accessible by group or others") in message
        assert hsm.pin("qimem-a") not in message
    finally:
        provider.close()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ({"extractable": True}, "can leave the token"),
        ({"sensitive": False}, "can leave the token"),
        ({"bits": 128}, "not an AES-256 key"),
        ({"key_type": "GENERIC_SECRET"}, "not an AES-256 key"),
    ],
    ids=["extractable", "not-sensitive", "aes-128", "generic-secret"],
)
def test_unfit_key_refused(
    hsm: SoftHsm,
    make: MakeProvider,
    key: dict[str, Any],
    expected: str,
) -> None:
    label = _label()
    hsm.make_key("qimem-a", label, **key)
    assert expected in _config_error(make("qimem-a", label))


def test_duplicate_key_label_refused(hsm: SoftHsm, make: MakeProvider) -> None:
    label = _label()
    hsm.make_key("qimem-a", label)
    hsm.make_key("qimem-a", label)
    assert "2 secret keys are labelled" in _config_error(make("qimem-a", label))


def test_create_root_key_refuses_an_existing_key(
    hsm: SoftHsm,
    tmp_path: Path,
    root: Pkcs11RootKeyProvider,
) -> None:
    with pytest.raises(ConflictError, match="already has a key"):
        create_root_key(hsm.settings(tmp_path, "qimem-a", root.key_label), tmp_path)
    out = hsm.run(
        "s = pkcs11.lib(LIB).get_token(token_label='qimem-a').open(user_pin=sys.argv[1])\n"
        "[k] = s.get_objects({Attribute.LABEL: sys.argv[2]})\n"
        "print([k[a] for a in (Attribute.EXTRACTABLE, Attribute.SENSITIVE,"
        " Attribute.NEVER_EXTRACTABLE, Attribute.TOKEN, Attribute.WRAP, Attribute.VALUE_LEN)])\n"
        "s.close()\n",
        hsm.pin("qimem-a"),
        root.key_label,
    )
    assert out.strip() == "[False, True, True, True, False, 32]"


# --- what works --------------------------------------------------------------------------


def test_round_trip_and_randomized_wrap(root: Pkcs11RootKeyProvider) -> None:
    assert isinstance(root, RootKeyProvider)
    key = os.urandom(KWK_SIZE)
    one, two = root.wrap(key, CONTEXT), root.wrap(key, CONTEXT)
    assert one != two and one[1:13] != two[1:13] and key not in one
    assert root.unwrap(one, CONTEXT) == key == root.unwrap(two, CONTEXT)
    assert isinstance(root.unwrap(one, CONTEXT), bytearray)


def test_slot_settings_and_describe_reopens(
    root: Pkcs11RootKeyProvider,
    hsm: SoftHsm,
    tmp_path: Path,
) -> None:
    blob = root.wrap(b"k" * KWK_SIZE, CONTEXT)
    described = root.describe()
    assert described["library"] == hsm.library and "pin_file" in described
    by_slot = {**described, "slot": hsm.slots["qimem-a"]}
    del by_slot["token_label"]
    for settings in (described, by_slot):
        again = Pkcs11RootKeyProvider.from_settings(settings, Path("/"))
        try:
            assert again.unwrap(blob, CONTEXT) == b"k" * KWK_SIZE
        finally:
            again.close()


def test_no_pin_in_describe_or_repr(root: Pkcs11RootKeyProvider, hsm: SoftHsm) -> None:
    root.check()
    pin = hsm.pin("qimem-a")
    assert pin not in repr(root) and pin not in str(root.describe()) and pin not in str(vars(root))


def test_closing_one_provider_keeps_the_others_logged_in(
    hsm: SoftHsm,
    tmp_path: Path,
    root: Pkcs11RootKeyProvider,
) -> None:
    blob = root.wrap(b"x" * KWK_SIZE, CONTEXT)
    other = Pkcs11RootKeyProvider.from_settings(root.describe(), tmp_path)
    assert other.unwrap(blob, CONTEXT) == b"x" * KWK_SIZE
    other.close()  # a logged-in session's close would log every session out
    assert root.pin_file is not None
    root.pin_file.unlink()  # so root cannot quietly log in again
    assert root.unwrap(blob, CONTEXT) == b"x" * KWK_SIZE


def test_a_lost_session_is_reopened_once(root: Pkcs11RootKeyProvider) -> None:
    blob = root.wrap(b"y" * KWK_SIZE, CONTEXT)
    assert root._login is not None
    root._login.session.close()  # as if the token restarted: the handle is gone
    assert root.unwrap(blob, CONTEXT) == b"y" * KWK_SIZE
    assert root.pin_file is not None
    root.pin_file.unlink()
    assert root._login is not None
    root._login.session.close()
    assert "PIN file" in _config_error(root)  # reopening needs the PIN again


def test_key_deleted_while_open_is_a_config_error(
    hsm: SoftHsm, root: Pkcs11RootKeyProvider
) -> None:
    blob = root.wrap(b"d" * KWK_SIZE, CONTEXT)
    hsm.run(
        "s = pkcs11.lib(LIB).get_token(token_label='qimem-a').open(user_pin=sys.argv[1], rw=True)\n"
        "[k] = s.get_objects({Attribute.LABEL: sys.argv[2]})\n"
        "k.destroy()\n"
        "s.close()\n",
        hsm.pin("qimem-a"),
        root.key_label,
    )
    with pytest.raises(ConfigError, match=f"no secret key '{root.key_label}'"):
        root.unwrap(blob, CONTEXT)


def test_pin_from_stdin_is_read_once(
    hsm: SoftHsm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    label = _label()
    hsm.make_key("qimem-b", label)
    settings = {**hsm.settings(tmp_path, "qimem-b", label), "pin": "stdin"}
    del settings["pin_file"]
    tokens.stdin_pins.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO("not-the-pin\n" + hsm.pin("qimem-b") + "\n"))
    wrong = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    assert "wrong PIN" in _config_error(wrong)
    assert "restart qimem to enter it again" in _config_error(wrong)  # no second read
    assert hsm.pin("qimem-b") + "\n" == sys.stdin.readline()
    tokens.stdin_pins.clear()  # as a restarted process
    stdin = io.StringIO(hsm.pin("qimem-b") + "\nnext line\n")
    monkeypatch.setattr("sys.stdin", stdin)
    first = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    second = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
    try:
        assert first.describe()["pin"] == "stdin"
        blob = first.wrap(bytes(KWK_SIZE), CONTEXT)
        assert second.unwrap(blob, CONTEXT) == bytes(KWK_SIZE)
        assert stdin.readline() == "next line\n"  # one line read, by the first open only
        first.read_stdin_pin()  # already read: no-op
        assert stdin.readline() == ""
    finally:
        first.close()
        second.close()
        tokens.stdin_pins.clear()


def test_stdin_pin_read_before_fork_serves_the_workers(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = _label()
    hsm.make_key("qimem-b", label)
    settings = {**hsm.settings(tmp_path, "qimem-b", label), "pin": "stdin"}
    del settings["pin_file"]
    tokens.stdin_pins.clear()
    monkeypatch.setattr("sys.stdin", io.StringIO(hsm.pin("qimem-b") + "\n"))
    Pkcs11RootKeyProvider.from_settings(settings, tmp_path).read_stdin_pin()  # the master
    assert sys.stdin.read() == ""
    pid = os.fork()
    if pid == 0:  # a worker: opens the token with the master's PIN
        status = 1
        try:
            worker = Pkcs11RootKeyProvider.from_settings(settings, tmp_path)
            status = 0 if worker.unwrap(worker.wrap(b"w" * 32, CONTEXT), CONTEXT) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    tokens.stdin_pins.clear()
    assert os.waitstatus_to_exitcode(status) == 0


def test_forked_child_opens_its_own_session(root: Pkcs11RootKeyProvider) -> None:
    key = os.urandom(KWK_SIZE)
    blob = root.wrap(key, CONTEXT)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: unwrap the parent's blob and wrap one for the parent
        status = 1
        try:
            os.close(read_end)
            assert root._login is None  # the parent's session is not the child's
            ok = root.unwrap(blob, CONTEXT) == key
            os.write(write_end, (b"ok" if ok else b"no") + root.wrap(key, CONTEXT))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and answer[:2] == b"ok"
    assert root.unwrap(answer[2:], CONTEXT) == key  # the parent's session still works
    assert root.unwrap(blob, CONTEXT) == key


def test_threads_share_the_provider(root: Pkcs11RootKeyProvider) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                key = os.urandom(KWK_SIZE)
                context = kwk_context(f"thread-{n}", i + 1)
                assert root.unwrap(root.wrap(key, context), context) == key
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]


def test_loaded_through_the_registry(hsm: SoftHsm, tmp_path: Path) -> None:
    from qimem.registry import Registry, make_plugin_manager

    registry = Registry(make_plugin_manager([]))
    settings = {**hsm.settings(tmp_path, "qimem-a", _label()), "create_key": True}
    provider = registry.root_key_providers["pkcs11"](settings, tmp_path)
    try:
        assert isinstance(provider, Pkcs11RootKeyProvider) and provider.name == "pkcs11"
        assert "create_key" not in provider.describe()
        with pytest.raises(ConfigError, match="no secret key"):
            provider.check()
        provider.create_key()  # what 'qimem init' calls when create_key = true
        assert provider.unwrap(provider.wrap(b"r" * KWK_SIZE, CONTEXT), CONTEXT) == b"r" * KWK_SIZE
        with pytest.raises(ConflictError):
            provider.create_key()
    finally:
        provider.close()


def test_missing_softhsm_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softhsm_helpers, "LIBRARY_CANDIDATES", ())
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        softhsm_helpers.require_softhsm()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must not be skipped"):
        softhsm_helpers.require_softhsm()


# --- the root-key provider contract ------------------------------------------------------


class TestPkcs11Contract(RootKeyProviderContract):
    """qimem.testing_rootkey's contract, against fresh SoftHSM2 keys (through the registry)."""

    provider_name = "pkcs11"

    @pytest.fixture
    def provider_settings(self, hsm: SoftHsm, tmp_path: Path) -> dict[str, Any]:
        settings = hsm.settings(tmp_path, "qimem-contract", _label())
        create_root_key(settings, tmp_path)
        return settings

    @pytest.fixture
    def other_settings(self, hsm: SoftHsm, tmp_path: Path) -> dict[str, Any]:
        settings = hsm.settings(tmp_path, "qimem-b", _label())
        create_root_key(settings, tmp_path)
        return settings

    @pytest.fixture
    def secrets(self) -> list[str]:
        return list(softhsm_helpers.TOKENS.values()) + [softhsm_helpers.SO_PIN]
