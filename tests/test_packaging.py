"""Packaging: the top-level ``hooks/``, ``builtin_plugins/``, ``server/`` folders ship as
``qimem.*``, nothing else lands in site-packages, and no package or data file is forgotten.

The slow test builds a real wheel from a copy of the source tree (so the shared checkout
gets no ``build/`` directory) and imports every module from the unpacked wheel alone.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"
BANNED = ("hooks", "server", "builtin_plugins")

REQUIRED_IN_WHEEL = [
    "qimem/__init__.py",
    "qimem/py.typed",
    "qimem/hooks/__init__.py",
    "qimem/hooks/specs.py",
    "qimem/hooks/markers.py",
    "qimem/builtin_plugins/__init__.py",
    "qimem/builtin_plugins/aes_gcm.py",
    "qimem/builtin_plugins/chacha20.py",
    "qimem/builtin_plugins/memory_keystore.py",
    "qimem/builtin_plugins/sql_keystore.py",
    "qimem/builtin_plugins/sql/__init__.py",
    "qimem/builtin_plugins/sql/store.py",
    "qimem/builtin_plugins/sql/sqlite.py",
    "qimem/builtin_plugins/sql/backend.py",
    "qimem/builtin_plugins/sql/catalog.py",
    "qimem/server/__init__.py",
    "qimem/builtin_plugins/sql/migrations/script.py.mako",
    "qimem/builtin_plugins/sql/migrations/env.py",
    "qimem/builtin_plugins/sql/migrations/versions/0001_keys.py",
    "qimem/cli/__init__.py",
]


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _package_dirs() -> dict[str, Path]:
    """Package name → source directory, from ``package_dir``."""
    mapping = {}
    for line in _lines(_setup_cfg()["options"]["package_dir"]):
        name, _, directory = (part.strip() for part in line.partition("="))
        mapping[name] = REPO / directory
    return mapping


def _source_packages() -> dict[str, Path]:
    """Every directory with an ``__init__.py`` under the mapped folders, by package name."""
    roots = _package_dirs()
    found: dict[str, Path] = {}
    for root_name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            found[".".join([root_name, *rel.parts])] = init.parent
    return found


def _data_files() -> dict[str, list[str]]:
    """Package name → its non-Python files (relative names), in the source tree."""
    result: dict[str, list[str]] = {}
    for name, directory in _source_packages().items():
        files = [
            p.name
            for p in directory.iterdir()
            if p.is_file() and p.suffix not in (".py", ".pyc") and not p.name.startswith(".")
        ]
        if files:
            result[name] = sorted(files)
    return result


def test_packages_match_directories_with_init() -> None:
    declared = set(_lines(_setup_cfg()["options"]["packages"]))
    on_disk = set(_source_packages())
    assert on_disk >= {"qimem", "qimem.hooks", "qimem.builtin_plugins", "qimem.server"}
    assert declared == on_disk, (
        f"missing from setup.cfg: {sorted(on_disk - declared)}; "
        f"declared without an __init__.py: {sorted(declared - on_disk)}"
    )


def test_mapped_folders_are_installed_under_qimem() -> None:
    mapping = _package_dirs()
    assert mapping == {
        "qimem": REPO / "qimem",
        "qimem.hooks": REPO / "hooks",
        "qimem.builtin_plugins": REPO / "builtin_plugins",
        "qimem.server": REPO / "server",
    }
    for directory in mapping.values():
        assert (directory / "__init__.py").is_file()  # setuptools #4943: no namespace dirs


def test_every_data_file_is_declared_package_data() -> None:
    section = _setup_cfg()["options.package_data"]
    patterns = {name: _lines(section[name]) for name in section}
    undeclared = [
        f"{package}/{filename}"
        for package, files in _data_files().items()
        for filename in files
        if not any(fnmatch.fnmatch(filename, pat) for pat in patterns.get(package, []))
    ]
    assert undeclared == [], f"add these to [options.package_data]: {undeclared}"


def test_ruff_bans_bare_imports_of_mapped_folders(tmp_path: Path) -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    lint = config["tool"]["ruff"]["lint"]
    assert "TID" in lint["select"] or "TID251" in lint["select"]
    banned = lint["flake8-tidy-imports"]["banned-api"]
    for name in BANNED:
        assert f"qimem.{name}" in banned[name]["msg"]

    if not RUFF.exists():
        pytest.skip("ruff is not installed next to this Python")
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import hooks\nfrom server import app\nimport builtin_plugins.aes_gcm\n"
        "from hooks.specs import qimem_key_event\nimport qimem.hooks\n"
        "from qimem.server import app as ok\n"
    )
    result = subprocess.run(
        [
            str(RUFF),
            "check",
            "--no-cache",
            "--config",
            str(REPO / "pyproject.toml"),
            "--select",
            "TID251",
            "--output-format",
            "concise",
            str(sample),
        ],
        capture_output=True,
        text=True,
    )
    flagged = sorted(
        int(line.split(":")[1]) for line in result.stdout.splitlines() if "TID251" in line
    )
    assert flagged == [1, 2, 3, 4], result.stdout


def test_repository_has_no_bare_imports() -> None:
    if not RUFF.exists():
        pytest.skip("ruff is not installed next to this Python")
    result = subprocess.run(
        [
            str(RUFF),
            "check",
            "--no-cache",
            "--config",
            str(REPO / "pyproject.toml"),
            "--select",
            "TID251",
            "--output-format",
            "concise",
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------- the real wheel


def _copy_source(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git",
        "__pycache__",
        "*.pyc",
        "*.egg-info",
        "build",
        "dist",
        ".ruff_cache",
        ".pytest_cache",
        ".venv",
        "venv",
    )
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def _build_requirements_met() -> bool:
    """Whether this environment satisfies ``[build-system] requires`` (then no download)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_source(base / "src")
    out = base / "dist"
    # Without the build requirements here (e.g. a fresh 3.11 venv has setuptools 65 and no
    # wheel), let build fetch them into an isolated environment, as pip install does.
    isolation = ["--no-isolation"] if _build_requirements_met() else []
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob("qimem-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
        top_level = zf.read(f"{dist_info}/top_level.txt").decode().split()

    strays = [n for n in names if not n.startswith(("qimem/", f"{dist_info}/"))]
    assert strays == [], f"files outside qimem/: {strays}"
    assert top_level == ["qimem"]
    missing = [n for n in REQUIRED_IN_WHEEL if n not in names]
    assert missing == [], missing
    # Every module and data file of every source package is in the wheel.
    for package, directory in _source_packages().items():
        prefix = package.replace(".", "/")
        for path in directory.iterdir():
            if path.is_file() and path.suffix != ".pyc" and not path.name.startswith("."):
                assert f"{prefix}/{path.name}" in names, f"{path} is not in the wheel"
    scripts = dict(entry_points["console_scripts"])
    assert scripts["qimem"] == "qimem.cli:main"
    assert scripts["qauth"] == "qimem.cli.qauth:main"


@pytest.mark.slow
def test_wheel_imports_on_its_own(wheel: Path, tmp_path: Path) -> None:
    """Unpacked alone on sys.path (no source tree, no editable finder first), every module
    imports and the mapped packages resolve inside it."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    program = (
        "import importlib, pkgutil, sys\n"
        "import qimem, qimem.hooks, qimem.builtin_plugins, qimem.server\n"
        f"root = {str(site)!r}\n"
        "for mod in (qimem, qimem.hooks, qimem.builtin_plugins, qimem.server):\n"
        "    assert mod.__file__.startswith(root), mod.__file__\n"
        "for info in pkgutil.walk_packages(qimem.__path__, 'qimem.'):\n"
        "    if info.name == 'qimem.builtin_plugins.sql.migrations.env':\n"
        "        continue  # an Alembic script, only runs inside Alembic\n"
        "    module = importlib.import_module(info.name)\n"
        "    assert module.__file__.startswith(root), module.__file__\n"
        "for name in ('hooks', 'server', 'builtin_plugins'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "from qimem.registry import Registry, make_plugin_manager\n"
        "print(sorted(Registry(make_plugin_manager()).algorithms))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['aes-256-gcm', 'chacha20-poly1305']"
