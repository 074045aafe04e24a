"""Plugin manifests: the schema, strict validation, and finding a package's manifest file.

A manifest describes one plugin. It is a TOML file shipped as package data
(``qimem_plugin.toml`` next to the plugin's code), the value the plugin's
``qimem_plugin_manifest`` hook returns, and the JSON object ``GET|POST /v1/plugins`` speak:

.. code-block:: toml

    name = "aes-gcm-siv"                      # the entry-point name users enable
    version = "1.0.0"
    description = "AES-256-GCM-SIV and a JSON-lines audit sink"
    qimem_api = ">=1,<2"                      # the qimem plugin API versions it works with
    homepage = "https://example.org/qimem-plugin-aes-gcm-siv"   # optional

    [provides]                                # every kind optional, lists of names
    algorithms = ["aes-256-gcm-siv"]
    keystores = []
    auth_providers = []
    root_key_providers = []
    event_hooks = ["qimem_key_event"]

Validation reports every problem at once, each naming the field and what is wrong
(``manifest field 'provides.algorithms[0]': ...``). Unknown fields are refused, so a typo
(``qimem-api``) is an error rather than a silently missing compatibility range.

The manifest file of an installed plugin is read **without importing the plugin**: qimem
looks it up in the distribution's file list (or next to the package, for editable
installs), so ``qimem plugins list`` can show the manifest of a plugin that is installed
but not enabled, and an incompatible plugin is refused before any of its code runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qimem.errors import ValidationError

#: The version of the plugin API this qimem implements (hooks, their arguments, the
#: :class:`qimem.crypto.Algorithm` and :class:`qimem.keystore.KeyStore` contracts). The
#: major number changes only when a change can break existing plugins. 1.1: a key store
#: factory may return a whole :class:`qimem.backend.Backend` (1.0's bare KeyStore still works).
#: 1.2: algorithms may declare a ``purpose`` (``sign``, ``mac``, ``deterministic``; see
#: :mod:`qimem.crypto_purposes`); one without it is an AEAD, as before.
PLUGIN_API_VERSION = (1, 2)
#: :data:`PLUGIN_API_VERSION` as a string (``"1.2"``).
PLUGIN_API = ".".join(map(str, PLUGIN_API_VERSION))

#: The name of the manifest file inside a plugin package.
MANIFEST_FILENAME = "qimem_plugin.toml"

#: The kinds a plugin may provide, in display order.
PROVIDES_KINDS = (
    "algorithms",
    "keystores",
    "auth_providers",
    "root_key_providers",
    "event_hooks",
)


def _event_hooks() -> tuple[str, ...]:
    from qimem.hooks import specs

    return tuple(
        sorted(
            name
            for name in vars(specs)
            if name.startswith("qimem_")
            and not name.startswith("qimem_register_")
            and name != "qimem_plugin_manifest"
        )
    )


#: The hooks a plugin may list under ``provides.event_hooks``: every hook of
#: :mod:`qimem.hooks.specs` that observes events (not the ``qimem_register_*`` collectors
#: or the manifest hook).
EVENT_HOOKS = _event_hooks()

FIELDS = ("name", "version", "description", "qimem_api", "provides", "homepage")
REQUIRED = ("name", "version", "description", "qimem_api", "provides")

# The same patterns are in server/openapi.json (PluginManifest), so both agree exactly.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# One separator-or-not per character: the same language as ([._+-]?[A-Za-z0-9]+)*, without
# its exponential backtracking on a near miss (found by fuzz/fuzz_manifest.py).
VERSION_PATTERN = r"^[0-9]+(\.[0-9]+)*([._+-]?[A-Za-z0-9])*$"
PROVIDED_PATTERN = r"^[a-z0-9][a-z0-9_+.-]{0,63}$"
EVENT_HOOK_PATTERN = r"^qimem_[a-z0-9_]{1,58}$"
HOMEPAGE_PATTERN = r"^https?://[^\s\x00-\x1f\x7f]{1,500}$"
_CLAUSE = r"(>=|<=|==|!=|~=|>|<) *[0-9]+(\.[0-9]+)*"
RANGE_PATTERN = rf"^ *{_CLAUSE} *(, *{_CLAUSE} *)*$"
MAX_DESCRIPTION = 300
MAX_VERSION = 64
MAX_RANGE = 100
MAX_PROVIDED = 64

_NAME_RE = re.compile(NAME_PATTERN.replace("$", r"\Z"))
_VERSION_RE = re.compile(VERSION_PATTERN.replace("$", r"\Z"))
_PROVIDED_RE = re.compile(PROVIDED_PATTERN.replace("$", r"\Z"))
_HOMEPAGE_RE = re.compile(HOMEPAGE_PATTERN.replace("$", r"\Z"))
_RANGE_RE = re.compile(RANGE_PATTERN.replace("$", r"\Z"))
_CLAUSE_RE = re.compile(r"^ *(>=|<=|==|!=|~=|>|<) *([0-9]+(?:\.[0-9]+)*) *\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class ManifestError(ValidationError):
    """A manifest that does not follow the schema; :attr:`problems` lists every problem."""

    code = "invalid_manifest"

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid plugin manifest: " + "; ".join(self.problems))


class IncompatiblePluginError(ValidationError):
    """A plugin whose ``qimem_api`` range excludes this qimem's plugin API."""

    code = "incompatible_plugin"


