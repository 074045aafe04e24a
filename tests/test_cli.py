"""The ``qimem`` CLI through click's CliRunner, against real SQLite stores in QIMEM_HOME.

Encrypt/decrypt are exercised only through their observable behaviour (stdin → stdout, a
single file → FILE.qimem → back), so the tests hold whatever the ciphertext format is.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qimem.cli import cli

PLAINTEXT = b"attack at dawn \x00\xff binary too\n"


def run(*args: str, input: bytes | str | None = None) -> Result:  # noqa: A002
    """Invoke the CLI; exceptions that escape click's handling fail the test."""
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: bytes | str | None = None) -> Result:  # noqa: A002
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


def as_json(result: Result) -> object:
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, exit_code: int, *fragments: str) -> None:
    """Exit code of the error class, one ``qimem: error: ...`` line on stderr, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qimem: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def home(qimem_home: Path) -> Path:
    """An initialized QIMEM_HOME."""
    ok("init")
    return qimem_home


def create(name: str | None = None, *extra: str) -> dict:
    args = ["keys", "create", "--json", *extra]
    if name:
        args += ["--name", name]
    data = as_json(ok(*args))
    assert isinstance(data, dict)
    return data


# --------------------------------------------------------------------------- init


def test_init_creates_config_root_key_and_store(qimem_home: Path) -> None:
    result = ok("init", "--json")
    info = as_json(result)
    assert isinstance(info, dict)
    assert sorted(info["created"]) == ["config", "root_key"]
    config = qimem_home / "config.toml"
    root_key = qimem_home / "root.key"
    assert Path(info["config"]) == config
    assert Path(info["root_key_file"]) == root_key
    assert info["store"].startswith("sqlite:///")
    assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    db = Path(info["store"].removeprefix("sqlite:///"))
    assert db.is_file() and db.stat().st_size > 0
    # The config names the store and the root key file, never the root key itself.
    text = config.read_text()
    assert "sqlite:///" in text and str(root_key) in text
    assert root_key.read_text().strip() not in text
    # The store is usable right away.
    assert as_json(ok("keys", "list", "--json")) == []


def test_init_rerun_keeps_keys_and_old_ciphertext_decrypts(home: Path) -> None:
    root_key_before = (home / "root.key").read_bytes()
    config_before = (home / "config.toml").read_bytes()
    key = create("keep-me")
    sealed = ok("encrypt", "--key", "keep-me", input=PLAINTEXT).stdout_bytes

    again = as_json(ok("init", "--json"))
    assert again["created"] == []
    assert "already initialized" in ok("init").stdout

    assert (home / "root.key").read_bytes() == root_key_before
    assert (home / "config.toml").read_bytes() == config_before
    listed = as_json(ok("keys", "list", "--json"))
    assert [k["key_id"] for k in listed] == [key["key_id"]]
    assert ok("decrypt", input=sealed).stdout_bytes == PLAINTEXT


def test_init_without_root_key_does_not_leave_a_wrong_one(home: Path) -> None:
    """A store whose root key file went missing is refused, and init writes no new key."""
    create("orphan")
    (home / "root.key").unlink()
    result = run("init")
    assert_one_line_error(result, 9, "root key")
    assert not (home / "root.key").exists()


def test_commands_before_init_say_run_init(qimem_home: Path) -> None:
    result = run("keys", "list")
    assert_one_line_error(result, 9, "qimem init")


# --------------------------------------------------------------------------- keys


def test_keys_create_plain_prints_key_id(home: Path) -> None:
    result = ok("keys", "create")
    key_id = result.stdout.strip()
    assert len(key_id) == 36 and key_id.count("-") == 4
    shown = as_json(ok("keys", "show", key_id, "--json"))
    assert shown["active_key_id"] == key_id


def test_keys_create_json_fields(home: Path) -> None:
    key = create("billing", "--algorithm", "chacha20-poly1305")
    assert key["name"] == "billing"
    assert key["algorithm"] == "chacha20-poly1305"
    assert key["version"] == 1
    assert key["state"] == "active" and key["active"] is True
    assert key["realm"] == "master"
    assert set(key) >= {"key_id", "lineage_id", "created_at"}


def test_keys_list_plain_and_json(home: Path) -> None:
    a = create("alpha")
    b = create("beta")
    listed = as_json(ok("keys", "list", "--json"))
    assert isinstance(listed, list)
    assert {k["key_id"] for k in listed} == {a["key_id"], b["key_id"]}
    table = ok("keys", "list").stdout
    lines = table.strip().splitlines()
    assert lines[0].split()[:3] == ["NAME", "LINEAGE_ID", "VERSION"]
    assert any(line.startswith("alpha ") and a["key_id"] in line for line in lines)
    assert any(line.startswith("beta ") and b["key_id"] in line for line in lines)


def test_keys_list_empty_plain_prints_nothing(home: Path) -> None:
    assert ok("keys", "list").stdout == ""


@pytest.mark.parametrize("by", ["name", "lineage_id", "key_id"])
def test_keys_show_by_any_reference(home: Path, by: str) -> None:
    key = create("shown")
    details = as_json(ok("keys", "show", key[by], "--json"))
    assert details["lineage_id"] == key["lineage_id"]
    assert details["name"] == "shown"
    assert details["active_key_id"] == key["key_id"]
    assert [v["version"] for v in details["versions"]] == [1]


def test_keys_show_plain(home: Path) -> None:
    key = create("plain")
    out = ok("keys", "show", "plain").stdout
    assert "name:       plain" in out
    assert f"lineage_id: {key['lineage_id']}" in out
    assert key["key_id"] in out


def test_keys_rotate_plain_and_json(home: Path) -> None:
    key = create("spin")
    second = ok("keys", "rotate", "spin").stdout.strip()
    assert second != key["key_id"]
    third = as_json(ok("keys", "rotate", second, "--json"))
    assert third["version"] == 3 and third["active"] is True
    assert third["lineage_id"] == key["lineage_id"]
    details = as_json(ok("keys", "show", "spin", "--json"))
    states = [(v["version"], v["state"]) for v in details["versions"]]
    assert states == [(1, "decrypt-only"), (2, "decrypt-only"), (3, "active")]
    assert details["active_key_id"] == third["key_id"]


def test_rotating_an_old_key_id_is_a_conflict(home: Path) -> None:
    key = create("once")
    ok("keys", "rotate", key["key_id"])
    result = run("keys", "rotate", key["key_id"])
    assert_one_line_error(result, 6, key["key_id"], "no longer active")


# ------------------------------------------------------------------ encrypt/decrypt


def test_readme_story(home: Path) -> None:
    """init, create, encrypt, rotate, decrypt the old ciphertext, old key_id refused."""
    key = create("demo")
    old = ok("encrypt", "--key", "demo", input=PLAINTEXT).stdout_bytes
    assert PLAINTEXT not in old

    new_key = as_json(ok("keys", "rotate", "demo", "--json"))
    assert new_key["version"] == 2

    assert ok("decrypt", input=old).stdout_bytes == PLAINTEXT
    fresh = ok("encrypt", "--key", "demo", input=PLAINTEXT).stdout_bytes
    assert fresh != old
    assert ok("decrypt", input=fresh).stdout_bytes == PLAINTEXT

    refused = run("encrypt", "--key", key["key_id"], input=PLAINTEXT)
    assert_one_line_error(refused, 6, key["key_id"], new_key["key_id"])
    assert refused.stdout_bytes == b""


def test_encrypt_by_lineage_and_key_id(home: Path) -> None:
    key = create()
    for ref in (key["lineage_id"], key["key_id"]):
        sealed = ok("encrypt", "--key", ref, input=PLAINTEXT).stdout_bytes
        assert ok("decrypt", input=sealed).stdout_bytes == PLAINTEXT


def test_empty_input_round_trips(home: Path) -> None:
    create("empty")
    sealed = ok("encrypt", "--key", "empty", input=b"").stdout_bytes
    assert sealed
    assert ok("decrypt", input=sealed).stdout_bytes == b""


def test_single_file_round_trip(home: Path, tmp_path: Path) -> None:
    create("files")
    src = tmp_path / "report.txt"
    src.write_bytes(PLAINTEXT)
    ok("encrypt", "--key", "files", str(src))
    sealed = tmp_path / "report.txt.qimem"
    assert sealed.is_file()
    assert PLAINTEXT not in sealed.read_bytes()
    assert src.read_bytes() == PLAINTEXT  # the input is untouched

    src.unlink()
    ok("decrypt", str(sealed))
    assert src.read_bytes() == PLAINTEXT
    assert sealed.is_file()


def test_file_to_named_output(home: Path, tmp_path: Path) -> None:
    create("named")
    src = tmp_path / "in.bin"
    src.write_bytes(PLAINTEXT)
    ok("encrypt", "--key", "named", str(src), "-o", str(tmp_path / "sealed.bin"))
    ok("decrypt", str(tmp_path / "sealed.bin"), "-o", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == PLAINTEXT


def test_existing_output_is_not_overwritten_without_force(home: Path, tmp_path: Path) -> None:
    create("careful")
    src = tmp_path / "doc.txt"
    src.write_bytes(PLAINTEXT)
    target = tmp_path / "doc.txt.qimem"
    target.write_bytes(b"precious")

    result = run("encrypt", "--key", "careful", str(src))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert str(target) in result.stderr
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    ok("encrypt", "--key", "careful", str(src), "--force")
    assert target.read_bytes() != b"precious"
    target_plain = tmp_path / "doc.txt"
    result = run("decrypt", str(target))  # doc.txt exists: refused as well
    assert result.exit_code != 0
    assert target_plain.read_bytes() == PLAINTEXT
    target_plain.write_bytes(b"other")
    ok("decrypt", str(target), "--force")
    assert target_plain.read_bytes() == PLAINTEXT


def test_missing_input_file_is_an_error(home: Path, tmp_path: Path) -> None:
    create("k")
    result = run("encrypt", "--key", "k", str(tmp_path / "nope.txt"))
    assert result.exit_code != 0
    assert result.stderr.startswith("qimem: error: ")
    assert "nope.txt" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "nope.txt.qimem").exists()


# --------------------------------------------------------------------- exit codes


def test_not_found_exit_5(home: Path) -> None:
    assert_one_line_error(run("keys", "show", "ghost"), 5, "ghost")
    assert_one_line_error(run("keys", "rotate", "ghost"), 5, "ghost")
    assert_one_line_error(run("encrypt", "--key", "ghost", input=b"x"), 5, "ghost")


def test_conflict_exit_6_duplicate_name(home: Path) -> None:
    create("dup")
    assert_one_line_error(run("keys", "create", "--name", "dup"), 6, "dup")


def test_integrity_exit_7_garbage(home: Path) -> None:
    result = run("decrypt", input=b"this is not a qimem message at all")
    assert_one_line_error(result, 7)
    assert result.stdout_bytes == b""


def test_integrity_exit_7_tampered(home: Path) -> None:
    create("t")
    sealed = bytearray(ok("encrypt", "--key", "t", input=PLAINTEXT).stdout_bytes)
    sealed[-1] ^= 0x01
    result = run("decrypt", input=bytes(sealed))
    assert_one_line_error(result, 7)
    assert result.stdout_bytes == b""
    assert "attack" not in result.output


def test_integrity_exit_7_truncated(home: Path) -> None:
    create("t")
    sealed = ok("encrypt", "--key", "t", input=PLAINTEXT).stdout_bytes
    result = run("decrypt", input=sealed[: len(sealed) // 2])
    assert_one_line_error(result, 7)
    assert result.stdout_bytes == b""


def test_tampered_file_leaves_no_output(home: Path, tmp_path: Path) -> None:
    create("t")
    src = tmp_path / "f.txt"
    src.write_bytes(PLAINTEXT)
    ok("encrypt", "--key", "t", str(src))
    src.unlink()
    sealed = tmp_path / "f.txt.qimem"
    data = bytearray(sealed.read_bytes())
    data[-1] ^= 0x80
    sealed.write_bytes(bytes(data))
    result = run("decrypt", str(sealed))
    assert_one_line_error(result, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt.qimem", "home"]


@pytest.mark.parametrize(
    "name", ["9starts-with-digit", "has space", "12345678-1234-4234-8234-123456789abc"]
)
def test_validation_exit_3_bad_name(home: Path, name: str) -> None:
    assert_one_line_error(run("keys", "create", "--name", name), 3, "key name")


def test_validation_exit_3_bad_realm(home: Path) -> None:
    assert_one_line_error(run("--realm", "Not A Realm", "keys", "list"), 3, "realm")


def test_unknown_algorithm_lists_available(home: Path) -> None:
    result = run("keys", "create", "--algorithm", "rot13")
    assert_one_line_error(result, 3, "rot13", "aes-256-gcm", "chacha20-poly1305")


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["keys", "frobnicate"],
        ["encrypt"],  # --key is required
        ["keys", "show"],  # KEY is required
        ["keys", "list", "--bogus-flag"],
    ],
)
def test_usage_exit_2(home: Path, args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_help_needs_no_store(qimem_home: Path) -> None:
    out = ok("--help").stdout
    for command in ("init", "keys", "encrypt", "decrypt"):
        assert command in out
    ok("keys", "--help")
    assert list(qimem_home.iterdir()) == []


def test_keys_create_refuses_an_unknown_realm(home: Path) -> None:
    assert_one_line_error(
        run("--realm", "nosuch", "keys", "create", "--name", "k"), 5, "realm 'nosuch'"
    )


def test_realms_are_separate(home: Path) -> None:
    from qimem.cli.qauth import qauth

    created = CliRunner().invoke(qauth, ["realm", "create", "other"], catch_exceptions=False)
    assert created.exit_code == 0, created.stderr
    create("shared-name")
    other = as_json(ok("--realm", "other", "keys", "create", "--name", "shared-name", "--json"))
    assert other["realm"] == "other"
    sealed = ok("--realm", "other", "encrypt", "--key", "shared-name", input=PLAINTEXT).stdout_bytes
    # The other realm's key is not visible from master.
    assert_one_line_error(run("decrypt", input=sealed), 5)
    assert ok("--realm", "other", "decrypt", input=sealed).stdout_bytes == PLAINTEXT


# ------------------------------------------------------------- global options


def _names(*args: str) -> set[str]:
    return {k["name"] for k in as_json(ok(*args, "keys", "list", "--json"))}


def test_store_option_overrides_config(home: Path, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    create("in-default")
    ok("--store", other, "keys", "create", "--name", "in-other")
    assert (tmp_path / "other.db").is_file()
    assert _names("--store", other) == {"in-other"}
    assert _names() == {"in-default"}


def test_store_env_and_option_precedence(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_store = f"sqlite:///{tmp_path / 'env.db'}"
    opt_store = f"sqlite:///{tmp_path / 'opt.db'}"
    monkeypatch.setenv("QIMEM_STORE", env_store)
    create("from-env")
    ok("--store", opt_store, "keys", "create", "--name", "from-option")
    assert _names() == {"from-env"}
    assert _names("--store", opt_store) == {"from-option"}
    monkeypatch.delenv("QIMEM_STORE")
    assert _names() == set()


def test_memory_store_via_option(home: Path) -> None:
    # A memory store lives for one invocation only: create works, and the next run is empty.
    key = as_json(ok("--store", "memory://", "keys", "create", "--json"))
    assert key["version"] == 1
    assert as_json(ok("--store", "memory://", "keys", "list", "--json")) == []


def test_unknown_store_scheme(home: Path) -> None:
    result = run("--store", "redis://localhost/0", "keys", "list")
    assert_one_line_error(result, 9, "redis", "sqlite")


def test_config_option_puts_everything_beside_it(qimem_home: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "elsewhere" / "qimem.toml"
    info = as_json(ok("--config", str(cfg), "init", "--json"))
    assert Path(info["config"]) == cfg and cfg.is_file()
    assert Path(info["root_key_file"]).parent == cfg.parent
    assert (cfg.parent / "qimem.db").is_file()
    assert not (qimem_home / "config.toml").exists()

    ok("--config", str(cfg), "keys", "create", "--name", "beside")
    assert _names("--config", str(cfg)) == {"beside"}
    # The default home knows nothing about it (and is not initialized).
    assert run("keys", "list").exit_code == 9


def test_config_env_var(qimem_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "env-config" / "config.toml"
    monkeypatch.setenv("QIMEM_CONFIG", str(cfg))
    ok("init")
    assert cfg.is_file()
    create("via-env")
    assert _names("--config", str(cfg)) == {"via-env"}


def test_malformed_config_is_one_line_error(qimem_home: Path) -> None:
    (qimem_home / "config.toml").write_text("[store\nurl = ")
    assert_one_line_error(run("keys", "list"), 9, "config.toml", "TOML")


def test_unknown_plugin_flag(home: Path) -> None:
    assert_one_line_error(run("--plugin", "not-installed", "keys", "list"), 8, "not-installed")


def test_errors_never_show_key_material(home: Path) -> None:
    root_key = (home / "root.key").read_text().strip()
    create("secretive")
    results = [
        run("keys", "create", "--name", "secretive"),
        run("decrypt", input=b"\x00" * 64),
        run("encrypt", "--key", "nope", input=PLAINTEXT),
    ]
    for result in results:
        assert result.exit_code != 0
        assert root_key not in result.output
        assert "attack at dawn" not in result.output


@pytest.mark.parametrize("damage", ["mode", "content", "env"])
def test_root_key_problems_are_config_errors(
    home: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    root_key = home / "root.key"
    secret = root_key.read_text().strip()
    if damage == "mode":
        root_key.chmod(0o644)
        fragment = "chmod 600"
    elif damage == "content":
        root_key.write_text("not base64 at all!")
        fragment = "root key"
    else:
        monkeypatch.setenv("QIMEM_ROOT_KEY", "%%%")
        fragment = "QIMEM_ROOT_KEY"
    result = run("keys", "list")
    assert_one_line_error(result, 9, fragment)
    assert secret not in result.output


def test_version(qimem_home: Path) -> None:
    out = ok("--version").stdout
    assert "version 0." in out
