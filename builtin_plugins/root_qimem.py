"""The built-in ``qimem`` root-key provider ("auto-unseal"): key-wrapping keys are sealed by
a key on another qimem server, through its normal encrypt/decrypt API with a service
account's token. Registered by reference (:mod:`qimem.builtin_plugins.root_qimem_provider`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qimem.hooks import hookimpl

if TYPE_CHECKING:
    from qimem.root.provider import RegisterRootKeyProvider


@hookimpl
def qimem_register_root_key_providers(register: RegisterRootKeyProvider) -> None:
    register(
        "qimem", "qimem.builtin_plugins.root_qimem_provider:QimemRootKeyProvider.from_settings"
    )


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "root-qimem",
        "version": "1.0.0",
        "description": "Root key held by another qimem server (auto-unseal)",
        "provides": {"root_key_providers": ["qimem"]},
        "qimem_api": ">=1,<2",
    }
