"""Plugin manifests: the schema, precise validation errors, TOML and JSON, API ranges, and
the manifests the built-in plugins ship."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from qimem import manifest
from qimem.errors import ValidationError
from qimem.manifest import IncompatiblePluginError, ManifestError
from qimem.registry import DEFAULT_PLUGINS, Registry, make_plugin_manager

GOOD: dict[str, Any] = {
    "name": "aes-gcm-siv",
    "version": "1.0.0",
    "description": "AES-256-GCM-SIV and an audit sink",
    "qimem_api": ">=1,<2",
    "provides": {"algorithms": ["aes-256-gcm-siv"], "event_hooks": ["qimem_key_event"]},
    "homepage": "https://example.org/siv",
}

GOOD_TOML = """\
name = "aes-gcm-siv"
version = "1.0.0"
description = "AES-256-GCM-SIV and an audit sink"
qimem_api = ">=1,<2"
homepage = "https://example.org/siv"

[provides]
algorithms = ["aes-256-gcm-siv"]
event_hooks = ["qimem_key_event"]
"""


def changed(**changes: Any) -> dict[str, Any]:
    data = {**GOOD, **changes}
    return {k: v for k, v in data.items() if v is not MISSING}


MISSING = object()


def test_valid_manifest_round_trips_as_json_and_toml(tmp_path: Path) -> None:
    found = manifest.validate(GOOD)
    assert found.name == "aes-gcm-siv" and found.compatible
    data = found.to_dict()
    assert data["provides"] == {
        "algorithms": ["aes-256-gcm-siv"],
        "keystores": [],
        "auth_providers": [],
        "root_key_providers": [],
        "event_hooks": ["qimem_key_event"],
    }
    assert manifest.parse_json(json.dumps(data)) == found
    assert manifest.parse_toml(GOOD_TOML) == found
    (tmp_path / "m.toml").write_text(GOOD_TOML)
    (tmp_path / "m.json").write_text(json.dumps(GOOD))
    assert manifest.load(tmp_path / "m.toml") == manifest.load(tmp_path / "m.json") == found


def test_homepage_is_optional_and_empty_provides_is_fine() -> None:
    found = manifest.validate(changed(homepage=MISSING, provides={}))
    assert found.homepage is None and "homepage" not in found.to_dict()
    assert found.provides == {}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (changed(name=MISSING), "field 'name' is required"),
        (changed(qimem_api=MISSING), "field 'qimem_api' is required"),
        (changed(provides=MISSING), "field 'provides' is required"),
        (changed(name="Upper"), "field 'name' must be 1-64 characters of lowercase"),
        (changed(name=""), "field 'name' must be 1-64 characters"),
        (changed(name="a" * 65), "field 'name' must be 1-64 characters"),
        (changed(name=7), "field 'name' must be a string, not an integer"),
        (changed(version="one"), "field 'version' must be a version such as '1.0.0'"),
        (changed(version=1.0), "field 'version' must be a string, not a number"),
        (changed(description=""), "field 'description' must be one line of 1-300"),
        (changed(description="two\nlines"), "field 'description' must be one line"),
        (changed(description="x" * 301), "field 'description' must be one line"),
        (changed(qimem_api="1"), "field 'qimem_api' clause '1' is not a version comparison"),
        (changed(qimem_api=">=1,"), "field 'qimem_api' clause '' is not a version comparison"),
        (changed(qimem_api=">=one"), "clause '>=one' is not a version comparison"),
        (changed(qimem_api=[">=1"]), "field 'qimem_api' must be a string, not a list"),
        (changed(homepage="ftp://x"), "field 'homepage' must be an http:// or https:// URL"),
        (changed(homepage="https://a b"), "field 'homepage' must be an http"),
        (changed(provides=["x"]), "field 'provides' must be a table of lists, not a list"),
        (changed(provides={"ciphers": []}), "field 'provides.ciphers' is not a kind"),
        (changed(provides={"algorithms": "x"}), "'provides.algorithms' must be a list of names"),
        (changed(provides={"algorithms": [1]}), "'provides.algorithms[0]' must be a string"),
        (changed(provides={"keystores": ["Bad Name"]}), "'provides.keystores[0]' 'Bad Name'"),
        (changed(provides={"algorithms": ["a", "a"]}), "'provides.algorithms[1]' 'a' is listed"),
        (changed(provides={"event_hooks": ["qimem_nope"]}), "'qimem_nope' is not an event hook"),
        (changed(extra=1), "field 'extra' is not a manifest field"),
        (changed(**{"qimem-api": ">=1"}), "field 'qimem-api' is not a manifest field"),
        (["not", "a", "table"], "a manifest must be a table (a JSON object), not a list"),
    ],
)
def test_invalid_manifest_names_field_and_problem(data: Any, problem: str) -> None:
    with pytest.raises(ManifestError) as info:
        manifest.validate(data, source="m.toml")
    assert isinstance(info.value, ValidationError)  # 400 / exit code 3
    assert info.value.code == "invalid_manifest"
    assert str(info.value).startswith("m.toml: invalid plugin manifest: ")
    assert problem in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ManifestError) as info:
        manifest.validate({"name": "X", "provides": {"algorithms": [1]}, "bogus": True})
    fields = ["'bogus'", "'version'", "'description'", "'qimem_api'", "'name'", "algorithms[0]"]
    for field in fields:
        assert field in str(info.value)
    assert len(info.value.problems) == 6


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name = ", "not valid TOML"),
        ('name = "x"\nname = "y"\n', "not valid TOML"),
    ],
)
def test_toml_syntax_errors(text: str, problem: str) -> None:
    with pytest.raises(ManifestError, match=problem):
        manifest.parse_toml(text)


def test_json_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        manifest.parse_json("{")
    with pytest.raises(ManifestError) as info:
        manifest.load(tmp_path / "absent.toml")
    assert "absent.toml: invalid plugin manifest: cannot read the file" in str(info.value)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ManifestError, match="not UTF-8"):
        manifest.load(tmp_path / "binary.toml")


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ((1, 0), ">=1,<2", True),
        ((1, 0), ">=1", True),
        ((1, 0), ">1", False),
        ((1, 0), ">=1.1", False),
        ((1, 0), "<1", False),
        ((1, 0), "==1", True),
        ((1, 0), "==1.0.0", True),
        ((1, 0), "!=1.0", False),
        ((1, 0), ">=2,<3", False),
        ((1, 3), "~=1.2", True),
        ((2, 0), "~=1.2", False),
        ((1, 1), "~=1.2", False),
        ((1, 2, 5), "~=1.2.0", True),
        ((1, 3, 0), "~=1.2.0", False),
        ((1, 0), " >= 1 , < 2 ", True),
    ],
)
def test_version_ranges(version: tuple[int, ...], spec: str, expected: bool) -> None:
    assert manifest.version_in_range(version, spec) is expected


def test_plugin_api_constant() -> None:
    assert manifest.PLUGIN_API_VERSION[0] >= 1
    assert ".".join(map(str, manifest.PLUGIN_API_VERSION)) == manifest.PLUGIN_API
    assert manifest.api_compatible(f">={manifest.PLUGIN_API}")
    nxt = manifest.PLUGIN_API_VERSION[0] + 1
    assert not manifest.api_compatible(f">={nxt}")


def test_incompatible_manifest_is_refused_clearly() -> None:
    found = manifest.validate(changed(qimem_api=">=2,<3"))
    assert not found.compatible
    with pytest.raises(IncompatiblePluginError) as info:
        found.check_compatible()
    assert str(info.value) == (
        "plugin 'aes-gcm-siv' is not compatible with this qimem: it requires qimem plugin "
        f"API '>=2,<3', and this qimem provides plugin API {manifest.PLUGIN_API}"
    )
    assert info.value.http_status == 400 and info.value.code == "incompatible_plugin"


def test_builtin_manifests_conform() -> None:
    manifests = Registry(make_plugin_manager()).manifests()
    assert set(manifests) == set(DEFAULT_PLUGINS)
    names = set()
    for data in manifests.values():
        found = manifest.validate(data)
        assert found.compatible
        names.add(found.name)
    assert names >= {"aes-256-gcm", "chacha20-poly1305", "memory-keystore", "sql-keystore"}
    assert "key-purposes" in names  # the other purposes (plugin API 1.2)


def test_from_package_reads_and_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "qimem_test_manifest_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / manifest.MANIFEST_FILENAME).write_text(GOOD_TOML)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert manifest.from_package("qimem_test_manifest_pkg") == manifest.validate(GOOD).to_dict()
    (package / manifest.MANIFEST_FILENAME).write_text(GOOD_TOML.replace('"1.0.0"', '"x"'))
    with pytest.raises(ManifestError, match="qimem_test_manifest_pkg/qimem_plugin.toml"):
        manifest.from_package("qimem_test_manifest_pkg")
    (package / manifest.MANIFEST_FILENAME).unlink()
    with pytest.raises(ManifestError, match="cannot read it"):
        manifest.from_package("qimem_test_manifest_pkg")


def test_openapi_schema_uses_the_same_rules() -> None:
    """server/openapi.json's PluginManifest repeats the patterns of qimem.manifest."""
    from qimem.server.ops import openapi_document

    schema = openapi_document()["components"]["schemas"]["PluginManifest"]
    props = schema["properties"]
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == sorted(manifest.REQUIRED)
    assert set(props) == set(manifest.FIELDS)
    assert props["name"]["pattern"] == manifest.NAME_PATTERN
    assert props["version"]["pattern"] == manifest.VERSION_PATTERN
    assert props["qimem_api"]["pattern"] == manifest.RANGE_PATTERN
    assert props["homepage"]["pattern"] == manifest.HOMEPAGE_PATTERN
    kinds = props["provides"]["properties"]
    assert set(kinds) == set(manifest.PROVIDES_KINDS)
    assert kinds["algorithms"]["items"]["pattern"] == manifest.PROVIDED_PATTERN
    assert kinds["event_hooks"]["items"]["pattern"] == manifest.EVENT_HOOK_PATTERN
    assert all(re.match(manifest.EVENT_HOOK_PATTERN, hook) for hook in manifest.EVENT_HOOKS)


