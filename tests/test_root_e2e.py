"""Root of trust end to end (issue 18): what an operator does, through the real ``qimem``
CLI in separate processes and real ``qimem serve`` servers, against a real SoftHSM2 token
(a private copy of this process's tokens: tests/root_e2e_helpers.py) and a real upstream
qimem server (tests/root_qimem_helpers.py).

The flows are docs/operations.md's, "Root of trust": a PKCS#11 root from scratch (attacks
first: wrong PIN, removed token, deleted key), ``pin = "stdin"`` under ``qimem serve
--workers 2``, migrating a file root to PKCS#11, another qimem server as the root, and the
split/recover drill of a file root.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from root_e2e_helpers import (
    PLAINTEXT,
    TOKEN,
    Home,
    PinServe,
    assert_,
    call,
    decrypts,
    exposed,
    fails_in_parallel,
    in_parallel,
    key_attributes,
    pkcs11_init,
    round_trip,
    seal,
    steps_in_parallel,
    token_dir,
    unseal,
    versions_of,
)
from serve_process import ServeProcess, child_pids, socket_owners, wait_for
from softhsm_helpers import SoftHsm, init_tokens

WRONG_PIN = "9999-not-the-pin"
CONFIG_ERROR = 9  # qimem.errors.ConfigError.exit_code (docs/operations.md)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """A SoftHSM2 of this module's own (fresh tokens) for its CLI processes: never a copy
    of a token directory another test's process may be writing at that moment."""
    return init_tokens(tmp_path_factory.mktemp("e2e-softhsm"))


# ---- PKCS#11: attacks first ----------------------------------------------------------


@pytest.fixture(scope="module")
def pk(hsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, Path, str]:
    """A store initialised on a new token key (PIN in a file): (home, its PIN file, a
    file encrypted under key ``k1``). The attacks below leave it as they found it."""
    base = tmp_path_factory.mktemp("pk")
    home = Home(base / "home", hsm.conf)
    pin_file = hsm.pin_file(base, TOKEN)
    pkcs11_init(home, hsm, f"e2e-{uuid.uuid4().hex[:8]}", f"pin_file={pin_file}")
    home.ok("keys", "create", "--name", "k1")
    return home, pin_file, str(round_trip(home, base / "files", "k1"))


WRONG_PIN_COMMANDS = [
    ["keys", "list"],
    ["keys", "create", "--name", "never"],
    ["decrypt", "-q", "-o", "-", "SEALED"],
    ["encrypt", "--key", "k1"],
    ["root", "status"],
    ["root", "rotate"],
    ["serve", "--insecure-no-auth", "--port", "0"],
]


def test_wrong_pin_file_fails_every_command_in_one_line(
    pk: tuple[Home, Path, str], hsm: SoftHsm
) -> None:
    home, pin_file, sealed = pk

    commands = [[sealed if a == "SEALED" else a for a in args] for args in WRONG_PIN_COMMANDS]
    pin_file.write_text(WRONG_PIN + "\n")
    try:
        lines = fails_in_parallel(home, commands, code=CONFIG_ERROR, stdin="text")
    finally:
        pin_file.write_text(hsm.pin(TOKEN) + "\n")
    for line in lines:
        assert f"pkcs11 root provider: wrong PIN for token '{TOKEN}'" in line, line
        assert WRONG_PIN not in line and hsm.pin(TOKEN) not in line
    assert home.versions() == [(1, "pkcs11", "active", 2)]  # nothing rotated or created


def test_wrong_pin_file_fails_serve_workers_in_one_line(
    pk: tuple[Home, Path, str], hsm: SoftHsm
) -> None:
    home, pin_file, _ = pk
    pin_file.write_text(WRONG_PIN + "\n")
    try:
        done = home.run("serve", "--insecure-no-auth", "--port", "0", "--workers", "2")
    finally:
        pin_file.write_text(hsm.pin(TOKEN) + "\n")
    assert done.returncode == CONFIG_ERROR and "Traceback" not in done.stderr
    assert WRONG_PIN not in done.stderr and hsm.pin(TOKEN) not in done.stderr
    assert done.stderr.splitlines()[0] == (
        f"qimem: error: pkcs11 root provider: wrong PIN for token '{TOKEN}'"
    )
    assert len(done.stderr.splitlines()) == 1, done.stderr  # the known deviation


