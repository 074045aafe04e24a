"""Rotation is a compare-and-swap: concurrent rotations of one key_id yield one new version.

Threads (memory, SQLite, PostgreSQL) and separate OS processes (PostgreSQL and SQLite) rotate
the same key_id at the same moment; exactly one wins, the rest get KeyNotActiveError, the
versions stay contiguous and every earlier ciphertext still decrypts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import make_app

from qimem.app import AppContext
from qimem.errors import KeyNotActiveError
from qimem.keys import KeyState, KeyVersion
from qimem.services.crypto import decrypt, encrypt
from qimem.services.keys import create_key, rotate_key, show_key
from qimem.testing import run_concurrently

THREADS = 16
PROCESSES = 4


def _outcomes(results: list[object]) -> tuple[list[KeyVersion], list[KeyNotActiveError]]:
    winners = [r for r in results if isinstance(r, KeyVersion)]
    losers = [r for r in results if isinstance(r, KeyNotActiveError)]
    unexpected = [r for r in results if not isinstance(r, KeyVersion | KeyNotActiveError)]
    assert unexpected == [], f"unexpected outcomes: {unexpected!r}"
    return winners, losers


def _encrypt_some(app: AppContext, ref: str, tag: str, count: int = 3) -> dict[bytes, bytes]:
    messages = {f"{tag} message {i}".encode() * (i + 1): b"" for i in range(count)}
    for plaintext in messages:
        messages[plaintext] = encrypt(app, ref, plaintext, aad=tag.encode()).envelope
    return messages


def _assert_all_decrypt(app: AppContext, sealed: dict[str, dict[bytes, bytes]]) -> None:
    app.cache.clear()  # unwrap every version from the store again, after the rotations
    for tag, messages in sealed.items():
        for plaintext, envelope in messages.items():
            assert decrypt(app, envelope, aad=tag.encode()).plaintext == plaintext


def test_threads_rotate_same_key_id(any_app: AppContext) -> None:
    key = create_key(any_app, name="contended")
    sealed = {"before": _encrypt_some(any_app, key.key_id, "before")}

    results = run_concurrently(THREADS, lambda _: rotate_key(any_app, key.key_id))

    winners, losers = _outcomes(results)
    assert len(winners) == 1
    assert len(losers) == THREADS - 1
    winner = winners[0]
    assert winner.version == 2
    for loser in losers:
        assert loser.code == "key_not_active"
        assert winner.key_id in str(loser)  # names the version to use instead
    details = show_key(any_app, "contended")
    assert [(v.version, v.state) for v in details.versions] == [
        (1, KeyState.DECRYPT_ONLY),
        (2, KeyState.ACTIVE),
    ]
    _assert_all_decrypt(any_app, sealed)
    # The name now encrypts under version 2; the old key_id is refused, naming the new one.
    assert encrypt(any_app, "contended", b"after").version == 2
    with pytest.raises(KeyNotActiveError, match=winner.key_id):
        encrypt(any_app, key.key_id, b"after")


def test_repeated_rounds_stay_contiguous(any_app: AppContext) -> None:
    rounds, threads = 5, 8
    current = create_key(any_app, name="churn")
    sealed: dict[str, dict[bytes, bytes]] = {}
    for round_no in range(rounds):
        sealed[f"round {round_no}"] = _encrypt_some(any_app, "churn", f"round {round_no}", 2)
        target = current.key_id
        results = run_concurrently(threads, lambda _, t=target: rotate_key(any_app, t))
        winners, losers = _outcomes(results)
        assert len(winners) == 1, f"round {round_no}: {len(winners)} winners"
        assert len(losers) == threads - 1
        current = winners[0]
        assert current.version == round_no + 2
    versions = show_key(any_app, "churn").versions
    assert [v.version for v in versions] == list(range(1, rounds + 2))
    assert [v.active for v in versions] == [False] * rounds + [True]
    assert len({v.key_id for v in versions}) == rounds + 1
    _assert_all_decrypt(any_app, sealed)


# -- separate OS processes ------------------------------------------------------------------

# Each child opens the stores (through the plugin registry, as qimem does), reports "ready",
# waits for "go" on stdin so all children rotate at the same moment, then rotates the given
# key_id in each store and prints one JSON line with the outcomes.
_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from qimem.errors import QimemError
    from qimem.backend import Backend
    from qimem.registry import Registry, make_plugin_manager
    from qimem.rootkey import KeyWrapper, decode_root_key

    job = json.loads(sys.argv[1])
    wrapper = KeyWrapper(decode_root_key(job["root_key"], "test root key"))
    registry = Registry(make_plugin_manager())
    stores = []
    for target in job["targets"]:
        scheme = target["url"].split(":", 1)[0]
        store = Backend.of(registry.keystores[scheme](target["url"], wrapper), scheme).keys
        store.ping()
        stores.append((store, target["key_id"]))
    print("ready", flush=True)
    sys.stdin.readline()
    outcomes = []
    for store, key_id in stores:
        try:
            rotated = store.rotate("master", key_id, os.urandom(32))
            outcomes.append({"version": rotated.version, "key_id": rotated.key_id})
        except QimemError as exc:
            outcomes.append({"error": type(exc).__name__, "message": str(exc)})
    for store, _ in stores:
        store.close()
    print(json.dumps(outcomes), flush=True)
    """
)


def _rotate_in_processes(root_key_b64: str, targets: list[dict[str, str]]) -> list[list[dict]]:
    job = json.dumps({"root_key": root_key_b64, "targets": targets})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, job],
            # Not the repo root: its qimem/ folder would shadow the installed package.
            cwd=tempfile.gettempdir(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                proc.kill()
                raise AssertionError(f"child failed to start: {proc.communicate()[1][-2000:]}")
        for proc in procs:  # every child is waiting: release them together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        return outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.postgres
@pytest.mark.slow
def test_processes_rotate_same_key_id(postgres_url: str, tmp_path: Path, root_key_b64: str) -> None:
    urls = {"postgres": postgres_url, "sqlite": f"sqlite:///{tmp_path / 'shared.db'}"}
    # No key cache in this process: a rotation by another process is otherwise only seen
    # once the cache entry expires (cache.ttl_seconds, documented in qimem.keycache).
    apps = {name: make_app(url, root_key_b64, cache_ttl=0) for name, url in urls.items()}
    try:
        keys = {name: create_key(app, name="shared") for name, app in apps.items()}
        sealed = {name: {"mp": _encrypt_some(app, "shared", "mp")} for name, app in apps.items()}
        targets = [{"url": urls[name], "key_id": keys[name].key_id} for name in apps]

        outputs = _rotate_in_processes(root_key_b64, targets)

        for index, name in enumerate(apps):
            outcomes = [output[index] for output in outputs]
            won = [o for o in outcomes if "version" in o]
            lost = [o for o in outcomes if "error" in o]
            assert len(won) == 1, f"{name}: {outcomes}"
            assert won[0]["version"] == 2
            assert [o["error"] for o in lost] == ["KeyNotActiveError"] * (PROCESSES - 1)
            assert all(won[0]["key_id"] in o["message"] for o in lost)
            app = apps[name]
            versions = show_key(app, "shared").versions
            assert [(v.version, v.active) for v in versions] == [(1, False), (2, True)]
            assert versions[1].key_id == won[0]["key_id"]
            _assert_all_decrypt(app, sealed[name])
            # The version another process created encrypts and decrypts here too.
            fresh = encrypt(app, "shared", b"after the race")
            assert fresh.key_id == won[0]["key_id"]
            assert decrypt(app, fresh.envelope).plaintext == b"after the race"
    finally:
        for app in apps.values():
            app.close()
