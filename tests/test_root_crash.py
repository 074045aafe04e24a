"""Crash safety of root rotation (issue 18 part 4): SIGKILL at seeded points, on SQLite and
PostgreSQL stores, in the style of tests/test_crash_safety.py (tests/crash_harness.py).

A python child runs :func:`qimem.root.rotation.rotate` on a store holding ~200 keys and
every kind of wrapped row, printing one line per SQL statement (``S``), per COMMIT (``C``)
and per progress line (``P ...``). It is SIGKILLed after the n-th line (two thirds of the
runs) or right after its k-th COMMIT (one third: the keyring's compare-and-set, a batch's
commit), n and k drawn from ``random.Random(seed/scenario/store/run)``. After each kill:

* every key still unwraps: every envelope made before decrypts, the signature and MAC
  verify, old tokens verify, logins (password, OTP) work, the realm's login settings open;
* ``qimem root status`` works;
* ``qimem root rotate`` resumes: when the killed run left a draining version it makes no
  new version, and it completes with no row left on an old version.

Seeds and run counts: ``QIMEM_CRASH_SEED`` / ``QIMEM_CRASH_RUNS`` (default 3 per store).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import root_helpers as rh
from crash_harness import Stats, describe, python_child, reproducible, run_rng, runs, sleep_precise

from qimem.rootkey import encode_root_key, generate_root_key

pytestmark = pytest.mark.slow

#: Keys besides the populated world's (each with one envelope to decrypt after each kill).
BULK_KEYS = 200

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import sqlalchemy as sa
    from qimem.app import build
    from qimem.config import Config
    from qimem.root import rotation

    job = json.loads(sys.argv[1])

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    app = build(Config(store_url=job["url"], root_key_b64=os.environ["QIMEM_ROOT_KEY"]), open=True)
    app.store
    say("ready")
    # One line per SQL statement and per COMMIT: the parent's kill points.
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", lambda *a: say("S"))
    sa.event.listen(sa.engine.Engine, "commit", lambda *a: say("C"))
    report = rotation.rotate(app, progress=lambda line: say("P " + line), settle=0.05)
    say("D " + json.dumps(report.to_json()))
    """
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path / 'store.db'}"
    return "postgres", str(request.getfixturevalue("postgres_url"))


def _kill_point(lines: list[str]) -> str:
    """Where the child was: before the new version, moving rows, retiring, or done."""
    point = "before-new-version"
    for line in lines:
        if line.startswith("P root version") or line.startswith("P resuming"):
            point = "moving"
        elif line.startswith("P retired"):
            point = "retired"
        elif line.startswith("D "):
            point = "completed"
    return point


def test_root_rotation_killed(
    store: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = store
    key = encode_root_key(generate_root_key())
    app = rh.env_app(url, key, monkeypatch)
    try:
        world = rh.populate(app, extra_keys=BULK_KEYS)
    finally:
        rh.close(app)
    config = rh.write_config(tmp_path, url)
    stats = Stats("root-rotation", name)
    try:
        for index in range(runs(3)):
            rng = run_rng("root-rotation", name, index)
            at_commit = rng.random() < 1 / 3
            kill_after = rng.randint(1, 6) if at_commit else rng.randint(1, 950)
            delay = rng.uniform(0, 0.002)
            mode = "commit" if at_commit else "lines"
            context = describe(
                "root-rotation", name, index, **{mode: kill_after}, delay=f"{delay:.6f}"
            )
            child = python_child(
                _CHILD, json.dumps({"url": url}), env=rh.cli_env(config, QIMEM_ROOT_KEY=key)
            )
            try:
                child.wait_ready()
                if at_commit:
                    commits = 0
                    while commits < kill_after and (line := child.readline()) is not None:
                        commits += line == "C"
                else:
                    child.read_lines(kill_after)
                sleep_precise(delay)
                child.kill()
                rc, err = child.finish()
            finally:
                child.close()
            with reproducible(context):
                point = _kill_point(child.lines)
                assert rc == -9 or point == "completed", (
                    f"child died by itself ({rc}): {err[-2000:]}"
                )
                outcome = _check_and_resume(url, key, config, world)
            stats.record(index, kill_point=point, outcome=outcome, mode=mode, n=kill_after)
    finally:
        stats.close()


def _check_and_resume(url: str, key: str, config: Path, world: rh.World) -> str:
    """The invariants after a kill, then a resumed rotation; returns the outcome."""
    app = rh.env_app(url, key)  # a fresh process' view of the store
    try:
        world.check(app)
        before = rh.versions_state(app)
    finally:
        rh.close(app)
    done = rh.qimem_cli(config, "root", "status", "--json", QIMEM_ROOT_KEY=key)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert {v["version"]: v["state"] for v in status["versions"]} == {
        v: s for v, (s, _) in before.items()
    }
    draining = [v for v, (s, _) in before.items() if s == "draining"]
    active = status["active"]
    done = rh.qimem_cli(config, "root", "rotate", "--json", QIMEM_ROOT_KEY=key)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    if draining:  # resumed: no new version while one is draining
        assert report["active"] == active and report["created"] is False, report
        assert "resuming" in done.stderr
        assert sorted(report["retired"]) == sorted(draining)
    else:
        assert report["active"] == active + 1 and report["created"] is True, report
    app = rh.env_app(url, key)
    try:
        counts = rh.count_rows(app)
        assert set(counts) == {report["active"]}, counts
        states = rh.versions_state(app)
        assert [s for _, (s, _) in sorted(states.items())][-1] == "active"
        assert all(s == "retired" for v, (s, _) in states.items() if v != report["active"])
        world.check(app)
    finally:
        rh.close(app)
    return "resumed" if draining else "rotated-again"