@pytest.mark.parametrize("damage", ["token removed", "key deleted"])
def test_removed_token_or_deleted_key_is_a_clear_error(
    pk: tuple[Home, Path, str], hsm: SoftHsm, tmp_path: Path, damage: str
) -> None:
    home, _, sealed = pk
    label = home.config()["root_key"]["key_label"]
    # A SoftHSM2 of fresh tokens (same labels and PINs, none holding the store's key),
    # never a copy of the module's token directory, which a server of this module may be
    # writing at that moment: "key deleted" is the same token without the key.
    broken = init_tokens(tmp_path / "hsm")
    if damage == "token removed":
        token_dir(broken, TOKEN).rename(tmp_path / "elsewhere")
        expected = f"no token labelled '{TOKEN}'"
    else:
        expected = f"no secret key '{label}' on token '{TOKEN}'"
    damaged = Home(home.path, broken.conf)
    commands = [["keys", "list"], ["decrypt", "-q", "-o", "-", sealed], ["root", "rotate"]]
    for line in fails_in_parallel(damaged, commands, code=CONFIG_ERROR):
        assert expected in line, line
    decrypts(home, Path(sealed))  # the real token still opens it


def test_a_wrong_key_label_in_the_config_is_refused(pk: tuple[Home, Path, str]) -> None:
    """The store's keyring is authenticated only by roots the configuration names (never
    by settings recorded in the database): a configured key label the token does not hold
    refuses every command with one line naming it, and nothing is made or rotated."""
    home, _, sealed = pk
    doc = home.config()
    good = dict(doc["root_key"])
    doc["root_key"]["key_label"] = "e2e-no-such-key"
    home.write_config(doc)
    try:
        lines = fails_in_parallel(
            home, [["root", "rotate"], ["decrypt", "-q", "-o", "-", sealed]], code=CONFIG_ERROR
        )
    finally:
        doc["root_key"] = good
        home.write_config(doc)
    for line in lines:
        assert "no secret key 'e2e-no-such-key'" in line, line
    assert home.versions() == [(1, "pkcs11", "active", 2)]  # no version was made
    decrypts(home, Path(sealed))


def test_init_with_a_wrong_pin_leaves_nothing(hsm: SoftHsm, tmp_path: Path) -> None:
    home = Home(tmp_path / "home", hsm.conf)
    label = f"e2e-{uuid.uuid4().hex[:8]}"
    wrong = hsm.pin_file(tmp_path, TOKEN, pin=WRONG_PIN)
    settings = [
        f"--root-key-setting={s}"
        for s in (f"library={hsm.library}", f"token_label={TOKEN}", f"key_label={label}")
    ]
    pin = hsm.pin(TOKEN)
    other = Home(tmp_path / "other", hsm.conf)
    wrong_pin, pin_setting = steps_in_parallel(
        [
            lambda: home.fails(
                "init",
                "--root-key-provider=pkcs11",
                *settings,
                f"--root-key-setting=pin_file={wrong}",
                "--root-key-setting=create_key=true",
                code=CONFIG_ERROR,
            ),
            # A PIN given as a setting is refused, never written or echoed.
            lambda: other.fails(
                "init",
                "--root-key-provider=pkcs11",
                *settings,
                f"--root-key-setting=pin={pin}",
                code=CONFIG_ERROR,
            ),
        ],
    )
    assert "wrong PIN" in wrong_pin and WRONG_PIN not in wrong_pin
    assert "the PIN never goes in the config" in pin_setting and pin not in pin_setting
    for made in (home, other):
        assert not made.config_path.exists() and not (made.path / "root.key").exists()
    # The failed runs made no key: init with the right PIN can still create it.
    pkcs11_init(home, hsm, label, f"pin_file={hsm.pin_file(tmp_path, TOKEN)}")


# ---- PKCS#11 from scratch ------------------------------------------------------------


