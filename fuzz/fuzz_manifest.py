"""Fuzz target: plugin manifests, as TOML (the packaged file) and as JSON (``POST
/v1/plugins``, ``.json`` files).

Contract checked for every input, through both parsers:

* :func:`qimem.manifest.parse_toml` (on UTF-8 input; :func:`~qimem.manifest.load` refuses
  other bytes first) and :func:`~qimem.manifest.parse_json` raise
  :class:`~qimem.manifest.ManifestError` or return a :class:`~qimem.manifest.Manifest`;
* a returned manifest survives the round trip through its dict, TOML and JSON forms
  unchanged, and its compatibility check answers (a bool, or
  :class:`~qimem.manifest.IncompatiblePluginError` exactly when the range excludes us).
"""

from __future__ import annotations

import json

import tomli_w
from _fuzzlib import check_typed

from qimem import manifest


def _check(found: manifest.Manifest) -> None:
    data = found.to_dict()
    assert manifest.validate(data) == found, "the dict form does not validate back"
    assert manifest.parse_toml(tomli_w.dumps(data)) == found, "TOML round trip changed it"
    assert manifest.parse_json(json.dumps(data)) == found, "JSON round trip changed it"
    compatible = found.compatible
    assert isinstance(compatible, bool)
    try:
        found.check_compatible()
    except manifest.IncompatiblePluginError:
        assert not compatible
    else:
        assert compatible


def test_one_input(data: bytes) -> None:
    """One fuzz input: a manifest document, tried as JSON and (if UTF-8) as TOML."""
    parsers = [lambda: manifest.parse_json(data, source="fuzz.json")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        parsers.append(lambda: manifest.parse_toml(text, source="fuzz.toml"))
    for parse in parsers:
        try:
            found = parse()
        except Exception as exc:
            check_typed(exc)
            assert isinstance(exc, manifest.ManifestError), type(exc).__name__
            assert exc.problems and all(isinstance(p, str) for p in exc.problems)
            continue
        _check(found)
