"""Tink's HashiCorp Vault integration (``tink.integration.hcvault``, unchanged) against a
live ``qimem serve``'s Transit facade.

What Tink sends (tink 1.16, ``_hcvault_kms_aead.py``): hvac's ``encrypt_data`` /
``decrypt_data`` on ``<mount>/keys/<name>`` with ``context=''`` and no ``associated_data``;
its remote AEAD refuses non-empty associated data itself (hvac issue 1107). Associated
data therefore reaches Tink users through ``KmsEnvelopeAead``: the Vault key wraps a local
data key, and the data key's AEAD authenticates the associated data."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import tink
from hvac.exceptions import Forbidden, InvalidRequest
from tink import aead
from tink.integration import hcvault
from transit_helpers import World, transit_world

pytestmark = pytest.mark.slow

KEY_PATH = "transit/keys/tink-orders"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    aead.register()
    with transit_world(tmp_path_factory.mktemp("tink")) as world:
        world.client().secrets.transit.create_key("tink-orders")
        yield world


def remote(world: World, who: str = "crypto") -> aead.Aead:
    """Tink's Vault AEAD as an application builds it: an hvac client and a key path."""
    return hcvault.new_aead(KEY_PATH, world.client(who))


def envelope(world: World, who: str = "crypto") -> aead.Aead:
    return aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, remote(world, who))


def test_round_trip_and_the_ciphertext_is_vault_shaped(world: World) -> None:
    sealed = remote(world).encrypt(b"4111 1111 1111 1111", b"")
    assert sealed.startswith(b"vault:v1:")
    assert remote(world).decrypt(sealed, b"") == b"4111 1111 1111 1111"


def test_tink_and_hvac_read_each_others_ciphertexts(world: World) -> None:
    transit = world.client("crypto").secrets.transit
    from_tink = remote(world).encrypt(b"from tink", b"").decode()
    opened = transit.decrypt_data("tink-orders", from_tink)["data"]["plaintext"]
    assert base64.b64decode(opened) == b"from tink"
    plaintext = base64.b64encode(b"from hvac").decode()
    from_hvac = transit.encrypt_data("tink-orders", plaintext)["data"]["ciphertext"]
    assert remote(world).decrypt(from_hvac.encode(), b"") == b"from hvac"


def test_associated_data_through_the_envelope_aead(world: World) -> None:
    sealed = envelope(world).encrypt(b"card 4111", b"order-42")
    assert envelope(world).decrypt(sealed, b"order-42") == b"card 4111"
    with pytest.raises(tink.TinkError):
        envelope(world).decrypt(sealed, b"order-43")
    with pytest.raises(tink.TinkError):
        envelope(world).decrypt(sealed, b"")


def test_the_remote_aead_refuses_associated_data_before_any_request(world: World) -> None:
    # Tink's own rule, not qimem's: true of Vault as well.
    with pytest.raises(tink.TinkError, match="only allows empty associated data"):
        remote(world).encrypt(b"x", b"order-42")
    sealed = remote(world).encrypt(b"x", b"")
    with pytest.raises(tink.TinkError, match="only allows empty associated data"):
        remote(world).decrypt(sealed, b"order-42")


def test_a_ciphertext_under_associated_data_does_not_open_through_tink(world: World) -> None:
    transit = world.client("crypto").secrets.transit
    bound = transit.encrypt_data(
        "tink-orders",
        base64.b64encode(b"bound").decode(),
        associated_data=base64.b64encode(b"order-42").decode(),
    )["data"]["ciphertext"]
    with pytest.raises(tink.TinkError) as failure:
        remote(world).decrypt(bound.encode(), b"")
    assert isinstance(failure.value.args[0], InvalidRequest)  # Vault's 400, not a crash


def test_tampered_and_malformed_ciphertexts_are_tink_errors(world: World) -> None:
    sealed = remote(world).encrypt(b"secret", b"")
    raw = bytearray(base64.b64decode(sealed[len(b"vault:v1:") :]))
    raw[-1] ^= 1
    tampered = b"vault:v1:" + base64.b64encode(bytes(raw))
    for bad in (tampered, b"vault:v1:not base64!", b"garbage", b"vault:v99:" + sealed[9:]):
        with pytest.raises(tink.TinkError) as failure:
            remote(world).decrypt(bad, b"")
        assert isinstance(failure.value.args[0], InvalidRequest), bad


def test_a_token_without_decrypt_is_refused(world: World) -> None:
    sealed = remote(world).encrypt(b"secret", b"")
    with pytest.raises(tink.TinkError) as failure:
        remote(world, "reader").decrypt(sealed, b"")
    assert isinstance(failure.value.args[0], Forbidden)  # hvac's 403
    with pytest.raises(tink.TinkError):
        remote(world, "reader").encrypt(b"x", b"")
    with pytest.raises(tink.TinkError):
        envelope(world, "reader").decrypt(envelope(world).encrypt(b"y", b"a"), b"a")


def test_a_key_outside_the_token_scope_is_refused(world: World) -> None:
    # "scoped" may use team-* keys only; tink-orders is outside its scope.
    with pytest.raises(tink.TinkError) as failure:
        remote(world, "scoped").encrypt(b"x", b"")
    assert isinstance(failure.value.args[0], Forbidden)


def test_after_rotation_old_ciphertexts_still_decrypt(world: World) -> None:
    world.client().secrets.transit.create_key("tink-rotating")
    rotating = hcvault.new_aead("transit/keys/tink-rotating", world.client("crypto"))
    old = rotating.encrypt(b"before", b"")
    old_envelope = aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, rotating).encrypt(
        b"enveloped", b"ctx"
    )
    world.client("crypto").secrets.transit.rotate_key("tink-rotating")
    new = rotating.encrypt(b"after", b"")
    assert old.startswith(b"vault:v1:") and new.startswith(b"vault:v2:")
    assert rotating.decrypt(old, b"") == b"before"
    assert rotating.decrypt(new, b"") == b"after"
    reopened = aead.KmsEnvelopeAead(aead.aead_key_templates.AES256_GCM, rotating)
    assert reopened.decrypt(old_envelope, b"ctx") == b"enveloped"
