"""A contract test suite for root-key providers (``qimem_register_root_key_providers``).

A root-key provider (:class:`qimem.root.provider.RootKeyProvider`) wraps and unwraps the
32-byte key-wrapping keys of a store's root versions under a root secret it holds. Every
built-in provider (``file``, ``env``, ``pkcs11``, ``qimem``) passes this suite, and a
plugin's provider can run exactly the same checks. It needs pytest
(``pip install 'qimem[test]'``).

Usage: subclass :class:`RootKeyProviderContract` (the name must start with ``Test``), set
:attr:`~RootKeyProviderContract.provider_name` to the name your plugin registers, and
provide a ``provider_settings`` fixture: the ``[root_key]`` settings (every key but
``provider``) that open a fresh root secret. The contract builds every provider *through
the plugin registry* from a ``plugin_manager`` fixture (default: qimem's built-in plugins;
override it to add yours), so your ``qimem_register_root_key_providers`` hook is tested
too::

    import pytest
    from qimem.registry import make_plugin_manager
    from qimem.testing_rootkey import RootKeyProviderContract


    class TestVaultTransitRoot(RootKeyProviderContract):
        provider_name = "vault-transit"

        @pytest.fixture
        def plugin_manager(self):
            return make_plugin_manager(["my-vault-plugin"])  # an installed plugin

        @pytest.fixture
        def provider_settings(self, vault):  # your fixture: a fresh transit key
            return {"address": vault.url, "key": vault.new_key(), "token_file": vault.token}

        @pytest.fixture
        def other_settings(self, vault):  # optional: another root secret
            return {"address": vault.url, "key": vault.new_key(), "token_file": vault.token}

        @pytest.fixture
        def secrets(self, vault):  # optional: strings that must never be shown
            return [vault.token_value]

Optional fixtures: ``other_settings`` (a different root secret; without it the check that
a blob does not cross roots is skipped), ``secrets`` (strings that must appear nowhere in
``describe()``, ``repr()`` or ``str()`` of the provider, nor in its exceptions),
``base_dir`` (where relative paths resolve; default ``tmp_path``). ``provider``,
``other_provider`` and ``reopen`` (a callable building the same provider again from
``provider.describe()``, the way qimem reopens a root version from the keyring) are built
from those; override them only if you must.

What it checks: 32-byte keys round trip (``unwrap`` returns a ``bytearray`` the caller
zeroes) and wrapping is randomized; a wrong context, every single-bit flip, every
truncation, extensions, an empty or a foreign blob are all
:class:`~qimem.errors.DecryptionError` (never another exception type); ``describe()`` is
JSON, holds no secret and reopens the same root after ``close()`` (durability); ``close()``
twice is harmless and does not break another instance; threads share one provider; the
``name`` attribute is the registered name; and end to end, an SQLite store whose root the
provider holds (``[root_key] provider = NAME``) creates, encrypts, reopens, decrypts, and
survives ``qimem root rotate`` onto the same provider.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from qimem.errors import DecryptionError
from qimem.registry import Registry, make_plugin_manager
from qimem.root.provider import KWK_SIZE, RootKeyProvider, kwk_context

__all__ = ["Reopen", "RootKeyProviderContract", "open_provider"]

#: ``reopen()``: a new provider built from ``provider.describe()`` through the registry.
Reopen = Callable[[], RootKeyProvider]

CONTEXT = kwk_context("contract-keyring", 1)


def open_provider(
    registry: Registry, name: str, settings: dict[str, Any], base_dir: Path
) -> RootKeyProvider:
    """Provider ``name`` built by the factory its plugin registered, as qimem builds it."""
    factory = registry.root_key_providers.get(name)
    known = sorted(registry.root_key_providers)
    assert factory is not None, f"no root-key provider {name!r} is registered (known: {known})"
    provider = factory(dict(settings), base_dir)
    assert isinstance(provider, RootKeyProvider), f"the {name!r} factory returned {provider!r}"
    return provider


class RootKeyProviderContract:
    """The behaviour every root-key provider must have (see the module docstring).

    Subclass it as ``TestSomething``, set :attr:`provider_name` and provide a
    ``provider_settings`` fixture.
    """

    #: The name the provider is registered under (``[root_key] provider``).
    provider_name: str = ""
    #: Threads sharing one provider in :meth:`test_threads_share_one_provider`.
    threads: int = 8
    #: Round trips per thread there.
    rounds: int = 10

    # -- fixtures ----------------------------------------------------------------------

    @pytest.fixture
    def plugin_manager(self) -> pluggy.PluginManager:
        """The plugin manager whose plugins register the provider (default: built-ins)."""
        return make_plugin_manager()

    @pytest.fixture
    def registry(self, plugin_manager: pluggy.PluginManager) -> Registry:
        return Registry(plugin_manager)

    @pytest.fixture
    def base_dir(self, tmp_path: Path) -> Path:
        """The configuration's directory (relative paths in settings resolve from it)."""
        return tmp_path

    @pytest.fixture
    def provider_settings(self) -> dict[str, Any]:
        """The ``[root_key]`` settings (but ``provider``) that open a fresh root secret."""
        pytest.fail(f"{type(self).__name__} needs a provider_settings fixture")

    @pytest.fixture
    def other_settings(self) -> dict[str, Any]:
        """Settings that open a *different* root secret (optional)."""
        pytest.skip(f"{type(self).__name__} has no other_settings fixture (another root)")

    @pytest.fixture
    def secrets(self) -> list[str]:
        """Strings that must never appear in describe(), reprs or error messages."""
        return []

    @pytest.fixture
    def provider(
        self, registry: Registry, provider_settings: dict[str, Any], base_dir: Path
    ) -> Iterator[RootKeyProvider]:
        assert self.provider_name, f"{type(self).__name__} must set provider_name"
        provider = open_provider(registry, self.provider_name, provider_settings, base_dir)
        yield provider
        provider.close()

    @pytest.fixture
    def other_provider(
        self, registry: Registry, other_settings: dict[str, Any], base_dir: Path
    ) -> Iterator[RootKeyProvider]:
        provider = open_provider(registry, self.provider_name, other_settings, base_dir)
        yield provider
        provider.close()

    @pytest.fixture
    def reopen(
        self, registry: Registry, provider: RootKeyProvider, base_dir: Path
    ) -> Iterator[Reopen]:
        """Builds the provider again from what ``describe()`` recorded (through JSON, as the
        keyring stores it); every provider made is closed after the test."""
        made: list[RootKeyProvider] = []

        def reopen() -> RootKeyProvider:
            settings = json.loads(json.dumps(provider.describe()))
            made.append(open_provider(registry, self.provider_name, settings, base_dir))
            return made[-1]

        yield reopen
        for other in made:
            other.close()

    # -- round trips -------------------------------------------------------------------

    def test_round_trip(self, provider: RootKeyProvider) -> None:
        for context in (CONTEXT, kwk_context("another-keyring", 7), b"", b"c" * 1000):
            for key in (os.urandom(KWK_SIZE), bytes(KWK_SIZE), b"\xff" * KWK_SIZE):
                blob = provider.wrap(key, context)
                assert isinstance(blob, bytes) and blob, "wrap must return non-empty bytes"
                assert key not in blob, "the wrapped blob holds the key in the clear"
                opened = provider.unwrap(blob, context)
                assert isinstance(opened, bytearray), "unwrap returns a bytearray to zero"
                assert bytes(opened) == key

    def test_wrap_is_randomized(self, provider: RootKeyProvider) -> None:
        key = os.urandom(KWK_SIZE)
        blobs = {provider.wrap(key, CONTEXT) for _ in range(3)}
        assert len(blobs) == 3, "wrapping one key twice gave the same blob (no random nonce)"

    # -- attacks -----------------------------------------------------------------------

    def test_wrong_context_is_refused(self, provider: RootKeyProvider) -> None:
        blob = provider.wrap(os.urandom(KWK_SIZE), CONTEXT)
        for context in (
            kwk_context("contract-keyring", 2),
            kwk_context("another-keyring", 1),
            b"",
            CONTEXT + b"\0",
            CONTEXT[:-1],
        ):
            with pytest.raises(DecryptionError):
                provider.unwrap(blob, context)

    def test_every_bit_flip_is_refused(self, provider: RootKeyProvider) -> None:
        blob = provider.wrap(os.urandom(KWK_SIZE), CONTEXT)
        for bit in range(len(blob) * 8):
            damaged = bytearray(blob)
            damaged[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(DecryptionError):
                provider.unwrap(bytes(damaged), CONTEXT)

    def test_truncated_extended_and_garbage_blobs_are_refused(
        self, provider: RootKeyProvider
    ) -> None:
        blob = provider.wrap(os.urandom(KWK_SIZE), CONTEXT)
        bad = [blob[:size] for size in range(len(blob))]  # b"" first
        bad += [blob + b"\0", blob + blob, blob + os.urandom(1 << 16)]
        bad += [os.urandom(size) for size in (1, 16, len(blob), 4096)]
        bad += [bytes(len(blob)), b"\xff" * len(blob)]
        for damaged in bad:
            with pytest.raises(DecryptionError):
                provider.unwrap(damaged, CONTEXT)

    def test_blob_of_another_root_is_refused(
        self, provider: RootKeyProvider, other_provider: RootKeyProvider
    ) -> None:
        key = os.urandom(KWK_SIZE)
        mine, theirs = provider.wrap(key, CONTEXT), other_provider.wrap(key, CONTEXT)
        with pytest.raises(DecryptionError):
            provider.unwrap(theirs, CONTEXT)
        with pytest.raises(DecryptionError):
            other_provider.unwrap(mine, CONTEXT)
        assert bytes(other_provider.unwrap(theirs, CONTEXT)) == key  # it works itself

    # -- settings and secrets ----------------------------------------------------------

    def test_describe_is_json_and_reveals_no_secret(
        self, provider: RootKeyProvider, secrets: list[str]
    ) -> None:
        described = provider.describe()
        assert isinstance(described, dict)
        text = json.dumps(described)  # JSON types only: it is stored in the keyring
        assert json.loads(text) == described
        assert "provider" not in described, "'provider' is the config's, not a setting"
        errors = []
        blob = provider.wrap(os.urandom(KWK_SIZE), CONTEXT)
        for damaged in (blob[:-1], b"", bytes([blob[0] ^ 1]) + blob[1:], blob + b"\0"):
            with pytest.raises(DecryptionError) as info:
                provider.unwrap(damaged, CONTEXT)
            errors += [str(info.value), repr(info.value)]
        shown = [text, repr(provider), str(provider), *errors]
        for secret in secrets:
            assert secret, "an empty string cannot be a secret"
            for where in shown:
                assert secret not in where, f"a secret is shown: {where[:200]!r}"

    def test_describe_reopens_the_same_root_after_close(
        self, provider: RootKeyProvider, reopen: Reopen
    ) -> None:
        key = os.urandom(KWK_SIZE)
        blob = provider.wrap(key, CONTEXT)
        provider.close()
        again = reopen()
        assert bytes(again.unwrap(blob, CONTEXT)) == key
        assert bytes(reopen().unwrap(again.wrap(key, CONTEXT), CONTEXT)) == key

    def test_close_is_harmless_twice_and_spares_other_instances(
        self, provider: RootKeyProvider, reopen: Reopen
    ) -> None:
        first, second = reopen(), reopen()
        key = os.urandom(KWK_SIZE)
        blob = first.wrap(key, CONTEXT)
        first.close()
        first.close()
        assert bytes(second.unwrap(blob, CONTEXT)) == key
        assert bytes(provider.unwrap(second.wrap(key, CONTEXT), CONTEXT)) == key

    def test_threads_share_one_provider(self, provider: RootKeyProvider) -> None:
        failures: list[BaseException] = []
        blobs: list[tuple[bytes, bytes]] = []
        start = threading.Barrier(self.threads)

        def work() -> None:
            try:
                start.wait()
                for _ in range(self.rounds):
                    key = os.urandom(KWK_SIZE)
                    blob = provider.wrap(key, CONTEXT)
                    assert bytes(provider.unwrap(blob, CONTEXT)) == key
                    blobs.append((key, blob))
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        workers = [threading.Thread(target=work) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not any(w.is_alive() for w in workers), "a thread hung"
        assert not failures, f"{len(failures)} thread(s) failed: {failures[0]!r}"
        for key, blob in blobs:  # another thread's blob opens too
            assert bytes(provider.unwrap(blob, CONTEXT)) == key

    # -- registration ------------------------------------------------------------------

    def test_registered_through_the_hook_under_its_name(
        self,
        provider: RootKeyProvider,
        plugin_manager: pluggy.PluginManager,
        provider_settings: dict[str, Any],
        base_dir: Path,
    ) -> None:
        assert provider.name == self.provider_name, "name must be the registered name"
        registry = Registry(plugin_manager)  # a fresh one: the hook is called again
        assert self.provider_name in registry.root_key_providers
        assert registry.root_key_provider_plugin(self.provider_name) != "?"
        built = open_provider(registry, self.provider_name, provider_settings, base_dir)
        try:
            key = os.urandom(KWK_SIZE)
            assert bytes(built.unwrap(provider.wrap(key, CONTEXT), CONTEXT)) == key
        finally:
            built.close()

    # -- end to end --------------------------------------------------------------------

    def test_store_end_to_end_with_root_rotation(
        self,
        provider: RootKeyProvider,
        plugin_manager: pluggy.PluginManager,
        provider_settings: dict[str, Any],
        base_dir: Path,
        tmp_path: Path,
    ) -> None:
        """An SQLite store whose root this provider holds: create a key, encrypt, reopen,
        decrypt; rotate the root onto the same provider; decrypt again."""
        from qimem import services
        from qimem.app import build
        from qimem.config import Config
        from qimem.root.rotation import rotate

        config = Config(
            store_url=f"sqlite:///{tmp_path / 'contract-store.db'}",
            root_key_provider=self.provider_name,
            root_key_settings=dict(provider_settings),
            path=base_dir / "config.toml",
        )
        with build(config, pm=plugin_manager) as app:
            services.create_key(app, name="contract")
            sealed = services.encrypt(app, "contract", b"held by the root", aad=b"a").envelope
            keyring = app.wrapper.keyring if app.wrapper is not None else None
            assert keyring is not None, "a provider-held root makes the store a keyring"
            record = keyring.active_version
            assert record.provider == self.provider_name and not record.direct
            assert json.loads(json.dumps(record.settings)) == record.settings
        with build(config, pm=plugin_manager) as app:
            assert services.decrypt(app, sealed, aad=b"a").plaintext == b"held by the root"
            report = rotate(app, settle=0.0)
            assert report.active == 2 and report.retired == [1]
            assert services.decrypt(app, sealed, aad=b"a").plaintext == b"held by the root"
            again = services.encrypt(app, "contract", b"after rotation", aad=b"a").envelope
        with build(config, pm=plugin_manager) as app:
            assert services.decrypt(app, sealed, aad=b"a").plaintext == b"held by the root"
            assert services.decrypt(app, again, aad=b"a").plaintext == b"after rotation"
            with pytest.raises(DecryptionError):
                services.decrypt(app, sealed, aad=b"b")
