"""Static security checks (issue 8, item 6): ruff's bandit rules (``S``) run on the whole
package in CI (``ruff check .`` in ``.ci/run``), and every exception to them is documented
with a reason: each ``# noqa: S...`` in the package says why, and each ``S`` rule ignored
in ``pyproject.toml`` carries a comment."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ["qimem", "server", "hooks", "builtin_plugins"]
NOQA_S = re.compile(r"#\s*noqa:\s*(S\d{3}(?:\s*,\s*S\d{3})*)(.*)$")


def undocumented_noqa(text: str) -> list[tuple[int, str]]:
    """Lines with a ``# noqa: S...`` that gives no reason after the codes."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        match = NOQA_S.search(line)
        if match and len(match.group(2).strip(" -—:()")) < 8:
            found.append((number, line.strip()))
    return found


def test_bandit_rules_are_selected() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    assert "S" in config["tool"]["ruff"]["lint"]["select"]


def test_every_package_noqa_for_a_bandit_rule_gives_its_reason() -> None:
    missing = []
    for folder in PACKAGE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in undocumented_noqa(path.read_text("utf-8")):
                missing.append(f"{path.relative_to(REPO)}:{number}: {line}")
    assert missing == []


def test_the_noqa_check_catches_a_bare_exception() -> None:
    assert undocumented_noqa('x = "Bearer"  # noqa: S105\n') == [(1, 'x = "Bearer"  # noqa: S105')]
    assert undocumented_noqa("y = 1  # noqa: S104 - refused below\n") == []


def test_every_ignored_bandit_rule_is_commented_in_pyproject() -> None:
    lines = (REPO / "pyproject.toml").read_text("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ignore = ["))
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "]")
    for line in lines[start + 1 : end]:
        if re.search(r'"S\d{3}"', line):
            assert "#" in line and len(line.split("#", 1)[1].strip()) >= 8, line
