"""The fuzz regression corpus, replayed through the fuzz targets themselves (no atheris).

Every file of ``fuzz/corpus/<target>/`` goes through the same ``test_one_input`` the
fuzzer runs (``fuzz/fuzz_<target>.py``), so each target's contract is checked on every
seed and every past crasher in the normal suite: only a qimem error with a 4xx status (or a
4xx HTTP answer with the JSON error body) or a verified correct result. The control tests
plant a non-typed exception, a 500 and a wrong plaintext and show the targets report them.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "fuzz"
TARGETS = ("envelope", "stream", "http_json", "manifest")


def target(name: str) -> ModuleType:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    import importlib

    return importlib.import_module(f"fuzz_{name}")


def corpus(name: str) -> list[Path]:
    return sorted(p for p in (FUZZ / "corpus" / name).iterdir() if p.is_file())


def test_corpus_is_small_and_has_every_target() -> None:
    files = [f for name in TARGETS for f in corpus(name)]
    assert all(len(corpus(name)) >= 10 for name in TARGETS)
    assert len(files) < 250 and sum(f.stat().st_size for f in files) < 1_000_000


@pytest.mark.parametrize("name", TARGETS)
def test_corpus_replays_clean(name: str) -> None:
    run = target(name).test_one_input
    failures = []
    for path in corpus(name):
        try:
            run(path.read_bytes())
        except Exception as exc:  # collect them all, then fail naming each
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def _seed(name: str, file: str) -> bytes:
    return (FUZZ / "corpus" / name / f"seed-{file}").read_bytes()


def test_valid_seeds_really_succeed() -> None:
    """The seeds reach the success paths (and so the correctness checks), not only errors."""
    from qimem import services

    envelope = target("envelope")
    assert services.decrypt(envelope.APP, _seed("envelope", "fuzz-aes-v2-text")).plaintext == (
        b"attack at dawn"
    )
    stream_target = target("stream")
    plain = stream_target._sequential(_seed("stream", "chacha-v1-four"))
    assert plain is not None and len(plain[0]) == 64
    assert stream_target._positional(_seed("stream", "chacha-v1-four")) == plain[0]
    http = target("http_json")
    assert http.request(_seed("http_json", "02-encrypt")).status_code == 200
    assert http.request(_seed("http_json", "02-encrypt-scoped")).status_code == 200


# ---- controls: each kind of contract violation is reported ------------------------------


def _boom(exc: type[Exception]) -> Callable[..., object]:
    def raise_it(*args: object, **kwargs: object) -> object:
        raise exc("planted")

    return raise_it


def test_control_untyped_exception_in_the_envelope_parser_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qimem import envelope

    run = target("envelope").test_one_input
    monkeypatch.setattr(envelope, "parse", _boom(IndexError))
    with pytest.raises(IndexError, match="planted"):
        run(_seed("envelope", "truncated-body"))


def test_control_wrong_plaintext_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from qimem import services
    from qimem.services.crypto import DecryptResult

    module = target("envelope")
    real = services.decrypt

    def wrong(*args: object, **kwargs: object) -> DecryptResult:
        opened = real(*args, **kwargs)  # type: ignore[arg-type]
        return DecryptResult(opened.plaintext + b"!", opened.key_id, opened.version)

    monkeypatch.setattr(services, "decrypt", wrong)
    with pytest.raises(AssertionError, match="non-authentic"):
        module.test_one_input(_seed("envelope", "fuzz-aes-v2-text"))


def test_control_server_side_error_in_a_parser_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A typed error with a 5xx status is outside the contract too."""
    from qimem import stream
    from qimem.errors import PluginError

    run = target("stream").test_one_input
    monkeypatch.setattr(stream, "plaintext_size", _boom(PluginError))
    with pytest.raises(PluginError):
        run(_seed("stream", "aes-v2-two-and-a-half"))


def test_control_the_two_stream_paths_are_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    module = target("stream")
    monkeypatch.setattr(module, "_positional", lambda data: None)
    with pytest.raises(AssertionError, match="positional refused"):
        module.test_one_input(_seed("stream", "aes-v2-one-byte"))


def test_control_http_500_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from qimem.server import crypto

    run = target("http_json").test_one_input
    monkeypatch.setattr(crypto.ENCRYPT_SPEC, "parse", _boom(KeyError))
    with pytest.raises(AssertionError, match="500"):
        run(_seed("http_json", "02-encrypt"))


def test_control_manifest_round_trip_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from qimem import manifest

    run = target("manifest").test_one_input
    original = manifest.Manifest.to_dict
    monkeypatch.setattr(
        manifest.Manifest, "to_dict", lambda self: {**original(self), "version": "9"}
    )
    with pytest.raises(AssertionError, match="dict form"):
        run(_seed("manifest", "valid.json"))
    monkeypatch.setattr(manifest, "validate", _boom(TypeError))
    with pytest.raises(TypeError, match="planted"):
        run(_seed("manifest", "valid.toml"))


def test_regression_inputs_are_in_the_corpus() -> None:
    """The inputs of the bugs found writing the targets stay in the corpus (regress-*)."""
    names = {p.name for name in TARGETS for p in corpus(name)}
    assert {
        "regress-scoped-key-name-not-a-string",
        "regress-scoped-deeply-nested-body",
        "regress-import-deeply-nested-backup",
    } <= names
    assert {
        "regress-deeply-nested.json",
        "regress-deeply-nested.toml",
        "regress-version-backtracking.json",
    } <= names
    deep = (FUZZ / "corpus" / "http_json" / "regress-import-deeply-nested-backup").read_bytes()
    assert base64.b64decode(deep.split(b'"backup": "')[1].split(b'"')[0]).startswith(b"[[[")
