"""qimem's imports form layers without cycles.

Every ``import`` of every module of the installed packages (``qimem/``, ``hooks/``,
``builtin_plugins/``, ``server/``) is read from the source, including the imports inside
functions (lazy imports still tie modules together) and leaving out ``if TYPE_CHECKING:``
blocks (annotations only). The test fails on any import cycle and on any module importing a
higher layer than its own; a new module must be given a layer below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "qimem": ROOT / "qimem",
    "qimem.hooks": ROOT / "hooks",
    "qimem.builtin_plugins": ROOT / "builtin_plugins",
    "qimem.server": ROOT / "server",
}

#: Layers, lowest first; a module may import its own layer and the ones below. The longest
#: matching prefix places a module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "primitives",
        (
            "qimem",  # the package itself: errors only, the rest lazily by name
            "qimem.errors",
            "qimem.crypto",
            "qimem.crypto_purposes",
            "qimem.envelope",
            "qimem.stream",
            "qimem.fileio",
            "qimem.hardening",
            "qimem.hashing_processes",  # Argon2 in helper processes (argon2-cffi only)
            "qimem.lazylog",
            "qimem.random_ids",
            "qimem.references",
            "qimem.sqlite_files",
            "qimem.hooks",
        ),
    ),
    (
        "keys, store, config, plugins",
        (
            "qimem.keys",
            "qimem.keystore",
            "qimem.keycache",
            "qimem.cached_key",  # the key cache's entry (CachedKey)
            "qimem.invalidation",  # change notices: sent by stores, applied to the caches
            "qimem.events",
            "qimem.config",
            "qimem.rootkey",
            "qimem.root",  # root-key providers, the keyring (rotation is a service, below)
            "qimem.manifest",
            "qimem.registry",
            "qimem.backend",
            "qimem.sql",
            "qimem.testing",
            "qimem.testing_catalog",
            "qimem.testing_keystore_states",  # part of the key store contract
            "qimem.http_client",
        ),
    ),
    ("identity", ("qimem.identity",)),
    ("composition root", ("qimem.app",)),
    (
        "services",
        (
            "qimem.services",
            "qimem.batch",
            "qimem.batch_group",
            "qimem.batch_plan",
            "qimem.batch_progress",
            "qimem.batch_parallel",
            "qimem.backup",
            "qimem.purger",
            "qimem.remote",
            "qimem.testing_identity",  # the identity contract drives qimem.services.identity
            "qimem.testing_identity_tokens",
            "qimem.root.rotation",  # moves the store's and the identity layer's rows
            "qimem.testing_rootkey",  # the provider contract opens apps and rotates
        ),
    ),
    # Built-in plugins may use all of qimem's core, never the CLI or the server; no core
    # module imports them (the registry loads them by name).
    ("builtin plugins", ("qimem.builtin_plugins",)),
    ("interfaces", ("qimem.cli", "qimem.server")),
]

#: Imports that cross the layers on purpose, with the reason.
ALLOWED = {
    # The schema (keys, identity, plugin catalog) is the SQL store's: its migrations live
    # with it, and qimem.sql, which identity's database also uses, compares against HEAD.
    ("qimem.sql", "qimem.builtin_plugins.sql.migrations"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if ".migrations.versions" in name or name.endswith(".migrations.env"):
                continue  # Alembic scripts, run by Alembic only
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The qimem modules ``name`` imports (eagerly or lazily) → the first line doing so."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in modules and target != name:
            found.setdefault(target, line)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    sub = f"{module}.{alias.name}"
                    add(sub if sub in modules else module, child.lineno)
            else:
                visit(child)

    visit(ast.parse(path.read_text("utf-8")))
    return found


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # "qimem" places the package's __init__ only, not everything under it
            covers = module == prefix or (prefix != "qimem" and module.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_walk_sees_the_known_imports() -> None:
    graph = _graph()
    assert "qimem.services.keys" in graph["qimem.services.lifecycle"]
    assert "qimem.app" in graph["qimem.services.keys"]
    assert "qimem.identity" in graph["qimem.app"]  # a lazy import, inside a method
    assert "qimem.builtin_plugins.sql.store" in graph["qimem.builtin_plugins.sql.backend"]


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_every_module_has_a_layer() -> None:
    assert [m for m in sorted(_modules()) if _layer(m) is None] == []


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for module, targets in sorted(_graph().items()):
        mine = _layer(module)
        for target, line in sorted(targets.items()):
            theirs = _layer(target)
            if mine is None or theirs is None or theirs <= mine:
                continue
            if (module, target) in ALLOWED:
                continue
            wrong.append(
                f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), line {line}"
            )
    assert wrong == []
