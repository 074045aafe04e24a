"""The executed-docs harness behind tests/test_docs.py: find the fenced blocks of a markdown
file, read the markers before them, and run each block in a per-document sandbox.

The marking scheme is documented at the top of tests/test_docs.py (and in README.md,
"Documentation"); this module implements it.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from serve_process import ServeProcess

REPO = Path(__file__).resolve().parent.parent
#: Every markdown file whose fenced blocks must run or be marked.
DOC_FILES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))]

#: Blocks of these languages run (each in its own way); any other block must be marked.
RUNNABLE = {"console", "bash", "sh", "python", "toml", "json"}
#: Seconds one shell command or script may take.
COMMAND_TIMEOUT = 60
#: Cheap Argon2 for the docs' users (appended to a config file ``qimem init`` wrote).
FAST_IDENTITY = "\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\n"

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*(illustrative|docs-test:)\s*(.*?)\s*-->\s*$")
_PLACEHOLDER = re.compile(r"(\w+\.\.\.|\.\.\.)")
_SERVE_LINE = re.compile(r"^\s*qimem serve\b(.*?)(?:\s+&)?\s*(?:#.*)?$")
#: An HTTP error status fails a documented curl call (its body is still shown).
_CURL_FAILS = 'curl() { command curl --fail-with-body "$@"; }'
_PIP_LINE = re.compile(r"^\s*pip install [^&;|]*(?:&&\s*)?")


@dataclass
class Block:
    """One fenced block: its file, first line (1-based, the fence), language and text."""

    path: str
    line: int
    lang: str
    text: str
    illustrative: bool = False
    #: The line of the closing fence.
    end: int = 0
    #: ``(key, value)`` pairs of the ``<!-- docs-test: KEY VALUE -->`` markers before it.
    directives: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(path: str) -> list[Block]:
    """Every fenced block of ``path`` (relative to the repository), with its markers: the
    HTML comment lines directly above its opening fence."""
    lines = (REPO / path).read_text("utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        found = _FENCE.match(lines[i])
        if not found:
            i += 1
            continue
        indent, fence, lang = found.group(1), found.group(2), found.group(3).lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        block = Block(path, i + 1, lang, "\n".join(body) + "\n", end=end + 1)
        k = i - 1
        markers = []
        while k >= 0 and (m := _MARKER.match(lines[k])):
            markers.append(m)
            k -= 1
        for m in reversed(markers):
            if m.group(1) == "illustrative":
                block.illustrative = True
            else:
                key, _, value = m.group(2).partition(" ")
                block.directives.append((key, value.strip()))
        blocks.append(block)
        i = end + 1
    return blocks


def output_matches(expected: str, actual: str, bindings: dict[str, str]) -> bool:
    """Whether ``actual`` matches ``expected`` line by line (trailing blanks ignored).

    ``...`` alone matches anything; ``WORD...`` (e.g. ``3f0c...``) matches one token and
    names it: the first match binds it (into ``bindings``), later uses must be equal, and
    commands get the bound value substituted (:func:`substitute`).
    """
    exp = "\n".join(line.rstrip() for line in expected.strip("\n").splitlines())
    act = "\n".join(line.rstrip() for line in actual.strip("\n").splitlines())
    pattern, names = [], []
    for part in _PLACEHOLDER.split(exp):
        if part == "...":
            pattern.append(r".*?")
        elif _PLACEHOLDER.fullmatch(part):
            if part in bindings:
                pattern.append(re.escape(bindings[part]))
            elif part in names:
                pattern.append(f"(?P=g{names.index(part)})")
            else:
                pattern.append(f"(?P<g{len(names)}>[^\\s'\"(),]+)")
                names.append(part)
        else:
            pattern.append(re.escape(part))
    found = re.fullmatch("".join(pattern), act, re.DOTALL)
    if not found:
        return False
    for index, name in enumerate(names):
        bindings[name] = found.group(f"g{index}")
    return True


def substitute(text: str, bindings: dict[str, str]) -> str:
    for name, value in sorted(bindings.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(name, value)
    return text


def console_commands(text: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` pairs of a console block (``$ `` prompts, ``\\``
    continuation lines)."""
    pairs: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise AssertionError(f"console line without a '$ ' prompt: {lines[i]!r}")
        command = [lines[i][2:]]
        while command[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        pairs.append(("\n".join(command), "\n".join(output)))
    return pairs


def is_qimem_config(doc: dict[str, object]) -> bool:
    known = {
        "store",
        "root_key",
        "plugins",
        "cache",
        "limits",
        "serve",
        "keys",
        "identity",
        "transit",
    }
    return bool(doc) and set(doc) <= known


def check_qimem_config(path: Path) -> None:
    """Load ``path`` with each of qimem's config loaders (the core, ``[serve]``, key
    lifecycle and identity tables); a bad value raises ``ConfigError``."""
    from qimem.cli.serve import serve_settings
    from qimem.config import load_config
    from qimem.identity.settings import load_settings as identity_settings
    from qimem.services.lifecycle import load_settings as lifecycle_settings

    config = load_config(path)
    serve_settings(config.serve, {})
    lifecycle_settings(path)
    identity_settings(path)


class DocSandbox:
    """One document's world: a temp ``QIMEM_HOME``, a working directory, shell variables
    carried from command to command, placeholder bindings, a Python namespace and at most
    one ``qimem serve`` (started on demand, on a free port, stopped by :meth:`close`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.work = root / "work"
        self.work.mkdir(parents=True)
        self.state = root / "shell-state.sh"
        self.cwd_file = root / "shell-cwd"
        self.cwd_file.write_text(str(self.work))
        self.state.write_text("")
        self.bindings: dict[str, str] = {}
        self.namespace: dict[str, object] = {"__name__": "__docs__"}
        self.server: ServeProcess | None = None
        #: The block that ran last and its output (a ``json`` block right after a shell
        #: block is that block's documented answer).
        self.last: tuple[Block, str] | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
        bindir = str(Path(sys.executable).parent)
        env.update(
            QIMEM_HOME=str(self.home),
            HOME=str(root),
            PATH=bindir + os.pathsep + env.get("PATH", ""),
        )
        env.pop("PYTHONPATH", None)  # the repository's qimem/ would shadow the installed one
        self.env = env

    # -- servers -------------------------------------------------------------------------

    def start_server(self, args: str) -> None:
        if self.server is not None:
            return
        words = shlex.split(args, comments=True)
        insecure = "--insecure-no-auth" in words
        words = [w for w in words if w != "--insecure-no-auth"]
        if "--port" in words:
            at = words.index("--port")
            del words[at : at + 2]
        env = self.current_env()
        self.server = ServeProcess(self.root, env, *words, insecure=insecure).wait_ready()
        self.bindings["127.0.0.1:8080"] = f"127.0.0.1:{self.server.port}"
        self.bindings["localhost:8080"] = f"localhost:{self.server.port}"
        self._export("URL", self.server.url)

    def current_env(self) -> dict[str, str]:
        """The environment the document's shell has now (its exports applied)."""
        dump = self.shell("env -0", strict=True).stdout
        return dict(item.split("=", 1) for item in dump.split("\0") if "=" in item)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # -- shell ---------------------------------------------------------------------------

    def _export(self, name: str, value: str) -> None:
        with self.state.open("a") as fh:
            fh.write(f"export {name}={shlex.quote(value)}\n")

    def prepare(self, text: str) -> str:
        """A shell text as the harness runs it: ``pip install`` commands dropped (the test
        runs the installed qimem), ``qimem serve`` lines replaced by the document's server,
        ``:8080`` replaced by its port, placeholders by their bound values."""
        kept = []
        for line in text.splitlines():
            serve = _SERVE_LINE.match(line)
            if serve:
                self.start_server(serve.group(1))
                continue
            kept.append(_PIP_LINE.sub("", line))
        return substitute("\n".join(kept), self.bindings)

    def shell(self, script: str, *, strict: bool) -> subprocess.CompletedProcess[str]:
        """Run ``script`` in bash with the document's variables and directory (both kept
        for the next command); stdout and stderr together."""
        opts = "set -euo pipefail" if strict else "set -o pipefail"
        wrapped = (
            f"{_CURL_FAILS}\nset -a\nsource {shlex.quote(str(self.state))}\n"
            f'cd "$(cat {shlex.quote(str(self.cwd_file))})"\n'
            f"{opts}\n{script}\n"
        )
        trailer = (
            f"__rc=$?; set +eu; export -p > {shlex.quote(str(self.state))}; "
            f"pwd > {shlex.quote(str(self.cwd_file))}; exit $__rc"
        )
        proc = subprocess.run(
            ["bash", "-c", f"trap {shlex.quote(trailer)} EXIT\n{wrapped}"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        self._fast_identity()
        return proc

    def _fast_identity(self) -> None:
        config = self.home / "config.toml"
        if config.exists() and "[identity]" not in config.read_text("utf-8"):
            with config.open("a") as fh:
                fh.write(FAST_IDENTITY)

    # -- block kinds ---------------------------------------------------------------------

    def run_block(self, block: Block) -> None:
        for key, value in block.directives:
            if key == "write":
                target = Path(self.cwd_file.read_text().strip()) / value
                target.write_text(block.text, "utf-8")
                continue
            if key == "file":
                same = (REPO / value).read_text("utf-8") == block.text
                assert same, f"{block.where}: the block differs from {value}"
                return
            if key == "serve":
                self.start_server(value)
            elif key == "before":
                proc = self.shell(self.prepare(value), strict=True)
                assert proc.returncode == 0, f"{block.where}: 'before' failed: {proc.stdout}"
            else:
                raise AssertionError(f"{block.where}: unknown marker 'docs-test: {key}'")
        runner = getattr(self, "_run_" + block.lang, None)
        if runner is None:
            raise AssertionError(
                f"{block.where}: a ```{block.lang or '(no language)'} block cannot run; "
                "mark it <!-- illustrative --> (see tests/test_docs.py)"
            )
        runner(block)
        if block.lang != "json":
            self.last = None

    def _run_console(self, block: Block) -> None:
        for command, expected in console_commands(block.text):
            proc = self.shell(self.prepare(command), strict=False)
            shown = expected.strip() != ""
            failing = "error:" in expected
            where = f"{block.where}: $ {command}"
            if proc.returncode != 0 and not failing:
                raise AssertionError(f"{where}\nexit {proc.returncode}:\n{proc.stdout}")
            if failing and proc.returncode == 0:
                raise AssertionError(f"{where}\nexpected a failure, got exit 0:\n{proc.stdout}")
            if shown and not output_matches(expected, proc.stdout, self.bindings):
                raise AssertionError(f"{where}\nexpected:\n{expected}\ngot:\n{proc.stdout}")

    def _run_bash(self, block: Block) -> None:
        # Run up to each ``qimem serve`` line, then start the server, then go on.
        chunks: list[list[str]] = [[]]
        for line in block.text.splitlines():
            if _SERVE_LINE.match(line):
                chunks.append([])
            chunks[-1].append(line)
        output = []
        for chunk in chunks:
            proc = self.shell(self.prepare("\n".join(chunk)), strict=True)
            output.append(proc.stdout)
            if proc.returncode != 0:
                raise AssertionError(f"{block.where}: exit {proc.returncode}:\n{proc.stdout}")
        self.last = (block, "".join(output))

    _run_sh = _run_bash

    def _run_python(self, block: Block) -> None:
        """Exec the block in the document's namespace, in its working directory (also on
        ``sys.path``, for modules a ``write`` marker put there); then call each ``test_*``
        function it defined that needs at most the ``tmp_path`` and ``monkeypatch``
        fixtures."""
        code = compile(block.text, block.where, "exec")
        work = Path(self.cwd_file.read_text().strip())
        before = os.getcwd()
        known = set(self.namespace)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(work)
            patch.setenv("QIMEM_HOME", str(self.home))
            patch.syspath_prepend(str(work))
            exec(code, self.namespace)  # noqa: S102 - the docs' own examples
            for name in sorted(set(self.namespace) - known):
                test = self.namespace[name]
                if not (name.startswith("test_") and callable(test)):
                    continue
                wanted = list(inspect.signature(test).parameters)
                if not set(wanted) <= {"tmp_path", "monkeypatch"}:
                    continue
                tmp = self.root / "pytest" / name
                tmp.mkdir(parents=True)
                with pytest.MonkeyPatch.context() as inner:
                    fixtures = {"tmp_path": tmp, "monkeypatch": inner}
                    test(**{arg: fixtures[arg] for arg in wanted})
        assert os.getcwd() == before

    def _run_toml(self, block: Block) -> None:
        doc = tomllib.loads(block.text)
        if is_qimem_config(doc):
            path = self.root / "config-check.toml"
            path.write_text(block.text)
            path.chmod(0o600)
            check_qimem_config(path)
        elif "qimem_api" in doc:
            from qimem import manifest

            manifest.parse_toml(block.text, source=block.where)

    def _run_json(self, block: Block) -> None:
        documented = json.loads(block.text)
        last, self.last = self.last, None
        if last is not None and last[0].end + 1 == block.line:
            actual = json.loads(last[1])
            problem = same_shape(documented, actual)
            assert problem is None, f"{block.where}: the answer above differs: {problem}\n{last[1]}"


def same_shape(documented: object, actual: object, where: str = "$") -> str | None:
    """``None`` if ``actual`` has the documented fields (recursively through objects and
    the first item of lists), else what differs. A documented ``"...": "..."`` entry means
    "more fields"; values are not compared (ids, nonces and times differ per run)."""
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return f"{where} is not an object"
        wanted = set(documented) - {"..."}
        if wanted - set(actual):
            return f"{where} lacks {sorted(wanted - set(actual))}"
        if "..." not in documented and set(actual) - wanted:
            return f"{where} has undocumented {sorted(set(actual) - wanted)}"
        for key in sorted(wanted):
            problem = same_shape(documented[key], actual[key], f"{where}.{key}")
            if problem:
                return problem
    elif isinstance(documented, list) and documented:
        if not isinstance(actual, list) or len(actual) < 1:
            return f"{where} is not a non-empty list"
        for index, item in enumerate(documented[: len(actual)]):
            problem = same_shape(item, actual[index], f"{where}[{index}]")
            if problem:
                return problem
    return None


def iter_blocks() -> Iterator[Block]:
    for path in DOC_FILES:
        yield from parse_blocks(path)