def test_pkcs11_root_from_scratch(hsm: SoftHsm, tmp_path: Path) -> None:
    home = Home(tmp_path / "home", hsm.conf)
    label = f"e2e-{uuid.uuid4().hex[:8]}"
    pin_file = hsm.pin_file(tmp_path, TOKEN)
    said = pkcs11_init(home, hsm, label, f"pin_file={pin_file}")
    assert "root key: held by the pkcs11 provider" in said
    root_key = home.config()["root_key"]
    assert root_key == {
        "provider": "pkcs11",
        "library": hsm.library,
        "token_label": TOKEN,
        "key_label": label,
        "pin_file": str(pin_file),
    }  # no file, no create_key, no PIN
    assert hsm.pin(TOKEN) not in home.config_path.read_text()
    assert not (home.path / "root.key").exists()
    assert sorted(p.name for p in home.path.iterdir()) == ["config.toml", "qimem.db"]
    # The key is in the token, and stays there (read by another process meanwhile).
    steps_in_parallel(
        [
            lambda: home.ok("keys", "create", "--name", "payroll"),
            lambda: assert_(key_attributes(hsm, label) == ["False", "True", "32"]),
        ],
    )
    sealed = round_trip(home, tmp_path / "files", "payroll")
    status = home.status()
    assert versions_of(status) == [(1, "pkcs11", "active", 2)]  # the key, the signing key
    assert status["versions"][0]["settings"]["key_label"] == label

    home.ok("root", "rotate")
    steps_in_parallel(
        [
            lambda: decrypts(home, sealed),  # sealed before the rotation
            lambda: home.ok("keys", "create", "--name", "after"),  # wrapped under version 2
        ],
    )
    assert home.versions() == [(1, "pkcs11", "retired", 0), (2, "pkcs11", "active", 3)]
    # A second store cannot take over the key with create_key=true.
    other = Home(tmp_path / "other", hsm.conf)
    line = other.fails(
        "init",
        "--root-key-provider=pkcs11",
        f"--root-key-setting=library={hsm.library}",
        f"--root-key-setting=token_label={TOKEN}",
        f"--root-key-setting=key_label={label}",
        f"--root-key-setting=pin_file={pin_file}",
        "--root-key-setting=create_key=true",
        code=6,
    )
    assert label in line and not other.config_path.exists()


# ---- pin = "stdin" under qimem serve ---------------------------------------------------


@pytest.fixture(scope="module")
def stdin_home(hsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A store whose root key's PIN comes from stdin (recorded as pin = "stdin")."""
    home = Home(tmp_path_factory.mktemp("stdin") / "home", hsm.conf)
    pin = hsm.pin(TOKEN) + "\n"
    # Recorded as pin = "stdin" in the version (else a PIN file would open it): the
    # no-PIN test below shows that the server needs its stdin.
    pkcs11_init(home, hsm, f"e2e-{uuid.uuid4().hex[:8]}", "pin=stdin", stdin=pin)
    home.ok("keys", "create", "--name", "svc", stdin=pin)
    return home


@pytest.mark.parametrize(
    ("stdin_text", "workers"), [(WRONG_PIN + "\n", "2"), ("", "1")], ids=["wrong PIN", "no PIN"]
)
def test_serve_refuses_a_wrong_or_missing_stdin_pin(
    stdin_home: Home, hsm: SoftHsm, tmp_path: Path, stdin_text: str, workers: str
) -> None:
    server = PinServe(tmp_path, stdin_home.env(), stdin_text, "--workers", workers)
    try:
        assert server.proc.wait(60) == CONFIG_ERROR
    finally:
        server.kill()
    log = server.log()
    assert "Traceback" not in log and WRONG_PIN not in log and hsm.pin(TOKEN) not in log
    assert "pkcs11 root provider" in log, log
    assert ("wrong PIN" if stdin_text else "the PIN read from stdin") in log, log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_reads_the_stdin_pin_once_and_every_worker_serves(
    stdin_home: Home, hsm: SoftHsm, tmp_path: Path, processes: list[ServeProcess], workers: str
) -> None:
    pin = hsm.pin(TOKEN)
    # stdin is closed after one line: a worker reading it again would fail to start.
    server = PinServe(tmp_path, stdin_home.env(), pin + "\n", "--workers", workers)
    processes.append(server)
    server.wait_ready()
    pids = [server.proc.pid]
    if workers == "2":
        found = wait_for(
            lambda: len(child_pids(server.proc.pid)) == 2 and child_pids(server.proc.pid)
        )
        pids += list(found)  # type: ignore[call-overload]
    served: set[int] = set()
    for _ in range(20):  # rounds of 8 concurrent connections until both workers answered
        conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            texts = list(
                pool.map(
                    lambda c: unseal(server.port, seal(server.port, "svc", PLAINTEXT, c), c), conns
                )
            )
        assert texts == [PLAINTEXT] * 8
        owners = socket_owners(server.port, pids)
        served |= {owners[c.sock.getsockname()[1]] for c in conns}
        for c in conns:
            c.close()
        if len(served) == len(pids) - (workers == "2"):
            break
    assert served == (set(pids[1:]) if workers == "2" else {server.proc.pid})
    for pid in pids:
        seen = exposed(pid)
        assert str(stdin_home.conf).encode() in seen and b"serve" in seen  # what it reads
        assert pin.encode() not in seen, f"the PIN is in /proc/{pid} (argv or environ)"
    if workers == "2":  # a replacement worker, forked later, still has the PIN
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: pids[1] not in (now := child_pids(server.proc.pid)) and len(now) == 2)
        for _ in range(10):
            assert unseal(server.port, seal(server.port, "svc", b"again")) == b"again"
    assert server.stop() == 0
    assert pin not in server.log() and "Traceback" not in server.log()


