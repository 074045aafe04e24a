"""Fuzz target: envelope v1 bytes through the parser and the decrypt and rewrap services.

Contract checked for every input:

* :func:`qimem.envelope.parse` raises :class:`~qimem.errors.EnvelopeFormatError` or returns
  fields that re-encode to exactly the input (the encoding is deterministic);
* :func:`qimem.services.decrypt` (its cached fast path and its parsing slow path) raises a
  qimem error with a 4xx status, or returns a plaintext that, sealed again with the same
  key and nonce, gives exactly the input bytes: nothing but an authentic envelope opens;
* after a successful decrypt, :func:`qimem.services.rewrap` gives an envelope that opens to
  the same plaintext.
"""

from __future__ import annotations

from _fuzzlib import BY_KEY_ID, check_typed, open_app

from qimem import envelope as env
from qimem import services
from qimem.errors import EnvelopeFormatError

APP = open_app()


def _parse(data: bytes) -> env.Envelope | None:
    try:
        parsed = env.parse(data)
    except EnvelopeFormatError:
        return None
    assert parsed.header + parsed.ciphertext == data, "parse is not the inverse of the encoding"
    assert len(parsed.header) == env.header_size(len(parsed.nonce))
    assert parsed.key_version >= 1 and parsed.nonce
    assert env.LENGTH.unpack_from(parsed.header, env.PREFIX_SIZE + len(parsed.nonce))[0] == len(
        parsed.ciphertext
    )
    return parsed


def test_one_input(data: bytes) -> None:
    """One fuzz input: raw envelope bytes."""
    parsed = _parse(data)
    try:
        # Twice: the first call may fill the key cache, the second may take the fast path.
        opened = services.decrypt(APP, data)
        again = services.decrypt(APP, data)
    except Exception as exc:
        check_typed(exc)
        return
    assert again.plaintext == opened.plaintext and again.key_id == opened.key_id
    assert parsed is not None, "decrypt accepted bytes the parser refuses"
    key = BY_KEY_ID[opened.key_id]
    assert key.material is not None and not key.derived
    assert (parsed.key_id_str, parsed.key_version) == (key.key_id, key.version)
    algorithm = APP.registry.algorithm(key.algorithm)
    resealed = env.seal(
        algorithm, key.material, key.key_id, key.version, parsed.nonce, opened.plaintext
    )
    assert resealed == data, "a non-authentic envelope decrypted"
    moved = services.rewrap(APP, data)
    assert services.decrypt(APP, moved.envelope).plaintext == opened.plaintext