def test_event_hooks_are_the_observing_hooks_of_the_specs() -> None:
    """provides.event_hooks accepts exactly the hooks that observe events."""
    pm = make_plugin_manager(builtins=())
    hooks = {name for name in vars(pm.hook) if name.startswith("qimem_")}
    observing = {
        h for h in hooks if not h.startswith("qimem_register_") and h != "qimem_plugin_manifest"
    }
    assert set(manifest.EVENT_HOOKS) == observing


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (manifest.parse_json, "[" * 100_000),
        (manifest.parse_json, '{"provides": ' * 5_000),
        (manifest.parse_toml, "name = " + "[" * 100_000),
    ],
)
def test_deeply_nested_documents_are_a_manifest_error(parse: Any, text: str) -> None:
    """Found writing fuzz/fuzz_manifest.py: the parsers' RecursionError escaped, and
    ``qimem plugins register deep.json`` failed as an internal error."""
    with pytest.raises(ManifestError, match="nested too deeply"):
        parse(text)


def test_cli_register_deeply_nested_json_is_one_clear_error(
    qimem_home: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from qimem.cli import cli

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    result = CliRunner().invoke(cli, ["plugins", "register", str(path)])
    assert result.exit_code == 3, (result.exit_code, result.output)
    assert "nested too deeply" in result.output and "Traceback" not in result.output


def test_version_pattern_has_no_catastrophic_backtracking() -> None:
    """Found by fuzz/fuzz_manifest.py (a libFuzzer timeout): ``([._+-]?[A-Za-z0-9]+)*``
    backtracked exponentially on a near-miss version, so validating one manifest (``POST
    /v1/plugins``, ``qimem plugins register``) never finished. Checked in a subprocess so
    that the old pattern makes this test fail at the timeout instead of hanging the suite."""
    import subprocess
    import sys

    version = "1.0.S" + "K" * 49 + "-25CM-Snk "  # 64 characters, invalid only at the end
    assert len(version) <= manifest.MAX_VERSION
    code = f"from qimem import manifest\nprint(manifest.problems({{'version': {version!r}}}))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert "field 'version' must be a version" in done.stdout


@pytest.mark.parametrize(
    ("version", "valid"),
    [
        ("1", True),
        ("1.0.0", True),
        ("2.1rc1", True),
        ("1.0.0-beta.2", True),
        ("1.0+local.7", True),
        ("1.0_a-b.c+d", True),
        ("1.0--a", False),
        ("1.0-", False),
        ("1..0", False),
        ("a1", False),
        ("1.0 ", False),
    ],
)
def test_version_pattern_language_is_unchanged(version: str, valid: bool) -> None:
    """The backtracking-free pattern accepts exactly what the old one did."""
    old = re.compile(r"^[0-9]+(\.[0-9]+)*([._+-]?[A-Za-z0-9]+)*\Z")
    assert bool(old.match(version)) is valid
    assert (not manifest.problems(changed(version=version))) is valid