# ---- migrating a file root to PKCS#11 -----------------------------------------------------


def test_migrate_a_file_root_to_pkcs11(hsm: SoftHsm, tmp_path: Path) -> None:
    home = Home(tmp_path / "home", hsm.conf)
    home.ok("init")
    root_file = home.path / "root.key"
    assert home.config()["root_key"] == {"file": str(root_file)}
    in_parallel(lambda k: home.ok("keys", "create", "--name", k), ["alpha", "beta"])
    sealed = in_parallel(
        lambda k: round_trip(home, tmp_path / "files", k, f"{k}.txt"), ["alpha", "beta"]
    )

    label = f"e2e-{uuid.uuid4().hex[:8]}"
    hsm.make_key(TOKEN, label)  # the token's tools (qimem init creates keys for new stores only)
    doc = home.config()
    doc["root_key"].update(
        provider="pkcs11",
        library=hsm.library,
        token_label=TOKEN,
        key_label=label,
        pin_file=str(hsm.pin_file(tmp_path, TOKEN)),
    )
    home.write_config(doc)  # file is kept until the rotation is done
    decrypts(home, sealed[0])  # still the file root meanwhile
    home.ok("root", "rotate")
    status = home.status()
    assert versions_of(status) == [(1, "file", "retired", 0), (2, "pkcs11", "active", 3)]
    assert status["versions"][1]["settings"]["key_label"] == label

    del doc["root_key"]["file"]
    home.write_config(doc)
    root_file.unlink()
    split = ["root", "split", "-n", "3", "-k", "2", "--out-dir", str(tmp_path / "s")]
    _, _, line = steps_in_parallel(
        [
            lambda: decrypts(home, *sealed),
            lambda: home.ok("keys", "create", "--name", "gamma"),
            lambda: home.fails(*split, code=CONFIG_ERROR),
        ],
    )
    assert "held by the pkcs11 provider" in line
    assert not (tmp_path / "s").exists()
    assert home.versions() == [(1, "file", "retired", 0), (2, "pkcs11", "active", 4)]


# ---- another qimem server as the root ---------------------------------------------------