@dataclass(frozen=True)
class Manifest:
    """A validated plugin manifest."""

    name: str
    version: str
    description: str
    qimem_api: str
    provides: dict[str, list[str]] = field(default_factory=dict)
    homepage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON/TOML shape: every provides kind present, ``homepage`` only when set."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "qimem_api": self.qimem_api,
            "provides": {kind: list(self.provides.get(kind, [])) for kind in PROVIDES_KINDS},
        }
        if self.homepage is not None:
            data["homepage"] = self.homepage
        return data

    @property
    def compatible(self) -> bool:
        """Whether this qimem's plugin API is in the manifest's ``qimem_api`` range."""
        return api_compatible(self.qimem_api)

    def check_compatible(self) -> None:
        """:raises IncompatiblePluginError: the plugin does not support this plugin API."""
        check_compatible(self.name, self.qimem_api)


# ---------------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    names = {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def range_problem(value: str) -> str | None:
    """What is wrong with a ``qimem_api`` range such as ``">=1,<2"``, or ``None``."""
    if len(value) > MAX_RANGE:
        return f"must be at most {MAX_RANGE} characters"
    for clause in value.split(","):
        if not _CLAUSE_RE.match(clause):
            return (
                f"clause {clause.strip()!r} is not a version comparison such as '>=1' "
                "(write a range like '>=1,<2')"
            )
    return None


