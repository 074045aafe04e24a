"""Hook specifications for qimem plugins. Import as ``qimem.hooks.specs``.

Collecting hooks hand the plugin a ``register`` callback, so the host validates what it is
given, refuses duplicates and names the plugin at fault. Built-in plugins implement exactly
these hooks, the same way a third-party package does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qimem.hooks.markers import hookspec

if TYPE_CHECKING:
    from qimem.events import KeyEvent
    from qimem.registry import RegisterAlgorithm, RegisterAuthProvider, RegisterKeyStore
    from qimem.root.provider import RegisterRootKeyProvider


@hookspec
def qimem_register_algorithms(register: RegisterAlgorithm) -> None:
    """Add algorithms: AEADs, and (plugin API 1.2) signing, MAC and deterministic ones.

    Call ``register(algorithm)`` once per algorithm. An object without a ``purpose``
    attribute is an AEAD (purpose ``"encrypt"``, unchanged since plugin API 1.0) and must
    satisfy :class:`qimem.crypto.Algorithm`: ``name`` (e.g. ``"aes-256-gcm"``),
    ``algorithm_id`` (1-255, written into envelopes), ``key_size``, ``nonce_size``,
    ``tag_size``, and ``generate_key()``, ``encrypt(key, nonce, plaintext, aad)``,
    ``decrypt(key, nonce, ciphertext, aad)`` and ``cipher(key)``. An object whose
    ``purpose`` is ``"sign"``, ``"mac"`` or ``"deterministic"`` must satisfy
    :class:`qimem.crypto_purposes.SigningAlgorithm`, :class:`~qimem.crypto_purposes.MacAlgorithm`
    or :class:`~qimem.crypto_purposes.DeterministicAlgorithm`. Or call
    ``register("module:attr", name=..., algorithm_id=..., purpose=...)`` to have it imported
    on first use (``purpose`` defaults to ``"encrypt"``). Names and ids are unique across
    purposes; a duplicate name or id, an unknown purpose or a missing member raises
    :class:`qimem.errors.PluginError` naming this plugin.

    :param register: callback that records one algorithm.
    """


@hookspec
def qimem_register_keystores(register: RegisterKeyStore) -> None:
    """Add key store backends, selected by the scheme of the store URL.

    Call ``register(scheme, factory)``; ``factory(url, wrapper)`` returns a
    :class:`qimem.backend.Backend` (plugin API 1.1: the key store with its identity database
    factory, plugin catalog and migrations) or a bare :class:`qimem.keystore.KeyStore`
    (plugin API 1.0), which qimem wraps in a backend with no identity layer and an in-memory
    catalog. ``factory`` may be a ``"module:attr"`` reference. ``wrapper`` is the
    :class:`qimem.rootkey.KeyWrapper`
    a persistent store must use so key material is never stored in the clear. Schemes are
    matched exactly (``memory``, ``sqlite``, ``postgresql+psycopg`` ...); a duplicate scheme
    raises :class:`qimem.errors.PluginError`.

    :param register: callback that records one scheme and its factory.
    """


@hookspec
def qimem_register_auth_providers(register: RegisterAuthProvider) -> None:
    """Add login providers (the built-in ``password`` and ``ldap``, or your own).

    Call ``register(name, provider)`` once per provider; ``name`` is lowercase
    (``[a-z][a-z0-9_-]*``) and ``provider`` the object or a ``"module:attr"`` reference to
    it (a class is instantiated), imported when a login first asks it. A provider has
    ``authenticate(attempt) -> Authenticated | None`` (:mod:`qimem.identity.providers`):
    ``Authenticated(username, groups=..., claims=...)`` for right credentials, ``None``
    otherwise, or it raises ``ProviderUnavailableError`` when it cannot decide (503). It
    may have ``check_options(options) -> dict`` to validate a realm's options for it.
    A realm's password grant asks the providers its configuration names, in that order
    (``qauth realm set-providers``); qimem does lockout, the uniform refusal, role mapping,
    just-in-time users and the audit record. A duplicate name raises
    :class:`qimem.errors.PluginError`.

    :param register: callback that records one provider.
    """


@hookspec
def qimem_register_root_key_providers(register: RegisterRootKeyProvider) -> None:
    """Add root-key providers (the built-in ``file``, ``env``, ``pkcs11`` and ``qimem``,
    or your own, such as a cloud KMS).

    Call ``register(name, factory)`` once per provider; ``name`` is lowercase
    (``[a-z][a-z0-9_-]*``, at most 32 characters) and ``factory`` a callable or a
    ``"module:attr"`` reference to one, imported only when a store's root needs it.
    ``factory(settings, base_dir)`` returns a :class:`qimem.root.provider.RootKeyProvider`:
    ``wrap(key, context)``, ``unwrap(blob, context)`` (a tampered blob raises
    :class:`qimem.errors.DecryptionError`), ``describe()`` (the non-secret settings that
    reopen the same root secret, recorded with each root version) and ``close()``. A
    misconfigured or unreachable root secret raises :class:`qimem.errors.ConfigError`.
    ``[root_key] provider = "<name>"`` selects it; ``qimem.testing_rootkey.
    RootKeyProviderContract`` is the test suite every provider should pass. A duplicate
    name raises :class:`qimem.errors.PluginError`.

    :param register: callback that records one provider.
    """


@hookspec
def qimem_plugin_manifest() -> dict[str, Any] | None:
    """Describe this plugin.

    Return a mapping with at least ``name``, ``version``, ``description`` and ``provides``
    (a mapping of kind, such as ``"algorithms"``, to a list of names). Every plugin, built-in
    ones too, should implement it; ``qimem plugins list`` shows the result.
    """


@hookspec
def qimem_key_event(event: KeyEvent) -> None:
    """Observe a key lifecycle event (``created``, ``rotated`` ...) after it committed.

    For audit sinks and integrations. ``event`` carries metadata only, never key material.
    An exception raised here is logged with the plugin's name and does not undo the
    operation or stop other plugins from seeing the event.

    :param event: what happened, to which key version, in which realm.
    """
