"""The built-in ``pkcs11`` root-key provider: the root key is a non-extractable AES-256 key
inside a PKCS#11 token (an HSM, SoftHSM2), used for AES-GCM wrap and unwrap with
associated data. Registered by reference: ``python-pkcs11`` is imported only when a store's
root uses it (:mod:`qimem.builtin_plugins.root_pkcs11_provider`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qimem.hooks import hookimpl

if TYPE_CHECKING:
    from qimem.root.provider import RegisterRootKeyProvider


@hookimpl
def qimem_register_root_key_providers(register: RegisterRootKeyProvider) -> None:
    register(
        "pkcs11", "qimem.builtin_plugins.root_pkcs11_provider:Pkcs11RootKeyProvider.from_settings"
    )


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "root-pkcs11",
        "version": "1.0.0",
        "description": "Root key inside a PKCS#11 token (HSM, SoftHSM2), with python-pkcs11",
        "provides": {"root_key_providers": ["pkcs11"]},
        "qimem_api": ">=1,<2",
    }