def problems(data: Any) -> list[str]:
    """Every way ``data`` breaks the manifest schema (empty: it is a valid manifest)."""
    if not isinstance(data, dict):
        return [f"a manifest must be a table (a JSON object), not {_describe(data)}"]
    found: list[str] = []

    def bad(name: str, what: str) -> None:
        found.append(f"field {name!r} {what}")

    for key in data:
        if key not in FIELDS:
            bad(str(key), f"is not a manifest field (known: {', '.join(FIELDS)})")
    for key in REQUIRED:
        if key not in data:
            bad(key, "is required")

    def string(name: str) -> str | None:
        value = data.get(name)
        if name in data and not isinstance(value, str):
            bad(name, f"must be a string, not {_describe(value)}")
            return None
        return value

    name = string("name")
    if name is not None and not _NAME_RE.match(name):
        bad(
            "name",
            "must be 1-64 characters of lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    version = string("version")
    if version is not None and (len(version) > MAX_VERSION or not _VERSION_RE.match(version)):
        bad("version", "must be a version such as '1.0.0' (at most 64 characters)")
    description = string("description")
    if description is not None and (
        not description.strip()
        or len(description) > MAX_DESCRIPTION
        or _CONTROL_RE.search(description)
    ):
        bad("description", f"must be one line of 1-{MAX_DESCRIPTION} characters")
    qimem_api = string("qimem_api")
    if qimem_api is not None:
        problem = range_problem(qimem_api)
        if problem:
            bad("qimem_api", problem)
    homepage = string("homepage")
    if homepage is not None and not _HOMEPAGE_RE.match(homepage):
        bad("homepage", "must be an http:// or https:// URL")

    provides = data.get("provides")
    if "provides" in data and not isinstance(provides, dict):
        bad("provides", f"must be a table of lists, not {_describe(provides)}")
    elif isinstance(provides, dict):
        for kind, names in provides.items():
            where = f"provides.{kind}"
            if kind not in PROVIDES_KINDS:
                bad(where, f"is not a kind a plugin can provide ({', '.join(PROVIDES_KINDS)})")
                continue
            if not isinstance(names, list):
                bad(where, f"must be a list of names, not {_describe(names)}")
                continue
            if len(names) > MAX_PROVIDED:
                bad(where, f"must list at most {MAX_PROVIDED} names")
            seen: set[str] = set()
            for index, item in enumerate(names):
                at = f"{where}[{index}]"
                if not isinstance(item, str):
                    bad(at, f"must be a string, not {_describe(item)}")
                elif not _PROVIDED_RE.match(item):
                    bad(at, f"{item[:70]!r} is not a lowercase name such as 'aes-256-gcm'")
                elif kind == "event_hooks" and item not in EVENT_HOOKS:
                    bad(at, f"{item!r} is not an event hook ({', '.join(EVENT_HOOKS)})")
                elif item in seen:
                    bad(at, f"{item!r} is listed twice")
                else:
                    seen.add(item)
    return found


def validate(data: Any, *, source: str | None = None) -> Manifest:
    """A :class:`Manifest` from a parsed TOML table or JSON object.

    :param source: where the data came from (a file name, ``"plugin 'x'"``), for errors.
    :raises ManifestError: naming every field that is missing, unknown or wrong.
    """
    found = problems(data)
    if found:
        raise ManifestError(found, source=source)
    provides = {kind: list(names) for kind, names in data["provides"].items() if names}
    return Manifest(
        name=data["name"],
        version=data["version"],
        description=data["description"],
        qimem_api=data["qimem_api"].strip(),
        provides=provides,
        homepage=data.get("homepage"),
    )


def parse_toml(text: str, *, source: str | None = None) -> Manifest:
    """Validate a manifest written as TOML.

    :raises ManifestError: the text is not TOML, or the manifest is invalid.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([f"not valid TOML ({exc})"], source=source) from None
    except RecursionError:
        raise ManifestError(["not valid TOML (nested too deeply)"], source=source) from None
    return validate(data, source=source)


def parse_json(text: str | bytes, *, source: str | None = None) -> Manifest:
    """Validate a manifest written as JSON.

    :raises ManifestError: the text is not JSON, or the manifest is invalid.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError([f"not valid JSON ({exc})"], source=source) from None
    except RecursionError:
        raise ManifestError(["not valid JSON (nested too deeply)"], source=source) from None
    return validate(data, source=source)


def load(path: str | Path) -> Manifest:
    """Read and validate a manifest file: ``.json`` as JSON, anything else as TOML.

    :raises ManifestError: the file is missing, unreadable or invalid (naming the file).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(
            [f"cannot read the file ({exc.strerror or type(exc).__name__})"], source=str(path)
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(["the file is not UTF-8 text"], source=str(path)) from None
    if path.suffix.lower() == ".json":
        return parse_json(text, source=str(path))
    return parse_toml(text, source=str(path))


def from_package(package: str) -> dict[str, Any]:
    """The validated manifest shipped in ``package`` as :data:`MANIFEST_FILENAME`, as a dict.

    Meant for a plugin's own ``qimem_plugin_manifest`` hook, so the TOML file is the one
    source of truth::

        @hookimpl
        def qimem_plugin_manifest():
            return qimem.manifest.from_package(__package__)

    :raises ManifestError: the file is missing or invalid.
    """
    source = f"{package}/{MANIFEST_FILENAME}"
    try:
        text = resources.files(package).joinpath(MANIFEST_FILENAME).read_text("utf-8")
    except (OSError, ModuleNotFoundError, UnicodeDecodeError) as exc:
        raise ManifestError([f"cannot read it ({type(exc).__name__})"], source=source) from None
    return parse_toml(text, source=source).to_dict()


# ---------------------------------------------------------------- compatibility


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _pad(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    size = max(len(a), len(b))
    return a + (0,) * (size - len(a)), b + (0,) * (size - len(b))


def version_in_range(version: tuple[int, ...], spec: str) -> bool:
    """Whether ``version`` satisfies every clause of ``spec`` (such as ``">=1,<2"``).

    Operators: ``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=`` and ``~=`` (compatible release:
    ``~=1.2`` means ``>=1.2,<2``). Missing components count as 0 (``1`` equals ``1.0``).

    :raises ValidationError: ``spec`` is not a range.
    """
    problem = range_problem(spec)
    if problem:
        raise ValidationError(f"version range {spec!r}: {problem}")
    for clause in spec.split(","):
        match = _CLAUSE_RE.match(clause)
        assert match is not None  # checked above
        op, bound_text = match.groups()
        bound = _version_tuple(bound_text)
        have, want = _pad(version, bound)
        if op == "~=":
            upper = (*bound[:-2], bound[-2] + 1) if len(bound) >= 2 else (bound[0] + 1,)
            ok = have >= want and _pad(version, upper)[0] < _pad(version, upper)[1]
        else:
            ok = {
                ">=": have >= want,
                ">": have > want,
                "<=": have <= want,
                "<": have < want,
                "==": have == want,
                "!=": have != want,
            }[op]
        if not ok:
            return False
    return True


def api_compatible(spec: str) -> bool:
    """Whether this qimem's :data:`PLUGIN_API_VERSION` satisfies ``spec``."""
    return version_in_range(PLUGIN_API_VERSION, spec)


def incompatibility(name: str, spec: str) -> str:
    """The message for a plugin whose range ``spec`` excludes this qimem's plugin API."""
    return (
        f"plugin {name!r} is not compatible with this qimem: it requires qimem plugin API "
        f"{spec.strip()!r}, and this qimem provides plugin API {PLUGIN_API}"
    )


def check_compatible(name: str, spec: str) -> None:
    """:raises IncompatiblePluginError: ``spec`` excludes this qimem's plugin API."""
    if not api_compatible(spec):
        raise IncompatiblePluginError(incompatibility(name, spec))


# ---------------------------------------------- manifests of installed plugins


def manifest_path(entry_point: Any) -> Path | None:
    """The :data:`MANIFEST_FILENAME` of an installed plugin, found without importing it.

    Looks in the distribution's file list (regular installs) and next to the entry point's
    module (editable installs; ``importlib.util.find_spec`` of a top-level name imports
    nothing). ``None`` when the plugin ships no manifest file.
    """
    module = str(getattr(entry_point, "module", "") or entry_point.value.split(":")[0])
    parts = [p for p in module.split(".") if p]
    if not parts:
        return None
    dist = getattr(entry_point, "dist", None)
    try:
        files = list(dist.files or []) if dist is not None else []
    except Exception:  # a broken RECORD: fall back to the package folder
        files = []
    wanted = [tuple(parts[:i]) for i in range(len(parts), 0, -1)]
    for folder in wanted:
        for item in files:
            if (
                dist is not None
                and item.name == MANIFEST_FILENAME
                and tuple(item.parts[:-1]) == folder
            ):
                located = Path(str(dist.locate_file(item)))
                if located.is_file():
                    return located
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    # Only packages: a manifest next to a top-level module would be shared by every module.
    for root in list(getattr(spec, "submodule_search_locations", None) or []):
        for folder in wanted:
            candidate = Path(root, *folder[1:], MANIFEST_FILENAME)
            if candidate.is_file():
                return candidate
    return None


def read_installed(entry_point: Any) -> Manifest | None:
    """The validated manifest file of an installed plugin (not imported), or ``None``.

    :raises ManifestError: the plugin ships a manifest file that is invalid.
    """
    path = manifest_path(entry_point)
    if path is None:
        return None
    return load(path)
