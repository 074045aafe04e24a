"""The example third-party package, examples/qimem-plugin-aes-gcm-siv, for real.

The slow test builds wheels of qimem and of the example, installs both into a fresh virtual
environment (not --system-site-packages: its only window on the test environment is a
directory of links to the third-party dependencies, without qimem itself), enables the
plugin, and round-trips an ``aes-256-gcm-siv`` key through the CLI and a live
``qimem serve`` subprocess. No network: ``pip install --no-index``.

The fast tests run the plugin in-process from its source folder: the Project Wycheproof
AES-GCM-SIV vectors through its algorithm object, its manifest, its audit sink.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from qimem import manifest, services
from qimem.app import AppContext
from qimem.config import Config
from qimem.errors import DecryptionError, ValidationError
from qimem.registry import Registry, make_plugin_manager

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "qimem-plugin-aes-gcm-siv"
WYCHEPROOF = Path(__file__).resolve().parent / "vectors" / "wycheproof" / "aes_gcm_siv_test.json"
PLUGIN = "aes-gcm-siv"


@pytest.fixture(scope="module")
def example(pytestconfig: pytest.Config) -> Iterator[Any]:
    """The example package imported from its source folder."""
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        import qimem_plugin_aes_gcm_siv

        yield qimem_plugin_aes_gcm_siv
    finally:
        sys.path.remove(str(EXAMPLE / "src"))
        for name in [m for m in sys.modules if m.startswith("qimem_plugin_aes_gcm_siv")]:
            del sys.modules[name]


# ------------------------------------------------------------------- wycheproof


def _cases() -> list[Any]:
    data = json.loads(WYCHEPROOF.read_text("utf-8"))
    cases = []
    for group in data["testGroups"]:
        if (group["keySize"], group["ivSize"], group["tagSize"]) != (256, 96, 128):
            continue
        cases += [pytest.param(case, id=f"tc{case['tcId']}") for case in group["tests"]]
    return cases


CASES = _cases()


def test_wycheproof_case_count() -> None:
    # 256-bit keys, 96-bit nonces: a change means the file or the filter changed.
    assert len(CASES) == 103
    assert {c.values[0]["result"] for c in CASES} == {"valid", "invalid"}


@pytest.mark.parametrize("case", CASES)
def test_wycheproof_aes_gcm_siv(example: Any, case: dict[str, Any]) -> None:
    algorithm = example.AesGcmSiv()
    key, nonce = bytes.fromhex(case["key"]), bytes.fromhex(case["iv"])
    aad, msg = bytes.fromhex(case["aad"]), bytes.fromhex(case["msg"])
    sealed = bytes.fromhex(case["ct"] + case["tag"])
    if case["result"] == "valid":
        assert algorithm.encrypt(key, nonce, msg, aad) == sealed
        assert algorithm.decrypt(bytearray(key), nonce, sealed, aad) == msg
    else:
        with pytest.raises(DecryptionError):
            algorithm.decrypt(key, nonce, sealed, aad)


def test_algorithm_refuses_bad_sizes(example: Any) -> None:
    algorithm = example.AesGcmSiv()
    with pytest.raises(ValidationError, match="32-byte key"):
        algorithm.encrypt(b"k" * 16, b"n" * 12, b"x")
    with pytest.raises(ValidationError, match="12-byte nonce"):
        algorithm.encrypt(b"k" * 32, b"n" * 16, b"x")
    assert len(algorithm.generate_key()) == 32


# --------------------------------------------------------------- in-process


def test_manifest_file_is_valid_and_matches_the_hook(example: Any) -> None:
    shipped = manifest.load(EXAMPLE / "src" / "qimem_plugin_aes_gcm_siv" / "qimem_plugin.toml")
    assert shipped.name == PLUGIN
    assert shipped.compatible
    assert shipped.provides == {
        "algorithms": ["aes-256-gcm-siv"],
        "event_hooks": ["qimem_key_event"],
    }
    assert example.qimem_plugin_manifest() == shipped.to_dict()
    project = (EXAMPLE / "pyproject.toml").read_text()
    assert f'{PLUGIN} = "qimem_plugin_aes_gcm_siv"' in project


def test_in_process_round_trip_and_audit(
    example: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("QIMEM_AUDIT_FILE", str(audit))
    pm = make_plugin_manager()
    pm.register(example, name=PLUGIN)
    pm.check_pending()
    assert Registry(pm).algorithms["aes-256-gcm-siv"].algorithm_id == 210
    with AppContext(Config(store_url="memory://"), pm=pm) as app:
        key = services.create_key(app, algorithm="aes-256-gcm-siv", name="siv")
        sealed = services.encrypt(app, "siv", b"misuse resistant", aad=b"ctx")
        assert sealed.envelope[5] == 210  # the algorithm id byte of envelope v1
        assert services.decrypt(app, sealed.envelope, aad=b"ctx").plaintext == b"misuse resistant"
        rotated = services.rotate_key(app, "siv")
        material = bytes(app.store.material(key.realm, key.key_id))
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["kind"], r["version"], r["algorithm"]) for r in records] == [
        ("created", 1, "aes-256-gcm-siv"),
        ("rotated", 2, "aes-256-gcm-siv"),
    ]
    assert records[1]["key_id"] == rotated.key_id
    assert records[1]["previous_key_id"] == key.key_id
    _assert_no_material(audit.read_text(), [material])


def _assert_no_material(text: str, materials: list[bytes]) -> None:
    for material in materials:
        assert len(material) == 32
        for encoded in (
            material.hex(),
            base64.b64encode(material).decode(),
            base64.urlsafe_b64encode(material).decode().rstrip("="),
        ):
            assert encoded not in text


# ------------------------------------------------------ a fresh venv, for real


def _build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` of a copy of ``source`` (the checkout gets no build/ folder)."""
    copy = out.parent / f"src-{source.name}"
    shutil.copytree(
        source,
        copy,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", "venv", ".venv"
        ),
    )
    # With the build requirements installed here, build without downloading anything;
    # otherwise (a fresh CI venv) let pip fetch them into an isolated build environment.
    isolation = ["--no-build-isolation"] if _build_requirements_met(source) else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out)]
        + [str(copy)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    name = source.name.replace("-", "_") if source != REPO else "qimem"
    (wheel,) = out.glob(f"{name}-*.whl")
    return wheel


def _build_requirements_met(source: Path) -> bool:
    """Whether this environment satisfies ``source``'s ``[build-system] requires``."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    requires = tomllib.loads((source / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


def _dependency_dir(base: Path) -> Path:
    """Links to this environment's site-packages entries, minus qimem itself: the fresh
    venv's dependencies without downloading them, and without the editable qimem."""
    deps = base / "deps"
    deps.mkdir()
    for root in site.getsitepackages():
        for entry in Path(root).iterdir():
            lowered = entry.name.lower()
            if lowered.startswith(("qimem", "__editable__", "_qimem")) or entry.suffix == ".pth":
                continue
            target = deps / entry.name
            if not target.exists():
                target.symlink_to(entry)
    return deps


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with qimem and the example installed from wheels, offline."""
    base = tmp_path_factory.mktemp("example-venv")
    wheels = base / "wheelhouse"
    wheels.mkdir()
    qimem_wheel = _build_wheel(REPO, wheels)
    example_wheel = _build_wheel(EXAMPLE, wheels)
    env_dir = base / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120
    )
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "qimem_test_dependencies.pth").write_text(f"{_dependency_dir(base)}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index"]
        + ["--no-deps", "--find-links", str(wheels), str(qimem_wheel), str(example_wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return env_dir


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QIMEM_", "PYTHON"))}
    env.update(QIMEM_HOME=str(home), QIMEM_AUDIT_FILE=str(home / "audit.jsonl"))
    return env


@pytest.mark.slow
def test_installed_example_round_trips_through_cli_and_http(
    venv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    env = _env(home)
    qimem = str(venv / "bin" / "qimem")

    def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:  # noqa: A002
        return subprocess.run(
            [qimem, *args], input=input, capture_output=True, env=env, cwd=tmp_path, timeout=120
        )

    # qimem runs from the venv's own copy, not from the checkout.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import qimem; print(qimem.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where

    assert run("init").returncode == 0
    before = {p["name"]: p for p in json.loads(run("plugins", "list", "--json").stdout)}
    assert before[PLUGIN]["installed"] and not before[PLUGIN]["enabled"]
    assert not before[PLUGIN]["loaded"] and before[PLUGIN]["compatible"] is True
    assert "not enabled" in before[PLUGIN]["reason"]
    assert before[PLUGIN]["manifest"]["provides"]["algorithms"] == ["aes-256-gcm-siv"]
    assert before[PLUGIN]["distribution"] == "qimem-plugin-aes-gcm-siv 1.0.0"
    assert {"aes-256-gcm", "chacha20-poly1305", "sql-keystore"} <= set(before)
    refused = run("keys", "create", "--algorithm", "aes-256-gcm-siv")
    assert refused.returncode == 3 and b"unknown algorithm" in refused.stderr

    enabled = run("plugins", "enable", PLUGIN)
    assert enabled.returncode == 0, enabled.stderr
    created = run("keys", "create", "--algorithm", "aes-256-gcm-siv", "--name", "siv", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["algorithm"] == "aes-256-gcm-siv"
    sealed = run("encrypt", "--key", "siv", input=b"through a third-party plugin")
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout[5] == 210  # the algorithm id byte of the stream header
    opened = run("decrypt", input=sealed.stdout)
    assert opened.returncode == 0 and opened.stdout == b"through a third-party plugin"
    shown = json.loads(run("plugins", "show", PLUGIN, "--json").stdout)
    assert shown["loaded"] and shown["enabled"] and shown["reason"] is None

    server = subprocess.Popen(
        [qimem, "serve", "--insecure-no-auth", "--host", "127.0.0.1", "--port", "0"]
        + ["--no-access-log"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    try:
        url = _wait_for_url(server)
        with requests.Session() as http:
            made = http.post(
                f"{url}/v1/security/keys",
                json={"algorithm": "aes-256-gcm-siv", "name": "siv-http"},
                timeout=30,
            )
            assert made.status_code == 201, made.text
            assert made.json()["algorithm"] == "aes-256-gcm-siv"
            enc = http.post(
                f"{url}/v1/security/encrypt",
                json={"key": "siv-http", "plaintext": base64.b64encode(b"over http").decode()},
                timeout=30,
            )
            assert enc.status_code == 200, enc.text
            assert base64.b64decode(enc.json()["envelope"])[5] == 210
            dec = http.post(
                f"{url}/v1/security/decrypt", json={"envelope": enc.json()["envelope"]}, timeout=30
            )
            assert dec.status_code == 200, dec.text
            assert base64.b64decode(dec.json()["plaintext"]) == b"over http"
            listed = http.get(f"{url}/v1/plugins", timeout=30).json()
            mine = next(p for p in listed["plugins"] if p["name"] == PLUGIN)
            assert mine["loaded"] and listed["plugin_api"] == manifest.PLUGIN_API
            http_key_id = made.json()["key_id"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        if server.stderr is not None:
            server.stderr.close()

    audit = (home / "audit.jsonl").read_text()
    records = [json.loads(line) for line in audit.splitlines()]
    assert [(r["kind"], r["name"], r["algorithm"]) for r in records] == [
        ("created", "siv", "aes-256-gcm-siv"),
        ("created", "siv-http", "aes-256-gcm-siv"),
    ]
    assert {r["key_id"] for r in records} == {key["key_id"], http_key_id}
    assert "through a third-party plugin" not in audit and "over http" not in audit
    # Read the two keys' material from the store (this process has no plugin: material
    # does not need the algorithm) and make sure the audit file holds none of it.
    monkeypatch.delenv("QIMEM_STORE", raising=False)
    monkeypatch.delenv("QIMEM_ROOT_KEY", raising=False)
    with AppContext(_load(home / "config.toml")) as app:
        materials = [bytes(app.store.material("master", r["key_id"])) for r in records]
    _assert_no_material(audit, materials)


def _load(path: Path) -> Config:
    import dataclasses

    from qimem.config import load_config

    # the plugin is installed in the venv, not here
    return dataclasses.replace(load_config(path), plugins_enabled=[])


def _wait_for_url(server: subprocess.Popen[bytes]) -> str:
    """Read the server's stderr until it says where it listens."""
    assert server.stderr is not None
    deadline = time.monotonic() + 60
    seen = b""
    while time.monotonic() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        seen += line
        found = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return found.group(1).decode()
    server.kill()
    raise AssertionError(f"the server did not start: {seen[-2000:]!r}")


# ------------------------------------------- the guide's contract-suite example


def test_docs_contract_example_passes_the_contract(tmp_path: Path) -> None:
    """docs/plugins.md's custom key store passes qimem.testing.KeyStoreContract as written."""
    from qimem.testing import KeyStoreContract

    text = (REPO / "docs" / "plugins.md").read_text("utf-8")
    blocks = re.findall(r"^```python\n(# test_dict_store\.py\n.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1
    (tmp_path / "test_dict_store.py").write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_dict_store.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    tests = [getattr(KeyStoreContract, n) for n in dir(KeyStoreContract) if n.startswith("test_")]
    optional = [t for t in tests if getattr(t, "optional_capability", False)]
    # DictKeyStore implements the core contract; the lifecycle methods keep the KeyStore
    # defaults (refused as unsupported), so their checks are skipped, never failed.
    assert f"{len(tests) - len(optional)} passed, {len(optional)} skipped" in result.stdout
    assert "failed" not in result.stdout and len(optional) >= 1