def test_qimem_server_root_and_its_upstream_going_away(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    from root_qimem_helpers import upstream

    (tmp_path / "up").mkdir()
    with upstream(tmp_path / "up") as up:
        settings = up.settings()
        token = up.token
        home = Home(tmp_path / "down" / "home")
        pairs = [f"--root-key-setting={k}={v}" for k, v in settings.items()]
        said = home.ok("init", "--root-key-provider", "qimem", *pairs)
        assert "held by the qimem provider" in said
        assert home.config()["root_key"]["provider"] == "qimem"
        assert "file" not in home.config()["root_key"]
        assert token not in home.config_path.read_text()
        home.ok("keys", "create", "--name", "db1")
        sealed = round_trip(home, tmp_path / "files", "db1")
        decrypts(home, sealed)
        assert home.versions() == [(1, "qimem", "active", 2)]

        server = ServeProcess(tmp_path / "down", home.env(), "--no-access-log", name="down")
        processes.append(server)
        server.wait_ready()
        before = seal(server.port, "db1", b"before the upstream went away")

        up.world.server.stop()
        fresh = Home(tmp_path / "fresh" / "home")
        commands = [
            lambda: home.fails("keys", "list", code=CONFIG_ERROR),
            lambda: home.fails("decrypt", "-q", "-o", "-", str(sealed), code=CONFIG_ERROR),
            # A new store cannot be made on an upstream that is down; init leaves nothing.
            lambda: fresh.fails("init", "--root-key-provider", "qimem", *pairs, code=9),
        ]
        for line in in_parallel(lambda step: step(), commands):
            assert f"cannot reach {up.url}" in line and token not in line
        assert not fresh.config_path.exists()
        assert not (home.path / "root.key").exists()  # nothing to fall back to
        # The running server keeps its KWK in memory: it still serves, even a new key.
        assert unseal(server.port, before) == b"before the upstream went away"
        for _ in range(5):
            assert unseal(server.port, seal(server.port, "db1", PLAINTEXT)) == PLAINTEXT
        assert call(server.port, "/v1/security/keys", {"name": "made-later"})[0] == 201
        assert unseal(server.port, seal(server.port, "made-later", b"x")) == b"x"
        assert server.stop() == 0


# ---- split / recover drill of a file root ------------------------------------------------


def test_split_recover_drill_on_a_file_root(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.ok("init")
    home.ok("keys", "create", "--name", "ledger")
    sealed = round_trip(home, tmp_path / "files", "ledger")
    root_file = home.path / "root.key"
    original = root_file.read_bytes()
    shares = tmp_path / "shares"
    split = home.json(
        "root", "split", "--shares", "5", "--threshold", "3", "--out-dir", str(shares)
    )
    files = sorted(shares.iterdir())
    assert len(files) == 5 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    for f in files:
        assert original.strip().decode() not in f.read_text()

    root_file.unlink()  # the loss
    s = [str(f) for f in files]
    listed, too_few = in_parallel(
        lambda step: step(),
        [
            lambda: home.fails("keys", "list", code=CONFIG_ERROR),
            lambda: home.fails("root", "recover", s[0], s[1], "-o", str(root_file), code=3),
        ],
    )
    assert "if the root key file is lost, restore it" in listed and "root recover" in listed
    assert "need 3 shares, got 2" in too_few and not root_file.exists()
    recovered = home.json("root", "recover", s[0], s[2], s[4], "-o", str(root_file))
    assert (recovered["identifier"], recovered["check_value"]) == (
        split["identifier"],
        split["check_value"],
    )
    assert root_file.read_bytes().strip() == original.strip()
    assert root_file.stat().st_mode & 0o777 == 0o600
    drill = str(tmp_path / "drill.key")
    _, _, line = in_parallel(
        lambda step: step(),
        [
            lambda: decrypts(home, sealed),
            # Any other three rebuild the same key; recover never overwrites.
            lambda: home.ok("root", "recover", s[1], s[3], s[4], "-o", drill),
            lambda: home.fails("root", "recover", s[1], s[2], s[3], "-o", str(root_file), code=6),
        ],
    )
    assert "exists" in line
    assert Path(drill).read_bytes().strip() == original.strip()


# ---- a live server's wraps after the keyring refresh interval -------------------------


def test_a_wrap_after_the_refresh_interval_does_not_wait_for_its_own_transaction(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    """Regression: a wrap inside a write transaction re-reads the root keyring once
    REFRESH_SECONDS have passed; on SQLite that read took a second connection's BEGIN
    IMMEDIATE and waited for its own thread's transaction until the busy timeout (503)."""
    from qimem.rootkey import REFRESH_SECONDS

    home = Home(tmp_path / "home")
    home.ok("init")
    server = ServeProcess(tmp_path, home.env(), "--no-access-log")
    processes.append(server)
    server.wait_ready()
    for name in ("first", "second"):
        time.sleep(REFRESH_SECONDS + 0.2)
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        status, body = call(server.port, "/v1/security/keys", {"name": name}, conn)
        conn.close()
        assert status == 201, body
        assert time.monotonic() - started < 5
    assert server.stop() == 0
